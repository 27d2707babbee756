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
