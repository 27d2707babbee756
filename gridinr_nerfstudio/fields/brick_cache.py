"""The INR decoded onto a lattice brick by brick, as ray samples first reach each brick, then read trilinearly.

Why: a dense volume (an MRI head) defeats empty-space skipping, so evaluating the INR at every ray sample costs one
hash-grid decode per sample, about twice a raw-voxel render on a CPU. Decoding the lattice instead costs one decode
per lattice point, in coherent order (neighbouring points hit the same table lines), only in bricks that rays
reach, and only once: bricks stay decoded across frames until the field changes (`clear`). Samples then cost what a
raw-voxel sample costs. Unlike the whole field cache decoded up front (`volume_field.decode_field_cache`), nothing
is decoded where no ray goes (empty space skipped by the occupancy grid, parts outside every view), and the first
frame does not wait for the whole lattice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gridinr_nerfstudio.fields.dense_grid import DenseGridField

UnitDecoder = Callable[[torch.Tensor], torch.Tensor]
"""Values (M,) of the field at points (M, 3) of the unit cube (x, y, z in [0, 1])."""


class BrickFieldCache(nn.Module):
    """A lattice of `grid_dims` (X, Y, Z) points spanning [-half_size, half_size], filled by `decode_unit` in bricks
    of `brick_size`^3 cells as `forward` meets them; values between lattice points are trilinear (DenseGridField).

    A brick holds its cells' corner points, so neighbouring bricks share a face of lattice points (decoded by
    whichever comes first, and again by the other: the same values). `decoded_points` counts decodes (benchmarks).
    Lookups carry no gradient to the field (a cache of a frozen or momentarily fixed field, like the field cache).
    """

    def __init__(self, decode_unit: UnitDecoder, grid_dims: Sequence[int], half_size: torch.Tensor | Sequence[float],
                 brick_size: int = 8, chunk_points: int = 1 << 18, device: torch.device | str = "cpu") -> None:
        super().__init__()
        dims_xyz = [int(n) for n in grid_dims]
        if len(dims_xyz) != 3 or min(dims_xyz) < 2:
            raise ValueError(f"BrickFieldCache needs at least 2 lattice points per axis, got {dims_xyz}")
        if brick_size < 1:
            raise ValueError(f"brick_size must be at least 1, got {brick_size}")
        self.decode_unit = decode_unit
        self.brick_size = brick_size
        self.chunk_points = chunk_points
        lattice = torch.full(dims_xyz[::-1], float("nan"), dtype=torch.float32, device=device)
        self.grid = DenseGridField(lattice, torch.as_tensor(half_size, dtype=torch.float32)).to(device)
        self.register_buffer("dims", torch.tensor(dims_xyz, device=device), persistent=False)  # (X, Y, Z)
        bricks = [-(-(n - 1) // brick_size) for n in dims_xyz]
        self.register_buffer("bricks", torch.tensor(bricks, device=device), persistent=False)  # (X, Y, Z)
        self.register_buffer("decoded", torch.zeros(bricks[::-1], dtype=torch.bool, device=device), persistent=False)
        corner = torch.arange(brick_size + 1, device=device)
        local = torch.stack(torch.meshgrid(corner, corner, corner, indexing="ij")[::-1], dim=-1).view(-1, 3)
        self.register_buffer("local_points", local, persistent=False)  # (x, y, z) offsets within a brick, z slowest
        self.decoded_points = 0
        self.probe_stride = max(1, brick_size // 2)

    @property
    def volume(self) -> torch.Tensor:
        """The lattice (Z, Y, X); NaN in bricks not decoded yet."""
        return self.grid.volume

    def clear(self) -> None:
        """Forget every decoded brick (the field changed)."""
        self.decoded.zero_()
        self.grid.volume.fill_(float("nan"))

    def decoded_fraction(self) -> float:
        return float(self.decoded.float().mean())

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Values (M,) at world points (M, 3) (x, y, z); 0 outside the box, as `DenseGridField`.

        Lattice points not decoded yet hold NaN, so a lookup touching any of them is NaN: only those points go
        through the brick index, their bricks are decoded and they are looked up again. A finite value read all
        eight of its corners from decoded bricks, so it is already the right one.
        """
        values = self.grid(points)
        stride = self.probe_stride
        while True:
            rows = values.isnan().nonzero().squeeze(-1)
            if rows.numel() == 0:
                return values
            again = points.index_select(0, rows)
            # Consecutive ray samples mostly share a brick: the bricks of every `stride`-th missing point find
            # nearly all, the next pass (every point) the rest. A pass over every point that finds no brick to
            # decode leaves NaN the field itself returned.
            if self.decode_bricks_of(again[::stride]) == 0 and stride == 1:
                return values
            values = values.index_put((rows,), self.grid(again))
            stride = 1

    @torch.no_grad()
    def brick_ids(self, points: torch.Tensor) -> torch.Tensor:
        """Flat index (M,) of the brick whose cells hold each world point (points outside: the nearest brick)."""
        lattice = (points.to(torch.float32) / self.grid.half_size + 1.0) * (0.5 * (self.dims - 1))
        cell = torch.minimum(lattice.floor().clamp_min(0).long(), self.dims - 2)
        brick = torch.div(cell, self.brick_size, rounding_mode="floor")
        return (brick[:, 2] * self.bricks[1] + brick[:, 1]) * self.bricks[0] + brick[:, 0]

    @torch.no_grad()
    def decode_bricks_of(self, points: torch.Tensor) -> int:
        """Decode the bricks `points` fall in that are not decoded yet; returns how many."""
        if points.shape[0] == 0:
            return 0
        wanted = torch.zeros_like(self.decoded).view(-1)
        wanted[self.brick_ids(points)] = True  # a scatter, not a sort (unique) of millions of ids
        missing = (wanted & ~self.decoded.view(-1)).nonzero().squeeze(-1)
        if missing.numel():
            self.decode_bricks(missing)
        return int(missing.numel())

    @torch.no_grad()
    def decode_bricks_at_cells(self, cells: torch.Tensor) -> int:
        """Decode the bricks holding lattice cells (M, 3) (x, y, z indices) that are not decoded yet; returns how
        many (the fused ray marcher reports the cells where it met undecoded values)."""
        if cells.shape[0] == 0:
            return 0
        brick = torch.div(cells.to(self.dims.device), self.brick_size, rounding_mode="floor")
        brick = torch.minimum(brick.clamp_min(0), self.bricks - 1)
        ids = (brick[:, 2] * self.bricks[1] + brick[:, 1]) * self.bricks[0] + brick[:, 0]
        wanted = torch.zeros_like(self.decoded).view(-1)
        wanted[ids] = True
        missing = (wanted & ~self.decoded.view(-1)).nonzero().squeeze(-1)
        if missing.numel():
            self.decode_bricks(missing)
        return int(missing.numel())

    @torch.no_grad()
    def decode_bricks(self, ids: torch.Tensor) -> None:
        """Evaluate the field at every lattice point of bricks `ids` (flat indices) and store the values."""
        bricks_x, bricks_y = int(self.bricks[0]), int(self.bricks[1])
        origin = torch.stack([ids % bricks_x, ids // bricks_x % bricks_y, ids // (bricks_x * bricks_y)], dim=-1)
        per_brick = self.local_points.shape[0]
        step = max(1, self.chunk_points // per_brick)
        scale = 1.0 / (self.dims - 1).to(torch.float32)
        lattice = self.grid.volume
        for start in range(0, ids.shape[0], step):
            corners = origin[start : start + step, None, :] * self.brick_size + self.local_points  # (b, P, 3)
            index = torch.minimum(corners, self.dims - 1).view(-1, 3)
            values = self.decode_unit(index.to(torch.float32) * scale)
            lattice[index[:, 2], index[:, 1], index[:, 0]] = values.to(lattice.dtype).clamp(0.0, 1.0)
            self.decoded_points += index.shape[0]
        self.decoded.view(-1)[ids] = True
