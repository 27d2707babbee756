"""Empty-space skipping: min/max macrocells of a field, marked visible or not by the current transfer function."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gridinr_nerfstudio.rendering.field_functions import ValueFn


def _macrocell_reduce(values: torch.Tensor, cells: Sequence[int], reduce: Callable) -> torch.Tensor:
    """Reduce a lattice (Z, Y, X) whose end points lie on the box faces into cells (Cz, Cy, Cx).

    Cell c of an axis with D lattice points covers index range [c (D-1)/C, (c+1) (D-1)/C] and gets every
    lattice point from floor of the start to ceil of the end: all points trilinear interpolation may touch.
    """
    for dim, count in enumerate(cells):
        if count is None:  # axis left as it is
            continue
        size = values.shape[dim]
        edges = [index * (size - 1) / count for index in range(count + 1)]
        slices = []
        for cell in range(count):
            start, stop = int(edges[cell] // 1), -int(-edges[cell + 1] // 1)
            slices.append(reduce(values.narrow(dim, start, stop - start + 1), dim))
        values = torch.stack(slices, dim=dim)
    return values


class OccupancyGrid(nn.Module):
    """Coarse min/max macrocells of a field over a box; with a transfer function, which cells can be non-transparent.

    A cell is occupied when the transfer function's opacity is > 0 anywhere in [min, max] of the cell.
    Call `update(transfer_function)` whenever the transfer function changes. Points outside the box count
    as occupied (nothing is known there).
    """

    min_values: torch.Tensor
    max_values: torch.Tensor
    occupied: torch.Tensor
    aabb: torch.Tensor

    def __init__(self, min_values: torch.Tensor, max_values: torch.Tensor, aabb: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("min_values", min_values)
        self.register_buffer("max_values", max_values)
        self.register_buffer("aabb", torch.as_tensor(aabb, dtype=torch.float32, device=min_values.device))
        self.register_buffer("occupied", torch.ones_like(min_values, dtype=torch.bool))
        self.register_buffer("_lookup", self._padded_lookup(), persistent=False)
        self._occupied_share: float | None = None
        self._leap_levels: list[torch.Tensor] | None = None

    @classmethod
    def from_volume(
        cls, volume_normalized: torch.Tensor, half_size: torch.Tensor | Sequence[float], resolution: int = 32
    ) -> OccupancyGrid:
        """Exact bounds of a DenseGridField's volume (Z, Y, X): `resolution` cells per axis, at most one per voxel."""
        volume = torch.as_tensor(volume_normalized, dtype=torch.float32)
        half = torch.as_tensor(half_size, dtype=torch.float32, device=volume.device)
        cells = [max(1, min(resolution, size - 1)) for size in volume.shape]
        return cls(
            _macrocell_reduce(volume, cells, torch.amin),
            _macrocell_reduce(volume, cells, torch.amax),
            torch.stack([-half, half]),
        )

    @classmethod
    @torch.no_grad()
    def from_slabs(
        cls, read_slab: Callable[[int, int], torch.Tensor], shape: Sequence[int],
        half_size: torch.Tensor | Sequence[float], resolution: int = 32, max_chunk_voxels: int = 1 << 23,
    ) -> OccupancyGrid:
        """The same bounds as `from_volume` for a volume (Z, Y, X) read by `read_slab(z0, z1)` in z-slabs of at most
        `max_chunk_voxels` (at least one slice), so that a memory-mapped volume is never loaded whole."""
        depth, height, width = (int(n) for n in shape)
        half = torch.as_tensor(half_size, dtype=torch.float32)
        cells = [max(1, min(resolution, size - 1)) for size in (depth, height, width)]
        per_read = max(1, max_chunk_voxels // max(height * width, 1))
        edges = [index * (depth - 1) / cells[0] for index in range(cells[0] + 1)]
        lows, highs = [], []
        for cell in range(cells[0]):
            start, stop = int(edges[cell] // 1), -int(-edges[cell + 1] // 1) + 1
            low = high = None
            for z0 in range(start, stop, per_read):
                slab = torch.as_tensor(read_slab(z0, min(stop, z0 + per_read)), dtype=torch.float32)
                slab_low = _macrocell_reduce(slab, [None, cells[1], cells[2]], torch.amin).amin(dim=0)
                slab_high = _macrocell_reduce(slab, [None, cells[1], cells[2]], torch.amax).amax(dim=0)
                low = slab_low if low is None else torch.minimum(low, slab_low)
                high = slab_high if high is None else torch.maximum(high, slab_high)
            lows.append(low)
            highs.append(high)
        return cls(torch.stack(lows), torch.stack(highs), torch.stack([-half, half]))

    @classmethod
    @torch.no_grad()
    def from_field(
        cls, value_fn: ValueFn, aabb: torch.Tensor, resolution: int = 32, samples_per_cell: int = 4
    ) -> OccupancyGrid:
        """Bounds of any field (e.g. an INR) from its values on a lattice with `samples_per_cell` steps per cell edge.

        Approximate: a field may exceed its lattice values between lattice points.
        """
        aabb = torch.as_tensor(aabb, dtype=torch.float32)
        points_per_axis = resolution * samples_per_cell + 1
        axes = [
            torch.linspace(float(aabb[0, axis]), float(aabb[1, axis]), points_per_axis, device=aabb.device)
            for axis in range(3)
        ]
        z, y, x = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        points = torch.stack([x, y, z], dim=-1).view(-1, 3)
        values = torch.cat([value_fn(chunk).reshape(-1) for chunk in points.split(1 << 18)])
        values = values.view(points_per_axis, points_per_axis, points_per_axis).float()
        cells = [resolution] * 3
        return cls(_macrocell_reduce(values, cells, torch.amin), _macrocell_reduce(values, cells, torch.amax), aabb)

    @torch.no_grad()
    def update(self, transfer_function) -> OccupancyGrid:
        """Mark the cells where `transfer_function.visible_in_range(min, max)` (any object with that method)."""
        self.occupied = transfer_function.visible_in_range(self.min_values, self.max_values)
        self._lookup = self._padded_lookup()
        self._occupied_share = None
        self._leap_levels = None
        return self

    @torch.no_grad()
    def leap_levels(self, block: int = 4, max_levels: int = 4) -> list[torch.Tensor]:
        """The occupancy as a pyramid for the fused ray marcher's leaps, finest first: uint8 (Z, Y, X) CPU tensors,
        level k+1 marking blocks of `block`^3 level-k cells of which any is occupied (computed once per `update`)."""
        if self._leap_levels is None:
            levels = [self.occupied.to(device="cpu", dtype=torch.uint8).contiguous()]
            while len(levels) < max_levels and max(levels[-1].shape) > 1:
                coarse = F.max_pool3d(levels[-1][None, None].float(), block, ceil_mode=True)[0, 0]
                levels.append(coarse.to(torch.uint8).contiguous())
            self._leap_levels = levels
        return self._leap_levels

    def _padded_lookup(self) -> torch.Tensor:
        """Occupancy as a float texture (1, 1, Z+2, Y+2, X+2) framed by occupied cells that catch points outside."""
        return F.pad(self.occupied.float(), (1, 1, 1, 1, 1, 1), value=1.0)[None, None]

    @torch.no_grad()
    def is_occupied(self, points: torch.Tensor) -> torch.Tensor:
        """(M,) bool for world points (M, 3)."""
        cells_xyz = torch.tensor(self.occupied.shape[::-1], dtype=self._lookup.dtype, device=points.device)
        low, high = self.aabb[0].to(self._lookup), self.aabb[1].to(self._lookup)
        # Nearest lookup in the padded texture: its [-1, 1] spans the box grown by one cell on each side.
        scale = 2.0 * cells_xyz / ((high - low) * (cells_xyz + 2.0))
        grid = (points.to(self._lookup) - (low + high) / 2.0) * scale
        occupied = F.grid_sample(
            self._lookup, grid.view(1, 1, 1, -1, 3), mode="nearest", padding_mode="border", align_corners=False
        )
        return occupied.view(-1) > 0.5

    def occupied_fraction(self) -> float:
        """Share of the cells that are occupied (computed once per `update`)."""
        if self._occupied_share is None:
            self._occupied_share = float(self.occupied.float().mean())
        return self._occupied_share
