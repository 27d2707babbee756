"""gridinr-bench scale: 1 and 2 torchrun ranks train the same global batches, so they end at the same volume PSNR;
the all-reduced bytes are the field's gradient bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings
from gridinr_nerfstudio.scripts.bench.cli import main as bench_main


def test_scale_measures_one_and_two_ranks_on_the_same_global_batches(write_raw_dataset, tmp_path: Path):
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, 12),) * 3, indexing="ij")
    values = np.exp(-3 * (x**2 + y**2 + z**2)) + 0.2 * np.sin(4 * x) * np.cos(3 * y)
    data = write_raw_dataset({"v": [values.astype(np.float32)]}, name="blob")
    output = tmp_path / "scale.json"
    bench_main(["scale", "--data", str(data), "--ranks", "1,2", "--iterations", "8", "--warmup", "2",
                "--batch", "2048", "--log2-hashmap-size", "12", "--timing-steps", "5", "--allreduce-repeats", "2",
                "--workdir", str(tmp_path / "work"), "--json", str(output)])
    rows = json.loads(output.read_text())
    assert set(rows) == {"1", "2"}
    one, two = rows["1"], rows["2"]
    assert one["global_batch"] == two["global_batch"] == 2048 and two["batch_per_rank"] == 1024
    # The gridinr-fit CPU field (8 levels x 2 features, one hidden layer of 16) with a 2^12 table, built here.
    field = VolumeField(torch.tensor([[-1.0] * 3, [1.0] * 3]),
                        VolumeFieldSettings(num_levels=8, log2_hashmap_size=12, num_hidden_layers=1, hidden_dim=16))
    parameters = sum(p.numel() for p in field.parameters())
    assert one["parameters"] == two["parameters"] == parameters
    assert two["allreduce_bytes"] == 4 * parameters and two["allreduce_ms"] > 0 and 0 <= two["allreduce_share"] < 1
    assert one["allreduce_share"] == 0 and all(row["points_per_s"] > 0 for row in rows.values())
    # Equal global batches and steps: one field up to float rounding, so one volume PSNR.
    assert np.isfinite(one["volume_psnr"]) and two["volume_psnr"] == pytest.approx(one["volume_psnr"], abs=1e-3)


@pytest.mark.parametrize("options, message", [(["--ranks", "1,two"], "--ranks"), (["--ranks", "0"], "--ranks"),
                                              (["--iterations", "3", "--warmup", "5"], "--warmup")])
def test_scale_refuses_bad_options_in_one_line(options, message):
    with pytest.raises(SystemExit) as error:
        bench_main(["scale", *options])
    assert message in str(error.value.code) and "\n" not in str(error.value.code)
