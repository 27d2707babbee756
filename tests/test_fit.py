"""Stage 1 (gridinr-fit): data manager targets, losses and metrics, checkpoints, a real short training run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nerfstudio.utils.eval_utils import eval_setup
from tiny_runs import run_of

from gridinr_nerfstudio.stages.fit.datamanager import FitDataManagerConfig


def _datamanager(data: Path, tmp_path: Path, **kwargs):
    config = FitDataManagerConfig(**kwargs)
    config.dataparser.data = data
    config.dataparser.num_train_views, config.dataparser.num_eval_views, config.dataparser.image_size = 2, 2, 16
    config.dataparser.cache_dir = tmp_path
    return config.setup(device="cpu")


@pytest.mark.parametrize("preload", [True, False])
def test_targets_equal_voxels_at_voxel_centres(shared_data, tmp_path, preload):
    """In memory or through the memmap, a voxel centre's target is that voxel (normalised), orientation included."""
    data = shared_data("fmri4d")
    manager = _datamanager(data, tmp_path, preload_max_bytes=(1 << 40) if preload else 0)
    raw = np.fromfile(data / "bold" / "fmri4d-bold-1.raw", dtype="<i2").reshape(24, 96, 128).astype(np.float64)
    normalised = (raw - raw.min()) / (raw.max() - raw.min())
    rng = np.random.default_rng(0)
    voxels = np.stack([rng.integers(0, n, 500) for n in (128, 96, 24)], axis=-1)  # (x, y, z)
    half = manager.aabb[1].numpy().astype(np.float64)
    world = -half + voxels / (np.array([127, 95, 23])) * 2 * half
    values = manager.values_at(torch.from_numpy(world).float()).numpy()
    expected = normalised[voxels[:, 2], voxels[:, 1], voxels[:, 0]]
    assert np.allclose(values, expected, atol=1e-5)


def test_batches_lie_in_the_box_and_coarse_phase_uses_the_subgrid(tmp_path):
    manager = _datamanager(Path("builtin-default"), tmp_path, batch_size=1000, subsample_factor=4, subsample_fraction=0.5,
                           sampling="continuous")
    manager.get_training_callbacks(run_of(10))  # the coarse phase: half of the run's 10 steps
    aabb = manager.aabb
    coarse_points, coarse_batch = manager.next_train(step=0)
    fine_points, _ = manager.next_train(step=9)
    for points in (coarse_points, fine_points):
        assert points.shape == (1000, 3) and ((points >= aabb[0]) & (points <= aabb[1])).all()
    dims = torch.tensor(manager.volume.info.dims, dtype=torch.float32)
    voxel = (coarse_points - aabb[0]) / (aabb[1] - aabb[0]) * (dims - 1)
    assert torch.allclose(voxel, voxel.round(), atol=1e-3) and (voxel.round() % 4 == 0).all()  # strided voxel centres
    fine_voxel = (fine_points - aabb[0]) / (aabb[1] - aabb[0]) * (dims - 1)
    assert (fine_voxel - fine_voxel.round()).abs().max() > 0.1  # continuous positions afterwards
    assert coarse_batch["values"].shape == (1000,)


@pytest.fixture(scope="module")
def fit_pipeline(tiny_fit_run):
    _, pipeline, _, step = eval_setup(tiny_fit_run)
    return pipeline


def test_volume_psnr_matches_numpy(fit_pipeline):
    model = fit_pipeline.model
    volume = model.volume
    reference = volume.normalized_array().astype(np.float64)
    size_x, size_y, size_z = volume.info.dims
    zz, yy, xx = np.meshgrid(*(np.linspace(0, 1, n) for n in (size_z, size_y, size_x)), indexing="ij")
    unit = torch.from_numpy(np.stack([xx, yy, zz], -1).reshape(-1, 3)).float()
    with torch.no_grad():
        predicted = torch.cat([model.field.forward_unit(chunk) for chunk in unit.split(1 << 17)]).numpy().astype(np.float64)
    mse = np.mean((np.clip(predicted, 0, 1) - reference.reshape(-1)) ** 2)
    assert math.isclose(model.volume_psnr(), 10 * np.log10(1 / mse), rel_tol=1e-4)


def test_point_loss_is_mse_or_l1(fit_pipeline):
    model = fit_pipeline.model
    points = torch.rand(256, 3) * 2 - 1
    targets = torch.rand(256)
    with torch.no_grad():
        predicted = model.field(points)
        model.config.loss = "l2"
        assert torch.allclose(model.get_loss_dict(model.get_point_outputs(points), {"values": targets})["value_loss"], ((predicted - targets) ** 2).mean(), atol=1e-6)
        model.config.loss = "l1"
        assert torch.allclose(model.get_loss_dict(model.get_point_outputs(points), {"values": targets})["value_loss"], (predicted - targets).abs().mean(), atol=1e-6)
        model.config.loss = "l2"


def test_checkpoint_loads_with_weights_only(tiny_fit_run):
    checkpoint = sorted((tiny_fit_run.parent / "nerfstudio_models").glob("*.ckpt"))[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert any(key.startswith("_model.field.encoding") for key in state["pipeline"])
    assert not any("volume" in key for key in state["pipeline"])  # the voxels never end up in checkpoints


def test_training_raises_volume_psnr(tmp_path, tiny_fit_run):
    """The same tiny model after 2 and after 150 steps: volume PSNR rises."""
    from tiny_runs import train_tiny_fit

    short = train_tiny_fit(tmp_path / "short", iterations=2)
    psnr_short = eval_setup(short)[1].model.volume_psnr()
    psnr_long = eval_setup(tiny_fit_run)[1].model.volume_psnr()
    assert psnr_long > psnr_short + 3.0, (psnr_short, psnr_long)


def test_ns_eval_reports_metrics_and_csv(tiny_fit_run, tmp_path):
    output = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "nerfstudio.scripts.eval", "--load-config", str(tiny_fit_run), "--output-path", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(output.read_text())["results"]
    for key in ("volume_psnr", "psnr", "ssim", "ms_per_frame", "rays_per_s", "fps", "compression_ratio", "params"):
        assert isinstance(metrics[key], float | int) and math.isfinite(metrics[key]), key
    assert metrics["volume_bytes"] == 96**3 * 4  # the built-in volume, float32
    assert metrics["model_bytes_fp32"] == 2 * metrics["model_bytes_fp16"] == 4 * metrics["params"]
    assert metrics["compression_ratio"] == pytest.approx(metrics["volume_bytes"] / metrics["model_bytes_fp32"])
    if "lpips" in metrics:
        assert isinstance(metrics["lpips"], float)
    else:  # left out (nerfstudio's writers need numbers), said why once
        assert "lpips is not reported" in result.stdout and "weights" in result.stdout
    csv_text = (tiny_fit_run.parent / "metrics.csv").read_text()
    assert "volume_psnr" in csv_text.splitlines()[0] and ",fit," in csv_text
