"""Triton kernels of the hash-grid encoding (forward, table gradient, position gradient) and their autograd Function.

Why: on a GPU without tiny-cuda-nn our torch path launches dozens of kernels per level and materialises (N, L, 8)
index and weight tensors; these kernels do one pass per (block of points, level) with the index math in registers.
Same math and parameter layout as ``_torch_impl.torch_encode`` (see ``encoding.py``): per-level scale and shift,
dense levels ``x + y r + z r^2`` and hashed levels ``x ^ y p1 ^ z p2`` in uint32 arithmetic, then ``mod T_l``;
feature ``f`` of entry ``e`` of level ``l`` at ``params[(offset_l + e) * F + f]``.

Triton ships with CUDA builds of torch; this module imports it, so import it only when the backend is used. The
kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported), which is how the
tests check them against the torch backend without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gridinr_nerfstudio.fields.hash_grid import _backend
from gridinr_nerfstudio.fields.hash_grid.geometry import GridGeometry

BLOCK = 128  # points per program; (BLOCK, F) tiles of table rows per corner
# The kernels are not specialised on the point count ``n`` (do_not_specialize): render chunks have any size, and
# each specialisation would compile again (seconds) in the middle of a run.


# Whether these kernels were decorated under TRITON_INTERPRET=1 (then they run on CPU tensors, in numpy).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def level_table(geometry: GridGeometry, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales (L,) in the positions' dtype, info int64 (L, 5) = [resolution, resolution^2 mod 2^32, dense,
    offset, size]) on ``device``; r^2 is precomputed so no kernel multiplies scalars that could overflow."""
    info = torch.tensor(
        [
            [r, (r * r) & 0xFFFFFFFF, int(d), o, s]
            for r, d, o, s in zip(geometry.resolutions, geometry.dense, geometry.table_offsets, geometry.table_sizes)
        ],
        dtype=torch.int64,
    )
    return torch.tensor(geometry.scales, dtype=dtype).to(device), info.to(device)


@triton.jit
def _level_setup(pos_ptr, rows, mask, scales_ptr, info_ptr, level, shift):
    """Per-level cell corner (uint32, wraps like the int64-masked torch path) and fractional position per axis."""
    scale = tl.load(scales_ptr + level)
    x = tl.load(pos_ptr + rows * 3 + 0, mask=mask, other=0.0)
    y = tl.load(pos_ptr + rows * 3 + 1, mask=mask, other=0.0)
    z = tl.load(pos_ptr + rows * 3 + 2, mask=mask, other=0.0)
    px = x * scale + shift
    py = y * scale + shift
    pz = z * scale + shift
    lx = tl.floor(px)
    ly = tl.floor(py)
    lz = tl.floor(pz)
    ix = lx.to(tl.int32).to(tl.uint32, bitcast=True)
    iy = ly.to(tl.int32).to(tl.uint32, bitcast=True)
    iz = lz.to(tl.int32).to(tl.uint32, bitcast=True)
    return scale, ix, iy, iz, px - lx, py - ly, pz - lz


@triton.jit
def _corner_entry(ix, iy, iz, corner: tl.constexpr, info_ptr, level):
    """Row of the flat table (int64, entries) for corner (x fastest, like tcnn): dense or hashed index, mod size."""
    resolution = tl.load(info_ptr + level * 5 + 0).to(tl.uint32)
    stride_z = tl.load(info_ptr + level * 5 + 1).to(tl.uint32)
    dense = tl.load(info_ptr + level * 5 + 2) != 0
    offset = tl.load(info_ptr + level * 5 + 3)
    size = tl.load(info_ptr + level * 5 + 4).to(tl.uint32)
    cx = ix + (corner & 1)
    cy = iy + ((corner >> 1) & 1)
    cz = iz + (corner >> 2)
    dense_index = cx + cy * resolution + cz * stride_z
    hashed_index = cx ^ (cy * 2654435761) ^ (cz * 805459861)
    index = tl.where(dense, dense_index, hashed_index) % size
    return offset + index.to(tl.int64)


@triton.jit
def _corner_weight(fx, fy, fz, corner: tl.constexpr):
    """Per-axis trilinear weights of the corner: f on its upper side, 1 - f on its lower side."""
    wx = fx if (corner & 1) else 1 - fx
    wy = fy if ((corner >> 1) & 1) else 1 - fy
    wz = fz if (corner >> 2) else 1 - fz
    return wx, wy, wz


@triton.jit(do_not_specialize=["n"])
def _forward_kernel(pos_ptr, params_ptr, out_ptr, scales_ptr, info_ptr, n, out_stride, shift,
                    F: tl.constexpr, BLOCK_N: tl.constexpr):
    level = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rows < n
    feats = tl.arange(0, F)
    scale, ix, iy, iz, fx, fy, fz = _level_setup(pos_ptr, rows, mask, scales_ptr, info_ptr, level, shift)
    acc = tl.zeros((BLOCK_N, F), dtype=fx.dtype)
    for corner in tl.static_range(8):
        entry = _corner_entry(ix, iy, iz, corner, info_ptr, level)
        wx, wy, wz = _corner_weight(fx, fy, fz, corner)
        values = tl.load(params_ptr + entry[:, None] * F + feats[None, :], mask=mask[:, None], other=0.0)
        acc += (wx * wy * wz)[:, None] * values
    tl.store(out_ptr + rows[:, None].to(tl.int64) * out_stride + level * F + feats[None, :], acc, mask=mask[:, None])


@triton.jit(do_not_specialize=["n"])
def _backward_params_kernel(pos_ptr, grad_out_ptr, grad_params_ptr, scales_ptr, info_ptr, n, out_stride, shift,
                            F: tl.constexpr, BLOCK_N: tl.constexpr):
    level = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rows < n
    feats = tl.arange(0, F)
    scale, ix, iy, iz, fx, fy, fz = _level_setup(pos_ptr, rows, mask, scales_ptr, info_ptr, level, shift)
    grad = tl.load(grad_out_ptr + rows[:, None].to(tl.int64) * out_stride + level * F + feats[None, :],
                   mask=mask[:, None], other=0.0)
    for corner in tl.static_range(8):
        entry = _corner_entry(ix, iy, iz, corner, info_ptr, level)
        wx, wy, wz = _corner_weight(fx, fy, fz, corner)
        tl.atomic_add(grad_params_ptr + entry[:, None] * F + feats[None, :], (wx * wy * wz)[:, None] * grad,
                      mask=mask[:, None])


@triton.jit(do_not_specialize=["n"])
def _backward_positions_kernel(pos_ptr, params_ptr, grad_out_ptr, grad_pos_ptr, scales_ptr, info_ptr, n, num_levels,
                               out_stride, shift, F: tl.constexpr, BLOCK_N: tl.constexpr):
    """d out / d x: per level and corner, the derivative of the trilinear weight times <grad, value>, times scale."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rows < n
    feats = tl.arange(0, F)
    gx = tl.zeros((BLOCK_N,), dtype=tl.load(pos_ptr + rows * 3, mask=mask, other=0.0).dtype)
    gy = tl.zeros_like(gx)
    gz = tl.zeros_like(gx)
    for level in range(num_levels):
        scale, ix, iy, iz, fx, fy, fz = _level_setup(pos_ptr, rows, mask, scales_ptr, info_ptr, level, shift)
        grad = tl.load(grad_out_ptr + rows[:, None].to(tl.int64) * out_stride + level * F + feats[None, :],
                       mask=mask[:, None], other=0.0)
        lx = tl.zeros_like(gx)
        ly = tl.zeros_like(gx)
        lz = tl.zeros_like(gx)
        for corner in tl.static_range(8):
            entry = _corner_entry(ix, iy, iz, corner, info_ptr, level)
            wx, wy, wz = _corner_weight(fx, fy, fz, corner)
            values = tl.load(params_ptr + entry[:, None] * F + feats[None, :], mask=mask[:, None], other=0.0)
            dot = tl.sum(values * grad, axis=1)
            # d w / d f per axis: +1 on the corner's upper side, -1 on its lower side
            lx += ((corner & 1) * 2 - 1) * wy * wz * dot
            ly += (((corner >> 1) & 1) * 2 - 1) * wx * wz * dot
            lz += ((corner >> 2) * 2 - 1) * wx * wy * dot
        gx += lx * scale
        gy += ly * scale
        gz += lz * scale
    tl.store(grad_pos_ptr + rows * 3 + 0, gx, mask=mask)
    tl.store(grad_pos_ptr + rows * 3 + 1, gy, mask=mask)
    tl.store(grad_pos_ptr + rows * 3 + 2, gz, mask=mask)


def _grid(n: int, levels: int) -> tuple[int, int]:
    return (triton.cdiv(n, BLOCK), levels)


class HashGridTritonFunction(torch.autograd.Function):
    """Autograd of the Triton kernels: table gradient by atomic adds (into HashGridAdam's recycled zeroed buffer
    when there is one), position gradient by a per-point pass over the levels (no atomics, deterministic)."""

    @staticmethod
    def forward(ctx, positions, params, scales, info, shift, features):  # type: ignore[override]
        n, levels = positions.shape[0], scales.shape[0]
        out = positions.new_empty((n, levels * features))
        if n:
            _forward_kernel[_grid(n, levels)](positions, params, out, scales, info, n, levels * features, shift,
                                              F=features, BLOCK_N=BLOCK)
        ctx.save_for_backward(positions, params, scales, info)
        ctx.shift, ctx.features = shift, features
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        positions, params, scales, info = ctx.saved_tensors
        n, levels, features = positions.shape[0], scales.shape[0], ctx.features
        grad_out = grad_out.contiguous().to(params.dtype)
        grad_positions = grad_params = None
        if ctx.needs_input_grad[0]:
            grad_positions = torch.zeros_like(positions)
            if n:
                _backward_positions_kernel[(triton.cdiv(n, BLOCK),)](
                    positions, params, grad_out, grad_positions, scales, info, n, levels, levels * features,
                    ctx.shift, F=features, BLOCK_N=BLOCK,
                )
        if ctx.needs_input_grad[1]:
            grad_params = _backend.take_zeroed_grad_buffer(params)
            if n:
                _backward_params_kernel[_grid(n, levels)](
                    positions, grad_out, grad_params, scales, info, n, levels * features, ctx.shift,
                    F=features, BLOCK_N=BLOCK,
                )
        return grad_positions, grad_params, None, None, None, None


@triton.jit(do_not_specialize=["n"])
def _sparse_adam_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, n, step_size, beta1, beta2, eps,
                        BLOCK_N: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offsets < n
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    touched = mask & (grad != 0)
    m = tl.load(exp_avg_ptr + offsets, mask=touched, other=0.0) * beta1 + (1 - beta1) * grad
    v = tl.load(exp_avg_sq_ptr + offsets, mask=touched, other=0.0) * beta2 + (1 - beta2) * grad * grad
    param = tl.load(param_ptr + offsets, mask=touched, other=0.0)
    tl.store(exp_avg_ptr + offsets, m, mask=touched)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=touched)
    tl.store(param_ptr + offsets, param - step_size * m / (tl.sqrt(v) + eps), mask=touched)
    tl.store(grad_ptr + offsets, tl.zeros_like(grad), mask=touched)


def sparse_adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     step_size: float, beta1: float, beta2: float, eps: float) -> None:
    """``_torch_impl.torch_sparse_adam_step`` in one pass (read the gradient once, touch only nonzero entries)."""
    n = param.numel()
    if n:
        block = 1024
        _sparse_adam_kernel[(triton.cdiv(n, block),)](param, grad, exp_avg, exp_avg_sq, n, step_size, beta1, beta2,
                                                      eps, BLOCK_N=block)
