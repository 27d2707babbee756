"""gridinr-render dataset: nerfstudio-format training sets, read back by nerfstudio's own `nerfstudio-data` parser
and readers, and their images against independent renders (the plain ray marcher over the raw voxels, with cameras
as nerfstudio parses them and looks built from each frame's record), a run's own renders, and `ns-train nerfacto`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import imageio.v3 as imageio
import numpy as np
import pytest
import torch

from gridinr_nerfstudio.data.camera_distributions import make_camera_set
from gridinr_nerfstudio.data.default_volume import default_volume_array
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.rendering.appearance import jittered
from gridinr_nerfstudio.rendering.images import render_camera, to_uint8
from gridinr_nerfstudio.rendering.raymarch import estimate_normals
from gridinr_nerfstudio.rendering.settings import RenderSettings
from gridinr_nerfstudio.scripts.render import main
from gridinr_nerfstudio.transfer.transfer_function import TABLE_SIZE, TransferFunction, sigma_from_opacity

BUILTIN_VOXEL = 2.0 / 95.0  # the built-in volume: 96 voxels over [-1, 1]


def render_dataset(*args) -> int:
    return main(["dataset", *map(str, args)])


def nerfstudio_outputs(folder: Path, split: str = "train", **options):
    """nerfstudio's `nerfstudio-data` parser on the folder (all frames in every split unless told otherwise)."""
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    settings = dict(eval_mode="all", orientation_method="none", center_method="none", auto_scale_poses=False)
    settings.update(options)
    return NerfstudioDataParserConfig(data=folder, **settings).setup().get_dataparser_outputs(split)


def plain_render(field, cameras, index, settings: RenderSettings, normals: bool = False, voxel: float = BUILTIN_VOXEL):
    """The reference: the plain ray marcher (no skipping, no early stop) through `field` with `settings`' look."""
    transfer = settings.transfer_function(voxel)
    kwargs = {}
    if settings.shading or normals:
        kwargs["normal_fn"] = lambda points: estimate_normals(field, points, 0.5 * voxel)
    with torch.no_grad():
        return render_camera(cameras, index, lambda p: transfer(field(p)), torch.tensor([[-1.0] * 3, [1.0] * 3]),
                             num_samples=settings.num_samples, background=torch.tensor(settings.background),
                             shading=settings.shading, early_stop_eps=0.0, **kwargs)


@pytest.fixture(scope="module")
def builtin_field():
    return DenseGridField(torch.from_numpy(default_volume_array()), torch.ones(3))


@pytest.fixture(scope="module")
def random_set(tmp_path_factory) -> Path:
    """Six random cameras (jittered field of view: per-frame intrinsics) of the built-in volume, depth, normals, masks."""
    folder = tmp_path_factory.mktemp("datasets") / "random"
    assert render_dataset("--data", "builtin-default", "--output", folder, "--num-images", 6, "--image-size", "24x20",
                          "--cameras", "random", "--seed", 3, "--depth", "--normals", "--masks") == 0
    return folder


def test_nerfstudio_parser_reads_our_cameras(random_set):
    """nerfstudio-data without re-orientation: its cameras are exactly the distribution's; with its defaults
    (orient up, centre, scale): ours moved by the transform and scale it reports."""
    ours = make_camera_set("random", 6, 24, 20, seed=3)
    parsed = nerfstudio_outputs(random_set)
    cameras = parsed.cameras
    assert len(cameras) == 6 and [p.name for p in parsed.image_filenames] == [f"frame_{i:05d}.png" for i in range(6)]
    np.testing.assert_allclose(cameras.camera_to_worlds.numpy(), ours.camera_to_worlds.numpy(), atol=1e-6)
    np.testing.assert_allclose(cameras.fx.view(-1).numpy(), ours.focal.numpy(), rtol=1e-6)
    np.testing.assert_allclose(cameras.fy.view(-1).numpy(), ours.focal.numpy(), rtol=1e-6)
    assert torch.all(cameras.cx == 12.0) and torch.all(cameras.cy == 10.0)
    assert torch.all(cameras.width == 24) and torch.all(cameras.height == 20)
    assert len(parsed.mask_filenames) == 6 and len(parsed.metadata["depth_filenames"]) == 6

    default = nerfstudio_outputs(random_set, orientation_method="up", center_method="poses", auto_scale_poses=True)
    homogeneous = torch.cat([ours.camera_to_worlds, torch.tensor([[[0.0, 0, 0, 1]]]).expand(6, 1, 4)], dim=1)
    moved = default.dataparser_transform @ homogeneous
    moved[:, :3, 3] *= default.dataparser_scale
    np.testing.assert_allclose(default.cameras.camera_to_worlds.numpy(), moved.numpy(), atol=1e-5)


def test_depth_masks_and_normals_as_nerfstudio_reads_them(random_set, builtin_field):
    """Depth read by nerfstudio (its default depth_unit_scale_factor) is the z-depth: the plain renderer's expected
    ray distance times the cosine of each pixel's ray, computed here from the pixel grid; masks are accumulation >=
    0.05, 0 = ignore; normals decode to the renderer's."""
    from nerfstudio.data.utils.data_utils import get_depth_image_from_path, get_image_mask_tensor_from_path

    parsed = nerfstudio_outputs(random_set)
    cameras = parsed.cameras
    transforms = json.loads((random_set / "transforms.json").read_text())
    assert transforms["depth_unit_scale_factor"] == parsed.metadata["depth_unit_scale_factor"] == 1e-3
    v, u = np.meshgrid(np.arange(20) + 0.5, np.arange(24) + 0.5, indexing="ij")
    for index in range(6):
        reference = plain_render(builtin_field, cameras, index, RenderSettings(), normals=True)
        accumulation = reference["accumulation"][..., 0].numpy()
        focal = float(cameras.fx[index])
        cosine = 1.0 / np.sqrt(((u - 12.0) / focal) ** 2 + ((v - 10.0) / focal) ** 2 + 1.0)
        z_depth = reference["depth"][..., 0].numpy() * cosine
        depth = get_depth_image_from_path(parsed.metadata["depth_filenames"][index], 20, 24, 1e-3)[..., 0].numpy()
        mask = get_image_mask_tensor_from_path(parsed.mask_filenames[index])[..., 0].numpy()
        clear = np.abs(accumulation - 0.05) > 0.01  # pixels not on the threshold's edge
        assert clear.mean() > 0.9 and 0.1 < (accumulation >= 0.05).mean() < 0.95
        assert np.array_equal(mask[clear], (accumulation >= 0.05)[clear])
        seen = clear & (accumulation >= 0.05)
        assert np.all(depth[~mask] == 0)
        assert np.abs(depth[seen] - z_depth[seen]).max() < 3e-3  # 1e-3 quantisation, skipping
        normals = imageio.imread(random_set / "normals" / f"frame_{index:05d}.png").astype(np.float64) / 255 * 2 - 1
        agree = np.sum(normals * reference["normals"].numpy(), axis=-1)
        assert np.median(agree[seen]) > 0.99 and np.all(normals[~mask] == -1)


def test_frames_are_rebuilt_from_their_appearance_records(tmp_path, builtin_field):
    """Presets, colormaps, shading and backgrounds drawn per image: each frame equals the plain render with render
    settings built here from its record alone, and the draws vary over the set."""
    folder = tmp_path / "looks"
    assert render_dataset("--data", "builtin-default", "--output", folder, "--num-images", 8, "--image-size", 20,
                          "--cameras", "orbit", "--presets", "all", "--colormaps", "viridis", "gray",
                          "--shading", "random", "--background", "black", "white", "random", "--seed", 5,
                          "--opacity-ramp", "0.2:0.7:0.4") == 0
    cameras = nerfstudio_outputs(folder).cameras
    frames = json.loads((folder / "transforms.json").read_text())["frames"]
    looks = {(f["appearance"]["preset"], f["appearance"]["colormap"]) for f in frames}
    assert len(looks) >= 3 and {f["appearance"]["shading"] for f in frames} == {True, False}
    assert len({tuple(f["appearance"]["background"]) for f in frames}) >= 3
    assert all(f["appearance"]["opacity_ramp"] == [0.2, 0.7, 0.4] for f in frames if f["appearance"]["colormap"])
    for index, frame in enumerate(frames):
        record = frame["appearance"]
        settings = RenderSettings(shading=record["shading"], background=tuple(record["background"]))
        if record["preset"]:
            settings.preset = record["preset"]
        else:
            settings.colormap = record["colormap"]
            settings.opacity_low, settings.opacity_high, settings.opacity_scale = record["opacity_ramp"]
        expected = to_uint8(plain_render(builtin_field, cameras, index, settings)["rgb"].numpy()).astype(int)
        image = imageio.imread(folder / frame["file_path"]).astype(int)
        assert np.abs(image - expected).max() <= 2, (index, record)


def test_jittered_transfer_function_against_numpy():
    """Colour nodes and opacity points moved along the value axis, opacities scaled and clipped: the table equals
    numpy's interpolation of the moved points (ends held)."""
    base = TransferFunction.ramp("viridis", 0.2, 0.6, 0.5, unit_distance=0.02)
    moved = jittered(base, 0.1, -0.05, 3.0)
    positions = np.linspace(0.0, 1.0, TABLE_SIZE)
    table = moved.table[0, :, 0, :].double().numpy()
    for channel in range(3):
        expected = np.interp(positions, base.color_nodes + 0.1, base.colors[:, channel])
        np.testing.assert_allclose(table[channel], expected, atol=1e-6)
    opacity = np.interp(positions, base.opacity_points[:, 0] - 0.05, np.minimum(base.opacity_points[:, 1] * 3.0, 1.0))
    np.testing.assert_allclose(table[3], sigma_from_opacity(opacity, 0.02), rtol=1e-5, atol=1e-5)
    assert jittered(base, 0.0, 0.0, 1.0) is base


def test_sequence_frames_carry_their_times(write_raw_dataset, tmp_path):
    """Two time steps: every camera at each step (step-major), time 0 and 1 and the step's number; each image is
    the plain render of its step normalised with the joint range of both steps (computed here with numpy)."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, 16),) * 3, indexing="ij")
    steps = [np.exp(-((x - c) ** 2 + y**2 + z**2) / 0.1) * (1 + k) for k, c in enumerate((-0.4, 0.4))]
    data = write_raw_dataset({"v": [s.astype(np.float32) for s in steps]}, name="moving")
    folder = tmp_path / "sequence"
    assert render_dataset("--data", data, "--output", folder, "--num-images", 3, "--image-size", 16,
                          "--timesteps", "all", "--cameras", "orbit", "--rings", 1, "--elevations", "10:10") == 0
    frames = json.loads((folder / "transforms.json").read_text())["frames"]
    assert [f["time"] for f in frames] == [0.0] * 3 + [1.0] * 3
    assert [f["timestep"] for f in frames] == [1] * 3 + [2] * 3
    cameras = nerfstudio_outputs(folder).cameras
    low, high = min(float(s.min()) for s in steps), max(float(s.max()) for s in steps)
    for index, frame in enumerate(frames):
        field = DenseGridField(torch.from_numpy((steps[index // 3] - low) / (high - low)).float(), torch.ones(3))
        rendered = plain_render(field, cameras, index, RenderSettings(), voxel=2.0 / 15.0)
        expected = to_uint8(rendered["rgb"].numpy()).astype(int)
        assert np.abs(imageio.imread(folder / frame["file_path"]).astype(int) - expected).max() <= 2
    first, second = (imageio.imread(folder / frames[i]["file_path"]).astype(int) for i in (0, 3))
    assert np.abs(first - second).max() > 30  # the blob moved and brightened


def test_existing_folders_need_overwrite_and_inputs_are_never_written(tmp_path, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    assert render_dataset("--data", "builtin-default", "--output", folder, "--num-images", 2, "--image-size", 8) == 0
    notes = folder / "notes.txt"
    notes.write_text("mine")
    stale = folder / "images" / "frame_00009.png"
    stale.write_bytes(b"old")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert render_dataset("--data", "builtin-default", "--output", folder, "--num-images", 1, "--image-size", 8) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--overwrite" in error and str(folder) in error
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # nothing touched
    assert render_dataset("--data", "builtin-default", "--output", folder, "--num-images", 1, "--image-size", 8,
                          "--overwrite") == 0
    assert notes.read_text() == "mine" and not stale.exists()  # our entries replaced, other files kept
    assert len(json.loads((folder / "transforms.json").read_text())["frames"]) == 1
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["frame_00000.png"]
    assert not [p for p in folder.rglob(".*")] and sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    # A folder holding the input volume is refused even with --overwrite.
    volume = tmp_path / "volume.npy"
    np.save(volume, np.ones((4, 4, 4), dtype=np.float32))
    capsys.readouterr()
    assert render_dataset("--data", volume, "--output", tmp_path, "--overwrite", "--num-images", 1) == 1
    assert "input" in capsys.readouterr().err


def test_overwrite_never_writes_over_the_volume_it_reads(tmp_path, capsys):
    """safe_write's rule through every path to the input: a frame name hard-linked or symlinked to the volume file,
    and transforms.json as a link to it, are refused even with --overwrite, and the volume keeps its bytes."""
    volume = tmp_path / "volume.npy"
    np.save(volume, np.linspace(0, 1, 64, dtype=np.float32).reshape(4, 4, 4))
    original = volume.read_bytes()
    for name, link in (("images/frame_00000.png", "hard"), ("masks/frame_00001.png", "symlink"),
                       ("transforms.json", "symlink")):
        folder = tmp_path / f"set-{link}-{name.split('/')[0]}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).hardlink_to(volume) if link == "hard" else (folder / name).symlink_to(volume)
        capsys.readouterr()
        assert render_dataset("--data", volume, "--output", folder, "--overwrite", "--num-images", 2,
                              "--image-size", 8, "--masks") == 1
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "the volume file" in error and "not even with --overwrite" in error
        assert volume.read_bytes() == original
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()) == [name]


def test_an_interrupted_render_leaves_what_was_there(tmp_path, monkeypatch, capsys):
    """A failure in the middle of a set (here the third frame's render) leaves the older set as it was, and no
    hidden staging files or folders, whether the folder was new or replaced with --overwrite."""
    import gridinr_nerfstudio.export.dataset as dataset

    folder = tmp_path / "set"
    assert render_dataset("--data", "builtin-default", "--output", folder, "--num-images", 2, "--image-size", 8,
                          "--depth") == 0
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    render_frame, calls = dataset.render_frame, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return render_frame(*args, **kwargs)

    monkeypatch.setattr(dataset, "render_frame", failing)
    for output, extra in ((folder, ["--overwrite"]), (tmp_path / "new", [])):
        calls.clear()
        assert render_dataset("--data", "builtin-default", "--output", output, "--num-images", 4, "--image-size", 8,
                              "--masks", *extra) == 1
        assert "disk full" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"] and not list(folder.rglob(".*"))


@pytest.mark.parametrize("args, message", [
    (["--cameras", "spiral"], "--cameras"),
    (["--presets", "No Such Preset"], "--presets"),
    (["--colormaps", "nope"], "--colormaps"),
    (["--background", "1,2,3"], "--background"),
    (["--image-size", "7y"], "--image-size"),
    (["--opacity-scale", "2:1"], "--opacity-scale"),
    (["--opacity-ramp", "0.5:0.2:0.3"], "--opacity-ramp"),
    (["--timesteps", "3"], "out of range"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    output = tmp_path / "out"
    assert render_dataset("--data", "builtin-default", "--output", output, "--num-images", 2, *args) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_camera_path_dataset(tmp_path):
    from test_camera_distributions import hand_pose, write_path

    poses = [hand_pose(np.array([2.5 * math.cos(a), 2.5 * math.sin(a), 0.5]), np.zeros(3), 0.0) for a in (0, 1, 2)]
    path = write_path(tmp_path, poses, [40.0, 45.0, 50.0], height=12, width=16)
    folder = tmp_path / "from-path"
    assert render_dataset("--data", "builtin-default", "--output", folder,
                          "--cameras", path) == 0
    transforms = json.loads((folder / "transforms.json").read_text())
    assert (transforms["w"], transforms["h"]) == (16, 12)
    for frame, pose, fov in zip(transforms["frames"], poses, (40.0, 45.0, 50.0)):
        np.testing.assert_allclose(np.asarray(frame["transform_matrix"])[:3], pose, atol=1e-6)
        assert frame["fl_y"] == pytest.approx(6.0 / math.tan(math.radians(fov) / 2), rel=1e-5)
        assert imageio.imread(folder / frame["file_path"]).shape == (12, 16, 3)
    assert render_dataset("--data", "builtin-default", "--output", tmp_path / "sized", "--cameras", path,
                          "--image-size", 32) == 1  # the path sets the size: a second one is refused


def model_uint8(model, cameras, index: int) -> np.ndarray:
    with torch.no_grad():
        rgb = model.get_outputs_for_camera(cameras[index : index + 1].to(model.device))["rgb"]
    return to_uint8(rgb.cpu().numpy()).astype(int)


def test_fit_and_edit_run_datasets_are_the_runs_renders(tiny_fit_run, tmp_path, capsys):
    """A run's frames equal the model's own renders (the viewer's code path) with the frame's background; an edit
    run keeps its learned look and refuses transfer-function randomisation in one line."""
    from tiny_runs import train_tiny_edit

    from gridinr_nerfstudio.scripts.render import load_model

    edit_run = train_tiny_edit(tmp_path / "edit", tiny_fit_run, iterations=2)
    for run in (tiny_fit_run, edit_run):
        folder = tmp_path / f"set-{run.parent.name}"
        assert render_dataset("--load-config", run, "--output", folder, "--num-images", 3, "--image-size", 24,
                              "--background", "white", "random", "--seed", 2) == 0
        model = load_model(run)
        cameras = nerfstudio_outputs(folder).cameras
        for index, frame in enumerate(json.loads((folder / "transforms.json").read_text())["frames"]):
            if run == edit_run:
                assert frame["appearance"]["transfer_function"] == "learned"
            model.render_settings.background = tuple(frame["appearance"]["background"])
            image = imageio.imread(folder / frame["file_path"]).astype(int)
            assert np.abs(image - model_uint8(model, cameras, index)).max() <= 1
    capsys.readouterr()
    assert render_dataset("--load-config", edit_run, "--output", tmp_path / "refused", "--presets", "all") == 1
    assert "learned transfer function" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_ns_train_nerfacto_starts_on_a_dataset(random_set, tmp_path, monkeypatch):
    """`ns-train nerfacto --data DIR` (nerfstudio's own command-line parsing and trainer) runs two steps on a dataset.

    nerfacto builds torchmetrics' LPIPS when its model is made, which downloads AlexNet weights; offline (as here)
    that fails before any data is read, whatever the dataset. The test stands in a no-op metric for it."""
    import torchmetrics.image.lpip
    import tyro
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
    from tiny_runs import run_ns_train

    class NoLPIPS(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

        def forward(self, first, second):
            return torch.zeros(())

    monkeypatch.setattr(torchmetrics.image.lpip, "LearnedPerceptualImagePatchSimilarity", NoLPIPS)
    config = tyro.cli(AnnotatedBaseConfigUnion, args=[
        "nerfacto", "--data", str(random_set), "--output-dir", str(tmp_path / "outputs"), "--vis", "tensorboard",
        "--machine.device-type", "cpu", "--max-num-iterations", "2", "--steps-per-save", "2",
        "--pipeline.datamanager.train-num-rays-per-batch", "256", "--pipeline.model.eval-num-rays-per-chunk", "256",
        "--timestamp", "nerfacto-test",
    ])
    run_ns_train(config)
    checkpoints = list((tmp_path / "outputs").rglob("step-*.ckpt"))
    assert len(checkpoints) == 1
    import numpy

    # nerfstudio stores a numpy scalar in its checkpoints: allow that one type, not arbitrary pickled code
    allowed = [numpy.core.multiarray.scalar, numpy.dtype, type(numpy.dtype("float64")), type(numpy.dtype("int64"))]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
    assert state["step"] == 1  # nerfstudio saves the last step's index
