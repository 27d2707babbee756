"""Comparisons shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np
import torch


def voxel_coordinates(volume, aabb: torch.Tensor, points: torch.Tensor) -> np.ndarray:
    """World points -> continuous voxel indices (x, y, z), by DESIGN.md's formula."""
    dims = np.asarray(volume.info.dims, dtype=np.float64)
    low, high = aabb[0].double().cpu().numpy(), aabb[1].double().cpu().numpy()
    return (points.double().cpu().numpy() - low) / (high - low) * (dims - 1)


def compare_encodings(reference, other, points: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Two hash-grid encodings on the same parameters agree: outputs, table gradients, position gradients."""
    generator = torch.Generator(device=points.device).manual_seed(1)
    upstream = torch.randn(points.shape[0], reference.get_out_dim(), generator=generator, device=points.device,
                           dtype=points.dtype)
    results = []
    for encoding in (reference, other):
        positions = points.clone().requires_grad_(True)
        encoded = encoding(positions)
        (encoded * upstream).sum().backward()
        results.append((encoded.detach(), encoding.params.grad, positions.grad))
    (expected, expected_table, expected_positions), (encoded, table, positions_grad) = results
    torch.testing.assert_close(encoded, expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(table, expected_table, rtol=rtol, atol=atol)
    scale = expected_positions.abs().max()  # sums of O(scale) terms over levels: compare relative to the largest
    torch.testing.assert_close(positions_grad / scale, expected_positions / scale, rtol=rtol, atol=atol)
