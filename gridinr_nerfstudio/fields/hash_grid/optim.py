"""HashGridAdam: lazy fused Adam for hash tables."""

from __future__ import annotations

import math

import torch

from gridinr_nerfstudio.fields.hash_grid import _backend
from gridinr_nerfstudio.fields.hash_grid._torch_impl import torch_sparse_adam_step
from gridinr_nerfstudio.thread_policy import kernel_threads


class HashGridAdam(torch.optim.Optimizer):
    """Lazy Adam for hash tables, fused into one pass (C++ on CPU, Triton on CUDA, torch ops elsewhere).

    Update rule of ``torch.optim.SparseAdam`` applied to a dense gradient whose exact zeros mean "not touched this
    step" (tiny-cuda-nn's Adam skips zero-gradient grid entries the same way): touched entries update their moments
    and move by ``lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)`` with the global step ``t``,
    untouched ones keep value and moments. Why: dense Adam over a 2^19-per-level table costs more than the
    encoding itself on CPU. The pass zeroes the gradient as it reads it and hands the buffer back to the next
    ``HashGridEncoding`` backward (no table-sized allocation and memset per step), so ``param.grad`` is None
    after ``step()``; do not keep references to a gradient across ``step()``, its buffer is reused.
    """

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-15) -> None:
        if lr < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or eps < 0:
            raise ValueError(f"HashGridAdam: invalid lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("HashGridAdam expects dense gradients (zeros mark untouched entries)")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                state["step"] += 1
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                fused = (
                    _backend.cpp is not None
                    and param.device.type == "cpu"
                    and param.dtype in (torch.float32, torch.float64)
                    and param.is_contiguous()
                    and grad.is_contiguous()
                )
                triton_ok = (
                    param.device.type == "cuda"
                    and param.dtype in (torch.float32, torch.float64)
                    and param.is_contiguous()
                    and grad.is_contiguous()
                    and _backend.triton_available()
                )
                if fused:
                    _backend.cpp.sparse_adam_step(
                        param, grad, state["exp_avg"], state["exp_avg_sq"], step_size, beta1, beta2, group["eps"],
                        kernel_threads(),
                    )
                elif triton_ok:
                    _backend.triton_module().sparse_adam_step(
                        param, grad, state["exp_avg"], state["exp_avg_sq"], step_size, beta1, beta2, group["eps"]
                    )
                else:
                    torch_sparse_adam_step(
                        param, grad, state["exp_avg"], state["exp_avg_sq"], step_size, beta1, beta2, group["eps"]
                    )
                _backend.recycle_grad_buffer(param, grad)
                param.grad = None
        return loss
