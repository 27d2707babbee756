"""The device-resident stage-1 sampler, run on CPU tensors (resident="on"), against the CPU sampler and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checks import voxel_coordinates

from gridinr_nerfstudio.data.volume_io import scene_aabb
from gridinr_nerfstudio.stages.fit.datamanager import FitDataManagerConfig, VolumePointSampler
from gridinr_nerfstudio.stages.fit.device_sampler import DeviceVolumePointSampler, make_point_sampler, resident_fits


def _device_sampler(volume, **kwargs) -> DeviceVolumePointSampler:
    sampler = make_point_sampler(volume, scene_aabb(volume), device="cpu", resident="on", **kwargs)
    assert isinstance(sampler, DeviceVolumePointSampler)
    return sampler


def test_same_voxel_batches_and_trilinear_values_as_the_cpu_sampler(small_volume):
    volume, voxels = small_volume
    aabb = scene_aabb(volume)
    device = _device_sampler(volume, subsample_factor=1)
    memmapped = VolumePointSampler(volume, aabb, subsample_factor=1, preload_max_bytes=0)  # reads the voxels itself
    index = torch.tensor([0, 3, 7, 34, 50, 104])
    for got, expected in zip(device.voxel_batch(index), memmapped.voxel_batch(index)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    points = torch.rand(50, 3, generator=torch.Generator().manual_seed(0)) * (aabb[1] - aabb[0]) + aabb[0]
    torch.testing.assert_close(device.values_at(points), memmapped.values_at(points), rtol=0, atol=1e-5)


def test_epochs_visit_every_voxel_once_in_sorted_batches(small_volume):
    volume, _ = small_volume
    sampler = _device_sampler(volume, subsample_factor=1)
    size = 7 * 5 * 3
    batches = [sampler.epoch_indices(count) for count in (40, 40, 25)]
    for batch in batches:
        assert bool((batch[1:] > batch[:-1]).all())
    assert torch.equal(torch.cat(batches).sort().values.long(), torch.arange(size))
    larger = sampler.epoch_indices(2 * size + 10)
    counts = torch.bincount(larger.long(), minlength=size)
    assert int(counts.min()) >= 2 and int(counts.max()) <= 3


def test_batches_mix_exact_centres_and_trilinear_points(small_volume):
    volume, voxels = small_volume
    aabb = scene_aabb(volume)
    sampler = _device_sampler(volume, continuous_fraction=0.25, subsample_factor=1)
    points, values = sampler.batch(100, step=0)
    assert points.device == values.device == torch.device("cpu") and points.shape == (100, 3)
    coordinates = voxel_coordinates(volume, aabb, points)
    off_centre = np.abs(coordinates - np.rint(coordinates)).max(axis=1) > 1e-3
    assert not off_centre[:75].any() and off_centre[75:].all()
    index = np.rint(coordinates[:75]).astype(np.int64)
    reference = (voxels.astype(np.float64) - voxels.min()) / (voxels.max() - voxels.min())
    assert np.allclose(values[:75].numpy(), reference[index[:, 2], index[:, 1], index[:, 0]], atol=1e-6)
    assert np.allclose(values.numpy(), volume.sample_normalized(coordinates), atol=1e-5)  # numpy trilinear


def test_coarse_phase_continuous_sampling_and_seeds(small_volume):
    volume, _ = small_volume
    aabb = scene_aabb(volume)
    sampler = _device_sampler(volume, subsample_factor=2, coarse_steps=3)
    coarse, _ = sampler.batch(200, step=2)
    assert (np.rint(voxel_coordinates(volume, aabb, coarse)).astype(np.int64) % 2 == 0).all()
    continuous = _device_sampler(volume, sampling="continuous", subsample_factor=1)
    points, values = continuous.batch(64, step=0)
    assert np.allclose(values.numpy(), volume.sample_normalized(voxel_coordinates(volume, aabb, points)), atol=1e-5)
    first, second = (_device_sampler(volume, seed=5).batch(30, step=0)[0] for _ in range(2))
    assert torch.equal(first, second)


def test_choice_of_sampler(small_volume):
    volume, _ = small_volume
    aabb = scene_aabb(volume)
    assert type(make_point_sampler(volume, aabb, device="cpu")) is VolumePointSampler  # auto: never on a CPU
    assert type(make_point_sampler(volume, aabb, device="cpu", resident="off")) is VolumePointSampler
    assert not resident_fits(10**12, "cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="resident"):
        make_point_sampler(volume, aabb, resident="yes")


def test_datamanager_option(small_volume, tmp_path):
    volume, _ = small_volume
    config = FitDataManagerConfig(continuous_fraction=0.0, batch_size=105, subsample_factor=1, device_resident="on")
    config.dataparser.data = volume.info.path
    config.dataparser.num_train_views, config.dataparser.num_eval_views, config.dataparser.image_size = 2, 2, 8
    config.dataparser.render.num_samples = 8
    config.dataparser.cache_dir = tmp_path
    manager = config.setup(device="cpu")
    assert isinstance(manager.sampler, DeviceVolumePointSampler)
    points, batch = manager.next_train(step=0)
    assert len({tuple(v) for v in np.rint(voxel_coordinates(volume, manager.aabb, points)).astype(int)}) == 105
    torch.testing.assert_close(batch["values"], manager.values_at(points), rtol=0, atol=1e-5)
