"""gridinr-bench edit and the fast stage-2 profile, with the tiny CLIP through the real loading code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gridinr_nerfstudio.gridinr_config import edit_fast_trainer_config, edit_trainer_config
from gridinr_nerfstudio.scripts.bench.cli import main as bench_main


pytestmark = pytest.mark.usefixtures("keep_global_rng")


def test_edit_benchmark_reports_both_profiles_and_the_clip_floor(tiny_fit_run: Path, tiny_clip, tmp_path: Path, capsys):
    name, weights = tiny_clip
    output = tmp_path / "edit.json"
    bench_main(["edit", "--load-config", str(tiny_fit_run), "--clip-model", name, "--clip-weights", str(weights),
                "--steps", "1", "--sections", "profiles,targets", "--targets", "1,2", "--json", str(output)])
    results = json.loads(output.read_text())
    # Edits by parts: each target adds its part render and its crops; the ratio is to the sum of those floors.
    crops = edit_trainer_config().pipeline.model.clip_crops
    for count in (1, 2):
        row = results["targets"][str(count)]
        assert (row["renders"], row["clip_crops"]) == (1 + count, count * crops)
        assert row["x_floors"] == pytest.approx(row["seconds_per_iteration"] / (row["render_floor"] + row["clip_floor"]))
    for key in ("default", "fast", "clip_floor"):
        assert results[key]["seconds_per_iteration"] > 0
    fast = results["fast"]
    assert fast["iterations"] == edit_fast_trainer_config().max_num_iterations
    # The total is the sum of its measured parts, and the steps part is iterations x seconds per step.
    assert fast["total_seconds"] == pytest.approx(sum(fast["total_parts"].values()))
    assert fast["total_parts"]["steps"] == pytest.approx(fast["iterations"] * fast["seconds_per_iteration"])
    assert fast["total_cpu_seconds"] == pytest.approx(sum(fast["total_parts_cpu"].values()))
    for row in (results["default"], fast, results["clip_floor"], fast["clip_floor"]):
        assert 0 < row["cpu_seconds_per_iteration"]
    assert results["default"]["x_clip_floor"] == pytest.approx(
        results["default"]["seconds_per_iteration"] / results["clip_floor"]["seconds_per_iteration"])
    printed = capsys.readouterr().out
    assert "clip_floor (default)" in printed and "fast profile" in printed and "edits by parts" in printed


def test_edit_benchmark_colour_target_needs_no_clip_and_keeps_opacity(tiny_fit_run: Path, tmp_path: Path, capsys):
    output = tmp_path / "color.json"
    bench_main(["edit", "--load-config", str(tiny_fit_run), "--color-seconds", "1", "--color-eval-every", "2",
                "--color-views", "1", "--color-range", "0.55", "1.0", "--json", str(output)])
    results = json.loads(output.read_text())
    assert results["config"]["sections"] == ["color"]  # without CLIP weights: the colour section alone
    for variant in ("colour_only", "with_opacity"):
        row = results["color"][variant]
        assert row["steps"] >= 1 and row["trace"][0]["ratio"] == 1.0 and row["start_distance"] > 0
        assert row["end_ratio"] == pytest.approx(row["end_distance"] / row["start_distance"])
    assert results["color"]["colour_only"]["min_accumulation_psnr"] == float("inf")  # opacity untouched, exactly
    assert "halved at" in capsys.readouterr().out


def test_edit_benchmark_rejects_a_run_that_is_not_a_fit_run(tmp_path: Path, tiny_clip):
    config = tmp_path / "config.yml"
    config.write_text("not: a nerfstudio config\n")
    with pytest.raises(Exception, match="config.yml"):
        bench_main(["edit", "--load-config", str(config), "--clip-weights", str(tiny_clip[1])])


def test_fast_profile_renders_fewer_pixels_and_one_directional_crop(tiny_fit_run: Path, tiny_clip):
    """Half-size training views, whose references are the area-averaged full-size references."""
    name, weights = tiny_clip
    pipelines = {}
    for profile, make in (("default", edit_trainer_config), ("fast", edit_fast_trainer_config)):
        config = make()
        config.pipeline.stage1_config = tiny_fit_run
        config.pipeline.model.clip_model, config.pipeline.model.clip_weights = name, weights
        pipelines[profile] = config.pipeline.setup(device="cpu", test_mode="val")
    default, fast = pipelines["default"], pipelines["fast"]
    clip_loss = fast.model.scored[0].clip_loss  # the command-line prompt over all values
    assert clip_loss.directional and clip_loss.crops_per_image == 1
    full = default.datamanager.train_images  # (K, 32, 32, 3) in the tiny run
    half = fast.datamanager.train_images
    assert half.shape == (full.shape[0], full.shape[1] // 2, full.shape[2] // 2, 3)
    pooled = full.reshape(full.shape[0], full.shape[1] // 2, 2, full.shape[2] // 2, 2, 3).mean(dim=(2, 4))
    assert torch.allclose(half, pooled, atol=1e-6)
    cameras, batch = fast.datamanager.next_train(0)
    with torch.no_grad():
        fast.model.eval()
        rendered = fast.model.get_view_outputs(cameras)["rgb"]
    assert rendered.shape == batch["image"].shape
    # Rendering the half-size camera shows the same picture as the references at that size.
    assert float((rendered.clamp(0, 1) - batch["image"]).square().mean()) < 0.01


def test_early_ray_termination_keeps_training_renders_and_gradients(tiny_fit_run: Path):
    """Dropping rays below 1e-4 transmittance changes neither the training render nor the MLP gradient visibly."""
    config = edit_trainer_config()
    config.pipeline.stage1_config = tiny_fit_run
    config.pipeline.model.lam_clip = 0.0
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    model = pipeline.model
    cameras, _ = pipeline.datamanager.next_train(0)
    outcomes = []
    for eps in (0.0, 1e-2):  # 1e-2 rather than the default 1e-4, so that rays of the tiny run do stop
        model.config.train_early_stop_eps = eps
        model.transfer_mlp.zero_grad()
        torch.manual_seed(0)  # same stratified jitter
        image = model.render_views(cameras)
        (image * torch.linspace(0, 1, 3)).sum().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.transfer_mlp.parameters()])
        outcomes.append((image.detach(), grads))
    (full, full_grads), (stopped, stopped_grads) = outcomes
    assert float((full - stopped).abs().max()) <= 1e-2 + 1e-6  # a stopped ray misses less than eps of its colour
    assert float((full_grads - stopped_grads).norm() / full_grads.norm()) < 0.05
    # Without autograd the accelerated render (skipping empty macrocells too) shows the same image: cells whose
    # density is below the transfer table's invisible threshold (1e-3 per voxel) count as empty, within 5e-3 here.
    model.eval()
    with torch.no_grad():
        accelerated = model.render_views(cameras)
        model.config.accelerate = False
        plain = model.render_views(cameras)
    assert float((accelerated - plain).abs().max()) < 5e-3
