"""The time-varying part of a sequence field (`VolumeField` with several steps), per the `time_field` option.

Both map points in the unit cube (N, 3) at times (N,) in [0, 1] to features for the field's MLP, next to a shared
3-D grid's; the step times are k / (T - 1) and a time between two steps is a linear blend of the two steps'
features, so the field at a step's time is that step's fit and in between it moves from one to the other.

- `auto` (default): step grids up to `AUTO_STEP_GRIDS_MAX_STEPS` steps, the 4-D grid beyond;
- `step_grids`: one small 3-D grid per step (its table 1/(2T) of the field's, so parameters stay ~1.4x
  one step's field however many steps);
- `hash4d`: one 4-D hash grid (`fields/time_hash_grid.py`) whose table (half the field's) all steps share.
Measured side by side by `gridinr-bench sequence` (README, "Time-varying volumes"): step grids won on translation,
a travelling front, an advected field and fmri4d, the 4-D grid on rotation and growth. A deformation (offset) field
before a shared grid and K-Planes (nerfstudio's KPlanesEncoding) were measured too and lost on every sequence, so
they are not options (README gives their figures).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

TimeField = Literal["auto", "step_grids", "hash4d"]
TIME_FIELDS = ("step_grids", "hash4d")
AUTO_STEP_GRIDS_MAX_STEPS = 4
"""`auto`: step grids up to this many steps (ahead at 4 steps on 4 of 6 sequences), the 4-D grid beyond (ahead at 100
steps by 3.4 dB in 36% less time); steps between 4 and 100 are unmeasured."""


def resolve_time_field(time_field: str, num_steps: int) -> str:
    """The time field `auto` stands for at `num_steps` steps (others: themselves)."""
    if time_field != "auto":
        return time_field
    return "step_grids" if num_steps <= AUTO_STEP_GRIDS_MAX_STEPS else "hash4d"


def step_blend(times: torch.Tensor | float, num_steps: int, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower step (N,), weight of the next step (N,)) at `times` in [0, 1] (clamped)."""
    position = snap_to_steps(torch.as_tensor(times, dtype=torch.float32, device=device).clamp(0, 1).expand(count),
                             num_steps)
    low = position.floor().long().clamp(max=max(num_steps - 2, 0))
    return low, position - low


def snap_to_steps(times: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Position (N,) on the step axis (t * (T - 1)), snapped to the step where float rounding left it a hair off
    (2/3 * 3 = 1.9999999 in float32): a step's points must read that step alone, since Adam turns even a 1e-7
    share of their gradient into full-size updates of the neighbouring step's entries."""
    position = times * (num_steps - 1)
    nearest = position.round()
    return torch.where((position - nearest).abs() < 1e-4, nearest, position)


def blend_step_grids(grids: nn.ModuleList, unit_points: torch.Tensor, times: torch.Tensor | float) -> torch.Tensor:
    """Features (N, F) of per-step grids at `times`: step k's grid at its time, linear blends in between."""
    low, weight = step_blend(times, len(grids), unit_points.shape[0], unit_points.device)
    out = None
    for step, grid in enumerate(grids):
        share = torch.where(low == step, 1.0 - weight, torch.where(low + 1 == step, weight, 0.0))
        rows = (share > 0).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        features = grid(unit_points[rows]) * share[rows, None]
        if out is None:
            out = torch.zeros(unit_points.shape[0], features.shape[-1], dtype=features.dtype, device=features.device)
        out = out.index_add(0, rows, features)
    return out
