"""The grid INR: a multi-resolution hash encoding plus a small MLP, xyz -> normalised voxel value.

Points are world coordinates; the field maps them into the unit cube of the scene box (DESIGN.md) and
returns 0 outside the box, the value of empty space after normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from nerfstudio.field_components.mlp import MLP
from torch import nn

from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.fields.hash_grid.encoding import HashGridEncoding


@dataclass
class VolumeFieldSettings:
    """Encoding and MLP sizes (instant-ngp defaults)."""

    num_levels: int = 16
    features_per_level: int = 2
    log2_hashmap_size: int = 21
    """2^21 entries per level (instant-ngp: 2^19): the fine levels of a 128^3 volume then barely collide
    (README, Benchmarks)."""
    base_resolution: int = 16
    max_resolution: int = 256
    """Finest grid resolution; about 2x the largest volume dimension resolves single voxels."""
    hidden_dim: int = 64
    num_hidden_layers: int = 2
    backend: str = "auto"
    """Hash-grid backend: auto (CUDA: tiny-cuda-nn when installed, else our Triton kernels; CPU: our C++ kernels;
    else torch), tcnn, triton, cpp, torch."""


def value_mlp(settings: VolumeFieldSettings) -> MLP:
    """The decoder from concatenated level features to one value (nerfstudio's MLP, linear output)."""
    return MLP(
        in_dim=settings.num_levels * settings.features_per_level,
        num_layers=settings.num_hidden_layers + 1,
        layer_width=settings.hidden_dim,
        out_dim=1,
        activation=nn.ReLU(),
        out_activation=None,
        implementation="torch",
    )


class VolumeField(nn.Module):
    """Hash-grid INR of one scalar volume."""

    def __init__(self, aabb: torch.Tensor, settings: VolumeFieldSettings):
        super().__init__()
        self.register_buffer("aabb", aabb.clone().float())
        self.settings = settings
        self.encoding = HashGridEncoding(
            num_levels=settings.num_levels,
            features_per_level=settings.features_per_level,
            log2_hashmap_size=settings.log2_hashmap_size,
            base_resolution=settings.base_resolution,
            max_resolution=settings.max_resolution,
            backend=settings.backend,
        )
        self.mlp = value_mlp(settings)

    def to_unit_cube(self, points: torch.Tensor) -> torch.Tensor:
        """World points -> [0, 1]^3 of the scene box."""
        return (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0])

    def forward_unit(self, unit_points: torch.Tensor) -> torch.Tensor:
        """Values (N,) at points already in the unit cube (no masking).

        When no gradient is wanted (rendering a frozen or evaluated field) the encoding and the MLP run fused
        per block of points on the C++ backend (see `HashGridEncoding.fused_decode`); otherwise through autograd.
        """
        if not self.needs_autograd(unit_points):
            values = self.encoding.fused_decode(unit_points, self.decoder_layers())
            if values is not None:
                return values
        return self.mlp(self.encoding(unit_points)).squeeze(-1)

    def needs_autograd(self, points: torch.Tensor) -> bool:
        """Whether a result could be differentiated: grad mode on and the points or any parameter require it."""
        return torch.is_grad_enabled() and (points.requires_grad or any(p.requires_grad for p in self.parameters()))

    def decoder_layers(self) -> list[nn.Linear]:
        """The MLP's linear layers, when it is the plain ReLU stack the fused kernel computes; else []."""
        layers = list(self.mlp.layers)
        plain = (
            isinstance(self.mlp.activation, nn.ReLU) and self.mlp.out_activation is None
            and not getattr(self.mlp, "_skip_connections", None) and all(isinstance(layer, nn.Linear) for layer in layers)
        )
        return layers if plain else []

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Normalised values (N,) at world points (N, 3); 0 outside the scene box."""
        unit = self.to_unit_cube(points)
        inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
        if bool(inside.all()):  # the usual case for ray samples, which lie in the box
            return self.forward_unit(unit).to(points.dtype)
        values = torch.zeros(points.shape[0], dtype=points.dtype, device=points.device)
        if inside.any():
            values = values.masked_scatter(inside, self.forward_unit(unit[inside]).to(points.dtype))
        return values


@torch.no_grad()
def decode_field_cache(field: VolumeField, dims, resolution: int = 0, chunk: int = 1 << 18) -> DenseGridField:
    """Evaluate the field on a grid (keeping the volume's aspect ratio) and serve it by trilinear lookup."""
    dims = np.asarray(dims, dtype=np.float64)
    longest = dims.max()
    target = min(longest, 256) if resolution == 0 else resolution
    grid_dims = np.maximum(2, np.round(dims * target / longest)).astype(int)  # (X, Y, Z)
    device = field.aabb.device
    axes = [torch.linspace(0.0, 1.0, int(n), device=device) for n in grid_dims]
    zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    unit = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
    values = torch.cat([field.forward_unit(unit[i : i + chunk]) for i in range(0, unit.shape[0], chunk)])
    grid = values.reshape(int(grid_dims[2]), int(grid_dims[1]), int(grid_dims[0])).clamp(0.0, 1.0)
    return DenseGridField(grid, field.aabb[1].clone())
