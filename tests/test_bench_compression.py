"""gridinr-bench compression: the baselines' grids and PSNRs against numpy, and one short run of the benchmark."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from gridinr_nerfstudio.data.volume_io import open_volume
from gridinr_nerfstudio.scripts.bench.compression import downsample_psnr, downsampled_dims, quantize, run


def test_downsampled_dims_fit_the_budget():
    assert downsampled_dims((128, 128, 128), 64**3) == (64, 64, 64)
    assert downsampled_dims((128, 96, 24), 128 * 96 * 24) is None  # the whole volume fits
    for dims, voxels in (((128, 96, 24), 20_000), ((97, 33, 10), 5_000)):
        grid = downsampled_dims(dims, voxels)
        assert np.prod(grid) <= voxels and all(2 <= g <= n for g, n in zip(grid, dims))


@pytest.fixture
def blob(write_raw_dataset):
    z, y, x = np.meshgrid(np.arange(12), np.arange(14), np.arange(16), indexing="ij")
    values = 200 * np.exp(-((x - 7.5) ** 2 + (y - 6.5) ** 2 + (z - 5.5) ** 2) / 20.0)
    return open_volume(write_raw_dataset({"v": [np.rint(values).astype(np.uint8)]}, name="blob"))


def test_downsample_baseline_psnr(blob):
    target = torch.from_numpy(blob.normalized_array())
    own = np.dtype(np.uint8)
    assert downsample_psnr(blob, target, target.numel(), own) == (math.inf, "full")  # uint8 fits: lossless
    # fp16 holds every uint8 value exactly, so the full-size fp16 cast is lossless too
    assert downsample_psnr(blob, target, 2 * target.numel(), np.dtype(np.float16))[0] == math.inf
    psnrs = [downsample_psnr(blob, target, budget, own)[0] for budget in (100, 300, 1000)]
    assert psnrs[0] < psnrs[1] < psnrs[2] < math.inf
    # The 8x7x6 grid by hand (float64 storage: no rounding ties): block means, upsampled with align_corners trilinear.
    psnr, grid = downsample_psnr(blob, target, 8 * 7 * 6 * 8, np.dtype(np.float64))
    assert grid == "8x7x6"
    data = np.asarray(blob.data, dtype=np.float64)
    means = data.reshape(6, 2, 7, 2, 8, 2).mean(axis=(1, 3, 5))
    small = torch.from_numpy((means - blob.value_min) / (blob.value_max - blob.value_min)).float()
    upsampled = torch.nn.functional.interpolate(small[None, None], size=(12, 14, 16), mode="trilinear",
                                                align_corners=True)[0, 0].double().numpy()
    expected = 10 * np.log10(1.0 / np.mean((upsampled - target.double().numpy()) ** 2))
    assert psnr == pytest.approx(expected, abs=1e-4)


def test_quantize_round_trips_stored_values(blob):
    target = torch.from_numpy(blob.normalized_array())
    assert torch.equal(quantize(target, blob, np.dtype(np.uint8)), target)


def test_short_benchmark_run(blob):
    args = argparse.Namespace(data=blob.info.path, seconds=0.5, batch=1024, tiers="small", threads=1)
    result = run(args)
    rows = {row["precision"]: row for row in result["rows"]}
    assert rows["fp32"]["bytes"] == 2 * rows["fp16"]["bytes"] == 4 * rows["fp32"]["params"]
    assert rows["fp32"]["compression_ratio"] == pytest.approx(16 * 14 * 12 / rows["fp32"]["bytes"])
    assert rows["fp32"]["downsampled_grid"] == "full" and math.isinf(rows["fp32"]["downsampled_psnr_db"])
    assert abs(rows["fp32"]["inr_psnr_db"] - rows["fp16"]["inr_psnr_db"]) < 0.5


def smooth_volume(shape=(13, 18, 22)) -> np.ndarray:
    """A smooth float32 volume in [0, 1] (partial ZFP blocks on every axis)."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    values = np.exp(-(x**2 + 2 * y**2 + 3 * z**2)) * (1 + 0.3 * np.sin(5 * x))
    return (values / values.max()).astype(np.float32)


def numpy_psnr(decoded: np.ndarray, target: np.ndarray) -> float:
    mse = np.mean((np.clip(decoded.astype(np.float64), 0, 1) - target.astype(np.float64)) ** 2)
    return float(10 * np.log10(1 / mse))


def test_zfp_fills_the_budget_at_fixed_rate():
    """The highest fixed rate whose stream fits: its size is the header plus whole blocks of floor(64 rate) bits in
    64-bit words (computed here), one more bit per block would not fit, and the PSNR is numpy's on zfpy's output."""
    zfpy = pytest.importorskip("zfpy", reason="ZFP bindings (bench extra) not installed")
    from gridinr_nerfstudio.scripts.bench.lossy_compressors import zfp_at_budget

    volume = smooth_volume()
    blocks = math.ceil(13 / 4) * math.ceil(18 / 4) * math.ceil(22 / 4)

    def stream_bytes(bits_per_block: int) -> int:
        return math.ceil((96 + blocks * bits_per_block) / 64) * 8

    for budget in (600, 1500, 4000):
        result = zfp_at_budget(volume, budget)
        rate = result.parameter
        bits = round(rate * 64)
        assert result.bytes == stream_bytes(bits) <= budget < stream_bytes(bits + 1)
        decoded = zfpy.decompress_numpy(zfpy.compress_numpy(volume, rate=rate))
        assert result.psnr_db == pytest.approx(numpy_psnr(decoded, volume), abs=1e-9)
    psnrs = [zfp_at_budget(volume, budget).psnr_db for budget in (600, 1500, 4000)]
    assert psnrs[0] < psnrs[1] < psnrs[2]
    assert zfp_at_budget(volume, 100) is None  # below ZFP's smallest rate


def test_sz3_fills_the_budget_in_psnr_mode():
    """The highest PSNR target whose stream fits: the stream fits, a target 0.2 dB higher does not, the reported PSNR
    is numpy's on pysz's output and at least the target (SZ3's PSNR mode is a bound)."""
    pytest.importorskip("pysz", reason="SZ3 bindings (bench extra) not installed")
    from gridinr_nerfstudio.scripts.bench.lossy_compressors import sz3_at_budget, sz3_compress, sz3_decompress

    volume = smooth_volume((32, 32, 32))
    psnrs = []
    for budget in (800, 2000, 6000):
        result = sz3_at_budget(volume, budget)
        target = result.parameter
        stream = sz3_compress(volume, target)
        assert result.bytes == stream.nbytes <= budget < sz3_compress(volume, target + 0.2).nbytes
        decoded = sz3_decompress(stream, volume.shape)
        assert result.psnr_db == pytest.approx(numpy_psnr(decoded, volume), abs=1e-9)
        assert result.psnr_db >= target - 0.1
        psnrs.append(result.psnr_db)
    assert psnrs[0] < psnrs[1] < psnrs[2]
    assert sz3_at_budget(volume, 10) is None


def test_benchmark_rows_hold_sz3_and_zfp_at_equal_bytes(blob):
    pytest.importorskip("pysz", reason="SZ3 bindings (bench extra) not installed")
    pytest.importorskip("zfpy", reason="ZFP bindings (bench extra) not installed")
    args = argparse.Namespace(data=blob.info.path, seconds=0.2, batch=1024, tiers="none", threads=1, ratios="1,4")
    rows = run(args)["rows"]
    lossless, quarter = rows
    assert lossless["bytes"] == 16 * 14 * 12 and math.isinf(lossless["sz3_psnr_db"]) and math.isinf(lossless["zfp_psnr_db"])
    assert quarter["bytes"] == 16 * 14 * 12 // 4
    for key in ("sz3", "zfp"):
        assert quarter[f"{key}_bytes"] <= quarter["bytes"] and 10 < quarter[f"{key}_psnr_db"] < math.inf


def test_missing_compressors_are_skipped_with_a_note(blob, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_sz3(name, *args, **kwargs):
        if name == "pysz":
            raise ImportError("No module named 'pysz'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sz3)
    args = argparse.Namespace(data=blob.info.path, seconds=0.2, batch=1024, tiers="none", threads=1, ratios="4")
    result = run(args)
    row = result["rows"][0]
    assert row["sz3_psnr_db"] is None and row["sz3_setting"] == "not installed"
    assert any("pysz" in note and "[bench]" in note for note in result["notes"])
    assert "note: SZ3 skipped" in capsys.readouterr().out
