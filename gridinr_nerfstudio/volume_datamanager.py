"""DataManager of stage 1: random positions inside the volume with trilinearly interpolated targets.

Training batches are points, not rays: positions drawn uniformly in the scene box (continuous, not only
voxel centres) with targets interpolated from the voxels. Early in training (the first
`subsample_fraction` of the iterations) positions are voxel centres of a strided sub-grid
(every `subsample_factor`-th voxel per axis), a cheap coarse pass that fits the low frequencies first;
after that, the full-resolution continuous sampling takes over.

Volumes that fit in `preload_max_bytes` are decoded into memory once (fast torch trilinear lookups);
larger ones are read through the memmap, touching only the 8 neighbours of each sample.
Eval images, the viewer and ns-eval go through nerfstudio's usual image datasets of reference renderings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Literal, Tuple, Type, Union

import numpy as np
import torch
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.datasets.base_dataset import InputDataset

from gridinr_nerfstudio.rendering import DenseGridField
from gridinr_nerfstudio.volume_dataparser import VolumeDataParserConfig
from gridinr_nerfstudio.volume_io import Volume


class VolumePointSampler:
    """Training positions and their target values for one volume (shared by the DataManager and the benchmark)."""

    def __init__(self, volume: Volume, aabb: torch.Tensor, device: Union[torch.device, str] = "cpu",
                 subsample_factor: int = 4, coarse_steps: int = 0, preload_max_bytes: int = 2 << 30, seed: int = 0):
        self.volume = volume
        self.aabb = aabb.float()
        self.device = device
        self.subsample_factor = subsample_factor
        self.coarse_steps = coarse_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.dense: DenseGridField | None = None
        if int(np.prod(volume.info.dims)) * 4 <= preload_max_bytes:
            normalized = torch.from_numpy(volume.normalized_array())
            self.dense = DenseGridField(normalized, torch.as_tensor(np.asarray(volume.half_size))).to(device)

    def coarse_phase(self, step: int) -> bool:
        """True while training on the strided sub-grid."""
        return self.subsample_factor > 1 and step < self.coarse_steps

    def sample_points(self, count: int, step: int) -> torch.Tensor:
        """World positions (count, 3): sub-grid voxel centres in the coarse phase, else uniform in the box."""
        dims = torch.tensor(self.volume.info.dims, dtype=torch.float32)
        if self.coarse_phase(step):
            stride = self.subsample_factor
            cells = torch.div(dims - 1, stride, rounding_mode="floor") + 1
            voxel = torch.floor(torch.rand(count, 3, generator=self.generator) * cells) * stride
            unit = voxel / (dims - 1).clamp(min=1)
        else:
            unit = torch.rand(count, 3, generator=self.generator)
        return self.aabb[0] + unit * (self.aabb[1] - self.aabb[0])

    def values_at(self, points: torch.Tensor) -> torch.Tensor:
        """Normalised voxel values (N,) trilinearly interpolated at world points."""
        if self.dense is not None:
            return self.dense(points.to(self.device))
        voxel = self.volume.world_to_voxel(points.cpu().numpy())
        return torch.from_numpy(self.volume.sample_normalized(voxel)).to(self.device)

    def batch(self, count: int, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(points (count, 3), values (count,)) on the sampler's device."""
        points = self.sample_points(count, step)
        return points.to(self.device), self.values_at(points)


@dataclass
class VolumeDataManagerConfig(VanillaDataManagerConfig):
    """Random point batches from a volume (stage 1) plus reference images for eval and the viewer."""

    _target: Type = field(default_factory=lambda: VolumeDataManager)
    dataparser: VolumeDataParserConfig = field(default_factory=VolumeDataParserConfig)
    batch_size: int = 1 << 16
    """Points per training batch."""
    subsample_factor: int = 4
    """Stride of the voxel sub-grid used early in training (1 disables the coarse phase)."""
    subsample_fraction: float = 0.1
    """Fraction of `max_iterations` spent on the strided sub-grid before full-resolution sampling."""
    max_iterations: int = 3000
    """Total training iterations (ns-train sets it to --max-num-iterations; used for the coarse phase length)."""
    preload_max_bytes: int = 2 << 30
    """Volumes whose float32 copy is at most this size are held in memory; larger ones stay memory-mapped."""
    seed: int = 0
    """Seed of the point sampler."""


class VolumeDataManager(VanillaDataManager[InputDataset]):
    """Point batches for training; nerfstudio image datasets for evaluation and the viewer."""

    config: VolumeDataManagerConfig

    def __init__(
        self,
        config: VolumeDataManagerConfig,
        device: Union[torch.device, str] = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ):
        super().__init__(config, device=device, test_mode=test_mode, world_size=world_size, local_rank=local_rank)
        self.volume: Volume = self.train_dataparser_outputs.metadata["volume"].volume
        self.aabb = self.train_dataparser_outputs.scene_box.aabb.float()
        # Not a registered submodule: the voxels it may hold must not end up in checkpoints.
        self.__dict__["sampler"] = VolumePointSampler(
            self.volume,
            self.aabb,
            device=device,
            subsample_factor=config.subsample_factor,
            coarse_steps=int(config.subsample_fraction * config.max_iterations),
            preload_max_bytes=config.preload_max_bytes,
            seed=config.seed + local_rank,
        )

    def setup_train(self):
        """Stage 1 trains on points: no training image loader or pixel sampler is needed."""

    def values_at(self, points: torch.Tensor) -> torch.Tensor:
        """Normalised voxel values (N,) trilinearly interpolated at world points."""
        return self.sampler.values_at(points)

    def next_train(self, step: int) -> Tuple[torch.Tensor, Dict]:
        """A batch of world positions and their target values."""
        self.train_count += 1
        points, values = self.sampler.batch(self.config.batch_size, step)
        return points, {"values": values}

    def get_train_rays_per_batch(self) -> int:
        return self.config.batch_size
