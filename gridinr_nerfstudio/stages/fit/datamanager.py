"""DataManager of stage 1: training points inside the volume with their target values.

Training batches are points, not rays, made by `VolumePointSampler` (stages/fit/point_sampler.py: voxel centres
once per epoch plus a continuous share, a strided coarse phase, resident on the device or on the host). Measured on
c60, side by side for 60 s: 63.3 dB with voxel sampling vs 57.4 dB with continuous sampling.

Volumes that fit in `preload_max_bytes` are decoded into memory once; larger ones are read through the memmap,
touching only the voxels (or 8 neighbours) of each sample. On CUDA the volume is uploaded and batches made there
when it fits (`device_resident`); otherwise batches are made on the host, one step ahead in a background thread,
and reach the GPU through pinned buffers (stages/fit/prefetch.py, `prefetch`).

Data-parallel runs: every rank builds the same samplers (same seeds) and takes its rows of each global batch
(`BatchShard`), so `batch_size` is per rank and a step trains on `world_size x batch_size` points.
Evaluation batches (`next_eval`) come from the samplers' evaluation stream; eval images, the viewer and ns-eval go
through nerfstudio's usual image datasets of reference renderings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Type, Union

import torch
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.datasets.base_dataset import InputDataset

from gridinr_nerfstudio import distributed
from gridinr_nerfstudio.data.dataparser import VolumeDataParserConfig
from gridinr_nerfstudio.data.volume_io import Volume
from gridinr_nerfstudio.device_defaults import resolve
from gridinr_nerfstudio.stages.fit.error_sampling import ErrorWeightedSampler
from gridinr_nerfstudio.stages.fit.point_sampler import BatchShard, Sampling, VolumePointSampler, resident_chosen
from gridinr_nerfstudio.stages.fit.prefetch import PrefetchingSampler
from gridinr_nerfstudio.stages.fit.sequence import SequencePointSampler


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
    """Fraction of the run's steps (--max-num-iterations) spent on the strided sub-grid before full-resolution
    sampling. 0 by default: on c60 a 10% coarse phase cost ~4 dB volume PSNR at 60 s (voxel sampling already fits
    low frequencies fast)."""
    preload_max_bytes: int = 2 << 30
    """Volumes whose float32 copy is at most this size are held in memory; larger ones stay memory-mapped."""
    seed: int = 0
    """Seed of the point sampler (the same on every rank: the ranks split one stream)."""
    device_resident: Literal["auto", "on", "off"] = "auto"
    """Hold the volume on the training device and make every batch there (stages/fit/point_sampler.py): "auto"
    does so on CUDA when the float32 volume takes at most a quarter of the GPU's memory; "on" forces it (any
    device), "off" makes batches on the host (memmap or in-memory volume, `preload_max_bytes`)."""
    error_weighted_fraction: float = 0.0
    """Share of each batch drawn from 8^3-voxel blocks in proportion to their recent squared error, which the
    pipeline reports after each step (stages/fit/error_sampling.py); 0: off (the default). One volume only (not a
    sequence); turns the prefetching thread off, which would draw a batch before the errors it depends on arrive.
    Measured in docs/cpu_profiles.md: +5.8 dB on a brain MRI at 60 s, -1.7 dB on c60. With several ranks the
    errors are summed over the ranks each step."""
    prefetch: Literal["auto", "on", "off"] = "auto"
    """With the CPU sampler (volume not resident on the device): make the next batch in a background thread while
    the device trains on the current one, and copy batches through pinned host buffers with non_blocking
    (stages/fit/prefetch.py). "auto": on a CUDA device only; "on": on any device (no pinning without CUDA);
    "off": batches made in the training loop, as on a CPU. Same batches either way, resumes included."""


class FitDataManager(VanillaDataManager[InputDataset]):
    """Point batches for training and evaluation losses; nerfstudio image datasets for evaluation and the viewer."""

    config: FitDataManagerConfig
    sampler: Union[VolumePointSampler, SequencePointSampler, ErrorWeightedSampler, PrefetchingSampler]
    """What `next_train` draws from (not a module: the voxels it may hold never enter checkpoints)."""
    error_sampler: Optional[ErrorWeightedSampler] = None
    """The error-weighted sampler the pipeline reports each step's errors to, when the option is on."""

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
        volumes = self.train_dataparser_outputs.metadata["volumes"].volume  # the steps of a sequence (or one)
        if config.prefetch not in ("auto", "on", "off"):
            raise ValueError(f"prefetch must be 'auto', 'on' or 'off', got {config.prefetch!r}")
        resident = [resident_chosen(config.device_resident, math.prod(volume.info.dims), device) for volume in volumes]
        weighted = config.error_weighted_fraction > 0
        if weighted and len(volumes) > 1:
            raise ValueError("--pipeline.datamanager.error-weighted-fraction works on one volume, not a sequence of "
                             f"{len(volumes)} time steps")
        prefetch = not any(resident) and not weighted and (
            config.prefetch == "on" or (config.prefetch == "auto" and torch.device(device).type == "cuda"))
        shard = BatchShard(distributed.rank(), distributed.world_size())  # global ranks: one stream for all machines
        self.point_samplers: List[VolumePointSampler] = [
            VolumePointSampler(
                volume,
                self.aabb,
                device="cpu" if prefetch else device,  # batches made on the host, copied by PrefetchingSampler
                resident=is_resident,
                sampling=config.sampling,
                continuous_fraction=config.continuous_fraction,
                subsample_factor=config.subsample_factor,
                preload_max_bytes=config.preload_max_bytes // len(volumes),
                seed=config.seed + 1000 * index,
                shard=shard,
            )
            for index, (volume, is_resident) in enumerate(zip(volumes, resident))
        ]
        points = self.point_samplers
        sampler = points[0] if len(points) == 1 else SequencePointSampler(points)
        if weighted:
            sampler = self.error_sampler = ErrorWeightedSampler(sampler, config.error_weighted_fraction)
        self.sampler = PrefetchingSampler(sampler, device) if prefetch else sampler

    @property
    def learns_from_errors(self) -> bool:
        """Whether the pipeline reports each step's errors (error-weighted batches)."""
        return self.error_sampler is not None

    def setup_train(self):
        """Stage 1 trains on points: no training image loader or pixel sampler is needed."""

    def get_training_callbacks(self, training_callback_attributes) -> list:
        """No callbacks; learns the run's length (--max-num-iterations, the one place it is set) for the coarse
        phase before the first batch."""
        coarse_steps = int(self.config.subsample_fraction * training_callback_attributes.trainer.config.max_num_iterations)
        for sampler in self.point_samplers:
            sampler.coarse_steps = coarse_steps
        return []

    def values_at(self, points: torch.Tensor) -> torch.Tensor:
        """Normalised voxel values (N,) trilinearly interpolated at world points."""
        return self.sampler.values_at(points)

    @staticmethod
    def _as_batch(drawn) -> Tuple[torch.Tensor, Dict]:
        if len(drawn) == 3:  # a sequence: each point with its step's time
            points, values, times = drawn
            return points, {"values": values, "times": times}
        points, values = drawn
        return points, {"values": values}

    def next_train(self, step: int) -> Tuple[torch.Tensor, Dict]:
        """This rank's batch of world positions and their target values."""
        self.train_count += 1
        return self._as_batch(self.sampler.batch(self.batch_size, step))

    def next_eval(self, step: int) -> Tuple[torch.Tensor, Dict]:
        """A batch of points for the evaluation loss, from the evaluation stream (training batches stay as they
        are, whatever --steps-per-eval-batch is)."""
        self.eval_count += 1
        return self._as_batch(self.sampler.eval_batch(self.batch_size))

    def report_errors(self, points: torch.Tensor, squared_errors: torch.Tensor) -> None:
        """The field's squared errors (N,) at a batch's points (N, 3), for error-weighted batches (else ignored)."""
        if self.error_sampler is not None:
            self.error_sampler.report(points, squared_errors)

    def get_train_rays_per_batch(self) -> int:
        return self.batch_size

    def get_sampler_state(self) -> Dict[str, object]:
        """Saved with checkpoints by GridINRTrainer, so a resumed run draws the batches it would have drawn (the same
        on every rank)."""
        return self.sampler.get_state()

    def set_sampler_state(self, state: Dict[str, object]) -> None:
        self.sampler.set_state(state)
