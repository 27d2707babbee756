"""Error-weighted batches: a share of each stage-1 batch drawn where the field is still wrong.

Why: a uniform pass over the voxels spends most points where the field is already right (flat background, smooth
tissue); measured by `gridinr-bench sweep` (docs/cpu_profiles.md), drawing a quarter of each batch from the 8^3-voxel
blocks in proportion to their recent error gained 5.8 dB on a brain MRI at 60 s (with the coarse-to-fine schedule:
the best variant on all four volumes) but lost 1.7 dB on c60 alone, so it is an option
(`--pipeline.datamanager.error-weighted-fraction`), off by default.

Several ranks: the block errors are summed over the ranks after every step (one all-reduce of two floats per
block), so every rank holds the same averages and draws its rows of the same global batch, as the wrapped sampler
does (`BatchShard`).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from gridinr_nerfstudio import distributed
from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler


class ErrorWeightedSampler:
    """Wraps a single-volume sampler: `share` of each batch from voxel blocks (`block`^3) in proportion to a moving
    average of their squared error, the rest from the wrapped sampler.

    The errors come back through `report` after each step (every block starts at the first batch's mean, so unseen
    blocks are drawn as often as average ones). Points are voxel centres with exact targets, like voxel batches.
    The moving averages are part of the resumable state.
    """

    def __init__(self, sampler: VolumePointSampler, share: float, block: int = 8, decay: float = 0.2):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"error-weighted share must be in [0, 1), got {share}")
        self.sampler, self.share, self.block, self.decay = sampler, share, block, decay
        self.dims = sampler.dims.cpu()  # (X, Y, Z)
        self.blocks = torch.div(self.dims + block - 1, block, rounding_mode="floor")
        self.error = torch.ones(int(self.blocks.prod()), device=sampler.generator.device)
        self.started = False

    @property
    def generator(self) -> torch.Generator:
        return self.sampler.generator

    @property
    def aabb(self) -> torch.Tensor:
        return self.sampler.aabb

    def values_at(self, points: torch.Tensor) -> torch.Tensor:
        return self.sampler.values_at(points)

    def batch_key(self, step: int):
        return self.sampler.batch_key(step)

    def batch(self, count: int, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        drawn = int(self.share * count)
        points, values = self.sampler.batch(count - drawn, step)
        if drawn == 0:
            return points, values
        generator, device = self.sampler.generator, self.error.device
        shard = self.sampler.shard  # every rank draws the global batch's blocks and offsets, keeps its rows
        total, rows = shard.world_size * drawn, shard.rows(drawn)
        ids = torch.multinomial(self.error.clamp_min(1e-20), total, replacement=True, generator=generator)[rows]
        blocks, dims = self.blocks.to(device), self.dims.to(device)
        block = torch.stack([ids % blocks[0], ids // blocks[0] % blocks[1], ids // (blocks[0] * blocks[1])], dim=-1)
        offset = torch.floor(torch.rand(total, 3, generator=generator, device=device)[rows] * self.block).long()
        voxel = torch.minimum(block * self.block + offset, dims - 1)
        flat = (voxel[:, 0] + dims[0] * (voxel[:, 1] + dims[1] * voxel[:, 2])).sort().values
        extra_points, extra_values = self.sampler.voxel_batch(flat)
        return torch.cat([points, extra_points.to(points)]), torch.cat([values, extra_values.to(values)])

    def eval_batch(self, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The wrapped sampler's evaluation batch (errors play no part in evaluation)."""
        return self.sampler.eval_batch(count)

    @torch.no_grad()
    def report(self, points: torch.Tensor, squared_errors: torch.Tensor) -> None:
        """Fold the squared errors (N,) of points (N, 3) into their blocks' moving averages (with several ranks:
        the errors of every rank's points; every rank calls this once per step)."""
        device = self.error.device
        aabb, dims, blocks = self.sampler.aabb.to(device), self.dims.to(device), self.blocks.to(device)
        voxel = ((points.to(device) - aabb[0]) / (aabb[1] - aabb[0]) * (dims - 1)).round().long()
        block = torch.minimum(torch.div(voxel.clamp_min(0), self.block, rounding_mode="floor"), blocks - 1)
        ids = block[:, 0] + blocks[0] * (block[:, 1] + blocks[1] * block[:, 2])
        squared_errors = squared_errors.to(device, torch.float32)
        sums = torch.zeros_like(self.error).index_add_(0, ids, squared_errors)
        counts = torch.bincount(ids, minlength=self.error.numel()).float()
        if distributed.world_size() > 1:
            both = distributed.all_reduce_sum(torch.stack([sums, counts]))
            sums, counts = both[0], both[1]
        if not self.started:
            self.error.fill_(float(sums.sum() / counts.sum().clamp_min(1)))  # the first batch's mean
            self.started = True
        seen = counts > 0
        self.error[seen] = (1 - self.decay) * self.error[seen] + self.decay * sums[seen] / counts[seen]

    def get_state(self) -> Dict[str, object]:
        return {"inner": self.sampler.get_state(), "error": self.error.cpu().clone(), "started": self.started}

    def set_state(self, state: Dict[str, object]) -> None:
        self.sampler.set_state(state["inner"])
        self.error = state["error"].to(self.error.device).clone()
        self.started = bool(state["started"])
