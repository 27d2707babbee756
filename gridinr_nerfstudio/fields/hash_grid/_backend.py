"""The compiled hash-grid kernels (our C++/OpenMP extension, tiny-cuda-nn, Triton) and the table-gradient buffers.

All are optional: ``cpp`` is None when the extension was not built; tiny-cuda-nn (importing it initialises CUDA)
and our Triton kernels (importing triton takes a second) are imported lazily. Read ``_backend.cpp`` at call time (tests switch it off by patching it).
"""

from __future__ import annotations

import importlib

import torch
from torch.utils.weak import WeakTensorKeyDictionary

try:
    cpp = importlib.import_module("gridinr_nerfstudio.fields.hash_grid._hash_grid_cpp")
except ImportError:
    cpp = None

_tcnn_module = None
_triton_module = None


def cpp_extension_available() -> bool:
    """True when the C++/OpenMP kernels were built (``pip install --no-build-isolation -e .``)."""
    return cpp is not None


def tcnn_available() -> bool:
    """True when ``import tinycudann`` works (it needs CUDA)."""
    global _tcnn_module
    if _tcnn_module is None:
        try:
            _tcnn_module = importlib.import_module("tinycudann")
        except (ImportError, OSError, RuntimeError):
            _tcnn_module = False
    return _tcnn_module is not False


def triton_available() -> bool:
    """True when our Triton kernels import (triton ships with CUDA builds of torch)."""
    global _triton_module
    if _triton_module is None:
        try:
            _triton_module = importlib.import_module("gridinr_nerfstudio.fields.hash_grid._triton")
        except (ImportError, OSError, RuntimeError):
            _triton_module = False
    return _triton_module is not False


def triton_module():
    """The imported ``_triton`` kernels module (call ``triton_available()`` first)."""
    return _triton_module


def tcnn_module():
    """The imported ``tinycudann`` module (call ``tcnn_available()`` first)."""
    return _tcnn_module


# Zeroed gradient buffers handed back by HashGridAdam after its step, keyed by parameter. Reusing one saves
# allocating (page faults) and clearing a dense table-sized gradient every step; autograd adopts the returned
# buffer as ``param.grad`` when the grad was None, so gradient semantics are unchanged.
_spare_grad_buffers: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def take_zeroed_grad_buffer(params: torch.Tensor) -> torch.Tensor:
    """The zeroed buffer HashGridAdam handed back for ``params`` if it still fits, else a new zeroed one."""
    spare = _spare_grad_buffers.pop(params, None)
    if spare is None or spare.shape != params.shape or spare.dtype != params.dtype or spare.device != params.device:
        return torch.zeros_like(params)
    return spare


def recycle_grad_buffer(params: torch.Tensor, grad: torch.Tensor) -> None:
    """Hand ``grad`` (zeroed by the optimizer) back for the next backward of ``params``."""
    _spare_grad_buffers[params] = grad
