"""Multi-resolution hash-grid encoding (instant-ngp / tiny-cuda-nn ``HashGrid``) that is fast on CPU.

Why: nerfstudio's ``HashEncoding(implementation="torch")`` manages about 0.02 M points/s forward+backward on a
2-core CPU. This module keeps tiny-cuda-nn's math and parameter layout and runs it through one of three
backends behind the same interface:

- ``"tcnn"``: tiny-cuda-nn (``tinycudann.Encoding``) for CUDA tensors, when it imports;
- ``"cpp"``: our multi-threaded C++ kernels (``csrc/hash_grid.cpp``) for CPU tensors, when the extension is built
  (threads: ``thread_policy.kernel_threads()``);
- ``"triton"``: our Triton kernels (``_triton.py``; fused inference in ``_triton_fused.py``) for CUDA tensors
  (CPU tensors too when the kernels were loaded under ``TRITON_INTERPRET=1``, which is how the tests check them);
- ``"torch"``: pure PyTorch, any device (the fallback, and the readable statement of the math).

``backend="auto"`` picks, per call: on CUDA tcnn if it passed its one-time subprocess probe on this device
(``tcnn_probe.py``: a segmentation fault inside tcnn cannot be caught, so it must happen in a child process), else
triton, else torch; on CPU cpp if built, else torch (never triton: the interpreter is for tests). An explicit
``backend="tcnn"`` is used without the probe.

Grid geometry (``convention="tcnn"``, tiny-cuda-nn's ``HashGrid``; float32 like tcnn):
    level l scale ``s_l = exp2(l * log2(per_level_scale)) * base_resolution - 1``, ``r_l = ceil(s_l) + 1``
    vertices per axis; a point ``x`` in [0, 1]^3 sits at ``p = x * s_l + 0.5``, cell ``floor(p)``, trilinear
    weights from ``p - floor(p)``. Level slice size ``T_l = min(next_multiple_of_8(r_l^3), 2^log2_hashmap_size)``
    entries. Levels with ``r_l^3 <= T_l`` are dense (index ``x + y r_l + z r_l^2``), the others hashed with
    ``x * 1 xor y * 2654435761 xor z * 805459861``; both in uint32 arithmetic, then ``mod T_l`` (so dense levels
    wrap around at the upper faces exactly as tcnn does).
Grid geometry (``convention="nerfstudio"``, nerfstudio's torch ``HashEncoding``): ``s_l = floor(base_resolution
    * growth^l)`` (computed in float32 as nerfstudio does), ``p = x * s_l`` (no 0.5 offset), every level hashed,
    ``T_l = 2^log2_hashmap_size``.
Both are the same kernel with different per-level (scale, offset, dense-or-hashed, slice offset, slice size).

Parameter layout (all backends, and checkpoints): one flat ``params`` tensor of ``sum_l T_l * F`` values in
tiny-cuda-nn's order: level-major, then entry, then feature, i.e. feature ``f`` of entry ``e`` of level ``l`` is
``params[(offset_l + e) * F + f]`` with ``offset_l = sum_{k<l} T_k``. That is what ``tcnn.Encoding(...,
dtype=torch.float32).params`` holds, so a ``convention="tcnn"`` checkpoint loads into either backend. For
``convention="nerfstudio"``, ``offset_l = l * 2^log2_hashmap_size`` and ``params.view(-1, F)`` *is* nerfstudio's
``hash_table`` (see ``from_nerfstudio`` / ``nerfstudio_hash_table``).

Gradients: w.r.t. the table on every backend; w.r.t. the positions too (cpp and triton kernels, torch autograd,
tcnn).
For training on CPU use ``HashGridAdam`` for the table: a lazy Adam (zero-gradient entries skipped, as tiny-cuda-nn
does for grids) in one fused C++ pass that also hands the zeroed gradient buffer back to the next backward, so no
table-sized gradient is allocated and zeroed per step.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch
from torch import nn

from gridinr_nerfstudio.fields.hash_grid import _backend
from gridinr_nerfstudio.fields.hash_grid._backend import cpp_extension_available, tcnn_available, triton_available
from gridinr_nerfstudio.fields.hash_grid._torch_impl import torch_encode
from gridinr_nerfstudio.fields.hash_grid.geometry import (
    SUPPORTED_FEATURES_PER_LEVEL,
    nerfstudio_geometry,
    tcnn_geometry,
)
from gridinr_nerfstudio.thread_policy import kernel_threads

Backend = Literal["auto", "tcnn", "triton", "cpp", "torch"]
BACKENDS = ("auto", "tcnn", "triton", "cpp", "torch")
Convention = Literal["tcnn", "nerfstudio"]
FUSED_TRITON_ENV = "GRIDINR_FUSED_TRITON"
"""Set to ``0`` to keep ``fused_decode`` off the fused Triton kernel (encoding kernel + torch MLP instead)."""


class _HashGridCppFunction(torch.autograd.Function):
    """Autograd wrapper of the C++ kernels; the table gradient reuses a recycled zeroed buffer when there is one."""

    @staticmethod
    def forward(ctx, positions, params, scales, level_info, shift, features):  # type: ignore[override]
        ctx.save_for_backward(positions, params)
        ctx.grid = (scales, level_info, shift, features)
        return _backend.cpp.forward(positions, params, scales, level_info, shift, features, kernel_threads())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        positions, params = ctx.saved_tensors
        scales, level_info, shift, features = ctx.grid
        grad_out = grad_out.contiguous()
        grad_positions = grad_params = None
        if ctx.needs_input_grad[0]:
            grad_positions = _backend.cpp.backward_positions(
                positions, params, grad_out, scales, level_info, shift, features, kernel_threads()
            )
        if ctx.needs_input_grad[1]:
            grad_params = _backend.take_zeroed_grad_buffer(params)
            _backend.cpp.backward_params(
                positions, grad_out, grad_params, scales, level_info, shift, features, kernel_threads()
            )
        return grad_positions, grad_params, None, None, None, None


class HashGridEncoding(nn.Module):
    """Multi-resolution hash-grid encoding: (..., 3) positions in [0, 1]^3 -> (..., num_levels * features).

    Args:
        num_levels: number of grid levels.
        features_per_level: features per entry (1, 2, 4 or 8, like tcnn).
        log2_hashmap_size: log2 of the maximum entries per level.
        base_resolution: resolution of the coarsest level.
        max_resolution: resolution of the finest level; sets ``per_level_scale`` when that is not given.
        per_level_scale: growth factor between levels (overrides ``max_resolution``).
        convention: ``"tcnn"`` (instant-ngp / tiny-cuda-nn) or ``"nerfstudio"`` (nerfstudio's torch HashEncoding).
        backend: ``"auto"``, ``"tcnn"``, ``"triton"``, ``"cpp"`` or ``"torch"``.
        init_scale: parameters start uniform in [-init_scale, init_scale] (tcnn uses 1e-4).
    """

    def __init__(
        self,
        num_levels: int = 16,
        features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        max_resolution: int = 1024,
        per_level_scale: float | None = None,
        convention: Convention = "tcnn",
        backend: Backend = "auto",
        init_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        if features_per_level not in SUPPORTED_FEATURES_PER_LEVEL:
            raise ValueError(
                f"features_per_level must be one of {SUPPORTED_FEATURES_PER_LEVEL}, got {features_per_level}"
            )
        if num_levels < 1 or not 1 <= log2_hashmap_size <= 31 or base_resolution < 1:
            raise ValueError("need num_levels >= 1, 1 <= log2_hashmap_size <= 31 and base_resolution >= 1")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if per_level_scale is None:
            per_level_scale = (
                float(np.exp((np.log(max_resolution) - np.log(base_resolution)) / (num_levels - 1)))
                if num_levels > 1
                else 1.0
            )
        if convention == "tcnn":
            self.geometry = tcnn_geometry(num_levels, log2_hashmap_size, base_resolution, per_level_scale)
        elif convention == "nerfstudio":
            self.geometry = nerfstudio_geometry(num_levels, log2_hashmap_size, base_resolution, per_level_scale)
        else:
            raise ValueError(f"convention must be 'tcnn' or 'nerfstudio', got {convention!r}")
        self.num_levels = num_levels
        self.features_per_level = features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.base_resolution = base_resolution
        self.per_level_scale = per_level_scale
        self.convention = convention
        self.backend = backend
        self._kernel_arguments = self.geometry.kernel_arguments()
        self._tcnn_encoding = None  # created on first CUDA call; not a submodule, ``params`` is the only state
        self._triton_tables: dict = {}  # (device, dtype) -> level tables for the Triton kernels (not state)
        self.fused_triton = True  # fused_decode may use the fused Triton kernel (see fused_decode; not in the state dict)
        params = torch.empty(self.geometry.num_entries * features_per_level).uniform_(-init_scale, init_scale)
        self.params = nn.Parameter(params)

    def get_out_dim(self) -> int:
        return self.num_levels * self.features_per_level

    def tcnn_config(self) -> dict:
        """tiny-cuda-nn encoding config with this geometry (``convention="tcnn"`` only)."""
        return {
            "otype": "HashGrid",
            "n_levels": self.num_levels,
            "n_features_per_level": self.features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
        }

    def backend_for(self, device: torch.device) -> str:
        """The backend a call on ``device`` uses; raises when the requested one cannot run there."""
        tcnn_ok = device.type == "cuda" and self.convention == "tcnn" and self.params.dtype == torch.float32
        cpp_ok = (
            device.type == "cpu" and self.params.dtype in (torch.float32, torch.float64) and cpp_extension_available()
        )
        triton_dtype = self.params.dtype in (torch.float32, torch.float64)
        if self.backend == "auto":
            if tcnn_ok and _backend.tcnn_usable(device):  # only once a subprocess probe has run it (tcnn_probe.py)
                return "tcnn"
            if device.type == "cuda" and triton_dtype and triton_available():
                return "triton"
            return "cpp" if cpp_ok else "torch"
        if self.backend == "tcnn" and not (tcnn_ok and tcnn_available()):
            raise RuntimeError("backend='tcnn' needs tinycudann, CUDA tensors, float32 params and convention='tcnn'")
        triton_ok = triton_dtype and triton_available() and (
            device.type == "cuda" or (device.type == "cpu" and _backend.triton_module().INTERPRETED)
        )
        if self.backend == "triton" and not triton_ok:
            raise RuntimeError(
                "backend='triton' needs triton (shipped with CUDA builds of torch), float32/float64 params and CUDA "
                "tensors (CPU tensors only under TRITON_INTERPRET=1)"
            )
        if self.backend == "cpp" and not cpp_ok:
            raise RuntimeError(
                "backend='cpp' needs CPU float32/float64 tensors and the built extension "
                "gridinr_nerfstudio.fields.hash_grid._hash_grid_cpp (pip install --no-build-isolation -e .)"
            )
        return self.backend

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.shape[-1] != 3:
            raise ValueError(f"HashGridEncoding expects positions of shape (..., 3), got {tuple(positions.shape)}")
        batch_shape = positions.shape[:-1]
        flat = positions.reshape(-1, 3).to(self.params.dtype).contiguous()
        backend = self.backend_for(flat.device)
        if flat.device != self.params.device:
            raise RuntimeError(
                f"HashGridEncoding: positions on {flat.device} but params on {self.params.device} (move the module)"
            )
        if backend == "tcnn":
            encoded = self._tcnn_forward(flat)
        elif backend == "triton":
            scales, info = self._triton_level_table(flat)
            encoded = _backend.triton_module().HashGridTritonFunction.apply(
                flat, self.params, scales, info, float(self.geometry.shift), self.features_per_level
            )
        elif backend == "cpp":
            scales, level_info, shift = self._kernel_arguments
            encoded = _HashGridCppFunction.apply(flat, self.params, scales, level_info, shift, self.features_per_level)
        else:
            encoded = torch_encode(flat, self.params, self.geometry, self.features_per_level)
        return encoded.reshape(*batch_shape, self.get_out_dim())

    def fused_decode(self, positions: torch.Tensor, layers: list[nn.Linear]) -> torch.Tensor | None:
        """Inference only: ``decoder(encoding(positions))`` (N,) in one fused pass, or None where it does not apply.

        ``layers`` are the decoder's linear layers with ReLU between them and one output at the end. On the cpp
        backend the C++ ``field_forward`` runs the decoder on each block of 256 encoded points while they sit in
        cache; on the triton backend ``_triton_fused`` encodes a block of points into registers and runs the
        decoder with ``tl.dot`` (hidden widths up to 128, zero-padded to powers of two). Both apply to (N, 3)
        positions and layers of the table's dtype, and compute no gradients. The Triton one can be switched off
        (``fused_triton = False`` on the encoding, or ``GRIDINR_FUSED_TRITON=0`` in the environment): then the
        caller runs the encoding kernel and the torch MLP.
        """
        if positions.dim() != 2 or positions.shape[-1] != 3:
            return None
        backend = self.backend_for(positions.device)
        if backend not in ("cpp", "triton") or (backend == "triton" and not self.fused_triton_enabled()):
            return None
        dtype = self.params.dtype
        if not layers or any(layer.weight.dtype != dtype for layer in layers) or layers[-1].out_features != 1:
            return None
        if positions.device != self.params.device:
            raise RuntimeError(
                f"HashGridEncoding: positions on {positions.device} but params on {self.params.device} (move the module)"
            )
        flat = positions.to(dtype).contiguous()
        if backend == "triton":
            scales, info = self._triton_level_table(flat)
            return _backend.triton_fused_module().fused_field_forward(
                flat, self.params.detach(), scales, info, float(self.geometry.shift), self.features_per_level, layers
            )
        scales, level_info, shift = self._kernel_arguments
        with torch.no_grad():
            return _backend.cpp.field_forward(
                flat, self.params.detach(), scales, level_info, shift,
                self.features_per_level,
                [layer.weight.detach().t().contiguous() for layer in layers],
                [layer.bias.detach() if layer.bias is not None else self.params.new_empty(0) for layer in layers],
                kernel_threads(),
            )

    def fused_triton_enabled(self) -> bool:
        """Whether ``fused_decode`` may use the fused Triton kernel: the ``fused_triton`` attribute (default True)
        and ``GRIDINR_FUSED_TRITON`` (``0`` switches it off for every encoding), and the kernel imports."""
        if not getattr(self, "fused_triton", True) or os.environ.get(FUSED_TRITON_ENV, "1") == "0":
            return False
        return _backend.triton_fused_module() is not False

    def _triton_level_table(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-level scales and info of the Triton kernels on the positions' device and dtype (cached)."""
        key = (flat.device, flat.dtype)
        if key not in self._triton_tables:
            self._triton_tables[key] = _backend.triton_module().level_table(self.geometry, flat.device, flat.dtype)
        return self._triton_tables[key]

    def _tcnn_forward(self, positions: torch.Tensor) -> torch.Tensor:
        """tiny-cuda-nn's kernels on our ``params`` (one state, one layout, portable checkpoints).

        The native module is created on the positions' device and recreated when the module moves; an empty
        batch is answered here (tcnn would launch its kernels on 0 rows; its bindings do not guard that), and
        tcnn is handed our ``params`` exactly as its own ``Module.forward`` expects them: a CUDA float32
        contiguous ``nn.Parameter`` of ``n_params`` values on the input's device (its bindings check this too;
        we check first for a clear message). tcnn's own initial params are dropped; a fp32 encoding's loss
        scale is 1.
        """
        if positions.shape[0] == 0:
            return positions.new_zeros((0, self.get_out_dim()))
        params = self.params
        if params.device != positions.device or params.dtype != torch.float32 or not params.is_contiguous():
            raise RuntimeError(
                f"backend='tcnn' needs contiguous float32 params on the positions' device {positions.device}, "
                f"got {params.dtype} on {params.device}"
            )
        encoding = self._tcnn_encoding
        if encoding is None or encoding.params.device != positions.device:
            with torch.cuda.device(positions.device):
                encoding = _backend.tcnn_module().Encoding(3, self.tcnn_config(), dtype=torch.float32)
            if encoding.params.numel() != params.numel() or encoding.params.device != positions.device:
                raise RuntimeError(
                    f"tiny-cuda-nn holds {encoding.params.numel()} grid parameters on {encoding.params.device}, "
                    f"our layout {params.numel()} on {positions.device}"
                )
            self.__dict__["_tcnn_encoding"] = encoding  # not a submodule: ``params`` stays our only state
        encoding.params = params  # tcnn's forward reads its ``params`` attribute: share ours
        return encoding(positions.to(torch.float32).contiguous())

    def __getstate__(self) -> dict:
        """Pickle (torch.save of the module, deepcopy) without the native tcnn module or device-side tables."""
        state = self.__dict__.copy()
        state["_tcnn_encoding"] = None
        state["_triton_tables"] = {}
        return state

    @classmethod
    def from_nerfstudio(cls, encoding: nn.Module, backend: Backend = "auto") -> HashGridEncoding:
        """Copy of a nerfstudio ``HashEncoding``: its torch ``hash_table``, or its tcnn params when it used tcnn."""
        tcnn_encoding = getattr(encoding, "tcnn_encoding", None)
        ours = cls(
            num_levels=encoding.num_levels,
            features_per_level=encoding.features_per_level,
            log2_hashmap_size=encoding.log2_hashmap_size,
            base_resolution=encoding.min_res,
            per_level_scale=float(encoding.growth_factor),
            convention="tcnn" if tcnn_encoding is not None else "nerfstudio",
            backend=backend,
        )
        source = tcnn_encoding.params if tcnn_encoding is not None else encoding.hash_table
        with torch.no_grad():
            ours.params.copy_(source.detach().reshape(-1).to(ours.params.dtype))
        return ours

    def nerfstudio_hash_table(self) -> torch.Tensor:
        """The ``(num_levels * 2^log2_hashmap_size, features)`` table of nerfstudio's torch HashEncoding (a view)."""
        if self.convention != "nerfstudio":
            raise ValueError("only convention='nerfstudio' has nerfstudio's hash_table layout")
        return self.params.view(-1, self.features_per_level)

