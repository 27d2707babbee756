"""The grid INR: a multi-resolution hash encoding plus a small MLP, xyz -> normalised voxel value.

Points are world coordinates; the field maps them into the unit cube of the scene box (DESIGN.md) and
returns 0 outside the box, the value of empty space after normalisation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from nerfstudio.field_components.mlp import MLP
from torch import nn

from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.fields.hash_grid.encoding import HashGridEncoding
from gridinr_nerfstudio.fields.time_features import TimeField, blend_step_grids, resolve_time_field
from gridinr_nerfstudio.fields.time_hash_grid import TimeHashGrid

LOSS_SCALE = 1024.0
"""Static gradient scale of the float16 decoder (tiny-cuda-nn scales by 128): the gradient of a mean loss over
2^18 points is ~1e-7 per point, below float16's normal range (6e-5); scaled, it is not. bfloat16 needs none."""


def autocast_dtype(device_type: str) -> torch.dtype:
    """The decoder's dtype under `mixed_precision`: float16 on CUDA (tensor cores), bfloat16 elsewhere."""
    return torch.float16 if device_type == "cuda" else torch.bfloat16


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient multiplied by `scale` backward."""

    @staticmethod
    def forward(ctx, tensor, scale: float):
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def mixed_precision_decode(layers: list[nn.Linear], features: torch.Tensor, dtype: torch.dtype,
                           loss_scale: float = 1.0) -> torch.Tensor:
    """The ReLU stack of `layers` on float32 `features` (N, F) under autocast to `dtype`; float32 values (N,).

    With `loss_scale` != 1 the gradient entering the decoder is multiplied by it (so it stays in float16's range)
    and divided by it again, in float32, where it leaves: into the features (hence the tables) and into each weight
    and bias before they are cast down.
    """
    scaled = loss_scale != 1.0
    x = _ScaleGrad.apply(features, 1.0 / loss_scale) if scaled else features
    with torch.autocast(features.device.type, dtype=dtype):
        for index, layer in enumerate(layers):
            weight, bias = layer.weight, layer.bias
            if scaled:
                weight = _ScaleGrad.apply(weight, 1.0 / loss_scale)
                bias = None if bias is None else _ScaleGrad.apply(bias, 1.0 / loss_scale)
            x = nn.functional.linear(x, weight, bias)
            if index < len(layers) - 1:
                x = torch.relu(x)
    values = x.float().squeeze(-1)
    return _ScaleGrad.apply(values, loss_scale) if scaled else values


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
    coarse_to_fine: float = 0.0
    """Share of the training steps (of `--max-num-iterations`) over which the levels are switched on from coarse to
    fine (level l fades in while `level_progress` * num_levels goes from l - 1 to l), so early steps fit the coarse
    shape before fine levels add detail; 0: every level from the start. Measured by `gridinr-bench sweep`
    (docs/cpu_profiles.md)."""
    mixed_precision: bool = False
    """Training steps run the decoder MLP under torch.autocast (float16 on CUDA, with a static loss scale of
    `LOSS_SCALE` inside the decoder; bfloat16 elsewhere). The hash tables, their gradients and optimizer state,
    the MLP's weights and the field's output stay float32; inference (renders, volume PSNR, exports) is float32.
    Not nerfstudio's trainer ``--mixed-precision``, which autocasts the whole step. README, "GPU"."""
    time_field: TimeField = "auto"
    """What varies with time in a sequence (`timesteps` A:B; no effect on one step), fields/time_features.py:
    step_grids (a shared grid with half the table plus one grid per step with 1/(2T) of it), hash4d (a shared
    grid plus a 4-D hash grid over x, y, z, t, each half the table) or auto (step_grids up to 4 steps, hash4d
    beyond). Chosen by `gridinr-bench sequence` (README, "Time-varying volumes": at 4 steps hash4d was ahead on
    rotating and growing features only, at 100 steps by 3.4 dB)."""


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
    """Hash-grid INR of one scalar volume, or of a sequence of `num_times` steps at times t in [0, 1]
    (data/timesteps.py) with the time-varying part `settings.time_field` (fields/time_features.py): the field at a
    step's time is that step's fit, a time between two steps blends the two steps' features."""

    def __init__(self, aabb: torch.Tensor, settings: VolumeFieldSettings, num_times: int = 1):
        super().__init__()
        self.register_buffer("aabb", aabb.clone().float())
        self.settings = settings
        self.num_times = int(num_times)
        sequence = self.num_times > 1
        self.time_field = resolve_time_field(settings.time_field, self.num_times) if sequence else None
        half = settings.log2_hashmap_size - 1
        shared_log2 = half if sequence else settings.log2_hashmap_size
        self.encoding = self._grid(settings, shared_log2)
        extra = 0
        # Absent for one step: single-step checkpoints keep their keys.
        if self.time_field == "step_grids":
            step_log2 = max(10, shared_log2 - math.ceil(math.log2(self.num_times)))
            self.step_encodings = nn.ModuleList([self._grid(settings, step_log2) for _ in range(self.num_times)])
            extra = self.encoding.get_out_dim()
        elif self.time_field == "hash4d":
            self.time_grid = TimeHashGrid(self.num_times, settings.num_levels, settings.features_per_level, half,
                                          settings.base_resolution, settings.max_resolution, settings.backend)
            extra = self.time_grid.get_out_dim()
        elif sequence:
            raise ValueError(f"time_field must be step_grids or hash4d, got {self.time_field!r}")
        self.mlp = value_mlp(settings, extra)
        self.level_progress = 1.0
        """Share (0..1) of the coarse-to-fine schedule done; 1 (the default, and after loading) uses every level."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint of step grids where the settings say otherwise (a run of more than 4 steps from before
        `time_field`, whose config.yml now reads as `auto`) rebuilds this field as `step_grids` to load."""
        if self.time_field not in (None, "step_grids") and f"{prefix}step_encodings.0.params" in state_dict:
            self.__init__(self.aabb, dataclasses.replace(self.settings, time_field="step_grids"), self.num_times)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _grid(settings: VolumeFieldSettings, log2_hashmap_size: int) -> HashGridEncoding:
        return HashGridEncoding(
            num_levels=settings.num_levels,
            features_per_level=settings.features_per_level,
            log2_hashmap_size=log2_hashmap_size,
            base_resolution=settings.base_resolution,
            max_resolution=settings.max_resolution,
            backend=settings.backend,
        )

    def to_unit_cube(self, points: torch.Tensor) -> torch.Tensor:
        """World points -> [0, 1]^3 of the scene box."""
        return (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0])

    def time_parameters(self) -> list[nn.Parameter]:
        """The hash tables of a sequence's time-varying part ([] for a single step), trained like `encoding`'s."""
        if self.time_field == "step_grids":
            return list(self.step_encodings.parameters())
        if self.time_field == "hash4d":
            return [self.time_grid.params]
        return []

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"encoding": hash tables (lazy Adam), "mlp": dense weights (Adam)}: the field's optimizer groups."""
        return {"encoding": list(self.encoding.parameters()) + self.time_parameters(), "mlp": list(self.mlp.parameters())}

    def step_features(self, unit_points: torch.Tensor, times: torch.Tensor | float) -> torch.Tensor:
        """Features (N, F) of the per-step grids (`step_grids`) at `times` (N,) or one time."""
        return blend_step_grids(self.step_encodings, unit_points, times)

    def forward_unit(self, unit_points: torch.Tensor, times: torch.Tensor | float | None = None) -> torch.Tensor:
        """Values (N,) at points already in the unit cube (no masking), at `times` (N,) or one time for all
        (sequences; None: the first step).

        When no gradient is wanted (rendering a frozen or evaluated field of one step) the encoding and the MLP run
        fused per block of points on the C++ and Triton backends (see `HashGridEncoding.fused_decode`); otherwise
        through autograd.
        """
        if self.num_times > 1:
            return self.decode(self.sequence_features(unit_points, 0.0 if times is None else times))
        if not self.needs_autograd(unit_points) and self.level_progress >= 1.0:
            values = self.encoding.fused_decode(unit_points, self.decoder_layers())
            if values is not None:
                return values
        return self.decode(self.weigh_levels(self.encoding(unit_points)))

    def sequence_features(self, unit_points: torch.Tensor, times: torch.Tensor | float) -> torch.Tensor:
        """The MLP's input (N, F) of a sequence field at `times` (see `time_field`)."""
        features = self.weigh_levels(self.encoding(unit_points))
        if self.time_field == "step_grids":
            varying = self.weigh_levels(self.step_features(unit_points, times))
        else:
            varying = self.weigh_levels(self.time_grid(unit_points, times))
        return torch.cat([features, varying.to(features)], dim=-1)

    def level_weights(self) -> torch.Tensor | None:
        """Per-level weights (num_levels,) of the coarse-to-fine schedule, or None when every level counts fully."""
        if self.level_progress >= 1.0:
            return None
        levels = self.settings.num_levels
        ramp = max(0.0, self.level_progress) * levels - torch.arange(levels, dtype=torch.float32) + 1.0
        return ramp.clamp(0.0, 1.0)

    def weigh_levels(self, features: torch.Tensor) -> torch.Tensor:
        """Level features (N, num_levels * F) scaled by `level_weights` (unchanged when there are none)."""
        weights = self.level_weights()
        if weights is None:
            return features
        per_feature = weights.to(features).repeat_interleave(features.shape[-1] // weights.numel())
        return features * per_feature

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """The MLP on features (N, F): float32 values (N,); under autocast in training steps with
        `mixed_precision` (see `mixed_precision_decode`)."""
        layers = self.decoder_layers()
        if self.settings.mixed_precision and layers and self.needs_autograd(features):
            dtype = autocast_dtype(features.device.type)
            return mixed_precision_decode(layers, features, dtype, LOSS_SCALE if dtype == torch.float16 else 1.0)
        return self.mlp(features).squeeze(-1)

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


def field_cache_dims(dims, resolution: int = 0) -> np.ndarray:
    """Lattice points (X, Y, Z) of a field cache: `resolution` along the longest axis (0: the volume's own, capped
    at 256), the volume's aspect ratio kept, at least 2 per axis."""
    dims = np.asarray(dims, dtype=np.float64)
    longest = dims.max()
    target = min(longest, 256) if resolution == 0 else resolution
    return np.maximum(2, np.round(dims * target / longest)).astype(int)


@torch.no_grad()
def decode_field_cache(field: VolumeField, dims, resolution: int = 0, chunk: int = 1 << 18,
                       time: float | None = None) -> DenseGridField:
    """Evaluate the field on a grid (keeping the volume's aspect ratio) and serve it by trilinear lookup."""
    grid_dims = field_cache_dims(dims, resolution)
    device = field.aabb.device
    axes = [torch.linspace(0.0, 1.0, int(n), device=device) for n in grid_dims]
    zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    unit = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
    values = torch.cat([field.forward_unit(unit[i : i + chunk], time) for i in range(0, unit.shape[0], chunk)])
    grid = values.reshape(int(grid_dims[2]), int(grid_dims[1]), int(grid_dims[0])).clamp(0.0, 1.0)
    return DenseGridField(grid, field.aabb[1].clone())
