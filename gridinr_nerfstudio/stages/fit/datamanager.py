"""DataManager of stage 1: training points inside the volume with their target values.

Training batches are points, not rays. Two ways to pick them (`sampling`):

- ``"voxels"``: voxel centres, every voxel once per epoch in shuffled batches, with the voxel itself as the exact
  target (an index, no interpolation). These are the points where the volume PSNR is measured and where renders
  read the field (its cache is decoded at the voxel centres). Each batch is sorted by voxel index so the table rows
  of the dense fine levels are read nearly in order: the encoding's forward + backward cost ~40% less, 20% more
  steps per second overall. Measured on c60, side by side for 60 s: 63.3 dB vs 57.4 dB with continuous sampling.
  `continuous_fraction` (default a quarter) mixes continuous points into each batch, so that the INR also
  matches the trilinear volume between the centres, where ray samples fall.
- ``"continuous"``: positions uniform in the scene box with targets interpolated trilinearly from the voxels.

Early in training (the first `subsample_fraction` of the iterations) positions can instead be voxel centres of a
strided sub-grid (every `subsample_factor`-th voxel per axis), a coarse pass meant to fit the low frequencies first.

Volumes that fit in `preload_max_bytes` are decoded into memory once (index and torch trilinear lookups);
larger ones are read through the memmap, touching only the voxels (or 8 neighbours) of each sample.
On CUDA the volume is uploaded and batches made there when it fits (stages/fit/device_sampler.py); otherwise this
sampler makes them on the host, one step ahead in a background thread, and they reach the GPU through pinned
buffers (stages/fit/prefetch.py, `prefetch`).
Eval images, the viewer and ns-eval go through nerfstudio's usual image datasets of reference renderings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Literal, Tuple, Type, Union

import torch
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.datasets.base_dataset import InputDataset

from gridinr_nerfstudio.data.dataparser import VolumeDataParserConfig
from gridinr_nerfstudio.data.volume_io import Volume
from gridinr_nerfstudio.device_defaults import resolve
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.stages.fit.sequence import SequencePointSampler
from gridinr_nerfstudio.stages.fit.shuffle import FeistelPermutation

Sampling = Literal["voxels", "continuous"]
RANDPERM_MAX_VOXELS = 1 << 24
"""Epochs over more voxels than this use a FeistelPermutation computed on the fly instead of a stored randperm
(64 MiB of int32 indices at most), so the sampler's memory does not grow with the volume."""


class VolumePointSampler:
    """Training positions and their target values for one volume (shared by the DataManager and the benchmark)."""

    def __init__(self, volume: Volume, aabb: torch.Tensor, device: Union[torch.device, str] = "cpu",
                 sampling: Sampling = "voxels", continuous_fraction: float = 0.0, subsample_factor: int = 4,
                 coarse_steps: int = 0, preload_max_bytes: int = 2 << 30, seed: int = 0):
        if sampling not in ("voxels", "continuous"):
            raise ValueError(f"sampling must be 'voxels' or 'continuous', got {sampling!r}")
        if not 0.0 <= continuous_fraction < 1.0:
            raise ValueError(f"continuous_fraction must be in [0, 1) (sampling='continuous' is all-continuous), "
                             f"got {continuous_fraction}")
        self.volume = volume
        self.aabb = aabb.float()
        self.device = device
        self.sampling = sampling
        self.continuous_fraction = continuous_fraction
        self.subsample_factor = subsample_factor
        self.coarse_steps = coarse_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.dims = torch.tensor(volume.info.dims, dtype=torch.int64)  # (X, Y, Z)
        self.num_voxels = int(self.dims.prod())
        self.epoch_order: torch.Tensor | FeistelPermutation | None = None  # this epoch's shuffle of the voxels
        self.epoch_position = 0
        self.epoch_seed_state: torch.Tensor | None = None  # generator state the epoch's shuffle was drawn from
        self.dense: DenseGridField | None = None
        if self.num_voxels * 4 <= preload_max_bytes:
            self.dense = DenseGridField.from_volume(volume).to(device)

    def coarse_phase(self, step: int) -> bool:
        """True while training on the strided sub-grid."""
        return self.subsample_factor > 1 and step < self.coarse_steps

    def batch_key(self, step: int) -> bool:
        """What `batch` takes from `step`: batches of steps with equal keys are drawn alike (PrefetchingSampler)."""
        return self.coarse_phase(step)

    def subgrid_indices(self, count: int) -> torch.Tensor:
        """Flat indices (count,) of random voxels of the strided sub-grid, sorted."""
        stride = self.subsample_factor
        cells = torch.div(self.dims - 1, stride, rounding_mode="floor") + 1
        voxel = torch.floor(torch.rand(count, 3, generator=self.generator) * cells).long() * stride
        return (voxel[:, 0] + self.dims[0] * (voxel[:, 1] + self.dims[1] * voxel[:, 2])).sort().values

    def epoch_indices(self, count: int) -> torch.Tensor:
        """The next `count` flat voxel indices of a shuffled pass over all voxels (a new shuffle per epoch), sorted."""
        chunks = []
        while count > 0:
            if self.epoch_order is None or self.epoch_position >= self.num_voxels:
                self.epoch_seed_state = self.generator.get_state()
                self.epoch_order = self._shuffle()
                self.epoch_position = 0
            stop = min(self.epoch_position + count, self.num_voxels)
            if isinstance(self.epoch_order, FeistelPermutation):
                chunk = self.epoch_order(torch.arange(self.epoch_position, stop, dtype=torch.int64))
            else:
                chunk = self.epoch_order[self.epoch_position : stop]
            self.epoch_position += chunk.numel()
            count -= chunk.numel()
            chunks.append(chunk)
        return torch.cat(chunks).sort().values

    def _shuffle(self) -> torch.Tensor | FeistelPermutation:
        """This epoch's order of the voxels: a stored randperm, or a permutation computed on the fly when large."""
        if self.num_voxels > RANDPERM_MAX_VOXELS:
            return FeistelPermutation(self.num_voxels, self.generator)
        return torch.randperm(self.num_voxels, generator=self.generator, dtype=torch.int32)  # int32 sorts ~2x faster

    def get_state(self) -> Dict[str, object]:
        """Where the sampler stands (a few kB: the epoch's shuffle is kept as the state it was drawn from)."""
        return {"generator": self.generator.get_state(), "epoch_seed_state": self.epoch_seed_state,
                "epoch_position": self.epoch_position}

    def set_state(self, state: Dict[str, object]) -> None:
        """Continue from `get_state()`: the next batches are those the saved sampler would have drawn."""
        self.epoch_seed_state, self.epoch_order = state["epoch_seed_state"], None
        if self.epoch_seed_state is not None:
            self.generator.set_state(self.epoch_seed_state)
            self.epoch_order = self._shuffle()
        self.epoch_position = int(state["epoch_position"])
        self.generator.set_state(state["generator"])

    def voxel_batch(self, flat_index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(world positions (N, 3), exact normalised values (N,)) of voxel centres given by flat index (x fastest)."""
        size_x, size_y = int(self.dims[0]), int(self.dims[1])
        voxel = torch.stack([flat_index % size_x, flat_index // size_x % size_y, flat_index // (size_x * size_y)], -1)
        unit = voxel.float() / (self.dims - 1).clamp(min=1).float()
        points = torch.addcmul(self.aabb[0], unit, self.aabb[1] - self.aabb[0]).to(self.device)
        if self.dense is not None:
            values = self.dense.volume.view(-1)[flat_index.to(self.device)]
        else:
            values = torch.from_numpy(self.volume.sample_normalized(voxel.numpy())).to(self.device)
        return points, values

    def values_at(self, points: torch.Tensor) -> torch.Tensor:
        """Normalised voxel values (N,) trilinearly interpolated at world points."""
        if self.dense is not None:
            return self.dense(points.to(self.device))
        voxel = self.volume.world_to_voxel(points.cpu().numpy())
        return torch.from_numpy(self.volume.sample_normalized(voxel)).to(self.device)

    def continuous_batch(self, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(world positions (count, 3) uniform in the box, trilinearly interpolated values (count,))."""
        unit = torch.rand(count, 3, generator=self.generator)
        points = self.aabb[0] + unit * (self.aabb[1] - self.aabb[0])
        return points.to(self.device), self.values_at(points)

    def batch(self, count: int, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(points (count, 3), values (count,)) on the sampler's device.

        With voxel sampling, the last floor(continuous_fraction * count) points are continuous ones.
        """
        if self.coarse_phase(step):
            return self.voxel_batch(self.subgrid_indices(count))
        if self.sampling == "continuous":
            return self.continuous_batch(count)
        continuous = int(self.continuous_fraction * count)
        points, values = self.voxel_batch(self.epoch_indices(count - continuous))
        if continuous == 0:
            return points, values
        extra_points, extra_values = self.continuous_batch(continuous)
        return torch.cat([points, extra_points]), torch.cat([values, extra_values])


@dataclass
class FitDataManagerConfig(VanillaDataManagerConfig):
    """Random point batches from a volume (stage 1) plus reference images for eval and the viewer."""

    _target: Type = field(default_factory=lambda: FitDataManager)
    dataparser: VolumeDataParserConfig = field(default_factory=VolumeDataParserConfig)
    batch_size: int = 0
    """Points per training batch; 0: the device's default (device_defaults.py: 2^16 on a CPU, 2^18 on CUDA)."""
    sampling: Sampling = "voxels"
    """Training positions: "voxels" (every voxel centre once per epoch, exact targets; what volume PSNR measures,
    63 dB vs 57 dB with "continuous" after 60 s on c60) or "continuous" (uniform in the box, trilinear targets).
    See the module doc."""
    continuous_fraction: float = 0.25
    """With sampling "voxels": share of each batch drawn at continuous positions (trilinear targets), so that the
    INR matches the volume between voxel centres too, where renders and users sample it. Measured on the built-in
    volume after 1000 iterations (image PSNR of the INR rendered at every sample / of its cache at the voxel
    centres): 0 -> 35.2 / 60.7 dB (500 it.), 0.25 -> 43.1 / 58.2 dB, 0.5 -> 45.2 / 55.7 dB. On fmri4d (24 slices)
    0.1 raised PSNR between centres from 25 to 40 dB for 3 dB less at the centres."""
    subsample_factor: int = 4
    """Stride of the voxel sub-grid used early in training (1 disables the coarse phase)."""
    subsample_fraction: float = 0.0
    """Fraction of `max_iterations` spent on the strided sub-grid before full-resolution sampling. 0 by default:
    on c60 a 10% coarse phase cost ~4 dB volume PSNR at 60 s (voxel sampling already fits low frequencies fast)."""
    max_iterations: int = 3000
    """Total training iterations (ns-train sets it to --max-num-iterations; used for the coarse phase length)."""
    preload_max_bytes: int = 2 << 30
    """Volumes whose float32 copy is at most this size are held in memory; larger ones stay memory-mapped."""
    seed: int = 0
    """Seed of the point sampler."""
    device_resident: Literal["auto", "on", "off"] = "auto"
    """Hold the volume on the training device and make every batch there (stages/fit/device_sampler.py): "auto"
    does so on CUDA when the float32 volume takes at most a quarter of the GPU's memory; "on" forces it (any
    device), "off" keeps the CPU sampler (memmap or in-memory volume, `preload_max_bytes`)."""
    error_weighted_fraction: float = 0.0
    """Share of each batch drawn from 8^3-voxel blocks in proportion to their recent squared error, which the
    pipeline reports after each step (stages/fit/error_sampling.py); 0: off (the default). One volume only (not a
    sequence); turns the prefetching thread off, which would draw a batch before the errors it depends on arrive.
    Measured in docs/cpu_profiles.md: +5.8 dB on a brain MRI at 60 s, -1.7 dB on c60."""
    prefetch: Literal["auto", "on", "off"] = "auto"
    """With the CPU sampler (volume not resident on the device): make the next batch in a background thread while
    the device trains on the current one, and copy batches through pinned host buffers with non_blocking
    (stages/fit/prefetch.py). "auto": on a CUDA device only; "on": on any device (no pinning without CUDA);
    "off": batches made in the training loop, as on a CPU. Same batches either way, resumes included."""


class FitDataManager(VanillaDataManager[InputDataset]):
    """Point batches for training; nerfstudio image datasets for evaluation and the viewer."""

    config: FitDataManagerConfig

    def __init__(
        self,
        config: FitDataManagerConfig,
        device: Union[torch.device, str] = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ):
        super().__init__(config, device=device, test_mode=test_mode, world_size=world_size, local_rank=local_rank)
        self.volume: Volume = self.train_dataparser_outputs.metadata["volume"].volume
        self.aabb = self.train_dataparser_outputs.scene_box.aabb.float()
        self.batch_size = resolve(config.batch_size, "batch_size", device)
        # device_sampler subclasses VolumePointSampler (defined here), hence the import at the point of use.
        from gridinr_nerfstudio.stages.fit.device_sampler import make_point_sampler, resident_chosen
        from gridinr_nerfstudio.stages.fit.prefetch import PrefetchingSampler

        volumes = self.train_dataparser_outputs.metadata["volumes"].volume  # the steps of a sequence (or one)
        if config.prefetch not in ("auto", "on", "off"):
            raise ValueError(f"prefetch must be 'auto', 'on' or 'off', got {config.prefetch!r}")
        resident = [resident_chosen(config.device_resident, math.prod(volume.info.dims), device) for volume in volumes]
        weighted = self.learns_from_errors = config.error_weighted_fraction > 0
        if weighted and len(volumes) > 1:
            raise ValueError("--pipeline.datamanager.error-weighted-fraction works on one volume, not a sequence of "
                             f"{len(volumes)} time steps")
        prefetch = not any(resident) and not weighted and (
            config.prefetch == "on" or (config.prefetch == "auto" and torch.device(device).type == "cuda"))
        samplers = [
            make_point_sampler(
                volume,
                self.aabb,
                device="cpu" if prefetch else device,  # batches made on the host, copied by PrefetchingSampler
                resident="on" if is_resident else "off",
                sampling=config.sampling,
                continuous_fraction=config.continuous_fraction,
                subsample_factor=config.subsample_factor,
                coarse_steps=int(config.subsample_fraction * config.max_iterations),
                preload_max_bytes=config.preload_max_bytes // len(volumes),
                seed=config.seed + local_rank + 1000 * index,
            )
            for index, (volume, is_resident) in enumerate(zip(volumes, resident))
        ]
        sampler = samplers[0] if len(samplers) == 1 else SequencePointSampler(samplers)
        if weighted:
            from gridinr_nerfstudio.stages.fit.error_sampling import ErrorWeightedSampler

            sampler = ErrorWeightedSampler(sampler, config.error_weighted_fraction)
        # Not a registered submodule: the voxels it may hold must not end up in checkpoints.
        self.__dict__["sampler"] = PrefetchingSampler(sampler, device) if prefetch else sampler

    def setup_train(self):
        """Stage 1 trains on points: no training image loader or pixel sampler is needed."""

    def values_at(self, points: torch.Tensor) -> torch.Tensor:
        """Normalised voxel values (N,) trilinearly interpolated at world points."""
        return self.sampler.values_at(points)

    def next_train(self, step: int) -> Tuple[torch.Tensor, Dict]:
        """A batch of world positions and their target values."""
        self.train_count += 1
        batch = self.sampler.batch(self.batch_size, step)
        if len(batch) == 3:  # a sequence: each point with its step's time
            points, values, times = batch
            return points, {"values": values, "times": times}
        points, values = batch
        return points, {"values": values}

    def report_errors(self, points: torch.Tensor, squared_errors: torch.Tensor) -> None:
        """The field's squared errors (N,) at a batch's points (N, 3), for error-weighted batches (else ignored)."""
        report = getattr(self.sampler, "report", None)
        if report is not None:
            report(points, squared_errors)

    def get_train_rays_per_batch(self) -> int:
        return self.batch_size

    def get_sampler_state(self) -> Dict[str, object]:
        """Saved with checkpoints by GridINRTrainer, so a resumed run draws the batches it would have drawn."""
        return self.sampler.get_state()

    def set_sampler_state(self, state: Dict[str, object]) -> None:
        self.sampler.set_state(state)
