"""gridinr-render (orbit/spiral videos of rgb, depth, normals) and nerfstudio's own ns-render on a tiny run.

References: cameras built by hand with numpy (eye on a circle, looking at the origin, world z up), the
model's own renders of those cameras, matplotlib's colormap table, and nerfstudio's ns-render code.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import imageio.v3 as imageio
import matplotlib
import numpy as np
import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from scipy.stats import spearmanr

from gridinr_nerfstudio.scripts.render import load_model, main, path_cameras, render_frames, write_frames


def hand_built_camera(eye: np.ndarray, image_size: int, fov_degrees: float = 45.0) -> Cameras:
    """A pinhole camera at `eye` looking at the origin, world z up (OpenGL: x right, y up, looks down -z)."""
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = torch.from_numpy(np.stack([right, up, -forward, eye], axis=1)).float()
    focal = 0.5 * image_size / math.tan(math.radians(fov_degrees) / 2)
    return Cameras(camera_to_worlds=c2w[None], fx=focal, fy=focal, cx=image_size / 2, cy=image_size / 2,
                   width=image_size, height=image_size)


def eye_on_circle(radius: float, elevation_deg: float, azimuth: float) -> np.ndarray:
    elevation = math.radians(elevation_deg)
    return radius * np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])


def model_rgb_uint8(model, camera: Cameras) -> np.ndarray:
    with torch.no_grad():
        rgb = model.get_outputs_for_camera(camera.to(model.device))["rgb"]
    return np.round(rgb.clamp(0, 1).cpu().numpy() * 255).astype(np.int16)


@pytest.fixture(scope="module")
def model(tiny_fit_run):
    return load_model(tiny_fit_run)


def test_missing_config_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "config.yml"
    assert main(["orbit", "--load-config", str(missing), "--output", str(tmp_path / "out.mp4")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(missing) in error and "no such config file" in error


def test_unsupported_output_type_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "config.yml"
    config.write_text("checked before the run is loaded\n")
    assert main(["orbit", "--load-config", str(config), "--output", str(tmp_path / "out.xyz")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "out.xyz" in error and "unsupported output type" in error


@pytest.mark.parametrize("output", ["a_file/x.gif", "a_file/deeper/frames", "a_file", "a_folder.gif"])
def test_unwritable_output_fails_before_loading_the_run(tmp_path, capsys, monkeypatch, output):
    """The output is checked first: no run loaded, no frame rendered, one line, nothing created."""
    import gridinr_nerfstudio.scripts.render as render_cli

    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder.gif").mkdir()
    config = tmp_path / "config.yml"
    config.write_text("never read\n")
    monkeypatch.setattr(render_cli, "load_model", lambda path: pytest.fail("the run was loaded before the check"))
    before = sorted(tmp_path.rglob("*"))
    assert main(["orbit", "--load-config", str(config), "--output", str(tmp_path / output)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(tmp_path / output) in error
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_folder_fails_before_loading_the_run(tmp_path, capsys, monkeypatch):
    import gridinr_nerfstudio.scripts.render as render_cli

    (tmp_path / "locked").mkdir(mode=0o555)
    config = tmp_path / "config.yml"
    config.write_text("never read\n")
    monkeypatch.setattr(render_cli, "load_model", lambda path: pytest.fail("the run was loaded before the check"))
    assert main(["orbit", "--load-config", str(config), "--output", str(tmp_path / "locked" / "x.gif")]) == 1
    assert "permission denied" in capsys.readouterr().err


def test_orbit_png_frames_are_the_hand_built_cameras(tiny_fit_run, model, tmp_path):
    frames_dir = tmp_path / "frames"
    argv = ["orbit", "--load-config", str(tiny_fit_run), "--output", str(frames_dir), "--frames", "4",
            "--image-size", "32", "--elevation", "30", "--radius", "3"]
    assert main(argv) == 0
    files = sorted(frames_dir.glob("*.png"))
    assert [f.name for f in files] == [f"frame_{k:05d}.png" for k in range(4)]
    for k, file in enumerate(files):
        frame = imageio.imread(file).astype(np.int16)
        expected = model_rgb_uint8(model, hand_built_camera(eye_on_circle(3.0, 30.0, k * math.pi / 2), 32))
        assert frame.shape == (32, 32, 3)
        assert np.abs(frame - expected).max() <= 1, k
        assert (frame.max(axis=-1) > 40).mean() > 0.1  # the volume is in view, not a blank frame


def test_spiral_swings_elevation_twice_per_turn_at_constant_radius():
    cameras = path_cameras("spiral", 8, 16, radius=2.0, elevation_deg=40.0, fov_degrees=45.0)
    eyes = cameras.camera_to_worlds[:, :, 3].numpy()
    elevation = np.degrees(np.arcsin(eyes[:, 2] / np.linalg.norm(eyes, axis=1)))
    azimuth = np.arange(8) * 2 * np.pi / 8
    np.testing.assert_allclose(np.linalg.norm(eyes, axis=1), 2.0, atol=1e-5)
    np.testing.assert_allclose(elevation, 40.0 * np.cos(2 * azimuth), atol=1e-3)
    np.testing.assert_allclose(np.arctan2(eyes[:, 1], eyes[:, 0]) % (2 * np.pi), azimuth, atol=1e-5)
    # Every camera looks at the origin: the optical axis (-z column) is the direction to the centre.
    forward = -cameras.camera_to_worlds[:, :, 2].numpy()
    np.testing.assert_allclose(forward, -eyes / np.linalg.norm(eyes, axis=1, keepdims=True), atol=1e-5)


def test_depth_frames_share_one_range_over_the_video(model):
    """A near and a far camera: colours follow depth on one scale (the far frame is lighter overall)."""
    near_eye, far_eye = eye_on_circle(2.2, 20.0, 0.3), eye_on_circle(3.4, 20.0, 0.3)
    cameras = Cameras(
        camera_to_worlds=torch.cat([hand_built_camera(e, 40).camera_to_worlds for e in (near_eye, far_eye)]),
        fx=48.0, fy=48.0, cx=20.0, cy=20.0, width=40, height=40,
    )
    frames = list(render_frames(model, cameras, "depth", "viridis"))
    with torch.no_grad():
        outputs = [model.get_outputs_for_camera(cameras[i : i + 1].to(model.device)) for i in range(2)]
    lut = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]
    depths, positions = [], []
    for frame, out in zip(frames, outputs):
        accumulation = out["accumulation"][..., 0].cpu().numpy()
        assert np.all(frame[accumulation == 0] == 0)  # background is black
        solid = accumulation > 0.9
        assert solid.sum() > 20
        colour = frame[solid] / 255.0 / accumulation[solid, None]
        nearest = np.argmin(((colour[:, None, :] - lut[None]) ** 2).sum(-1), axis=1)
        assert np.sqrt(((colour - lut[nearest]) ** 2).sum(-1)).max() < 0.05  # colours come from the colormap
        depths.append(out["depth"][..., 0].cpu().numpy()[solid])
        positions.append(nearest / 255.0)
    assert spearmanr(np.concatenate(depths), np.concatenate(positions)).statistic > 0.95
    assert np.median(positions[1]) > np.median(positions[0]) + 0.3


def test_normal_frames_map_unit_normals_and_restore_the_setting(model):
    camera = hand_built_camera(eye_on_circle(2.5, 20.0, 1.0), 32)
    assert model.config.compute_normals is False
    (frame,) = list(render_frames(model, camera, "normals"))
    assert model.config.compute_normals is False
    with torch.no_grad():
        accumulation = model.get_outputs_for_camera(camera.to(model.device))["accumulation"][..., 0].cpu().numpy()
    assert np.all(frame[accumulation == 0] == 0)
    solid = accumulation > 0.9
    normals = 2.0 * frame[solid] / 255.0 / accumulation[solid, None] - 1.0
    assert solid.sum() > 20
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=0.05)


def test_video_gif_and_png_outputs_hold_the_frames(tmp_path):
    frames = []
    for k in range(5):
        frame = np.zeros((32, 48, 3), np.uint8)
        frame[8:24, 4 + 8 * k : 12 + 8 * k] = (250, 120, 30)
        frames.append(frame)
    assert write_frames(iter(frames), tmp_path / "clip.mp4", fps=5) == 5
    video = imageio.imread(tmp_path / "clip.mp4")
    assert video.shape == (5, 32, 48, 3)
    assert np.abs(video.astype(int) - np.stack(frames)).mean() < 4
    assert write_frames(iter(frames), tmp_path / "clip.gif", fps=5) == 5
    gif = imageio.imread(tmp_path / "clip.gif")
    assert gif.shape[:3] == (5, 32, 48)
    np.testing.assert_array_equal(gif[..., :3], np.stack(frames))
    assert write_frames(iter(frames), tmp_path / "pngs", fps=5) == 5
    for k, frame in enumerate(frames):
        np.testing.assert_array_equal(imageio.imread(tmp_path / "pngs" / f"frame_{k:05d}.png"), frame)


@pytest.fixture
def ffmpeg_on_path(tmp_path, monkeypatch):
    """ns-render insists on an `ffmpeg` on PATH: link the one imageio-ffmpeg ships when there is none."""
    if shutil.which("ffmpeg") is None:
        imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="ns-render needs ffmpeg or imageio-ffmpeg")
        shim = tmp_path / "ffmpeg-bin"
        shim.mkdir()
        (shim / "ffmpeg").symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
        monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")


def ns_render(*args: str) -> None:
    """`ns-render ARGS` in this process, through nerfstudio's own command-line parsing."""
    import tyro
    from nerfstudio.scripts.render import Commands

    tyro.cli(Commands, args=list(args)).main()


def test_ns_render_camera_path_renders_our_model(tiny_fit_run, model, tmp_path, ffmpeg_on_path):
    """A camera path in the viewer's JSON format: ns-render's frames are the model's renders of those cameras."""
    eyes = [eye_on_circle(2.5, 25.0, a) for a in (0.0, 2.0)]
    cameras = [hand_built_camera(eye, 40) for eye in eyes]
    path = {
        "camera_type": "perspective", "render_height": 40, "render_width": 40, "seconds": 1.0, "fps": 2,
        "camera_path": [
            {"camera_to_world": torch.cat([c.camera_to_worlds[0], torch.tensor([[0, 0, 0, 1.0]])]).flatten().tolist(),
             "fov": 45.0, "aspect": 1.0}
            for c in cameras
        ],
    }
    path_file = tmp_path / "camera_path.json"
    path_file.write_text(json.dumps(path))
    ns_render("camera-path", "--load-config", str(tiny_fit_run), "--camera-path-filename", str(path_file),
              "--output-path", str(tmp_path / "renders" / "path"), "--output-format", "images", "--image-format", "png")
    files = sorted((tmp_path / "renders" / "path").glob("*.png"))
    assert len(files) == 2
    for file, camera in zip(files, cameras):
        frame = imageio.imread(file).astype(np.int16)
        assert np.abs(frame - model_rgb_uint8(model, camera)).max() <= 1
        assert (frame.max(axis=-1) > 40).mean() > 0.1


def test_ns_render_interpolate_writes_a_video(tiny_fit_run, tmp_path, ffmpeg_on_path):
    output = tmp_path / "interpolate.mp4"
    ns_render("interpolate", "--load-config", str(tiny_fit_run), "--output-path", str(output),
              "--frame-rate", "4", "--interpolation-steps", "2", "--rendered-output-names", "rgb", "depth")
    video = imageio.imread(output)
    assert video.shape[0] >= 2 and video.shape[2] == 2 * video.shape[1]  # rgb | depth side by side
    assert (video[:, :, : video.shape[1]].max(axis=-1) > 40).mean() > 0.05  # the volume shows in the rgb half


def test_existing_outputs_are_replaced_only_with_overwrite(tiny_fit_run, tmp_path, capsys):
    gif = tmp_path / "orbit.gif"
    gif.write_bytes(b"the user's own file")
    argv = ["orbit", "--load-config", str(tiny_fit_run), "--frames", "2", "--image-size", "8", "--output", str(gif)]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip() == f"gridinr-render: error: {gif} exists (use --overwrite to replace it)"
    assert gif.read_bytes() == b"the user's own file"
    assert main([*argv, "--overwrite"]) == 0
    assert imageio.imread(gif, index=None).shape == (2, 8, 8, 3)
    frames = tmp_path / "frames"
    frames.mkdir()
    for index in range(4):  # an older, longer render
        (frames / f"frame_{index:05d}.png").write_bytes(b"old frame")
    (frames / "notes.txt").write_text("mine")
    argv[-1] = str(frames)
    assert main(argv) == 1
    assert "holds frame_*.png frames (use --overwrite to replace them)" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in frames.iterdir()) == ["frame_00000.png", "frame_00001.png", "notes.txt"]
    assert imageio.imread(frames / "frame_00001.png").shape == (8, 8, 3)
    assert sorted(tmp_path.rglob(".*partial*")) == []
