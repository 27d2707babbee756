"""Comparisons shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import itertools

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


def boundary_points(encoding, inside: int = 40, outside: int = 0) -> torch.Tensor:
    """`inside` random points, box faces and corners, points exactly on the cell boundaries of every level, and
    `outside` points beyond the box (negative cells and the upper face: the uint32 wrap of both index kinds)."""
    generator = torch.Generator().manual_seed(0)
    parts = [torch.rand(inside, 3, generator=generator)]
    parts.append(torch.tensor(list(itertools.product([0.0, 0.5, 1.0], repeat=3))))  # box faces, corners, centre
    for scale in encoding.geometry.scales:
        # p = x * s + shift is an integer: x = (k - shift) / s, for some k along each axis
        k = torch.arange(0, int(scale) + 1, max(1, int(scale) // 4), dtype=torch.float32)
        x = ((k - encoding.geometry.shift) / scale).clamp(0, 1)
        parts.append(torch.stack([x, x.flip(0), torch.full_like(x, 0.25)], dim=1))
    if outside:
        parts.append(torch.rand(outside, 3, generator=generator) * 1.4 - 0.2)
    return torch.cat(parts).to(encoding.params.dtype)


def torch_and_triton_pair(features: int = 2, convention: str = "tcnn", dtype=torch.float32, **geometry):
    """A torch-backend hash-grid encoding with O(1) random params and a triton-backend copy of it (same state dict);
    4 levels, table 2^9, resolutions 3..40 (dense and hashed levels) unless `geometry` says otherwise."""
    from gridinr_nerfstudio.fields.hash_grid.encoding import HashGridEncoding

    kwargs = dict(num_levels=4, log2_hashmap_size=9, base_resolution=3, max_resolution=40,
                  features_per_level=features, convention=convention) | geometry
    reference = HashGridEncoding(backend="torch", **kwargs).to(dtype)
    with torch.no_grad():
        reference.params.normal_(generator=torch.Generator().manual_seed(features))
    triton_encoding = HashGridEncoding(backend="triton", **kwargs).to(dtype)
    triton_encoding.load_state_dict(reference.state_dict())
    return reference, triton_encoding
