"""Orbit cameras around the volume, in nerfstudio's convention (OpenGL: camera looks down -z, y up; world z up).

Train and eval views are different points of one Fibonacci spiral over the sphere (`split_views`), so eval
measures novel views rather than memorised ones.
"""

from __future__ import annotations

import math

import torch
from nerfstudio.cameras.cameras import Cameras, CameraType


WORLD_UP = (0.0, 0.0, 1.0)
"""The up direction of every camera we make (and of the viewer's orbit controls)."""


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world matrices (N, 3, 4) for cameras at `eye` (N, 3) looking at `target` (default origin)."""
    target = torch.zeros(3) if target is None else target
    up = torch.tensor(WORLD_UP) if up is None else up
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.linalg.cross(forward, up.expand_as(forward), dim=-1)
    # A camera straight above or below the target has no defined right vector: pick the x axis.
    degenerate = right.norm(dim=-1) < 1e-6
    right[degenerate] = torch.tensor([1.0, 0.0, 0.0])
    right = torch.nn.functional.normalize(right, dim=-1)
    cam_up = torch.linalg.cross(right, forward, dim=-1)
    rotation = torch.stack([right, cam_up, -forward], dim=-1)  # columns: camera x, y, z in world
    return torch.cat([rotation, eye[..., None]], dim=-1)


def fibonacci_directions(count: int, offset: float = 0.0, max_elevation_deg: float = 75.0) -> torch.Tensor:
    """`count` unit vectors spread evenly over a sphere band (elevation within +-max_elevation_deg).

    `offset` in [0, 1) shifts the spiral so a second set interleaves with the first (eval vs train views).
    """
    golden_angle = math.pi * (3.0 - math.sqrt(5.0))
    index = torch.arange(count, dtype=torch.float64) + 0.5 + offset
    z_max = math.sin(math.radians(max_elevation_deg))
    z = z_max * (1.0 - 2.0 * index / (count + offset))
    radius = torch.sqrt(torch.clamp(1.0 - z * z, min=0.0))
    azimuth = golden_angle * index + 2.0 * math.pi * offset
    return torch.stack([radius * torch.cos(azimuth), radius * torch.sin(azimuth), z], dim=-1).float()


def pinhole_cameras(camera_to_worlds: torch.Tensor, image_size: int, fov_degrees: float) -> Cameras:
    """Square pinhole cameras with the given vertical field of view."""
    focal = 0.5 * image_size / math.tan(math.radians(fov_degrees) / 2.0)
    return Cameras(
        camera_to_worlds=camera_to_worlds,
        fx=focal,
        fy=focal,
        cx=image_size / 2.0,
        cy=image_size / 2.0,
        width=image_size,
        height=image_size,
        camera_type=CameraType.PERSPECTIVE,
    )


def orbit_cameras(
    count: int,
    image_size: int = 256,
    fov_degrees: float = 45.0,
    radius: float = 2.5,
    offset: float = 0.0,
) -> Cameras:
    """Pinhole cameras on a sphere of `radius` around the origin, all looking at it."""
    return pinhole_cameras(look_at(fibonacci_directions(count, offset) * radius), image_size, fov_degrees)


def split_views(num_train: int, num_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of train and eval views on one spiral of num_train + num_eval directions.

    Eval views are spread evenly along the spiral, so they cover the sphere and never coincide with a
    training view (novel views, each between training neighbours).
    """
    total = num_train + num_eval
    eval_indices = torch.unique(((torch.arange(num_eval) + 0.5) * total / max(num_eval, 1)).long().clamp(max=total - 1))
    is_eval = torch.zeros(total, dtype=torch.bool)
    is_eval[eval_indices] = True
    return (~is_eval).nonzero().squeeze(-1), is_eval.nonzero().squeeze(-1)


def split_orbit_cameras(
    split: str, num_train: int, num_eval: int, image_size: int = 256, fov_degrees: float = 45.0, radius: float = 2.5
) -> Cameras:
    """The train or eval ("val"/"test") cameras of one shared spiral (see `split_views`)."""
    train, evaluation = split_views(num_train, num_eval)
    eyes = fibonacci_directions(num_train + num_eval) * radius
    indices = train if split == "train" else evaluation
    return pinhole_cameras(look_at(eyes[indices]), image_size, fov_degrees)


def circle_cameras(
    count: int,
    image_size: int = 256,
    fov_degrees: float = 45.0,
    radius: float = 2.5,
    elevation_deg: float = 20.0,
) -> Cameras:
    """Cameras on a horizontal circle (an orbit video path)."""
    azimuth = torch.linspace(0.0, 2.0 * math.pi, count + 1)[:-1]
    elevation = math.radians(elevation_deg)
    eyes = torch.stack(
        [
            math.cos(elevation) * torch.cos(azimuth),
            math.cos(elevation) * torch.sin(azimuth),
            torch.full_like(azimuth, math.sin(elevation)),
        ],
        dim=-1,
    ) * radius
    return pinhole_cameras(look_at(eyes), image_size, fov_degrees)
