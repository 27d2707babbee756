"""Fused Triton field inference: hash-grid encoding and the ReLU MLP decoder of a block of points in one kernel.

Why: rendering evaluates the frozen field at every ray sample. Unfused, the encoding kernel writes (N, L*F) features
to memory and the torch MLP reads them back and streams its (N, width) activations through memory once per layer,
one launch each. Here a program encodes BLOCK points (the same helpers and math as ``_triton._forward_kernel``: both
conventions, dense and hashed levels, uint32 index arithmetic) into a (BLOCK, L*F) register tile and runs the
decoder on it with ``tl.dot``; only the (N,) values are written. The GPU counterpart of the C++ ``field_forward``.

Decoder: 0..k hidden ReLU layers and one output (``VolumeField``'s MLP). Widths are zero-padded to powers of two
(at least 16, ``tl.dot``'s minimum): padded features, weights and biases are 0, so padded units stay 0 through
ReLU and add nothing. Levels are padded to a power of two the same way (masked loads give 0 features).

Precision: ``tl.dot`` of float32 uses TF32 tensor cores by default; we ask for IEEE float32 unless torch itself
allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``), so the fused values match the torch MLP's.
Inference only (no autograd). Like ``_triton``, this imports triton: import it only when the backend is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gridinr_nerfstudio.fields.hash_grid._triton import _corner_entry, _corner_weight, _level_setup

BLOCK = 64  # points per program: (BLOCK, width) tiles of activations in registers
MAX_WIDTH = 128  # widest padded layer (input features or hidden units) we fuse; wider ones spill, use the unfused path


def num_warps(width: int) -> int:
    """Warps per program: 8 from 64 hidden units (ptxas for sm_90: the default field's kernel, 16 x 2 levels and
    2 x 64 hidden, needs 181 registers per thread with 8 warps and spills at the 255-register cap with 4), else 4."""
    return 8 if width >= 64 else 4


@triton.jit(do_not_specialize=["n"])
def _fused_field_kernel(pos_ptr, params_ptr, out_ptr, scales_ptr, info_ptr, w_in_ptr, b_in_ptr, w_hid_ptr, b_hid_ptr,
                        w_out_ptr, b_out_ptr, n, shift, L: tl.constexpr, L_PAD: tl.constexpr, F: tl.constexpr,
                        HIDDEN: tl.constexpr, H_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """values[n] = decoder(encoding(pos[n])) for the BLOCK_N points of this program.

    Weights (zero-padded, row-major, ``x @ W`` layout): ``w_in`` (L_PAD*F, H_PAD) and ``b_in`` (H_PAD,) of the first
    hidden layer; ``w_hid`` (HIDDEN-1, H_PAD, H_PAD) and ``b_hid`` (HIDDEN-1, H_PAD) of the others; ``w_out`` (H_PAD,)
    and ``b_out`` (1,) of the output layer. Without hidden layers (HIDDEN == 0) ``w_out`` is (L_PAD*F,).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rows < n
    levels = tl.arange(0, L_PAD)
    level_ok = levels < L
    level = tl.minimum(levels, L - 1)[None, :]  # padded levels read level L-1's table (masked out below)
    feats = tl.arange(0, F)
    # (BLOCK_N, L_PAD) per-level cells and fractions: the helpers broadcast a (1, L_PAD) level over (BLOCK_N, 1) rows
    scale, ix, iy, iz, fx, fy, fz = _level_setup(pos_ptr, rows[:, None], mask[:, None], scales_ptr, info_ptr, level,
                                                 shift)
    load_mask = (mask[:, None] & level_ok[None, :])[:, :, None]
    acc = tl.zeros((BLOCK_N, L_PAD, F), dtype=fx.dtype)
    for corner in tl.static_range(8):
        entry = _corner_entry(ix, iy, iz, corner, info_ptr, level)
        wx, wy, wz = _corner_weight(fx, fy, fz, corner)
        values = tl.load(params_ptr + entry[:, :, None] * F + feats[None, None, :], mask=load_mask, other=0.0)
        acc += (wx * wy * wz)[:, :, None] * values
    encoded = tl.reshape(acc, (BLOCK_N, L_PAD * F))  # level-major, then feature: the encoding's column order
    inputs = tl.arange(0, L_PAD * F)
    hidden = tl.arange(0, H_PAD)
    if HIDDEN == 0:
        w_out = tl.load(w_out_ptr + inputs)
        value = tl.sum(encoded * w_out[None, :], axis=1)
    else:
        w_in = tl.load(w_in_ptr + inputs[:, None] * H_PAD + hidden[None, :])
        b_in = tl.load(b_in_ptr + hidden)
        h = tl.dot(encoded, w_in, input_precision=DOT_PRECISION, out_dtype=encoded.dtype) + b_in[None, :]
        h = tl.maximum(h, 0.0)
        for k in tl.static_range(HIDDEN - 1):
            w = tl.load(w_hid_ptr + k * H_PAD * H_PAD + hidden[:, None] * H_PAD + hidden[None, :])
            b = tl.load(b_hid_ptr + k * H_PAD + hidden)
            h = tl.maximum(tl.dot(h, w, input_precision=DOT_PRECISION, out_dtype=h.dtype) + b[None, :], 0.0)
        w_out = tl.load(w_out_ptr + hidden)
        value = tl.sum(h * w_out[None, :], axis=1)
    value += tl.load(b_out_ptr)
    tl.store(out_ptr + rows, value, mask=mask)


def _pow2(x: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, int(x) - 1).bit_length())


def padded_sizes(num_levels: int, features: int, layers: list[torch.nn.Linear]) -> tuple[int, int] | None:
    """(L_PAD, H_PAD) of a decoder, or None when the fused kernel does not take it (shape mismatch, too wide)."""
    if not layers or layers[-1].out_features != 1 or layers[0].in_features != num_levels * features:
        return None
    if any(a.out_features != b.in_features for a, b in zip(layers, layers[1:])):
        return None
    hidden = [layer.out_features for layer in layers[:-1]]
    # with hidden layers the input tile is a tl.dot operand: at least 16 columns
    levels = _pow2(num_levels, _pow2(16 // features) if hidden else 1)
    width = _pow2(max(hidden), 16) if hidden else 1
    if levels * features > MAX_WIDTH or width > MAX_WIDTH:
        return None
    return levels, width


def pack_decoder(layers: list[torch.nn.Linear], num_levels: int, features: int, levels_padded: int,
                 width: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The zero-padded weight and bias buffers of ``_fused_field_kernel`` (transposed to ``x @ W``)."""
    inputs = levels_padded * features
    real_inputs = num_levels * features
    hidden = layers[:-1]

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    def bias(layer: torch.nn.Linear) -> torch.Tensor | None:
        return None if layer.bias is None else layer.bias.detach().to(dtype)

    last = layers[-1]
    b_out = zeros(1)
    if last.bias is not None:
        b_out.copy_(bias(last))
    if not hidden:
        w_out = zeros(inputs)
        w_out[:real_inputs] = last.weight.detach()[0].to(dtype)
        return [zeros(1), zeros(1), zeros(1), zeros(1), w_out, b_out]
    first = hidden[0]
    w_in, b_in = zeros(inputs, width), zeros(width)
    w_in[:real_inputs, : first.out_features] = first.weight.detach().t().to(dtype)
    if first.bias is not None:
        b_in[: first.out_features] = bias(first)
    w_hid, b_hid = zeros(max(1, len(hidden) - 1), width, width), zeros(max(1, len(hidden) - 1), width)
    for k, layer in enumerate(hidden[1:]):
        w_hid[k, : layer.in_features, : layer.out_features] = layer.weight.detach().t().to(dtype)
        if layer.bias is not None:
            b_hid[k, : layer.out_features] = bias(layer)
    w_out = zeros(width)
    w_out[: last.in_features] = last.weight.detach()[0].to(dtype)
    return [w_in, b_in, w_hid, b_hid, w_out, b_out]


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE products unless float32 matmuls may use TF32 in torch too (then the torch MLP would as well)."""
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", "none")  # torch >= 2.9 (set_float32_matmul_precision sets it too)
    if setting in ("tf32", "ieee"):
        return setting
    try:
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:  # torch refuses to answer when its legacy and new TF32 settings were mixed: stay exact
        return "ieee"


def fused_field_forward(positions: torch.Tensor, params: torch.Tensor, scales: torch.Tensor, info: torch.Tensor,
                        shift: float, features: int, layers: list[torch.nn.Linear]) -> torch.Tensor | None:
    """``decoder(encoding(positions))`` (N,) for (N, 3) contiguous positions of the params' dtype, no autograd;
    None when the decoder's shape is not one the kernel takes. ``scales``/``info`` from ``_triton.level_table``."""
    num_levels = scales.shape[0]
    sizes = padded_sizes(num_levels, features, layers)
    if sizes is None:
        return None
    levels_padded, width = sizes
    dtype, device = params.dtype, params.device
    with torch.no_grad():
        buffers = pack_decoder(layers, num_levels, features, levels_padded, width, dtype, device)
        n = positions.shape[0]
        out = positions.new_empty((n,))
        if n:
            _fused_field_kernel[(triton.cdiv(n, BLOCK),)](
                positions, params, out, scales, info, *buffers, n, shift, L=num_levels, L_PAD=levels_padded,
                F=features, HIDDEN=len(layers) - 1, H_PAD=width, DOT_PRECISION=dot_precision(dtype), BLOCK_N=BLOCK,
                num_warps=num_warps(width),
            )
    return out
