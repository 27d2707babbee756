"""Per-level grid geometry shared by every hash-grid backend (tiny-cuda-nn's and nerfstudio's conventions).

See ``encoding.py`` for the formulas; a ``GridGeometry`` is what each backend consumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

HASH_PRIMES = (1, 2654435761, 805459861)
SUPPORTED_FEATURES_PER_LEVEL = (1, 2, 4, 8)


@dataclass(frozen=True)
class GridGeometry:
    """Per-level description consumed by every backend (scales are exact float32 values)."""

    scales: tuple[float, ...]
    shift: float
    resolutions: tuple[int, ...]
    dense: tuple[bool, ...]
    table_offsets: tuple[int, ...]
    table_sizes: tuple[int, ...]

    @property
    def num_levels(self) -> int:
        return len(self.scales)

    @property
    def num_entries(self) -> int:
        return self.table_offsets[-1] + self.table_sizes[-1]

    def kernel_arguments(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(scales float64 (L,), level_info int64 (L, 4) = [resolution, dense, offset, size], shift) for the C++ side."""
        info = torch.tensor(
            list(zip(self.resolutions, [int(d) for d in self.dense], self.table_offsets, self.table_sizes)),
            dtype=torch.int64,
        )
        return torch.tensor(self.scales, dtype=torch.float64), info, self.shift


def tcnn_geometry(
    num_levels: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float
) -> GridGeometry:
    """tiny-cuda-nn HashGrid levels (GridEncodingTemplated): float32 scales, slices padded to 8 entries."""
    log2_scale = np.log2(np.float32(per_level_scale))
    hashmap_size = 1 << log2_hashmap_size
    max_dense = np.iinfo(np.uint32).max // 2
    scales, resolutions, dense, offsets, sizes = [], [], [], [], []
    offset = 0
    for level in range(num_levels):
        scale = np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1.0)
        resolution = math.ceil(float(scale)) + 1
        dense_entries = min(resolution**3, max_dense)
        size = min(-(-dense_entries // 8) * 8, hashmap_size)
        scales.append(float(scale))
        resolutions.append(resolution)
        dense.append(resolution**3 <= size)
        offsets.append(offset)
        sizes.append(size)
        offset += size
    return GridGeometry(tuple(scales), 0.5, tuple(resolutions), tuple(dense), tuple(offsets), tuple(sizes))


def nerfstudio_geometry(
    num_levels: int, log2_hashmap_size: int, base_resolution: int, growth_factor: float
) -> GridGeometry:
    """nerfstudio HashEncoding levels: its float32 ``floor(min_res * growth**l)`` scalings, all levels hashed."""
    scalings = torch.floor(base_resolution * growth_factor ** torch.arange(num_levels))  # nerfstudio's expression
    size = 1 << log2_hashmap_size
    scales = tuple(float(s) for s in scalings.to(torch.float32))
    return GridGeometry(
        scales=scales,
        shift=0.0,
        resolutions=tuple(int(s) + 1 for s in scales),
        dense=(False,) * num_levels,
        table_offsets=tuple(level * size for level in range(num_levels)),
        table_sizes=(size,) * num_levels,
    )

