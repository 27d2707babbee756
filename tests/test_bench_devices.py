"""gridinr-bench --device and backend contenders, on the CPU (the CUDA runs are scripts/gpu_check.sh's)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gridinr_nerfstudio.data.volume_io import open_volume
from gridinr_nerfstudio.fields.hash_grid._backend import cpp_extension_available
from gridinr_nerfstudio.scripts.bench import fit
from gridinr_nerfstudio.scripts.bench.cli import main as bench_main
from gridinr_nerfstudio.scripts.bench.timing import Clock, resolve_device

TINY_ENCODING = ["encoding", "--batch", "512", "--levels", "2", "--log2-table", "8", "--max-resolution", "32",
                 "--repeats", "1", "--threads", "1"]


def test_encoding_benchmark_runs_every_cpu_backend_from_the_same_params(tmp_path: Path) -> None:
    output = tmp_path / "encoding.json"
    bench_main([*TINY_ENCODING, "--device", "cpu", "--json", str(output)])
    results = json.loads(output.read_text())
    expected = (["cpp"] if cpp_extension_available() else []) + ["torch"]
    assert results["config"]["backends"] == expected and results["config"]["device"] == "cpu"
    for name in [f"ours_{b}" for b in expected] + ["nerfstudio_torch"]:
        assert results[name]["fwd_points_per_s"] > 0 and results[name]["fwd_bwd_points_per_s"] > 0
    assert results["ours"]["backend"] in expected
    assert set(results["training_step_ms"]) == {"torch_adam", "torch_adam_fused", "hash_grid_adam"}


def test_device_errors_are_one_line() -> None:
    with pytest.raises(SystemExit, match="triton"):
        bench_main([*TINY_ENCODING, "--device", "cpu", "--backends", "triton"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA"):
            resolve_device("cuda")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert Clock(torch.device("cpu")).time(lambda: sum(range(1000))) >= 0


def test_fit_benchmark_backend_and_optimizer_contenders(write_raw_dataset) -> None:
    voxels = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    volume = open_volume(write_raw_dataset({"v": [voxels]}))
    parser = fit.add_parser(argparse.ArgumentParser().add_subparsers())
    args = parser.parse_args(["--data", str(volume.info.path), "--seconds", "0.5", "--batch", "64", "--levels", "2",
                              "--log2-table", "8", "--max-resolution", "8", "--device", "cpu", "--resident", "on",
                              "--contenders", "ours_torch,ours_dense"])
    results = fit.run(args)
    assert results["ours_torch"]["backend"] == "torch" and results["ours_torch"]["hash_optimizer"] == "HashGridAdam"
    assert results["ours_dense"]["hash_optimizer"] == "Adam"
    assert results["config"]["sampler"] == ["resident on cpu"] and results["config"]["device"] == "cpu"
    with pytest.raises(SystemExit, match="unknown contender"):
        fit.run(parser.parse_args(["--data", str(volume.info.path), "--contenders", "ours_fast"]))


def test_fit_benchmark_equal_iterations_with_the_mixed_precision_contender(write_raw_dataset) -> None:
    voxels = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    volume = open_volume(write_raw_dataset({"v": [voxels]}))
    parser = fit.add_parser(argparse.ArgumentParser().add_subparsers())
    args = parser.parse_args(["--data", str(volume.info.path), "--iterations", "7", "--batch", "64", "--levels", "2",
                              "--log2-table", "8", "--max-resolution", "8", "--hidden-dim", "16", "--device", "cpu",
                              "--contenders", "ours,ours_mixed"])
    results = fit.run(args)
    assert results["ours"]["iterations"] == results["ours_mixed"]["iterations"] == 7
    assert results["ours"]["volume_psnr_db"] != results["ours_mixed"]["volume_psnr_db"]  # the decoder ran in bf16
    assert results["config"]["iterations"] == 7
