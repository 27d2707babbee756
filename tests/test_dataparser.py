"""The gridinr-volume DataParser: orbit cameras, scene box, cached reference renderings."""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from gridinr_nerfstudio.data.dataparser import VolumeDataParserConfig
from gridinr_nerfstudio.data.orbit_cameras import look_at, orbit_cameras, split_orbit_cameras


def test_cameras_look_at_the_origin_from_the_radius():
    cameras = orbit_cameras(7, image_size=16, fov_degrees=45.0, radius=2.5)
    centres = cameras.camera_to_worlds[:, :, 3]
    assert torch.allclose(centres.norm(dim=-1), torch.full((7,), 2.5), atol=1e-5)
    rays = cameras.generate_rays(camera_indices=torch.arange(7)[:, None].expand(-1, 1).contiguous(), coords=torch.tensor([[8.0, 8.0]]).expand(7, 2))
    # The ray through the image centre passes through the origin: origin + t * direction ~ 0 for some t.
    origins, directions = rays.origins.reshape(-1, 3), rays.directions.reshape(-1, 3)
    t = -(origins * directions).sum(-1, keepdim=True)
    assert (origins + t * directions).norm(dim=-1).max() < 1e-4
    # Rotation part is orthonormal with camera y close to world up (z) for cameras off the poles.
    rotation = cameras.camera_to_worlds[:, :, :3]
    assert torch.allclose(rotation.transpose(1, 2) @ rotation, torch.eye(3).expand(7, 3, 3), atol=1e-5)
    assert (rotation[:, 2, 1] > 0).all()
    assert math.isclose(float(cameras.fy[0]), 8.0 / math.tan(math.radians(22.5)), rel_tol=1e-5)


def test_look_at_from_straight_above_is_defined():
    c2w = look_at(torch.tensor([[0.0, 0.0, 2.5]]))
    assert torch.isfinite(c2w).all()
    assert torch.allclose(c2w[0, :, 2], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)  # camera looks down -z_cam = -world z


def test_train_and_eval_views_differ():
    train = split_orbit_cameras("train", 50, 20).camera_to_worlds[:, :, 3]
    evaluation = split_orbit_cameras("test", 50, 20).camera_to_worlds[:, :, 3]
    assert train.shape[0] == 50 and evaluation.shape[0] == 20
    closest = torch.cdist(evaluation, train).min(dim=1).values
    assert closest.min() > 0.2  # no eval view repeats a training view
    # ... and eval views cover the sphere: both hemispheres and all azimuth quadrants.
    assert (evaluation[:, 2] > 0).any() and (evaluation[:, 2] < 0).any()
    quadrants = {(bool(x > 0), bool(y > 0)) for x, y, _ in evaluation.tolist()}
    assert len(quadrants) == 4


def _outputs(data: Path, tmp_path: Path, split: str = "train", **kwargs):
    config = VolumeDataParserConfig(data=data, num_train_views=2, num_eval_views=2, image_size=48, cache_dir=tmp_path, **kwargs)
    config.render.num_samples = 48
    return config.setup().get_dataparser_outputs(split)


def test_fmri_scene_box_keeps_aspect_ratio_and_spacing(shared_data, tmp_path):
    outputs = _outputs(shared_data("fmri4d"), tmp_path, timestep=2)
    extent = np.array([127 * 2.0, 95 * 2.0, 23 * 2.2])
    expected = extent / extent.max()
    assert np.allclose(outputs.scene_box.aabb[1].numpy(), expected, atol=1e-4)
    assert np.allclose(outputs.scene_box.aabb[0].numpy(), -expected, atol=1e-4)
    assert outputs.metadata["volume"].volume.timestep == 2


def test_reference_renderings_are_cached_and_shared(tmp_path):
    first = _outputs(Path("builtin-default"), tmp_path)
    stamps = [path.stat().st_mtime_ns for path in first.image_filenames]
    image = iio.imread(first.image_filenames[0])
    assert image.shape == (48, 48, 3) and image.max() > 50  # the volume is visible
    again = _outputs(Path("builtin-default"), tmp_path)
    assert [path.stat().st_mtime_ns for path in again.image_filenames] == stamps  # reused, not re-rendered
    other = _outputs(Path("builtin-default"), tmp_path, split="val")
    assert set(other.image_filenames).isdisjoint(first.image_filenames)


def test_changed_render_settings_render_again(tmp_path):
    first = _outputs(Path("builtin-default"), tmp_path)
    config = VolumeDataParserConfig(data=Path("builtin-default"), num_train_views=2, num_eval_views=2, image_size=48, cache_dir=tmp_path)
    config.render.num_samples = 48
    config.render.colormap = "viridis"
    second = config.setup().get_dataparser_outputs("train")
    assert second.image_filenames[0].parent != first.image_filenames[0].parent
    assert not np.array_equal(iio.imread(second.image_filenames[0]), iio.imread(first.image_filenames[0]))


def test_c60_reference_shows_a_cage_of_blobs(shared_data, tmp_path):
    """C60 is a hollow cage: with a threshold on its density the view shows a ring-like shell with holes."""
    config = VolumeDataParserConfig(data=shared_data("c60"), num_train_views=1, num_eval_views=1, image_size=96, cache_dir=tmp_path)
    config.render.opacity_low, config.render.opacity_high, config.render.opacity_scale = 0.7, 1.0, 0.9
    image = iio.imread(config.setup().get_dataparser_outputs("train").image_filenames[0]).astype(float).mean(-1)
    yy, xx = np.mgrid[:96, :96]
    radius = np.hypot(yy - 47.5, xx - 47.5)
    assert image[radius > 46].mean() < 5  # background outside the molecule
    shell = image[(radius > 20) & (radius < 38)]
    assert shell.mean() > 60  # bright shell
    assert (shell < 0.5 * shell.mean()).mean() > 0.02  # ... with holes (pentagons/hexagons) in it


def test_missing_volume_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="does-not-exist"):
        _outputs(tmp_path / "does-not-exist", tmp_path)
