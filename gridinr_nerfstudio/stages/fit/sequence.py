"""Training points of a sequence: every batch holds points of every selected step, each with its step's time.

With several ranks each step's sampler hands out this rank's rows of its global share (`BatchShard`), so the ranks
split every step's points as they split a single volume's.
"""

from __future__ import annotations

from typing import Tuple

import torch

from gridinr_nerfstudio.data.timesteps import step_times


class SequencePointSampler:
    """One point sampler per step (see `VolumePointSampler`); a batch splits evenly across the steps."""

    def __init__(self, samplers: list):
        self.samplers = samplers
        self.times = step_times(len(samplers)).tolist()
        self.dense = samplers[0].dense  # whether the steps are preloaded (all alike)

    def batch_key(self, step: int):
        """What `batch` takes from `step` (see `VolumePointSampler.batch_key`)."""
        return tuple(sampler.batch_key(step) for sampler in self.samplers)

    def batch(self, count: int, step: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(points (count, 3), values (count,), times (count,)) on the samplers' device."""
        return self._split(count, lambda sampler, share: sampler.batch(share, step))

    def eval_batch(self, count: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An evaluation batch of every step (see `VolumePointSampler.eval_batch`)."""
        return self._split(count, lambda sampler, share: sampler.eval_batch(share))

    def _split(self, count: int, draw) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        steps = len(self.samplers)
        shares = [count // steps + (index < count % steps) for index in range(steps)]
        points, values, times = [], [], []
        for sampler, time, share in zip(self.samplers, self.times, shares):
            if share == 0:
                continue
            step_points, step_values = draw(sampler, share)
            points.append(step_points)
            values.append(step_values)
            times.append(torch.full((step_points.shape[0],), time, device=step_points.device))
        return torch.cat(points), torch.cat(values), torch.cat(times)

    def get_state(self) -> dict:
        """Where every step's sampler stands (saved with checkpoints, see `VolumePointSampler.get_state`)."""
        return {"steps": [sampler.get_state() for sampler in self.samplers]}

    def set_state(self, state: dict) -> None:
        for sampler, step_state in zip(self.samplers, state["steps"]):
            sampler.set_state(step_state)

    def values_at(self, points: torch.Tensor) -> torch.Tensor:
        """Values of the first step (as for a single step)."""
        return self.samplers[0].values_at(points)
