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
    """Hash-grid backend: auto (tiny-cuda-nn on CUDA when installed, else our C++ kernels, else torch), tcnn, cpp, torch."""
    time_latent_dim: int = 16
    """Sequences only (more than one time step): size of the learned per-step latent appended to the MLP input;
    the hash grid is shared by all steps. A time between two steps interpolates their latents."""


def value_mlp(settings: VolumeFieldSettings, extra_inputs: int = 0) -> MLP:
    """The decoder from concatenated level features (and `extra_inputs` more) to one value (nerfstudio's MLP)."""
    return MLP(
        in_dim=settings.num_levels * settings.features_per_level + extra_inputs,
        num_layers=settings.num_hidden_layers + 1,
        layer_width=settings.hidden_dim,
        out_dim=1,
        activation=nn.ReLU(),
        out_activation=None,
        implementation="torch",
    )


class VolumeField(nn.Module):
    """Hash-grid INR of one scalar volume, or of a sequence of `num_times` steps (time t in [0, 1], see
    data/timesteps.py): one shared hash grid, a learned latent per step appended to the MLP input."""

    def __init__(self, aabb: torch.Tensor, settings: VolumeFieldSettings, num_times: int = 1):
        super().__init__()
        self.register_buffer("aabb", aabb.clone().float())
        self.settings = settings
        self.num_times = int(num_times)
        latent_dim = settings.time_latent_dim if self.num_times > 1 else 0
        if latent_dim:  # absent for one step: single-step checkpoints keep their keys
            self.time_latents = nn.Parameter(torch.randn(self.num_times, latent_dim) * 0.1)
        self.encoding = HashGridEncoding(
            num_levels=settings.num_levels,
            features_per_level=settings.features_per_level,
            log2_hashmap_size=settings.log2_hashmap_size,
            base_resolution=settings.base_resolution,
            max_resolution=settings.max_resolution,
            backend=settings.backend,
        )
        self.mlp = value_mlp(settings, latent_dim)

    def to_unit_cube(self, points: torch.Tensor) -> torch.Tensor:
        """World points -> [0, 1]^3 of the scene box."""
        return (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0])

    def latent(self, times: torch.Tensor | float) -> torch.Tensor:
        """Per-step latents linearly interpolated at times in [0, 1]: (N, D) for times (N,), (D,) for a scalar."""
        position = torch.as_tensor(times, dtype=torch.float32, device=self.time_latents.device).clamp(0, 1)
        position = position * (self.num_times - 1)
        low = position.floor().long().clamp(max=self.num_times - 2)
        weight = (position - low)[..., None]
        return torch.lerp(self.time_latents[low], self.time_latents[low + 1], weight)

    def forward_unit(self, unit_points: torch.Tensor, times: torch.Tensor | float | None = None) -> torch.Tensor:
        """Values (N,) at points already in the unit cube (no masking), at `times` (N,) or one time for all
        (sequences; None: the first step).

        When no gradient is wanted (rendering a frozen or evaluated field) the encoding and the MLP run fused
        per block of points on the C++ backend (see `HashGridEncoding.fused_decode`); otherwise through autograd.
        """
        one_time = times is None or not torch.is_tensor(times) or times.dim() == 0
        if not self.needs_autograd(unit_points) and one_time:
            values = self.encoding.fused_decode(unit_points, self.decoder_layers(0.0 if times is None else times))
            if values is not None:
                return values
        features = self.encoding(unit_points)
        if self.num_times > 1:
            latent = self.latent(0.0 if times is None else times)
            latent = latent.expand(features.shape[0], -1) if latent.dim() == 1 else latent
            features = torch.cat([features, latent.to(features)], dim=-1)
        return self.mlp(features).squeeze(-1)

    def needs_autograd(self, points: torch.Tensor) -> bool:
        """Whether a result could be differentiated: grad mode on and the points or any parameter require it."""
        return torch.is_grad_enabled() and (points.requires_grad or any(p.requires_grad for p in self.parameters()))

    def decoder_layers(self, time: torch.Tensor | float = 0.0) -> list[nn.Linear]:
        """The MLP's linear layers, when it is the plain ReLU stack the fused kernel computes; else [].

        For a sequence, the latent of `time` is folded into the first layer's bias (W [f; z] + b = W_f f + (W_z z + b)).
        """
        layers = list(self.mlp.layers)
        plain = (
            isinstance(self.mlp.activation, nn.ReLU) and self.mlp.out_activation is None
            and not getattr(self.mlp, "_skip_connections", None) and all(isinstance(layer, nn.Linear) for layer in layers)
        )
        if not plain:
            return []
        if self.num_times > 1:
            first, width = layers[0], self.encoding.get_out_dim()
            folded = nn.Linear(width, first.out_features).to(first.weight)
            folded.weight.data = first.weight.data[:, :width].contiguous()
            folded.bias.data = first.bias.data + first.weight.data[:, width:] @ self.latent(time).to(first.weight)
            layers = [folded] + layers[1:]
        return layers

    def forward(self, points: torch.Tensor, time: float | None = None) -> torch.Tensor:
        """Normalised values (N,) at world points (N, 3) at one time; 0 outside the scene box."""
        unit = self.to_unit_cube(points)
        inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
        if bool(inside.all()):  # the usual case for ray samples, which lie in the box
            return self.forward_unit(unit, time).to(points.dtype)
        values = torch.zeros(points.shape[0], dtype=points.dtype, device=points.device)
        if inside.any():
            values = values.masked_scatter(inside, self.forward_unit(unit[inside], time).to(points.dtype))
        return values


@torch.no_grad()
def decode_field_cache(field: VolumeField, dims, resolution: int = 0, chunk: int = 1 << 18,
                       time: float | None = None) -> DenseGridField:
    """Evaluate the field on a grid (keeping the volume's aspect ratio) and serve it by trilinear lookup."""
    dims = np.asarray(dims, dtype=np.float64)
    longest = dims.max()
    target = min(longest, 256) if resolution == 0 else resolution
    grid_dims = np.maximum(2, np.round(dims * target / longest)).astype(int)  # (X, Y, Z)
    device = field.aabb.device
    axes = [torch.linspace(0.0, 1.0, int(n), device=device) for n in grid_dims]
    zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    unit = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
    values = torch.cat([field.forward_unit(unit[i : i + chunk], time) for i in range(0, unit.shape[0], chunk)])
    grid = values.reshape(int(grid_dims[2]), int(grid_dims[1]), int(grid_dims[0])).clamp(0.0, 1.0)
    return DenseGridField(grid, field.aabb[1].clone())
