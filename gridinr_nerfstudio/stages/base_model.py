"""What both stages share as nerfstudio Models: rendering camera rays through a field with a transfer function.

A subclass supplies `value_fn()` (world points -> normalised values) and `color_fn()` (values -> rgb, sigma);
this class renders rays and whole camera images with the project's ray marcher, keeps the live render
settings the viewer edits (its controls), and computes image metrics against the reference renderings
(PSNR, SSIM, LPIPS when its weights are available).

Acceleration (viewer, eval, videos): early ray termination and empty-space skipping with min/max
macrocells of `occupancy_source()` combined with the current colour function; neither changes the image
beyond 1e-4 transmittance. Normals (for shading and the `normals` output) are central differences of the field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Type, Union

import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.models.base_model import Model, ModelConfig

from gridinr_nerfstudio.data.volume_io import voxel_size_world
from gridinr_nerfstudio.device_defaults import resolve
from gridinr_nerfstudio.eval.metrics import ImageMetrics
from gridinr_nerfstudio.fields.brick_cache import BrickFieldCache
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.fields.volume_field import decode_field_cache, field_cache_dims
from gridinr_nerfstudio.helper_modules import HelperModules
from gridinr_nerfstudio.rendering.fused_march import GridNormals, GridSamples
from gridinr_nerfstudio.rendering.field_functions import SampleFn, ValueFn
from gridinr_nerfstudio.rendering.images import render_image
from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid
from gridinr_nerfstudio.rendering.raymarch import estimate_normals, render_rays
from gridinr_nerfstudio.rendering.settings import RenderSettings
from gridinr_nerfstudio.stages.viewer_controls import StartCamera, render_controls

ColorFn = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StageModelConfig(ModelConfig):
    """Rendering and evaluation options shared by gridinr-fit and gridinr-edit."""

    _target: Type = field(default_factory=lambda: StageModel)
    enable_collider: bool = False
    """Rays are clipped to the scene box by the ray marcher itself."""
    render_chunk_rays: int = 0
    """Rays rendered at once for whole images (memory vs speed); 0: the device's default (device_defaults.py:
    2^15 on a CPU, 2^18 on CUDA)."""
    accelerate: bool = True
    """Empty-space skipping and early ray termination for whole-image renders (viewer, eval, videos)."""
    occupancy_resolution: int = 128
    """Macrocells per axis of the empty-space-skipping grid (at most one per voxel). A sample's lookup costs the same
    at any resolution, so finer cells skip more: on the built-in volume, 32 -> 96 cells cut the field evaluations
    per frame from 2.58 M to 1.47 M (of 8.3 M samples); the lookup texture of 128^3 cells takes 9 MB."""
    field_cache_resolution: int = 0
    """Whole-image renders (viewer, eval, videos) read the field decoded onto a grid with this many voxels along
    the longest axis (0: the volume's own resolution, capped at 256; -1: evaluate the INR at every sample)."""
    field_cache_bricks: int = 0
    """Decode the field cache lazily, in bricks of this many cells per edge as rays first reach them
    (fields/brick_cache.py), instead of all at once before the first frame (0). Nothing is decoded where no ray
    goes (empty space, parts outside every view); `gridinr-bench render` compares both (field_bricks, field_cache)."""
    field_cache_refresh_steps: int = 100
    """While the field trains (stage 1), decode it again when a render comes this many steps after the last decode."""
    compute_normals: bool = False
    """Also output `normals` (gradient of the field) when shading is off; costs 6 field lookups per visible sample."""
    lpips_net: str = "alex"
    """LPIPS backbone (alex or vgg)."""
    lpips_weights: Optional[Path] = None
    """Backbone weights file for LPIPS (default: torchvision's cache); LPIPS is reported unavailable without it."""


class StageModel(Model):
    """Base model: renders rays through `sample_fn()`; subclasses define the field and the losses."""

    config: StageModelConfig
    field: torch.nn.Module
    field_trains: bool = False
    """True when the optimizer changes `field` (stage 1): the field cache then goes stale as training proceeds."""

    def populate_modules(self):
        super().populate_modules()
        self.volume = self.kwargs["metadata"]["volume"].volume
        sequence = self.kwargs["metadata"].get("volumes")  # absent in runs of a single step written before sequences
        self.volumes = sequence.volume if sequence is not None else [self.volume]
        self.timesteps = self.kwargs["metadata"].get("timesteps", [self.volume.timestep])
        self.render_settings: RenderSettings = copy.deepcopy(self.kwargs["metadata"]["render_settings"])
        self.register_buffer("aabb", self.scene_box.aabb.clone().float(), persistent=False)
        self._transfer_function_cache: Tuple[str, torch.nn.Module] | None = None
        # Out of the module tree (checkpoints, parameters, DDP): the decoded field and its empty-space macrocells,
        # built on first use, and the image metrics (LPIPS weights, built lazily).
        self.helpers = HelperModules(field_cache=None, occupancy_grid=None, image_metrics=ImageMetrics(
            lpips_net=self.config.lpips_net, lpips_weights=self.config.lpips_weights, device=self.aabb.device))
        self.field_version, self.cache_version = 0, -1
        self.render_time: float = 0.0  # time in [0, 1] of a sequence's renders (cameras with `times` set it)
        self.cache_time: float = 0.0
        for name, element in render_controls(self.render_settings).items():
            setattr(self, f"viewer_{name}", element)
        self.viewer_start_camera = StartCamera()  # every viewer client opens at the first evaluation camera

    @property
    def field_cache(self) -> Optional[Union[DenseGridField, BrickFieldCache]]:
        """The field decoded onto a grid as last built (None until a render needs it; see `cached_field`)."""
        return self.helpers.field_cache

    @property
    def occupancy_grid(self) -> Optional[OccupancyGrid]:
        """The empty-space macrocells as last built (None until an accelerated render needs them)."""
        return self.helpers.occupancy_grid

    @property
    def image_metrics(self) -> ImageMetrics:
        """PSNR, SSIM and LPIPS against reference renderings (LPIPS weights never enter our checkpoints)."""
        return self.helpers.image_metrics

    def forward(self, inputs, *args):
        """What DDP calls (so gradients are averaged over the ranks): camera rays go nerfstudio's way (`get_outputs`);
        a stage's training batch (points, views) goes to `get_batch_outputs`."""
        if isinstance(inputs, RayBundle):
            return super().forward(inputs)
        return self.get_batch_outputs(inputs, *args)

    def get_batch_outputs(self, inputs, *args) -> Dict[str, torch.Tensor]:
        """Outputs for the stage's own training batches (stage 1: points, stage 2: whole views)."""
        raise NotImplementedError

    def transfer_function(self) -> torch.nn.Module:
        """The transfer function of the current render settings (rebuilt when the viewer changes them)."""
        key = self.render_settings.fingerprint()
        if self._transfer_function_cache is None or self._transfer_function_cache[0] != key:
            tf = self.render_settings.transfer_function(voxel_size_world(self.volume)).to(self.aabb.device)
            self._transfer_function_cache = (key, tf)
        return self._transfer_function_cache[1]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.invalidate_field_cache()
        return result

    def invalidate_field_cache(self) -> None:
        """Forget the decoded field (and its macrocells): the next render decodes the current field."""
        self.helpers.field_cache = None
        self.helpers.occupancy_grid = None

    def use_current_field(self) -> None:
        """Before an evaluation: drop a field cache decoded at an earlier training step (during training the cache
        is refreshed only every `field_cache_refresh_steps`, for the viewer), so metrics measure the field as it is."""
        if self.field_cache is not None and self.cache_version != self.field_version:
            self.invalidate_field_cache()

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        def advance(step: int) -> None:
            self.field_version = step

        return [TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], advance)] if self.field_trains else []

    @torch.no_grad()
    def cached_field(self) -> Optional[Union[DenseGridField, BrickFieldCache]]:
        """The field decoded onto a grid (refreshed when stale; in bricks as rays reach them with
        `field_cache_bricks`), or None when the cache is off."""
        if self.config.field_cache_resolution < 0:
            return None
        stale = self.field_version - self.cache_version >= self.config.field_cache_refresh_steps
        if self.field_cache is None or stale or (self.is_sequence() and self.cache_time != self.render_time):
            if self.config.field_cache_bricks > 0:
                cache = BrickFieldCache(self._decode_unit(self.field_time()),
                                        field_cache_dims(self.volume.info.dims, self.config.field_cache_resolution),
                                        self.aabb[1], brick_size=self.config.field_cache_bricks, device=self.aabb.device)
            else:
                was_training = self.field.training
                self.field.eval()
                cache = decode_field_cache(self.field, self.volume.info.dims, self.config.field_cache_resolution,
                                           time=self.field_time())
                self.field.train(was_training)
            self.invalidate_field_cache()
            self.helpers.field_cache = cache
            self.cache_version, self.cache_time = self.field_version, self.render_time
        return self.field_cache

    def _decode_unit(self, time: Optional[float]):
        """Unit-cube points -> values of the field as it is now, in eval mode, without gradients (brick decodes)."""

        @torch.no_grad()
        def decode(unit_points: torch.Tensor) -> torch.Tensor:
            was_training = self.field.training
            self.field.eval()
            try:
                return self.field.forward_unit(unit_points, time)
            finally:
                self.field.train(was_training)

        return decode

    def is_sequence(self) -> bool:
        """Whether the field covers several time steps (then renders show `render_time`)."""
        return getattr(self.field, "num_times", 1) > 1

    def field_time(self) -> Optional[float]:
        """The time to query the field at: `render_time` for a sequence, None for a single step."""
        return self.render_time if self.is_sequence() else None

    def set_render_time(self, time: float) -> None:
        """Show the sequence at `time` in [0, 1] (the occupancy grid then follows the field cache of that time)."""
        time = min(max(float(time), 0.0), 1.0)
        if time != self.render_time and self.is_sequence():
            self.render_time = time
            if self.config.field_cache_resolution >= 0:
                self.invalidate_field_cache()

    def value_fn(self) -> ValueFn:
        """World points (M, 3) -> normalised values (M,): the field cache when on, else the INR itself."""
        cache = self.cached_field()
        if cache is not None:
            return lambda points: cache(points).clamp(0.0, 1.0)
        time = self.field_time()
        if time is None:
            return lambda points: self.field(points).clamp(0.0, 1.0)
        return lambda points: self.field(points, time).clamp(0.0, 1.0)

    def color_fn(self) -> ColorFn:
        """Values (M,) -> (rgb (M, 3), sigma (M,)): the transfer function."""
        raise NotImplementedError

    def occupancy_source(self) -> Optional[torch.Tensor]:
        """Normalised voxels (Z, Y, X) whose macrocell min/max bound the field shown (for empty-space skipping):
        the field cache when decoded whole (exact for what is rendered); None (no cache, or one decoded in bricks
        as rays reach them): the raw voxels the field approximates, read in
        z-slabs through the memmap (see `occupancy`)."""
        cache = self.cached_field()
        return cache.volume if isinstance(cache, DenseGridField) else None

    def sample_fn(self) -> SampleFn:
        """World points (M, 3) -> (rgb (M, 3), sigma (M,)); over the field cache a `GridSamples`, which
        `render_rays` hands to the fused ray marcher (rendering/fused_march.py)."""
        cache, color = self.cached_field(), self.color_fn()
        if cache is not None:
            return GridSamples(cache, color)
        values_at = self.value_fn()
        return lambda points: color(values_at(points))

    @torch.no_grad()
    def occupancy(self, color_fn: ColorFn) -> OccupancyGrid:
        """Macrocell grid of `occupancy_source()`, marked with what `color_fn` makes visible."""
        if self.occupancy_grid is None:
            source, resolution = self.occupancy_source(), self.config.occupancy_resolution
            if source is not None:
                grid = OccupancyGrid.from_volume(source, self.aabb[1].cpu(), resolution=resolution)
            else:  # every step of a sequence: the bounds hold at any time
                grids = [
                    OccupancyGrid.from_slabs(lambda z0, z1, v=volume: torch.from_numpy(v.normalized_slab(z0, z1)),
                                             volume.data.shape, self.aabb[1].cpu(), resolution=resolution)
                    for volume in self.volumes
                ]
                grid = grids[0]
                for other in grids[1:]:
                    grid.min_values = torch.minimum(grid.min_values, other.min_values)
                    grid.max_values = torch.maximum(grid.max_values, other.max_values)
            self.helpers.occupancy_grid = grid.to(self.aabb.device)
        return self.occupancy_grid.update(color_fn)

    def render_kwargs(self, accelerate: bool = False) -> Dict:
        """Ray-marching options from the live render settings."""
        settings = self.render_settings
        kwargs: Dict = {
            "num_samples": settings.num_samples,
            "background": torch.tensor(settings.background, dtype=torch.float32, device=self.aabb.device),
            "shading": settings.shading,
        }
        if settings.shading or self.config.compute_normals:
            cache, eps = self.cached_field(), 0.5 * voxel_size_world(self.volume)
            if cache is not None:
                kwargs["normal_fn"] = GridNormals(cache, eps)
            else:
                values_at = self.value_fn()
                kwargs["normal_fn"] = lambda points: estimate_normals(values_at, points, eps)
        if accelerate:
            kwargs["occupancy_grid"] = self.occupancy(self.color_fn())
        else:
            kwargs["early_stop_eps"] = 0.0
        return kwargs

    def get_outputs(self, ray_bundle: RayBundle) -> Dict[str, torch.Tensor]:
        shape = ray_bundle.origins.shape[:-1]
        out = render_rays(
            ray_bundle.origins.reshape(-1, 3),
            ray_bundle.directions.reshape(-1, 3),
            self.sample_fn(),
            self.aabb,
            stratified=self.training,
            **self.render_kwargs(),
        )
        return {key: value.reshape(*shape, -1) for key, value in out.items() if torch.is_tensor(value) and value.dim() >= 1}

    @torch.no_grad()
    def get_outputs_for_camera_ray_bundle(self, camera_ray_bundle: RayBundle) -> Dict[str, torch.Tensor]:
        """Whole images in large chunks through our renderer (nerfstudio's default chunks are tuned for NeRFs).
        A camera with `times` (a sequence's eval views, the viewer's time slider) shows the field at that time."""
        if camera_ray_bundle.times is not None:
            self.set_render_time(float(camera_ray_bundle.times.reshape(-1)[0]))
        return render_image(
            camera_ray_bundle.origins,
            camera_ray_bundle.directions,
            self.sample_fn(),
            self.aabb,
            chunk_rays=self.render_chunk_rays(),
            **self.render_kwargs(accelerate=self.config.accelerate),
        )

    def render_chunk_rays(self) -> int:
        """`render_chunk_rays`, or the default for the device the model is on (device_defaults.py)."""
        return resolve(self.config.render_chunk_rays, "render_chunk_rays", self.device)

    def get_param_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        raise NotImplementedError

    def get_image_metrics_and_images(
        self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        """PSNR, SSIM and (when available) LPIPS of a rendered view against its reference rendering."""
        reference = batch["image"][..., :3].to(outputs["rgb"].device).float()
        rendered = outputs["rgb"].clamp(0, 1)
        scores = self.image_metrics(rendered, reference)
        metrics = {key: float(value) for key, value in scores.items() if value is not None}
        images = {"img": torch.cat([reference, rendered], dim=1), "accumulation": outputs["accumulation"]}
        return metrics, images
