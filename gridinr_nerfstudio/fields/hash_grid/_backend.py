"""The compiled hash-grid kernels (our C++/OpenMP extension, tiny-cuda-nn, Triton) and the table-gradient buffers.

All are optional: ``cpp`` is None when the extension was not built; tiny-cuda-nn (importing it initialises CUDA)
and our Triton kernels (importing triton takes a second) are imported lazily. Read ``_backend.cpp`` at call time (tests switch it off by patching it).
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch.utils.weak import WeakTensorKeyDictionary

try:
    cpp = importlib.import_module("gridinr_nerfstudio.fields.hash_grid._hash_grid_cpp")
except ImportError:
    cpp = None

_LAZY_MODULES: dict[str, object] = {}
"""Optional modules imported on first use: the module, or False when it cannot be imported here."""
TCNN_MODULE = "tinycudann"
TRITON_MODULE = "gridinr_nerfstudio.fields.hash_grid._triton"
TRITON_FUSED_MODULE = "gridinr_nerfstudio.fields.hash_grid._triton_fused"


def _lazy_module(name: str):
    """``name`` imported once (the module), or False when the import fails on this machine."""
    if name not in _LAZY_MODULES:
        try:
            _LAZY_MODULES[name] = importlib.import_module(name)
        except (ImportError, OSError, RuntimeError):
            _LAZY_MODULES[name] = False
    return _LAZY_MODULES[name]


def cpp_extension_available() -> bool:
    """True when the C++/OpenMP kernels were built (``pip install --no-build-isolation -e .``)."""
    return cpp is not None


def tcnn_available() -> bool:
    """True when ``import tinycudann`` works (it needs CUDA)."""
    return _lazy_module(TCNN_MODULE) is not False


_tcnn_refusals_said: set[str] = set()


def tcnn_usable(device: torch.device) -> bool:
    """Whether the ``auto`` backend may use tiny-cuda-nn on `device`: installed, its subprocess probe (a forward and
    backward pass, tcnn_probe.py) passed on this build and device, and it imports. When it is installed but
    refused, one line on stderr says why (once per device and process)."""
    from gridinr_nerfstudio.fields.hash_grid import tcnn_probe

    if tcnn_probe.build_identity(TCNN_MODULE) is None:
        return False
    verdict = tcnn_probe.probe(TCNN_MODULE, device)
    if verdict.ok and tcnn_available():
        return True
    if str(device) not in _tcnn_refusals_said:
        _tcnn_refusals_said.add(str(device))
        reason = verdict.reason if not verdict.ok else "it does not import in this process"
        print(f"gridinr: tiny-cuda-nn not used on {device}: {reason} (verdict cached in {tcnn_probe.cache_path()}); "
              "using the next backend", file=sys.stderr)
    return False


def triton_available() -> bool:
    """True when our Triton kernels import (triton ships with CUDA builds of torch)."""
    return _lazy_module(TRITON_MODULE) is not False


def triton_module():
    """The imported ``_triton`` kernels module (call ``triton_available()`` first)."""
    return _lazy_module(TRITON_MODULE)


def triton_fused_module():
    """The imported ``_triton_fused`` module (fused field inference), or False when it cannot be imported."""
    return _lazy_module(TRITON_FUSED_MODULE)


def tcnn_module():
    """The imported ``tinycudann`` module (call ``tcnn_available()`` first)."""
    return _lazy_module(TCNN_MODULE)


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
