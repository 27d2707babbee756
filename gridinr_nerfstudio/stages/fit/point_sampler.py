"""`VolumePointSampler`: stage-1 training points and their targets, on any device, for one rank or many.

Two ways to pick points (`sampling`):

- ``"voxels"``: voxel centres, every voxel once per epoch in shuffled batches, with the voxel itself as the exact
  target. Each batch is sorted by voxel index, so the table rows of the dense fine levels are read nearly in order
  (the encoding's forward + backward cost ~40% less). `continuous_fraction` mixes continuous points into each
  batch (the last rows), so the INR also matches the trilinear volume between the centres, where ray samples fall.
- ``"continuous"``: positions uniform in the scene box with targets interpolated trilinearly from the voxels.

Early in training (the first `coarse_steps`) positions can instead be centres of a strided sub-grid.

**Residency is a constructor choice** (`resident`): the volume is uploaded to `device` and indices, shuffles,
positions and targets are made there from a generator on that device (a GPU's batches never cross the bus), or
the volume stays on the host (in memory when its float32 copy fits `preload_max_bytes`, else read through the
memmap) and batches are made on the CPU, then moved to `device`. Same code and rules either way; only where the
random stream lives differs, so a state saved on one kind of device resumes on that kind (`get_state`).

**One sampler for all ranks** (`shard`): every rank holds the same sampler (same seed) and draws the same global
batch of `world_size x count` points, of which it materialises only its own rows: the ranks' batches are disjoint
slices of one permutation and of one continuous-point stream. An epoch still visits every voxel once, whatever
the number of ranks; all ranks' states are equal, so the saved state is one state and a run resumes on any number
of ranks. Cost of that: each rank draws the random numbers of the whole global batch (not its voxels or targets).

**Evaluation batches** (`eval_batch`) come from a stream of their own: how often a run evaluates changes nothing
it trains on.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Literal, Tuple, Union

import torch

from gridinr_nerfstudio.data.volume_io import Volume
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.stages.fit.shuffle import FeistelPermutation

Sampling = Literal["voxels", "continuous"]
Residency = Literal["auto", "on", "off"]
RANDPERM_MAX_VOXELS = 1 << 24
"""Epochs over more voxels than this use a FeistelPermutation computed on the fly instead of a stored randperm
(64 MiB of int32 indices at most), so the sampler's memory does not grow with the volume."""
RESIDENT_MEMORY_SHARE = 0.25
"""With residency "auto", a volume (float32) up to this share of the GPU's memory is uploaded."""
EVAL_SEED_OFFSET = 1 << 32
"""The evaluation stream is seeded with the sampler's seed plus this (never a training seed)."""


def resident_fits(num_voxels: int, device: Union[torch.device, str]) -> bool:
    """True on a CUDA device whose total memory is at least 4x the volume's float32 copy."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return num_voxels * 4 <= RESIDENT_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory


def resident_chosen(resident: Residency, num_voxels: int, device: Union[torch.device, str]) -> bool:
    """Whether a sampler is made resident on `device`: "on", or "auto" and the volume fits (`resident_fits`)."""
    if resident not in ("auto", "on", "off"):
        raise ValueError(f"resident must be 'auto', 'on' or 'off', got {resident!r}")
    return resident == "on" or (resident == "auto" and resident_fits(num_voxels, device))


@dataclass(frozen=True)
class BatchShard:
    """This process's rows of each global batch: rank `rank` of `world_size` takes rows
    [rank * count, (rank + 1) * count) of the `world_size * count` drawn."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not one of {self.world_size} ranks")

    def rows(self, count: int) -> slice:
        return slice(self.rank * count, (self.rank + 1) * count)


class VolumePointSampler:
    """Training positions and their target values for one volume (see the module doc)."""

    def __init__(self, volume: Volume, aabb: torch.Tensor, device: Union[torch.device, str] = "cpu",
                 resident: bool = False, sampling: Sampling = "voxels", continuous_fraction: float = 0.0,
                 subsample_factor: int = 4, coarse_steps: int = 0, preload_max_bytes: int = 2 << 30, seed: int = 0,
                 shard: BatchShard = BatchShard()):
        if sampling not in ("voxels", "continuous"):
            raise ValueError(f"sampling must be 'voxels' or 'continuous', got {sampling!r}")
        if not 0.0 <= continuous_fraction < 1.0:
            raise ValueError(f"continuous_fraction must be in [0, 1) (sampling='continuous' is all-continuous), "
                             f"got {continuous_fraction}")
        self.volume = volume
        self.device = torch.device(device)  # where batches are handed out
        self.resident = bool(resident)
        self.work_device = self.device if self.resident else torch.device("cpu")  # where they are made
        self.sampling = sampling
        self.continuous_fraction = continuous_fraction
        self.subsample_factor = subsample_factor
        self.coarse_steps = coarse_steps
        self.shard = shard
        self.aabb = aabb.float().to(self.work_device)
        self.generator = torch.Generator(device=self.work_device).manual_seed(seed)
        self.eval_generator = torch.Generator(device=self.work_device).manual_seed(seed + EVAL_SEED_OFFSET)
        self.size: Tuple[int, int, int] = tuple(int(d) for d in volume.info.dims)  # (X, Y, Z)
        self.dims = torch.tensor(self.size, dtype=torch.int64, device=self.work_device)
        self.num_voxels = math.prod(self.size)
        self.epoch_order: torch.Tensor | FeistelPermutation | None = None  # this epoch's shuffle of the voxels
        self.epoch_position = 0
        self.epoch_seed_state: torch.Tensor | None = None  # generator state the epoch's shuffle was drawn from
        self.dense: DenseGridField | None = None  # the volume in memory (on the work device), else None: memmap
        if self.resident or self.num_voxels * 4 <= preload_max_bytes:
            self.dense = DenseGridField.from_volume(volume).to(self.work_device)

    # Random draws: every rank draws the global batch, each keeps its rows.
    def _uniform(self, count: int, generator: torch.Generator, sharded: bool = True) -> torch.Tensor:
        """(count, 3) uniform numbers in [0, 1): this rank's rows of a global draw (sharded), or all of them."""
        if not sharded:
            return torch.rand(count, 3, generator=generator, device=self.work_device)
        total = self.shard.world_size * count
        return torch.rand(total, 3, generator=generator, device=self.work_device)[self.shard.rows(count)]

    def coarse_phase(self, step: int) -> bool:
        """True while training on the strided sub-grid."""
        return self.subsample_factor > 1 and step < self.coarse_steps

    def batch_key(self, step: int) -> bool:
        """What `batch` takes from `step`: batches of steps with equal keys are drawn alike (PrefetchingSampler)."""
        return self.coarse_phase(step)

    def _flat(self, voxel: torch.Tensor) -> torch.Tensor:
        return voxel[:, 0] + self.dims[0] * (voxel[:, 1] + self.dims[1] * voxel[:, 2])

    def subgrid_indices(self, count: int) -> torch.Tensor:
        """Flat indices (count,) of random voxels of the strided sub-grid, sorted."""
        stride = self.subsample_factor
        cells = torch.div(self.dims - 1, stride, rounding_mode="floor") + 1
        voxel = torch.floor(self._uniform(count, self.generator) * cells).long() * stride
        return self._flat(voxel).sort().values

    def epoch_indices(self, count: int) -> torch.Tensor:
        """This rank's `count` flat voxel indices of the next global batch of a shuffled pass over all voxels (a new
        shuffle per epoch), sorted."""
        wanted_start, wanted_stop = self.shard.rank * count, (self.shard.rank + 1) * count
        chunks: List[torch.Tensor] = []
        drawn, total = 0, self.shard.world_size * count  # global rows handed out so far / in all
        while drawn < total:
            if self.epoch_order is None or self.epoch_position >= self.num_voxels:
                self.epoch_seed_state = self.generator.get_state()
                self.epoch_order = self._shuffle()
                self.epoch_position = 0
            take = min(total - drawn, self.num_voxels - self.epoch_position)
            start, stop = max(wanted_start, drawn), min(wanted_stop, drawn + take)  # this rank's rows in them
            if start < stop:
                chunks.append(self._epoch_slice(self.epoch_position + start - drawn, self.epoch_position + stop - drawn))
            self.epoch_position += take
            drawn += take
        return torch.cat(chunks).sort().values

    def _epoch_slice(self, start: int, stop: int) -> torch.Tensor:
        """Voxels at positions [start, stop) of this epoch's shuffle."""
        if isinstance(self.epoch_order, FeistelPermutation):
            return self.epoch_order(torch.arange(start, stop, dtype=torch.int64, device=self.work_device))
        return self.epoch_order[start:stop]

    def _shuffle(self) -> torch.Tensor | FeistelPermutation:
        """This epoch's order of the voxels: a stored randperm, or a permutation computed on the fly when large."""
        if self.num_voxels > RANDPERM_MAX_VOXELS:
            return FeistelPermutation(self.num_voxels, self.generator)
        # int32 sorts ~2x faster than int64
        return torch.randperm(self.num_voxels, generator=self.generator, dtype=torch.int32, device=self.work_device)

    def get_state(self) -> Dict[str, object]:
        """Where the sampler stands (a few kB: the epoch's shuffle is kept as the state it was drawn from); the same
        on every rank. `stream` names the kind of device the generator draws on."""
        return {"generator": self.generator.get_state(), "epoch_seed_state": self.epoch_seed_state,
                "epoch_position": self.epoch_position, "stream": self.work_device.type}

    def set_state(self, state: Dict[str, object]) -> None:
        """Continue from `get_state()`: the next batches are those the saved sampler would have drawn.

        A state drawn on another kind of device (a CUDA-resident run resumed on a CPU) cannot continue that stream:
        the sampler then starts a new epoch from its own seed, with a warning."""
        stream = state.get("stream", "cpu")  # states saved before residency was a choice: CPU samplers
        if stream != self.work_device.type:
            warnings.warn(f"the saved point sampler drew on {stream}, this one draws on {self.work_device.type}: "
                          "training continues with a new shuffle (batches differ from the uninterrupted run)")
            self.epoch_order, self.epoch_seed_state, self.epoch_position = None, None, 0
            return
        self.epoch_seed_state, self.epoch_order = state["epoch_seed_state"], None
        if self.epoch_seed_state is not None:
            self.generator.set_state(self.epoch_seed_state)
            self.epoch_order = self._shuffle()
        self.epoch_position = int(state["epoch_position"])
        self.generator.set_state(state["generator"])

    def voxel_batch(self, flat_index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(world positions (N, 3), exact normalised values (N,)) of voxel centres given by flat index (x fastest),
        on `device`."""
        flat_index = flat_index.to(self.work_device, torch.int64)
        size_x, size_y, _ = self.size
        voxel = torch.stack([flat_index % size_x, flat_index // size_x % size_y, flat_index // (size_x * size_y)], -1)
        unit = voxel.float() / (self.dims - 1).clamp(min=1).float()
        points = torch.addcmul(self.aabb[0], unit, self.aabb[1] - self.aabb[0])
        if self.dense is not None:
            values = self.dense.volume.view(-1)[flat_index]
        else:
            values = torch.from_numpy(self.volume.sample_normalized(voxel.numpy()))
        return points.to(self.device), values.to(self.device)

    def values_at(self, points: torch.Tensor) -> torch.Tensor:
        """Normalised voxel values (N,) trilinearly interpolated at world points, on `device`."""
        if self.dense is not None:
            return self.dense(points.to(self.work_device)).to(self.device)
        voxel = self.volume.world_to_voxel(points.cpu().numpy())
        return torch.from_numpy(self.volume.sample_normalized(voxel)).to(self.device)

    def _continuous(self, unit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        points = self.aabb[0] + unit * (self.aabb[1] - self.aabb[0])
        return points.to(self.device), self.values_at(points)

    def continuous_batch(self, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(world positions (count, 3) uniform in the box, trilinearly interpolated values (count,))."""
        return self._continuous(self._uniform(count, self.generator))

    def batch(self, count: int, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's (points (count, 3), values (count,)) of the global batch of `step`, on `device`.

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

    def eval_batch(self, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(points (count, 3), values (count,)) for an evaluation loss, from the evaluation stream: voxel centres
        drawn at random (and the same continuous share as training batches), or continuous points. Training
        batches and the state are untouched. Not sharded: evaluation runs once, not on every rank."""
        continuous = count if self.sampling == "continuous" else int(self.continuous_fraction * count)
        parts = []
        if count > continuous:
            flat = torch.randint(0, self.num_voxels, (count - continuous,), generator=self.eval_generator,
                                 device=self.work_device)
            parts.append(self.voxel_batch(flat.sort().values))
        if continuous > 0:
            parts.append(self._continuous(self._uniform(continuous, self.eval_generator, sharded=False)))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def make_point_sampler(volume: Volume, aabb: torch.Tensor, device: Union[torch.device, str] = "cpu",
                       resident: Residency = "auto", **kwargs) -> VolumePointSampler:
    """A `VolumePointSampler`, resident on `device` when `resident` is "on", or "auto" and the volume fits."""
    chosen = resident_chosen(resident, math.prod(volume.info.dims), device)
    return VolumePointSampler(volume, aabb, device=device, resident=chosen, **kwargs)
