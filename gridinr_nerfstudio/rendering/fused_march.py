"""The fused ray marcher (C++/OpenMP, `csrc/raymarch.cpp`): grid fields read through a transfer table, in one pass.

Interface (the renderer's contract with every caller, also stage 2's edit by parts):

- A colour function exposes its TABLE: `lookup_table()` -> a tensor (L, 4) of (r, g, b, sigma per world unit) at
  L evenly spaced normalised values in [0, 1], read by linear interpolation (`TransferFunction`: 4081 entries;
  `TransferTable` of the transfer MLP: 1024; any object with `lookup_table()` and `visible_in_range(low, high)`),
  called with values it returns `(rgb, sigma)` interpolated from that table. The table may require grad: the fused
  path returns dLoss/dtable through autograd (`FusedMarch`), whatever produced it (an MLP, masked residuals).
- A render that can take the fused path says so with its sample function: `GridSamples(field, color)` (callable
  as any `sample_fn`: `color(field(points).clamp(0, 1))`), where `field` is a grid `grid_source` knows: raw
  voxels resident (`DenseGridField`) or memory-mapped (`MemmapGridField`, read in the file's dtype), the decoded
  field cache (`DenseGridField`) or its lazy bricks (`BrickFieldCache`). Normals of that grid are asked for with
  `normal_fn=GridNormals(field, eps)`.
- `render_rays` (rendering/raymarch.py) is the one dispatch: `fused_applies` -> this module's `render_fused`,
  else the torch ray marcher, which stays the reference and the fallback (no extension, CUDA tensors, any other
  sample function). Same sample positions (midpoints, or stratified offsets drawn from the same generator the same
  way), same outputs; early termination per sample instead of per chunk of samples (what follows a ray whose
  transmittance fell below `early_stop_eps` changes its colour by less than that).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from gridinr_nerfstudio.fields.brick_cache import BrickFieldCache
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.fields.memmap_grid import MemmapGridField
from gridinr_nerfstudio.thread_policy import kernel_threads, torch_ops_on_one_thread

if TYPE_CHECKING:
    from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid
    from gridinr_nerfstudio.rendering.raymarch import RenderStats

try:
    cpp = importlib.import_module("gridinr_nerfstudio.rendering._raymarch_cpp")
except ImportError:
    cpp = None

GridField = DenseGridField | BrickFieldCache | MemmapGridField
_SUPPORTED_VOXELS = (torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.float32, torch.float64)


def kernel_available() -> bool:
    """Whether the C++ extension was built and `GRIDINR_FUSED_MARCH` does not switch it off (`0`)."""
    return cpp is not None and os.environ.get("GRIDINR_FUSED_MARCH", "1") != "0"


@contextmanager
def packet_rays(rays: int) -> Iterator[None]:
    """Within the block the forward kernel hands out `rays` rays per work item instead of 16 (benchmarks: one packet
    per thread is a static split of the rays, which a busy machine shows the cost of)."""
    previous = cpp.set_packet_rays(int(rays))
    try:
        yield
    finally:
        cpp.set_packet_rays(previous)


_torch_ops_serial = True
"""Whether frames run the torch ops around the kernel on one thread (`torch_ops_in_parallel` switches it off)."""


@contextmanager
def torch_ops_in_parallel() -> Iterator[None]:
    """Within the block frames run the torch ops around the kernel on torch's thread count, and the kernel in
    torch's OpenMP team when it is as large (benchmarks: the frame before `torch_ops_on_one_thread`)."""
    global _torch_ops_serial
    previous, _torch_ops_serial = _torch_ops_serial, False
    try:
        yield
    finally:
        _torch_ops_serial = previous


class GridSamples:
    """A sample function `points -> (rgb, sigma)` of a grid field read through a colour function with a table."""

    def __init__(self, field: GridField, color) -> None:
        self.field = field
        self.color = color

    def values(self, points: torch.Tensor) -> torch.Tensor:
        return self.field(points).clamp(0.0, 1.0)

    def __call__(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.color(self.values(points))


class GridNormals:
    """`normal_fn` of a grid field: -gradient / |gradient| by central differences with step `eps` (the torch path
    calls `estimate_normals`, the fused kernel computes the same differences itself)."""

    def __init__(self, field: GridField, eps: float) -> None:
        self.field = field
        self.eps = float(eps)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        from gridinr_nerfstudio.rendering.raymarch import estimate_normals

        return estimate_normals(lambda p: self.field(p).clamp(0.0, 1.0), points, self.eps)


class GridSource:
    """What the kernel reads: voxels (Z, Y, X) in any layout and dtype, normalised as clamp(raw * scale + offset),
    non-finite raw values replaced (a volume's nan_policy "replace"), spanning [-half, half]."""

    def __init__(self, voxels: torch.Tensor, half: Sequence[float], scale: float = 1.0, offset: float = 0.0,
                 replacement: float | None = None, affine: bool = False) -> None:
        self.voxels = voxels
        self.params = torch.tensor([*map(float, half), scale, offset, float(affine), float(replacement is not None),
                                    0.0 if replacement is None else replacement], dtype=torch.float64)


def grid_source(field) -> GridSource | None:
    """The kernel's view of `field`, or None when it is not a grid the kernel reads (then the torch path renders)."""
    if isinstance(field, BrickFieldCache):
        field = field.grid
    if isinstance(field, DenseGridField):
        volume = field.volume
        if volume.device.type != "cpu" or volume.dtype not in (torch.float32, torch.float64):
            return None
        return GridSource(volume, field.half_size.tolist())
    if isinstance(field, MemmapGridField):
        return _memmap_source(field)
    return None


def _memmap_source(field: MemmapGridField) -> GridSource | None:
    """The volume's voxels as they are in the file (no copy), with its normalisation as an affine map."""
    volume = field.volume
    data = volume.data
    if data.ndim != 3 or min(data.shape) < 2 or not data.dtype.isnative:
        return None
    with warnings.catch_warnings():  # a read-only memmap: the kernel only reads it
        warnings.simplefilter("ignore", UserWarning)
        try:
            voxels = torch.from_numpy(data) if isinstance(data, np.ndarray) else None
        except (TypeError, ValueError):
            return None
    if voxels is None or voxels.dtype not in _SUPPORTED_VOXELS or any(stride < 0 for stride in voxels.stride()):
        return None
    span = volume.value_max - volume.value_min
    scale = volume.value_scale / span if span > 0 else 0.0
    offset = (volume.value_offset - volume.value_min) / span if span > 0 else 0.0
    replacement = None
    if volume.nan_policy == "replace" and voxels.dtype.is_floating_point:
        replacement = min(max((volume.replace_value - volume.value_min) / span, 0.0), 1.0) if span > 0 else 0.0
    return GridSource(voxels, np.asarray(volume.half_size, dtype=np.float64).tolist(), scale, offset, replacement,
                      affine=True)


def fused_applies(origins: torch.Tensor, sample_fn, normal_fn, shading: bool) -> bool:
    """Whether `render_rays` can take the fused path for these arguments."""
    if not (kernel_available() and isinstance(sample_fn, GridSamples) and hasattr(sample_fn.color, "lookup_table")):
        return False
    if origins.device.type != "cpu" or origins.dtype not in (torch.float32, torch.float64):
        return False
    if normal_fn is not None and not (isinstance(normal_fn, GridNormals) and normal_fn.field is sample_fn.field):
        return False
    if shading and normal_fn is None:
        return False
    return grid_source(sample_fn.field) is not None


def frame_threads(origins: torch.Tensor, sample_fn, render_kwargs: dict):
    """The thread setting of a whole frame (`images.render_image`): torch's ops on one thread when its chunks go
    to the fused kernel (`torch_ops_on_one_thread`; the ops between chunks and after them too), else unchanged."""
    fused = render_kwargs.get("fused", True) and _torch_ops_serial and fused_applies(
        origins, sample_fn, render_kwargs.get("normal_fn"), bool(render_kwargs.get("shading", False)))
    return torch_ops_on_one_thread() if fused else nullcontext()


class FusedMarch(torch.autograd.Function):
    """Per-ray sums (R, C) of weight * (r, g, b, 1, t[, normal]) for a table (L, 4); differentiable w.r.t. the table.

    The backward kernel recomputes the march (nothing per sample is stored) from the forward's sums."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, march: dict) -> torch.Tensor:
        sums = _march_forward(table, march)
        ctx.save_for_backward(table, sums)
        ctx.march = march
        return sums

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor):
        table, sums = ctx.saved_tensors
        m = ctx.march
        grad_table = cpp.backward(
            m["origins"], m["directions"], m["box"], m["source"].voxels, m["source"].params, table, m["occupied"],
            m["cell_box"], m["offsets"], m["num_samples"], m["early_stop_eps"], m["normal_eps"], m["shading"],
            sums, grad_sums.contiguous().to(sums.dtype), kernel_threads(),
        )
        return grad_table, None


def _march_forward(table: torch.Tensor, m: dict) -> torch.Tensor:
    """Run the forward kernel over every ray; rays that reach lattice points of bricks not decoded yet are resumed
    once those bricks are decoded (each round decodes every brick the suspended rays stopped at)."""
    num_rays = m["origins"].shape[0]
    sums = table.new_zeros(num_rays, m["channels"])
    transmittance = table.new_ones(num_rays)
    next_sample = torch.zeros(num_rays, dtype=torch.int64)
    cells = torch.zeros(num_rays, 3, dtype=torch.int64)
    bricks: BrickFieldCache | None = m["bricks"]
    rays = torch.empty(0, dtype=torch.int64)
    stats = m["stats"]
    while True:
        counts = cpp.forward(
            m["origins"], m["directions"], m["box"], m["source"].voxels, m["source"].params, table, m["occupied"],
            m["cell_box"], m["offsets"], m["num_samples"], m["early_stop_eps"], m["normal_eps"], m["shading"],
            bricks is not None, rays, sums, transmittance, next_sample, cells, kernel_threads(),
        ).tolist()
        if stats is not None:
            if rays.numel() == 0:  # the first round: resumed rays were counted then
                stats.rays_hit += counts[0]
                stats.samples_total += counts[0] * m["num_samples"]
            stats.samples_evaluated += counts[1]
        if counts[2] == 0:
            return sums
        rays = (next_sample >= 0).nonzero().squeeze(-1)
        if bricks.decode_bricks_at_cells(cells.index_select(0, rays)) == 0:
            bricks = None  # those lattice values are NaN after decoding (the field's own): they count as 0


def render_fused(
    origins: torch.Tensor,
    directions: torch.Tensor,
    sample_fn: GridSamples,
    aabb: torch.Tensor,
    num_samples: int = 128,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    background: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0),
    occupancy_grid: OccupancyGrid | None = None,
    early_stop_eps: float = 1e-4,
    normal_fn: GridNormals | None = None,
    shading: bool = False,
    stats: RenderStats | None = None,
) -> dict[str, torch.Tensor]:
    """`render_rays` on the fused kernel (see its docstring; call it through `render_rays`). The kernel runs on the
    thread policy's count of kernel threads, the torch ops around it on one thread (`torch_ops_on_one_thread`: they
    gain nothing from more, and beside a busy process each of their parallel regions can stall the frame)."""
    with torch_ops_on_one_thread() if _torch_ops_serial else nullcontext():
        return _render_fused(origins, directions, sample_fn, aabb, num_samples, stratified, generator, background,
                             occupancy_grid, early_stop_eps, normal_fn, shading, stats)


def _render_fused(origins, directions, sample_fn, aabb, num_samples, stratified, generator, background, occupancy_grid,
                  early_stop_eps, normal_fn, shading, stats) -> dict[str, torch.Tensor]:
    dtype = origins.dtype
    table = sample_fn.color.lookup_table().to(dtype).contiguous()
    num_rays = origins.shape[0]
    offsets = torch.empty(0, dtype=dtype)
    if stratified:  # the torch path's draw, so a seeded generator gives the same positions on both paths
        offsets = torch.rand((num_rays, num_samples), dtype=dtype, device=origins.device, generator=generator)
    occupied, cell_box = [], torch.empty(0, dtype=torch.float64)
    if occupancy_grid is not None:
        occupied = occupancy_grid.leap_levels()
        cell_box = occupancy_grid.aabb.detach().to(device="cpu", dtype=torch.float64).reshape(-1).contiguous()
    march = {
        "origins": origins.detach().contiguous(), "directions": directions.detach().contiguous(),
        "box": aabb.detach().to(torch.float64).reshape(-1).contiguous(), "source": grid_source(sample_fn.field),
        "occupied": occupied, "cell_box": cell_box, "offsets": offsets, "num_samples": int(num_samples),
        "early_stop_eps": float(early_stop_eps), "normal_eps": normal_fn.eps if normal_fn is not None else 0.0,
        "shading": bool(shading), "channels": 5 if normal_fn is None else 8, "stats": stats,
        "bricks": sample_fn.field if isinstance(sample_fn.field, BrickFieldCache) else None,
    }
    if stats is not None:
        stats.rays += num_rays
        stats.fused_rays += num_rays
    if torch.is_grad_enabled() and table.requires_grad:
        sums = FusedMarch.apply(table, march)
    else:
        with torch.no_grad():
            sums = _march_forward(table.detach(), march)
    background = torch.as_tensor(background, dtype=dtype, device=origins.device)
    accumulation, depth_sum = sums[:, 3:4], sums[:, 4:5]
    outputs = {
        "rgb": sums[:, :3] + (1.0 - accumulation) * background,
        "accumulation": accumulation,
        "depth": torch.where(
            accumulation > 0, depth_sum / accumulation.clamp_min(1e-10), torch.zeros_like(accumulation)
        ),
    }
    if normal_fn is not None:
        outputs["normals"] = F.normalize(sums[:, 5:], dim=-1, eps=1e-12)
    return outputs
