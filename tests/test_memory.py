"""Volumes that are not preloaded: every stage reads them through the memmap and none loads the whole volume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gridinr_nerfstudio.data.volume_io import Volume, open_volume, write_dataset
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.fields.memmap_grid import MemmapGridField
from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid
from gridinr_nerfstudio.stages.fit import point_sampler
from gridinr_nerfstudio.stages.fit.shuffle import FeistelPermutation


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (9, 11, 13)), indexing="ij")
    ball = np.clip(200 * (1 - np.sqrt(x**2 + y**2 + z**2)), 0, None) + rng.integers(0, 40, x.shape)
    return write_dataset(tmp_path / "small", "small", {"v": [ball.astype(np.uint16)]}, spacing=(1.0, 1.5, 2.0))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    permutation = FeistelPermutation(n, torch.Generator().manual_seed(n))
    images = permutation(torch.arange(n))
    assert torch.equal(images.sort().values, torch.arange(n))
    if n >= 64:  # a shuffle, not the identity
        assert (images != torch.arange(n)).float().mean() > 0.9


def test_feistel_permutation_reaches_beyond_int32():
    n = 3 * (1 << 31) + 7
    images = FeistelPermutation(n, torch.Generator().manual_seed(0))(torch.arange(100_000))
    assert images.dtype == torch.int64 and int(images.min()) >= 0 and int(images.max()) < n
    assert int(images.max()) > (1 << 31) and len(torch.unique(images)) == 100_000


def test_memmap_field_matches_dense_field(small_dataset):
    volume = open_volume(small_dataset)
    dense = DenseGridField(torch.from_numpy(volume.normalized_array()), torch.as_tensor(volume.half_size))
    points = (torch.rand(5000, 3, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2)  # some outside the box
    memmap = MemmapGridField(volume, chunk_points=777)
    assert torch.allclose(memmap(points), dense(points), atol=1e-5)


def test_occupancy_from_slabs_equals_from_volume(small_dataset):
    volume = open_volume(small_dataset)
    dense = torch.from_numpy(volume.normalized_array())
    expected = OccupancyGrid.from_volume(dense, torch.as_tensor(volume.half_size), resolution=4)
    for chunk in (1, 150, 1 << 20):
        streamed = OccupancyGrid.from_slabs(lambda z0, z1: dense[z0:z1], dense.shape, torch.as_tensor(volume.half_size),
                                            resolution=4, max_chunk_voxels=chunk)
        assert torch.equal(streamed.min_values, expected.min_values)
        assert torch.equal(streamed.max_values, expected.max_values)


def test_epochs_over_a_large_volume_visit_every_voxel_once(small_dataset, monkeypatch):
    """Above RANDPERM_MAX_VOXELS the shuffle is computed on the fly: still each voxel once per epoch."""
    monkeypatch.setattr(point_sampler, "RANDPERM_MAX_VOXELS", 16)
    volume = open_volume(small_dataset)
    sampler = point_sampler.VolumePointSampler(volume, torch.as_tensor(np.stack([-volume.half_size,
                                                 volume.half_size])).float(), preload_max_bytes=0)
    batches = [sampler.epoch_indices(100) for _ in range(sampler.num_voxels // 100)]
    seen = torch.cat(batches + [sampler.epoch_indices(sampler.num_voxels % 100)])
    assert isinstance(sampler.epoch_order, FeistelPermutation)
    assert torch.equal(seen.sort().values, torch.arange(sampler.num_voxels))


def test_tiny_preload_limit_never_loads_the_whole_volume(small_dataset, tmp_path, monkeypatch):
    """Training, reference renders, eval renders without the field cache and volume PSNR all work through the memmap:
    the whole-volume read is forbidden, and the results match the numbers computed from the whole array."""
    from nerfstudio.utils.eval_utils import eval_setup
    from tiny_runs import train_tiny_fit

    reference = open_volume(small_dataset).normalized_array().astype(np.float64)

    def forbidden(self, *args, **kwargs):
        raise AssertionError("normalized_array() called on the memmap path")

    monkeypatch.setattr(Volume, "normalized_array", forbidden)
    monkeypatch.setattr(point_sampler, "RANDPERM_MAX_VOXELS", 64)
    config_path = train_tiny_fit(tmp_path / "run", data=small_dataset, iterations=12, preload_max_bytes=0,
                                 datamanager_overrides={"preload_max_bytes": 0})
    _, pipeline, _, _ = eval_setup(config_path)
    model = pipeline.model
    assert pipeline.datamanager.sampler.dense is None
    model.config.field_cache_resolution = -1  # occupancy then comes from the raw voxels, read in slabs
    model.invalidate_field_cache()
    camera = pipeline.datamanager.eval_dataset.cameras[0:1]
    outputs = model.get_outputs_for_camera(camera)
    assert outputs["rgb"].shape[-1] == 3 and torch.isfinite(outputs["rgb"]).all()
    size_x, size_y, size_z = model.volume.info.dims
    zz, yy, xx = np.meshgrid(*(np.linspace(0, 1, n) for n in (size_z, size_y, size_x)), indexing="ij")
    unit = torch.from_numpy(np.stack([xx, yy, zz], -1).reshape(-1, 3)).float()
    with torch.no_grad():
        predicted = model.field.forward_unit(unit).numpy().astype(np.float64)
    mse = np.mean((np.clip(predicted, 0, 1) - reference.reshape(-1)) ** 2)
    assert math.isclose(model.volume_psnr(), 10 * np.log10(1 / mse), rel_tol=1e-4)
