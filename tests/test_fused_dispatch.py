"""Every user of the renderer takes the fused ray marcher on a CPU, and none falls back to the torch path silently.

`render_paths` counts the rays each path marches: the fused kernel's (`fused_march.render_fused`), the torch
path's (`raymarch.sample_along_rays`, which only the torch path calls) and the fused backward's calls. Each test
renders through a user's own entry point (viewer, ns-eval/gridinr-eval, gridinr-render, reference renderings,
stage-2 training) and asserts fused rays == the pixels asked for and torch rays == 0; with the kernel switched off
(`GRIDINR_FUSED_MARCH=0`) the same counters see the torch path, so they can fail.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from test_rendering import blob_volume

from gridinr_nerfstudio.data.volume_io import open_volume
from gridinr_nerfstudio.fields.brick_cache import BrickFieldCache
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.rendering import fused_march, raymarch

pytestmark = pytest.mark.skipif(not fused_march.kernel_available(), reason="fused ray-marching extension not built")


@dataclass
class RenderPaths:
    fused: list[int] = field(default_factory=list)
    """Rays of each `render_fused` call."""
    torch: list[int] = field(default_factory=list)
    """Rays of each torch-path `render_rays` call."""
    backward: int = 0
    """Calls of the fused backward kernel (the table gradient)."""

    def clear(self) -> None:
        self.fused.clear()
        self.torch.clear()
        self.backward = 0


@pytest.fixture
def render_paths(monkeypatch) -> RenderPaths:
    paths = RenderPaths()
    render_fused, sample_along_rays, kernels = fused_march.render_fused, raymarch.sample_along_rays, fused_march.cpp

    def counting_fused(origins, *args, **kwargs):
        paths.fused.append(origins.shape[0])
        return render_fused(origins, *args, **kwargs)

    def counting_torch(t_near, *args, **kwargs):
        paths.torch.append(t_near.shape[0])
        return sample_along_rays(t_near, *args, **kwargs)

    class CountingKernels:
        forward = staticmethod(kernels.forward)

        @staticmethod
        def backward(*args):
            paths.backward += 1
            return kernels.backward(*args)

    monkeypatch.setattr(fused_march, "render_fused", counting_fused)
    monkeypatch.setattr(raymarch, "sample_along_rays", counting_torch)
    monkeypatch.setattr(fused_march, "cpp", CountingKernels)
    return paths


def pixels(cameras, count: int = 1) -> int:
    return count * int(cameras.width[0]) * int(cameras.height[0])


@pytest.fixture
def fresh_fit_pipeline(tiny_fit_run):
    """The tiny run loaded anew for each test (tests change its render settings)."""
    from gridinr_nerfstudio.runs import load_run_pipeline

    return load_run_pipeline(tiny_fit_run, test_mode="test", device="cpu")[1]


def test_viewer_frames_with_depth_normals_and_shading_take_the_fused_path(fresh_fit_pipeline, render_paths, monkeypatch):
    """What nerfstudio's viewer calls (`get_outputs_for_camera`), with Phong shading and every output it shows; the
    same frame with the kernel switched off is the torch path's, counted there."""
    model = fresh_fit_pipeline.model
    cameras = fresh_fit_pipeline.datamanager.eval_dataset.cameras
    model.render_settings.shading = True
    render_paths.clear()
    fused = model.get_outputs_for_camera(cameras[0:1])
    assert render_paths.fused == [pixels(cameras)] and render_paths.torch == []
    assert {"rgb", "accumulation", "depth", "normals"} <= fused.keys()
    assert isinstance(model.field_cache, DenseGridField)  # the viewer's path: the field cache
    monkeypatch.setenv("GRIDINR_FUSED_MARCH", "0")
    render_paths.clear()
    reference = model.get_outputs_for_camera(cameras[0:1])
    assert render_paths.fused == [] and sum(render_paths.torch) == pixels(cameras)
    # Early termination per sample (fused) vs per chunk of 32 samples (torch): at most 1e-4 per channel apart.
    assert (fused["rgb"] - reference["rgb"]).abs().max() < 1e-3
    assert (fused["accumulation"] - reference["accumulation"]).abs().max() < 1e-3


def test_training_rays_and_brick_caches_take_the_fused_path(fresh_fit_pipeline, render_paths):
    """`get_outputs` (nerfstudio's ray bundles, stratified in training mode) and the field cache decoded in bricks."""
    model = fresh_fit_pipeline.model
    cameras = fresh_fit_pipeline.datamanager.eval_dataset.cameras
    bundle = cameras.generate_rays(camera_indices=0)[:3]
    model.train()
    render_paths.clear()
    model.get_outputs(bundle)
    model.eval()
    assert render_paths.fused == [3 * int(cameras.width[0])] and render_paths.torch == []
    model.config.field_cache_bricks = 4
    model.invalidate_field_cache()
    render_paths.clear()
    outputs = model.get_outputs_for_camera(cameras[0:1])
    assert isinstance(model.field_cache, BrickFieldCache) and 0 < model.field_cache.decoded_fraction()
    assert render_paths.fused == [pixels(cameras)] and render_paths.torch == []
    assert outputs["accumulation"].max() > 0.1  # the volume was seen through the bricks


def test_the_inr_without_a_cache_takes_the_torch_path(fresh_fit_pipeline, render_paths):
    """`field-cache-resolution -1` evaluates the INR at every sample: not a grid, so the torch path (by design)."""
    model = fresh_fit_pipeline.model
    cameras = fresh_fit_pipeline.datamanager.eval_dataset.cameras
    model.config.field_cache_resolution = -1
    model.invalidate_field_cache()
    render_paths.clear()
    model.get_outputs_for_camera(cameras[0:1])
    assert render_paths.fused == [] and sum(render_paths.torch) == pixels(cameras)


def test_gridinr_eval_renders_through_the_fused_path(tiny_fit_run, render_paths, tmp_path, capsys):
    """ns-eval's evaluation (gridinr-eval: the same pipeline call) of a copy of the run."""
    from gridinr_nerfstudio.scripts.eval import main

    copy = tmp_path / "run"
    shutil.copytree(tiny_fit_run.parent, copy)
    assert main(["--load-config", str(copy / "config.yml"), "--output-path", str(tmp_path / "eval.json")]) == 0
    capsys.readouterr()
    assert render_paths.torch == [] and len(render_paths.fused) >= 2  # the eval views (references are cached)
    assert sum(render_paths.fused) % (32 * 32) == 0


@pytest.mark.parametrize("output_kind", ["rgb", "depth", "normals"])
def test_gridinr_render_videos_take_the_fused_path(tiny_fit_run, render_paths, tmp_path, output_kind):
    from gridinr_nerfstudio.scripts.render import main

    argv = ["orbit", "--load-config", str(tiny_fit_run), "--output", str(tmp_path / "frames"), "--frames", "2",
            "--image-size", "16", "--output-kind", output_kind]
    assert main(argv) == 0
    assert render_paths.fused == [16 * 16, 16 * 16] and render_paths.torch == []


def test_stage2_training_step_and_its_gradient_take_the_fused_path(tiny_fit_run, render_paths, monkeypatch):
    """A stage-2 training step (the pipeline's own batch and loss) renders its views through the fused kernel and its
    backward through the fused table gradient; the transfer MLP's gradient equals the torch path's."""
    from test_edit import edit_pipeline

    pipeline = edit_pipeline(tiny_fit_run, lam_pix=1.0)
    model = pipeline.model
    model.config.train_early_stop_eps = 0.0  # the torch path stops per chunk of samples, the kernel per sample
    grads, counts = [], []
    for kernel in ("1", "0"):
        monkeypatch.setenv("GRIDINR_FUSED_MARCH", kernel)
        model.transfer_mlp.zero_grad()
        render_paths.clear()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same batch and stratified positions
            _, losses, _ = pipeline.get_train_loss_dict(0)
            sum(losses.values()).backward()
        grads.append([p.grad.clone() for p in model.transfer_mlp.parameters()])
        counts.append((sum(render_paths.fused), sum(render_paths.torch), render_paths.backward))
    views = pipeline.datamanager.train_dataset.cameras
    batch_pixels = counts[1][1]
    assert batch_pixels > 0 and batch_pixels % pixels(views) == 0
    assert counts[0] == (batch_pixels, 0, counts[0][2]) and counts[0][2] >= 1  # fused forward and backward only
    assert counts[1] == (0, batch_pixels, 0)
    for fused, reference in zip(*grads):
        assert torch.allclose(fused, reference, atol=1e-7, rtol=1e-3)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_reference_renderings_resident_and_memory_mapped_take_the_fused_path(write_raw_dataset, render_paths,
                                                                              tmp_path, dtype):
    """The dataparser's reference renderings from voxels held in memory and read through the memmap in the file's
    own dtype (volumes over `dense_max_bytes`): the same PNGs, every ray on the fused path."""
    import imageio.v3 as iio

    from gridinr_nerfstudio.data.dataparser import reference_renderings
    from gridinr_nerfstudio.data.orbit_cameras import orbit_cameras
    from gridinr_nerfstudio.rendering.settings import RenderSettings

    base = blob_volume((10, 12, 14))
    top = {"uint8": 250, "uint16": 4000, "float32": 7.5}[dtype]
    volume = open_volume(write_raw_dataset({"density": [(base * top).astype(dtype)]}))
    cameras = orbit_cameras(2, image_size=16)
    settings = RenderSettings(num_samples=24, opacity_scale=0.6)
    images = {}
    for name, dense_max_bytes in (("resident", 2 << 30), ("memmapped", 0)):
        render_paths.clear()
        paths = reference_renderings(volume, cameras, settings, tmp_path / name, dense_max_bytes=dense_max_bytes)
        assert render_paths.fused == [16 * 16, 16 * 16] and render_paths.torch == [], name
        images[name] = np.stack([iio.imread(path).astype(np.int16) for path in paths])
    assert images["resident"].max() > 60  # the blobs are in view
    assert np.abs(images["resident"] - images["memmapped"]).max() <= 1  # 8-bit rounding of float32 sums


def dataset_images(folder) -> dict[str, np.ndarray]:
    """A dataset folder's PNGs by kind (images, depth, normals, masks), stacked over frames."""
    import imageio.v3 as iio

    return {kind: np.stack([iio.imread(path).astype(np.int64) for path in sorted((folder / kind).glob("frame_*.png"))])
            for kind in ("images", "depth", "normals", "masks") if (folder / kind).is_dir()}


def render_dataset_both_ways(argv, output, render_paths, monkeypatch, frames: int, frame_pixels: int):
    """`gridinr-render dataset` with the kernel on (every frame's rays fused) and off (all on the torch path); the
    rays are counted per frame (`render_frame`), not those of loading a run."""
    import gridinr_nerfstudio.export.dataset as dataset
    from gridinr_nerfstudio.scripts.render import main

    render_frame, per_frame = dataset.render_frame, []

    def counted_frame(*args, **kwargs):
        render_paths.clear()
        images = render_frame(*args, **kwargs)
        per_frame.append((sum(render_paths.fused), sum(render_paths.torch)))
        return images

    monkeypatch.setattr(dataset, "render_frame", counted_frame)
    sets = []
    for kernel in ("1", "0"):
        monkeypatch.setenv("GRIDINR_FUSED_MARCH", kernel)
        per_frame.clear()
        assert main(["dataset", *map(str, argv), "--output", str(output / kernel)]) == 0
        expected = (frame_pixels, 0) if kernel == "1" else (0, frame_pixels)
        assert per_frame == [expected] * frames, kernel
        sets.append(dataset_images(output / kernel))
    return sets


def assert_same_dataset(fused: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    """The tolerance: the fused kernel stops a ray at the first sample whose transmittance is below early_stop_eps
    (1e-4), the torch path at the end of a chunk of 32 samples, and their float32 sums differ in order; so rgb and
    accumulation differ by < 1e-4 (0.03 of a uint8 level): one level where a value sits on a rounding edge, 1e-3
    world units of z-depth likewise (< 1e-4 apart before rounding), normals (weighted by those weights) one level,
    and a mask only where the accumulation is within 1e-4 of the threshold (at most a pixel or two per frame)."""
    assert fused.keys() == reference.keys()
    masks = fused["masks"] > 0
    flipped = masks != (reference["masks"] > 0)
    assert flipped.sum() <= 2 * masks.shape[0]
    seen = masks & ~flipped
    assert 0.05 < seen.mean() < 0.95  # the volume is in view and does not fill the frames
    assert np.abs(fused["images"] - reference["images"]).max() <= 1
    assert np.abs(fused["depth"] - reference["depth"])[seen].max() <= 1
    assert np.abs(fused["normals"] - reference["normals"])[seen].max() <= 1


def test_gridinr_render_dataset_takes_the_fused_path_with_every_look(render_paths, monkeypatch, tmp_path):
    """Raw voxels (the built-in volume) with every shipped preset (fMRI BOLD included), colormaps, shifts, opacity
    factors, shading on and off and backgrounds drawn per frame, depth, normals and masks: each image the torch
    path's to the tolerance of `assert_same_dataset`."""
    argv = ["--data", "builtin-default", "--num-images", 8, "--image-size", 24, "--cameras", "random", "--seed", 2,
            "--presets", "all", "--colormaps", "viridis", "--opacity-ramp", "0.2:0.7:0.4", "--opacity-scale", "0.5:2",
            "--colormap-shift", "0.05", "--shading", "random", "--background", "black", "white", "random",
            "--depth", "--normals", "--masks"]
    fused, reference = render_dataset_both_ways(argv, tmp_path, render_paths, monkeypatch, 8, 24 * 24)
    assert_same_dataset(fused, reference)
    import json

    looks = json.loads((tmp_path / "1" / "transforms.json").read_text())["frames"]
    assert len({frame["appearance"]["preset"] or frame["appearance"]["colormap"] for frame in looks}) == 5
    assert {frame["appearance"]["shading"] for frame in looks} == {True, False}


def test_gridinr_render_dataset_of_the_fmri_sequence_takes_the_fused_path(shared_data, render_paths, monkeypatch,
                                                                         tmp_path):
    """The fMRI BOLD preset on the fMRI data it was made for (int16, anisotropic, two time steps), shaded."""
    argv = ["--data", shared_data("fmri4d"), "--timesteps", "all", "--num-images", 3, "--image-size", 20,
            "--cameras", "orbit", "--rings", 1, "--presets", "fMRI BOLD", "--shading", "on", "--depth", "--normals",
            "--masks"]
    fused, reference = render_dataset_both_ways(argv, tmp_path, render_paths, monkeypatch, 6, 20 * 20)
    assert_same_dataset(fused, reference)
    assert np.abs(fused["images"][:3] - fused["images"][3:]).max() > 0  # the two steps differ


def test_memory_mapped_dataset_frames_take_the_fused_path(shared_data, render_paths, tmp_path):
    """Volumes over `dense_max_bytes` are read through the memmap in their own dtype (int16): the same frames."""
    from gridinr_nerfstudio.data.camera_distributions import make_camera_set
    from gridinr_nerfstudio.data.volume_io import open_volume
    from gridinr_nerfstudio.export.dataset import DatasetOutputs, VolumeScene, plan_frames, write_dataset
    from gridinr_nerfstudio.fields.memmap_grid import MemmapGridField
    from gridinr_nerfstudio.rendering.appearance import AppearanceOptions, draw_appearances
    from gridinr_nerfstudio.rendering.settings import RenderSettings

    volume = open_volume(shared_data("fmri4d"))
    cameras = make_camera_set("sphere", 3, 20, 20)
    looks = draw_appearances(AppearanceOptions(presets=["fMRI BOLD"], shading="on"), RenderSettings(), 3,
                             np.random.default_rng(0))
    outputs = DatasetOutputs(depth=True, normals=True, masks=True)
    sets = {}
    for name, dense_max_bytes in (("resident", 2 << 30), ("memmapped", 0)):
        scene = VolumeScene([volume], [1], RenderSettings(), "fmri", dense_max_bytes=dense_max_bytes)
        render_paths.clear()
        write_dataset(scene, cameras, plan_frames(cameras, [1], [1]), looks, tmp_path / name, outputs)
        assert render_paths.fused == [20 * 20] * 3 and render_paths.torch == [], name
        sets[name] = dataset_images(tmp_path / name)
    assert isinstance(scene.value_fn(), MemmapGridField)
    assert_same_dataset(sets["memmapped"], sets["resident"])  # float32 copy vs the kernel's affine map of int16


def test_gridinr_render_dataset_of_a_run_takes_the_fused_path(tiny_fit_run, render_paths, monkeypatch, tmp_path):
    """A fit run's field cache, shaded, with the look drawn per frame."""
    argv = ["--load-config", tiny_fit_run, "--num-images", 3, "--image-size", 16, "--presets", "all",
            "--shading", "on", "--depth", "--normals", "--masks"]
    fused, reference = render_dataset_both_ways(argv, tmp_path, render_paths, monkeypatch, 3, 16 * 16)
    assert_same_dataset(fused, reference)
