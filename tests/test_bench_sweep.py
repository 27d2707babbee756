"""gridinr-bench sweep: every variant trains on every volume, and the summary follows from the per-volume table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gridinr_nerfstudio.scripts.bench import sweep
from gridinr_nerfstudio.scripts.bench.cli import main as bench_main

SMALL = {"num_levels": 4, "log2_hashmap_size": 12, "max_resolution": 32, "hidden_dim": 16, "batch": 1 << 10}


def test_sweep_trains_every_variant_on_every_volume(write_raw_dataset, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sweep, "VARIANTS", {"small": SMALL, "small_linear": {**SMALL, "num_hidden_layers": 0},
                                            "small_lr": {**SMALL, "lr": 3e-2}})
    rng = np.random.default_rng(0)
    first = write_raw_dataset({"v": [rng.random((8, 10, 12)).astype(np.float32)]}, name="first")
    second = write_raw_dataset({"v": [rng.integers(0, 255, (6, 6, 6)).astype(np.uint8)]}, name="second")
    table, output = tmp_path / "sweep.md", tmp_path / "sweep.json"
    bench_main(["sweep", "--data", str(first), "--data", str(second), "--seconds", "0.2",
                "--markdown", str(table), "--json", str(output)])
    results = json.loads(output.read_text())
    assert list(results["volumes"]) == [str(first), str(second)]
    for rows in results["volumes"].values():
        assert set(rows) == {"small", "small_linear", "small_lr"}
        assert all(row["iterations"] >= 1 and np.isfinite(row["volume_psnr_db"]) for row in rows.values())
    for name, row in results["summary"].items():
        scores = [rows[name]["volume_psnr_db"] for rows in results["volumes"].values()]
        best = [max(r["volume_psnr_db"] for r in rows.values()) for rows in results["volumes"].values()]
        assert row["mean_psnr_db"] == pytest.approx(sum(scores) / len(scores))
        assert row["worst_margin_db"] == pytest.approx(min(s - b for s, b in zip(scores, best)))
    text = table.read_text()
    assert all(f"| {name} |" in text for name in ("small", "small_linear", "small_lr"))
    assert "first" in text and "second" in text


def test_sweep_rejects_unknown_variants(tmp_path: Path):
    with pytest.raises(SystemExit, match="unknown variants"):
        bench_main(["sweep", "--data", "builtin-default", "--variants", "default,nonsense"])


def test_sweep_schedules_and_error_weighted_batches_run(write_raw_dataset, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sweep, "VARIANTS", {"c2f": {**SMALL, "coarse_to_fine": 0.5},
                                            "errors": {**SMALL, "error_weighted": 0.5}})
    rng = np.random.default_rng(1)
    data = write_raw_dataset({"v": [rng.random((8, 10, 12)).astype(np.float32)]}, name="vol")
    output = tmp_path / "sweep.json"
    bench_main(["sweep", "--data", str(data), "--seconds", "0.3", "--json", str(output)])
    rows = json.loads(output.read_text())["volumes"][str(data)]
    assert all(row["iterations"] >= 1 and np.isfinite(row["volume_psnr_db"]) for row in rows.values())


def test_error_weighted_sampler_draws_where_the_errors_are(write_raw_dataset):
    import torch

    from gridinr_nerfstudio.data.volume_io import open_volume, scene_aabb
    from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler

    voxels = np.random.default_rng(2).random((16, 16, 32)).astype(np.float32)  # (Z, Y, X): blocks 4 x 2 x 2
    volume = open_volume(write_raw_dataset({"v": [voxels]}, name="blocks"))
    aabb = scene_aabb(volume)
    sampler = sweep.ErrorWeightedSampler(VolumePointSampler(volume, aabb, seed=0), share=0.5)
    points, values = sampler.batch(2000, 0)
    # Every point of the error-weighted half is a voxel centre with its exact value (independent index math).
    unit = (points[1000:] - aabb[0]) / (aabb[1] - aabb[0])
    index = (unit * torch.tensor([31.0, 15.0, 15.0])).round().long()
    assert torch.allclose(unit * torch.tensor([31.0, 15.0, 15.0]), index.float(), atol=1e-4)
    normalized = torch.from_numpy((voxels - voxels.min()) / (voxels.max() - voxels.min()))
    torch.testing.assert_close(values[1000:], normalized[index[:, 2], index[:, 1], index[:, 0]], atol=1e-6, rtol=0)
    # Errors only in the block x < 8, y < 8, z < 8: afterwards the drawn half comes from there.
    in_corner = (index < 8).all(dim=-1)
    assert 0.02 < float(in_corner.float().mean()) < 0.3  # first draws: uniform over the 16 blocks
    for _ in range(30):  # moving averages: the other blocks' errors decay towards 0
        sampler.report(points, torch.where((((points - aabb[0]) / (aabb[1] - aabb[0])
                                             * torch.tensor([31.0, 15.0, 15.0])).round() < 8).all(-1), 1.0, 0.0))
    points, _ = sampler.batch(2000, 1)
    index = ((points[1000:] - aabb[0]) / (aabb[1] - aabb[0]) * torch.tensor([31.0, 15.0, 15.0])).round().long()
    assert float((index < 8).all(dim=-1).float().mean()) > 0.95


def test_bench_contender_drives_the_coarse_to_fine_schedule(write_raw_dataset):
    import torch

    from gridinr_nerfstudio.data.volume_io import open_volume, scene_aabb
    from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings
    from gridinr_nerfstudio.gridinr_config import fit_trainer_config
    from gridinr_nerfstudio.scripts.bench.fit import Contender
    from gridinr_nerfstudio.scripts.bench.timing import Clock
    from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler

    volume = open_volume(write_raw_dataset({"v": [np.random.default_rng(3).random((6, 7, 8)).astype(np.float32)]}))
    aabb = scene_aabb(volume)
    settings = VolumeFieldSettings(num_levels=4, log2_hashmap_size=10, max_resolution=16, hidden_dim=16)
    method = fit_trainer_config()
    lr_finals = {name: group["scheduler"].lr_final for name, group in method.optimizers.items()}
    contender = Contender("c2f", VolumeField(aabb, settings), method, lr_finals, None, VolumePointSampler(volume, aabb),
                          aabb, Clock(torch.device("cpu")), coarse_to_fine=0.5)
    contender.step(256, progress=0.25)
    assert contender.model.level_progress == 0.5
    contender.step(256, progress=0.9)
    assert contender.model.level_progress == 1.0
