"""The raw-voxel field read through the volume's memmap: trilinear values at points without loading the volume.

`DenseGridField` holds the whole volume as float32 (4 bytes a voxel); this reads only the 8 neighbours of each
point, in chunks, so its memory depends on how many points are asked for, not on the volume's size. Used for
reference renderings of volumes that are not preloaded: their cost is proportional to pixels x samples.
"""

from __future__ import annotations

import numpy as np
import torch

from gridinr_nerfstudio.data.volume_io import Volume
from gridinr_nerfstudio.fields.dense_grid import DenseGridField

DEFAULT_DENSE_MAX_BYTES = 2 << 30  # float32 copies up to this size are held in memory (fast grid_sample lookups)


class MemmapGridField:
    """Trilinear normalised values (M,) at world points (M, 3); 0 outside the scene box. Same values as a
    DenseGridField of `volume.normalized_array()` (float64 arithmetic here, float32 there)."""

    def __init__(self, volume: Volume, chunk_points: int = 1 << 20):
        self.volume = volume
        self.chunk_points = chunk_points
        self.half_size = torch.as_tensor(np.asarray(volume.half_size, dtype=np.float32))

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        flat = points.detach().reshape(-1, 3)
        out = torch.empty(flat.shape[0], dtype=torch.float32)
        for start in range(0, flat.shape[0], self.chunk_points):
            chunk = flat[start : start + self.chunk_points].cpu()
            voxel = self.volume.world_to_voxel(chunk.numpy())
            out[start : start + chunk.shape[0]] = torch.from_numpy(self.volume.sample_normalized(voxel))
        half = self.half_size.to(flat)
        outside = (flat.abs() > half * (1 + 1e-6)).any(dim=-1)
        return out.to(points.device).masked_fill(outside, 0.0)


def raw_voxel_field(volume: Volume, dense_max_bytes: int = DEFAULT_DENSE_MAX_BYTES):
    """The field of the raw voxels: a DenseGridField when its float32 copy fits `dense_max_bytes`, else memmapped."""
    if int(np.prod(volume.info.dims)) * 4 <= dense_max_bytes and min(volume.info.dims) >= 2:
        normalized = torch.from_numpy(volume.normalized_array())
        return DenseGridField(normalized, torch.as_tensor(np.asarray(volume.half_size)))
    return MemmapGridField(volume)
