"""The field of raw voxels: trilinear interpolation of a normalised volume (reference renderings, field cache)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class DenseGridField(nn.Module):
    """Trilinear interpolation of a normalised volume (Z, Y, X) spanning the box [-half_size, half_size]; 0 outside.

    This is the field of the reference renderings (the raw voxels); see DESIGN.md for the coordinates.
    """

    volume: torch.Tensor
    half_size: torch.Tensor

    def __init__(self, volume_normalized: torch.Tensor, half_size: torch.Tensor | Sequence[float]) -> None:
        super().__init__()
        volume = torch.as_tensor(volume_normalized, dtype=torch.float32)
        half = torch.as_tensor(half_size, dtype=torch.float32)
        if volume.dim() != 3 or min(volume.shape) < 2:
            raise ValueError(
                f"DenseGridField needs a (Z, Y, X) volume with at least 2 voxels per axis, got {tuple(volume.shape)}"
            )
        if half.shape != (3,) or not bool(torch.all(half > 0)):
            raise ValueError(f"half_size must be 3 positive numbers (x, y, z), got {half.tolist()}")
        self.register_buffer("volume", volume.contiguous())
        self.register_buffer("half_size", half)

    @classmethod
    def from_volume(cls, volume) -> "DenseGridField":
        """The raw voxels of a `data.volume_io.Volume`, normalised to [0, 1], spanning its scene box."""
        return cls(torch.from_numpy(volume.normalized_array()), torch.as_tensor(np.asarray(volume.half_size)))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Values (M,) at world points (M, 3) (x, y, z)."""
        # grid_sample's grid holds (x, y, z) in [-1, 1]; align_corners=True puts -1 and 1 on the end voxel centres.
        grid = (points / self.half_size).to(self.volume.dtype)
        values = F.grid_sample(
            self.volume[None, None],
            grid.view(1, 1, 1, -1, 3),
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        ).view(-1)
        return values.masked_fill(grid.abs().amax(dim=-1) > 1.0, 0.0)
