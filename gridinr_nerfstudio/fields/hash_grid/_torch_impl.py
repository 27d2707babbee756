"""Pure-PyTorch reference of the hash-grid kernels: encoding (autograd gives both gradients) and the lazy Adam step.

Runs on any device; the C++ and tiny-cuda-nn backends are tested against it.
"""

from __future__ import annotations

import torch

from gridinr_nerfstudio.fields.hash_grid.geometry import HASH_PRIMES, GridGeometry

_CORNERS = torch.tensor([[c & 1, (c >> 1) & 1, c >> 2] for c in range(8)], dtype=torch.int64)  # x fastest, like tcnn
_UINT32_MASK = 0xFFFFFFFF


def torch_encode(positions: torch.Tensor, params: torch.Tensor, geometry: GridGeometry, features: int) -> torch.Tensor:
    """Pure-PyTorch encoding: the same index math in int64 masked to uint32; autograd gives both gradients."""
    corners = _CORNERS.to(positions.device)
    indices, weights = [], []
    for level in range(geometry.num_levels):
        scaled = positions * geometry.scales[level] + geometry.shift
        lower = torch.floor(scaled)
        frac = scaled - lower
        grid = lower.to(torch.int64)[:, None, :] + corners  # (N, 8, 3)
        if geometry.dense[level]:
            resolution = geometry.resolutions[level]
            raw = grid[..., 0] + grid[..., 1] * resolution + grid[..., 2] * (resolution * resolution & _UINT32_MASK)
        else:
            raw = grid[..., 0] ^ (grid[..., 1] * HASH_PRIMES[1]) ^ (grid[..., 2] * HASH_PRIMES[2])
        index = (raw & _UINT32_MASK) % geometry.table_sizes[level]
        indices.append(index + geometry.table_offsets[level])
        weights.append(torch.where(corners.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(dim=-1))
    index = torch.stack(indices, dim=1)  # (N, L, 8)
    values = params.view(-1, features).index_select(0, index.reshape(-1)).view(*index.shape, features)  # (N, L, 8, F)
    encoded = (torch.stack(weights, dim=1)[..., None] * values).sum(dim=2)
    return encoded.reshape(positions.shape[0], geometry.num_levels * features)


def torch_sparse_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step_size: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """The same update as the C++ ``sparse_adam_step`` in torch ops (any device); zeroes ``grad``."""
    touched = grad != 0
    g = grad[touched]
    m = exp_avg[touched].mul_(beta1).add_(g, alpha=1 - beta1)
    v = exp_avg_sq[touched].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg[touched] = m
    exp_avg_sq[touched] = v
    param[touched] -= step_size * m / (v.sqrt() + eps)
    grad.zero_()
