"""gridinr-bench edit and the fast stage-2 profile, with the tiny CLIP through the real loading code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import register_tiny_clip, save_tiny_clip_weights

from gridinr_nerfstudio.gridinr_config import edit_fast_trainer_config, edit_trainer_config
from gridinr_nerfstudio.scripts.bench.cli import main as bench_main


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("tiny-clip")
    name = register_tiny_clip(root / "configs")
    return name, save_tiny_clip_weights(name, root / "open_clip_pytorch_model.bin")


def test_edit_benchmark_reports_both_profiles_and_the_clip_floor(tiny_fit_run: Path, tiny_clip, tmp_path: Path, capsys):
    name, weights = tiny_clip
    output = tmp_path / "edit.json"
    bench_main(["edit", "--load-config", str(tiny_fit_run), "--clip-model", name, "--clip-weights", str(weights),
                "--steps", "1", "--json", str(output)])
    results = json.loads(output.read_text())
    for key in ("default", "fast", "clip_floor"):
        assert results[key]["seconds_per_iteration"] > 0
    fast = results["fast"]
    assert fast["iterations"] == edit_fast_trainer_config().max_num_iterations
    # The total is the sum of its measured parts, and the steps part is iterations x seconds per step.
    assert fast["total_seconds"] == pytest.approx(sum(fast["total_parts"].values()))
    assert fast["total_parts"]["steps"] == pytest.approx(fast["iterations"] * fast["seconds_per_iteration"])
    assert results["default"]["x_clip_floor"] == pytest.approx(
        results["default"]["seconds_per_iteration"] / results["clip_floor"]["seconds_per_iteration"])
    printed = capsys.readouterr().out
    assert "clip_floor (default)" in printed and "fast profile" in printed


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
    assert fast.model.clip_loss.directional and fast.model.clip_loss.crops_per_image == 1
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
