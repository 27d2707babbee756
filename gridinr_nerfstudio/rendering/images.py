"""Render whole camera images through the ray marcher, in chunks of rays.

Shared by the reference renderings, the models' `get_outputs_for_camera`, the video CLI and the benchmarks.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras

from gridinr_nerfstudio.rendering.field_functions import SampleFn
from gridinr_nerfstudio.rendering.fused_march import frame_threads
from gridinr_nerfstudio.rendering.raymarch import render_rays


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Colours in [0, 1] (clipped) -> uint8, rounded to nearest: how every PNG, video frame and reference is written."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def camera_rays(cameras: Cameras, index: int, device: torch.device | str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Origins and unit directions (H, W, 3) of camera `index`."""
    bundle = cameras.to(device).generate_rays(camera_indices=index)
    return bundle.origins, bundle.directions


def render_image(
    origins: torch.Tensor,
    directions: torch.Tensor,
    sample_fn: SampleFn,
    aabb: torch.Tensor,
    chunk_rays: int = 1 << 16,
    **render_kwargs,
) -> Dict[str, torch.Tensor]:
    """Render rays laid out as an image (H, W, 3) and return outputs shaped (H, W, C). A frame of the fused ray
    marcher runs under `fused_march.frame_threads` (torch's ops on one thread, the kernel on the policy's count)."""
    height, width = origins.shape[:2]
    flat_origins = origins.reshape(-1, 3)
    flat_directions = directions.reshape(-1, 3)
    chunks: Dict[str, list] = {}
    with frame_threads(flat_origins, sample_fn, render_kwargs):
        for start in range(0, flat_origins.shape[0], chunk_rays):
            out = render_rays(
                flat_origins[start : start + chunk_rays],
                flat_directions[start : start + chunk_rays],
                sample_fn,
                aabb,
                **render_kwargs,
            )
            for key, value in out.items():
                if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == flat_origins[start : start + chunk_rays].shape[0]:
                    chunks.setdefault(key, []).append(value)
        return {key: torch.cat(values).reshape(height, width, -1) for key, values in chunks.items()}


def render_camera(
    cameras: Cameras,
    index: int,
    sample_fn: SampleFn,
    aabb: torch.Tensor,
    chunk_rays: int = 1 << 16,
    **render_kwargs,
) -> Dict[str, torch.Tensor]:
    """Render camera `index` of `cameras`; outputs (H, W, C) tensors (rgb, accumulation, depth, ...)."""
    origins, directions = camera_rays(cameras, index, aabb.device)
    return render_image(origins, directions, sample_fn, aabb, chunk_rays=chunk_rays, **render_kwargs)
