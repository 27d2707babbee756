"""Camera distributions of rendered datasets: their statistics against what uniform / ring / jittered cameras must
show, poses rebuilt by hand with numpy, and nerfstudio camera path files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import chisquare

from gridinr_nerfstudio.data.camera_distributions import (
    CameraJitter,
    CameraSpecError,
    RANDOM_JITTER,
    camera_path_set,
    make_camera_set,
)


def eyes_and_axes(camera_set):
    poses = camera_set.camera_to_worlds.double().numpy()
    return poses[:, :, 3], poses[:, :, 0], poses[:, :, 1], -poses[:, :, 2]  # eye, right, up, forward


def hand_pose(eye: np.ndarray, target: np.ndarray, roll_degrees: float) -> np.ndarray:
    """Camera-to-world (3, 4) looking from eye at target, world z up, then rolled about the viewing axis."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    a = math.radians(roll_degrees)
    right, up = math.cos(a) * right + math.sin(a) * up, -math.sin(a) * right + math.cos(a) * up
    return np.stack([right, up, -forward, eye], axis=1)


@pytest.mark.parametrize("kind", ["sphere", "random"])
def test_directions_are_uniform_on_the_sphere(kind):
    """Uniform on the sphere <=> z uniform in [-1, 1] and azimuth uniform (Archimedes): equal-area bands and equal
    azimuth sectors hold equal shares; the mean direction is ~0 and the second moments are I/3."""
    count = 4000
    eyes, _, _, _ = eyes_and_axes(make_camera_set(kind, count, 8, 8, radius=2.5, seed=7,
                                                  jitter=CameraJitter()))
    directions = eyes / np.linalg.norm(eyes, axis=1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(eyes, axis=1), 2.5, rtol=1e-6)  # no jitter: on the sphere
    bands = np.histogram(directions[:, 2], bins=10, range=(-1, 1))[0]
    sectors = np.histogram(np.arctan2(directions[:, 1], directions[:, 0]), bins=12, range=(-np.pi, np.pi))[0]
    if kind == "sphere":  # the Fibonacci spiral: equal-area bands hold equal shares to a camera
        assert bands.max() - bands.min() <= 2
        assert np.abs(directions.mean(axis=0)).max() < 2e-3
        assert sectors.max() - sectors.min() <= 0.02 * count
    else:
        assert chisquare(bands).pvalue > 1e-3 and chisquare(sectors).pvalue > 1e-3
        assert np.abs(directions.mean(axis=0)).max() < 4.0 / math.sqrt(count)  # 4 sigma of a uniform mean
    np.testing.assert_allclose(directions.T @ directions / count, np.eye(3) / 3, atol=0.02 if kind == "random" else 2e-3)


def test_orbit_rings_are_circles_at_even_elevations():
    cameras = make_camera_set("orbit", 14, 16, 16, radius=3.0, rings=3, elevation_range=(-20.0, 40.0))
    eyes, _, _, forward = eyes_and_axes(cameras)
    elevations = np.degrees(np.arcsin(eyes[:, 2] / np.linalg.norm(eyes, axis=1)))
    rings = np.unique(np.round(elevations, 4))
    np.testing.assert_allclose(rings, [-20.0, 10.0, 40.0], atol=1e-4)
    counts = [int(np.sum(np.isclose(elevations, ring, atol=1e-3))) for ring in rings]
    assert sorted(counts) == [4, 5, 5]
    for ring in rings:
        on_ring = eyes[np.isclose(elevations, ring, atol=1e-3)]
        azimuth = np.sort(np.arctan2(on_ring[:, 1], on_ring[:, 0]))
        gaps = np.diff(np.concatenate([azimuth, azimuth[:1] + 2 * np.pi]))
        np.testing.assert_allclose(gaps, 2 * np.pi / len(on_ring), atol=1e-5)
    np.testing.assert_allclose(forward, -eyes / np.linalg.norm(eyes, axis=1, keepdims=True), atol=1e-6)


def test_random_jitter_stays_in_its_ranges_and_fills_them():
    """Each drawn radius, field of view, roll and look-at point lies in its range and the draws reach its ends; the
    poses equal poses built by hand from the recorded draws; the focal length is that of the recorded field of view."""
    count, radius, fov = 2000, 2.5, 45.0
    jitter = RANDOM_JITTER
    cameras = make_camera_set("random", count, 40, 30, radius=radius, fov_degrees=fov, seed=11)
    eyes, _, _, _ = eyes_and_axes(cameras)
    records = cameras.records
    radii = np.array([r["radius"] for r in records])
    fovs = np.array([r["fov_degrees"] for r in records])
    rolls = np.array([r["roll_degrees"] for r in records])
    targets = np.array([r["look_at"] for r in records])
    for values, low, high in ((radii, radius * (1 - jitter.radius), radius * (1 + jitter.radius)),
                              (fovs, fov - jitter.fov_degrees, fov + jitter.fov_degrees),
                              (rolls, -jitter.roll_degrees, jitter.roll_degrees),
                              (targets.ravel(), -jitter.look_at, jitter.look_at)):
        assert values.min() >= low and values.max() <= high
        assert values.min() < low + 0.01 * (high - low) and values.max() > high - 0.01 * (high - low)
        assert abs(values.mean() - (low + high) / 2) < 0.03 * (high - low)  # uniform: centred
    np.testing.assert_allclose(np.linalg.norm(eyes, axis=1), radii, rtol=1e-5)
    for index in range(0, count, 97):
        expected = hand_pose(eyes[index], targets[index], rolls[index])
        np.testing.assert_allclose(cameras.camera_to_worlds[index].numpy(), expected, atol=2e-5)
    np.testing.assert_allclose(cameras.focal.numpy(), 15.0 / np.tan(np.radians(fovs) / 2), rtol=1e-5)
    assert len(set(np.round(cameras.focal.numpy(), 3))) > count // 2  # per-camera intrinsics


def test_same_seed_same_cameras_other_seed_other_cameras():
    first, again, other = (make_camera_set("random", 5, 8, 8, seed=seed) for seed in (1, 1, 2))
    assert np.array_equal(first.camera_to_worlds.numpy(), again.camera_to_worlds.numpy())
    assert not np.allclose(first.camera_to_worlds.numpy(), other.camera_to_worlds.numpy())


@pytest.mark.parametrize("options, message", [
    (dict(jitter=CameraJitter(radius=1.0)), "--radius-jitter"),
    (dict(fov_degrees=170.0, jitter=CameraJitter(fov_degrees=20.0)), "--fov"),
    (dict(radius=0.1, jitter=CameraJitter(look_at=0.5)), "--look-at-jitter"),
    (dict(elevation_range=(-100.0, 10.0)), "--elevations"),
])
def test_bad_camera_options_are_named(options, message):
    with pytest.raises(CameraSpecError, match=message):
        make_camera_set("orbit", 4, 8, 8, **options)


def write_path(tmp_path, poses, fovs, height=30, width=40, times=None, camera_type="perspective"):
    cameras = []
    for index, (pose, fov) in enumerate(zip(poses, fovs)):
        matrix = np.vstack([pose, [0, 0, 0, 1]])
        camera = {"camera_to_world": matrix.ravel().tolist(), "fov": fov, "aspect": width / height}
        if times is not None:
            camera["render_time"] = times[index]
        cameras.append(camera)
    path = tmp_path / "camera_path.json"
    path.write_text(json.dumps({"camera_type": camera_type, "render_height": height, "render_width": width,
                                "fps": 24, "seconds": 1, "camera_path": cameras}))
    return path


def test_camera_path_file_gives_its_poses_and_fields_of_view(tmp_path):
    eyes = [np.array([2.5, 0.0, 0.5]), np.array([0.0, 2.0, 1.0]), np.array([-1.5, -1.5, 0.0])]
    poses = [hand_pose(eye, np.zeros(3), 0.0) for eye in eyes]
    fovs = [40.0, 50.0, 60.0]
    cameras = camera_path_set(write_path(tmp_path, poses, fovs, times=[0.0, 0.5, 1.0]))
    assert (cameras.width, cameras.height) == (40, 30)
    np.testing.assert_allclose(cameras.camera_to_worlds.numpy(), np.stack(poses), atol=1e-6)
    np.testing.assert_allclose(cameras.focal.numpy(), 15.0 / np.tan(np.radians(fovs) / 2), rtol=1e-5)
    np.testing.assert_allclose(cameras.times.numpy(), [0.0, 0.5, 1.0])
    two = camera_path_set(write_path(tmp_path, poses, fovs), count=2)  # evenly spaced: first and last
    np.testing.assert_allclose(two.camera_to_worlds.numpy(), np.stack([poses[0], poses[2]]), atol=1e-6)
    assert two.times is None


def test_bad_camera_path_files_are_one_line(tmp_path):
    pose = hand_pose(np.array([2.5, 0.0, 0.0]), np.zeros(3), 0.0)
    with pytest.raises(CameraSpecError, match="only perspective"):
        camera_path_set(write_path(tmp_path, [pose], [45.0], camera_type="equirectangular"))
    with pytest.raises(CameraSpecError, match="has 1 cameras"):
        camera_path_set(write_path(tmp_path, [pose], [45.0]), count=3)
    broken = tmp_path / "broken.json"
    broken.write_text('{"camera_path": [{"fov": 45}], "render_height": 8, "render_width": 8}')
    with pytest.raises(CameraSpecError, match="camera_to_world"):
        camera_path_set(broken)
    broken.write_text("{not json")
    with pytest.raises(CameraSpecError, match="not a readable camera path"):
        camera_path_set(broken)
