"""The time-varying parts of a sequence field (`VolumeField` with several steps), one per `time_field` option.

Each maps points in the unit cube (N, 3) at times (N,) in [0, 1] to features for the field's MLP; the step times
are k / (T - 1) and a time between two steps is a linear blend of the two steps' features (or offsets), so the
field at a step's time is that step's fit and in between it moves smoothly from one to the other.

- `step_grids`: a shared 3-D grid plus one small 3-D grid per step (parameters grow with the steps);
- `hash4d`: a shared 3-D grid plus one 4-D hash grid (`fields/time_hash_grid.py`) whose table all steps share;
- `deform`: one 3-D grid read at x + offset(x, t), the offset from a small, coarse 4-D grid and a linear head that
  starts at zero (a deformation field before the lookup, as in D-NeRF/Nerfies, here on a grid);
- `kplanes`: K-Planes (nerfstudio's `KPlanesEncoding`: xy, xz, yz, xt, yt, zt planes multiplied) at three scales.
Measured side by side by `gridinr-bench sequence` (README, "Time-varying volumes").
"""

from __future__ import annotations

from typing import Literal

import torch
from nerfstudio.field_components.encodings import KPlanesEncoding
from torch import nn

from gridinr_nerfstudio.fields.time_hash_grid import TimeHashGrid

TimeField = Literal["hash4d", "step_grids", "deform", "kplanes"]
TIME_FIELDS = ("hash4d", "step_grids", "deform", "kplanes")


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


class DeformationOffsets(nn.Module):
    """offset(x, t) (N, 3) in unit-cube units: a coarse 4-D grid (one node per step) and a linear head at zero, so
    training starts from the undeformed shared grid."""

    def __init__(self, num_steps: int, backend: str = "auto", num_levels: int = 4, max_resolution: int = 32):
        super().__init__()
        self.grid = TimeHashGrid(num_steps, num_levels, 2, 18, 8, max_resolution, backend=backend)
        self.head = nn.Linear(self.grid.get_out_dim(), 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, unit_points: torch.Tensor, times: torch.Tensor | float) -> torch.Tensor:
        return self.head(self.grid(unit_points, times))


class MultiScaleKPlanes(nn.Module):
    """K-Planes at several spatial resolutions (time: one node per step), features concatenated over the scales."""

    def __init__(self, num_steps: int, resolutions=(64, 128, 256), components: int = 16):
        super().__init__()
        self.scales = nn.ModuleList(
            [KPlanesEncoding((r, r, r, max(num_steps, 2)), num_components=components, reduce="product")
             for r in resolutions])

    def get_out_dim(self) -> int:
        return sum(scale.get_out_dim() for scale in self.scales)

    def forward(self, unit_points: torch.Tensor, times: torch.Tensor | float) -> torch.Tensor:
        time = torch.as_tensor(times, dtype=unit_points.dtype, device=unit_points.device).clamp(0, 1)
        coords = torch.cat([unit_points, time.expand(unit_points.shape[0])[:, None]], dim=-1) * 2.0 - 1.0
        return torch.cat([scale(coords) for scale in self.scales], dim=-1)
