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
