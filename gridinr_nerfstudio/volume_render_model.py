"""What both stages share as nerfstudio Models: rendering camera rays through a field with a transfer function.

A subclass supplies `sample_fn()` (world points -> rgb, sigma); this class renders rays and whole camera
images with the project's ray marcher, keeps the live render settings the viewer edits, and computes image
metrics against the reference renderings (PSNR, SSIM, LPIPS when its weights are available).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type

import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.models.base_model import Model, ModelConfig

from gridinr_nerfstudio.camera_render import SampleFn, render_image
from gridinr_nerfstudio.image_metrics import ImageMetrics
from gridinr_nerfstudio.render_settings import RenderSettings
from gridinr_nerfstudio.rendering import render_rays
from gridinr_nerfstudio.volume_dataparser import voxel_size_world


@dataclass
class VolumeRenderModelConfig(ModelConfig):
    """Rendering and evaluation options shared by gridinr-fit and gridinr-edit."""

    _target: Type = field(default_factory=lambda: VolumeRenderModel)
    enable_collider: bool = False
    """Rays are clipped to the scene box by the ray marcher itself."""
    render_chunk_rays: int = 1 << 15
    """Rays rendered at once for whole images (memory vs speed)."""
    lpips_net: str = "alex"
    """LPIPS backbone (alex or vgg)."""
    lpips_weights: Optional[Path] = None
    """Backbone weights file for LPIPS (default: torchvision's cache); LPIPS is reported unavailable without it."""


class VolumeRenderModel(Model):
    """Base model: renders rays through `sample_fn()`; subclasses define the field and the losses."""

    config: VolumeRenderModelConfig

    def populate_modules(self):
        super().populate_modules()
        self.volume = self.kwargs["metadata"]["volume"].volume
        self.render_settings: RenderSettings = copy.deepcopy(self.kwargs["metadata"]["render_settings"])
        self.register_buffer("aabb", self.scene_box.aabb.clone().float(), persistent=False)
        self._transfer_function_cache: Tuple[str, torch.nn.Module] | None = None
        # Built lazily and kept out of the module tree: LPIPS weights are never part of our checkpoints.
        self.__dict__["image_metrics"] = ImageMetrics(
            lpips_net=self.config.lpips_net, lpips_weights=self.config.lpips_weights, device=self.aabb.device
        )

    def transfer_function(self) -> torch.nn.Module:
        """The transfer function of the current render settings (rebuilt when the viewer changes them)."""
        key = self.render_settings.fingerprint()
        if self._transfer_function_cache is None or self._transfer_function_cache[0] != key:
            tf = self.render_settings.transfer_function(voxel_size_world(self.volume)).to(self.aabb.device)
            self._transfer_function_cache = (key, tf)
        return self._transfer_function_cache[1]

    def sample_fn(self) -> SampleFn:
        """World points (M, 3) -> (rgb (M, 3), sigma (M,))."""
        raise NotImplementedError

    def render_kwargs(self) -> Dict:
        """Ray-marching options from the live render settings."""
        return {
            "num_samples": self.render_settings.num_samples,
            "background": torch.tensor(self.render_settings.background, dtype=torch.float32, device=self.aabb.device),
        }

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
        """Whole images in large chunks through our renderer (nerfstudio's default chunks are tuned for NeRFs)."""
        return render_image(
            camera_ray_bundle.origins,
            camera_ray_bundle.directions,
            self.sample_fn(),
            self.aabb,
            chunk_rays=self.config.render_chunk_rays,
            **self.render_kwargs(),
        )

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
