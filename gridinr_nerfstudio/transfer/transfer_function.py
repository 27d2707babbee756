"""Transfer functions: normalised value in [0, 1] -> (rgb, sigma), and ParaView colormap presets.

Colour is piecewise linear between colour nodes (a matplotlib colormap gives 256 evenly spaced nodes);
opacity is a piecewise-linear curve of ParaView-style opacities `a`, i.e. the opacity over one
`unit_distance` (see DESIGN.md), converted to extinction `sigma = -ln(1 - a) / unit_distance`.
Like VTK's volume mappers, colour and (opacity-corrected) sigma are sampled into one table of TABLE_SIZE
evenly spaced entries that is interpolated linearly: one grid_sample call, fast and differentiable
w.r.t. the values (sigma is thus exact at table entries and linear between them).

ParaView presets (import and export) are in `paraview.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_UNIT_DISTANCE = 2.0 / 127.0
"""One voxel of a 128-voxel longest axis in world units; pass the volume's own voxel size instead."""
TABLE_SIZE = 16 * 255 + 1
"""Table entries: 256-colour matplotlib nodes and multiples of 1/80 (0.05, 0.1, 0.25, ...) fall exactly on entries."""
MAX_OPACITY = 1.0 - 1e-6
"""Opacities are clamped below 1 so that sigma stays finite."""


class TransferFunction(nn.Module):
    """value in [0, 1] -> (rgb (..., 3), sigma (...)); `tf(field(points))` is a render sample_fn.

    Values outside [0, 1] get the end colours and opacities.
    """

    table: torch.Tensor
    positive_opacity_count: torch.Tensor

    def __init__(
        self,
        color_nodes: Sequence[float],
        colors: Sequence[Sequence[float]],
        opacity_points: Sequence[tuple[float, float]],
        unit_distance: float = DEFAULT_UNIT_DISTANCE,
    ) -> None:
        super().__init__()
        color_nodes_array = np.asarray(color_nodes, dtype=np.float64)
        colors_array = np.asarray(colors, dtype=np.float64)
        opacity_array = np.asarray(opacity_points, dtype=np.float64)
        if (
            color_nodes_array.ndim != 1
            or color_nodes_array.size < 1
            or colors_array.shape != (color_nodes_array.size, 3)
        ):
            raise ValueError(
                f"colour nodes {color_nodes_array.shape} and colours {colors_array.shape} must be (K,) and (K, 3)"
            )
        if opacity_array.ndim != 2 or opacity_array.shape[1] != 2 or opacity_array.shape[0] < 1:
            raise ValueError(
                f"opacity points must be a non-empty list of (value, opacity) pairs, got shape {opacity_array.shape}"
            )
        if np.any(np.diff(color_nodes_array) < 0) or np.any(np.diff(opacity_array[:, 0]) < 0):
            raise ValueError("colour nodes and opacity point values must be non-decreasing")
        if not (
            np.all((colors_array >= 0) & (colors_array <= 1))
            and np.all((opacity_array[:, 1] >= 0) & (opacity_array[:, 1] <= 1))
        ):
            raise ValueError("colours and opacities must lie in [0, 1]")
        if not unit_distance > 0:
            raise ValueError(f"unit_distance must be positive, got {unit_distance}")
        self.unit_distance = float(unit_distance)
        self.color_nodes, self.colors, self.opacity_points = color_nodes_array, colors_array, opacity_array
        positions = np.linspace(0.0, 1.0, TABLE_SIZE)
        opacity = np.interp(positions, opacity_array[:, 0], opacity_array[:, 1])
        table = np.stack(
            [
                *(np.interp(positions, color_nodes_array, colors_array[:, channel]) for channel in range(3)),
                sigma_from_opacity(opacity, self.unit_distance),
            ]
        )
        # (1, 4, 1, TABLE_SIZE): a one-row texture of (r, g, b, sigma) for grid_sample.
        self.register_buffer("table", torch.tensor(table, dtype=torch.float32)[None, :, None, :])
        # Number of entries with opacity > 0 before each entry, for exact visibility of value ranges.
        self.register_buffer("positive_opacity_count", count_before(torch.from_numpy(opacity > 0)))

    @classmethod
    def from_colormap(
        cls,
        colormap: str,
        opacity_points: Sequence[tuple[float, float]],
        unit_distance: float = DEFAULT_UNIT_DISTANCE,
        num_colors: int = 256,
    ) -> TransferFunction:
        """Colours from a named matplotlib colormap sampled at `num_colors` evenly spaced nodes."""
        import matplotlib  # here: the method entry points must not import matplotlib

        try:
            cmap = matplotlib.colormaps[colormap]
        except KeyError:
            raise ValueError(f"unknown matplotlib colormap {colormap!r}") from None
        nodes = np.linspace(0.0, 1.0, num_colors)
        return cls(nodes, cmap(nodes)[:, :3], opacity_points, unit_distance)

    @classmethod
    def ramp(
        cls, colormap: str, low: float, high: float, scale: float, unit_distance: float = DEFAULT_UNIT_DISTANCE
    ) -> TransferFunction:
        """Opacity 0 below `low`, rising linearly to `scale` at `high` and constant above (viewer control)."""
        if not (0.0 <= low <= high <= 1.0 and 0.0 <= scale <= 1.0):
            raise ValueError(
                f"ramp needs 0 <= low <= high <= 1 and 0 <= scale <= 1, got low={low}, high={high}, scale={scale}"
            )
        return cls.from_colormap(colormap, [(0.0, 0.0), (low, 0.0), (high, scale), (1.0, scale)], unit_distance)

    def forward(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rgb (..., 3), sigma (...)) of normalised values (...); rgb may be a non-contiguous view."""
        shape = values.shape
        coordinates = values.to(self.table.dtype).reshape(-1) * 2.0 - 1.0
        grid = torch.stack([coordinates, torch.zeros_like(coordinates)], dim=-1).view(1, 1, -1, 2)
        sampled = F.grid_sample(self.table, grid, mode="bilinear", padding_mode="border", align_corners=True).view(
            4, -1
        )
        return sampled[:3].t().reshape(*shape, 3), sampled[3].reshape(shape)

    def lookup_table(self) -> torch.Tensor:
        """The table (TABLE_SIZE, 4) of (r, g, b, sigma) at evenly spaced values in [0, 1] that `forward`
        interpolates linearly (what the fused ray marcher reads; see rendering/fused_march.py)."""
        return self.table[0, :, 0, :].t()

    def visible_in_range(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """Whether the opacity is > 0 anywhere in each value interval [low, high] (exact for the table)."""
        return visible_in_range(self.positive_opacity_count, low, high)


def sigma_from_opacity(opacity: np.ndarray, unit_distance: float) -> np.ndarray:
    """Extinction per world unit of ParaView opacities: -ln(1 - a) / unit_distance (a clamped below 1)."""
    return -np.log1p(-np.minimum(opacity, MAX_OPACITY)) / unit_distance


def count_before(visible: torch.Tensor) -> torch.Tensor:
    """(N + 1,) number of visible entries before each entry of a table of N, for `visible_in_range`."""
    visible = visible.long()
    return torch.cat([visible.new_zeros(1), visible.cumsum(0)])


def visible_in_range(count: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Whether a linearly interpolated table over [0, 1] is visible anywhere in each interval [low, high].

    `count` is `count_before(visible)` of the table's entries. A linear piece is visible somewhere in [low, high]
    iff an entry bracketing that interval is visible, so this is exact for the table (both tabulated transfer
    functions, the fixed one and the transfer MLP's, use it for empty-space skipping).
    """
    last = count.shape[0] - 2
    first_entry = (low.clamp(0.0, 1.0) * last).floor().long()
    last_entry = (high.clamp(0.0, 1.0) * last).ceil().long()
    return count[last_entry + 1] - count[first_entry] > 0
