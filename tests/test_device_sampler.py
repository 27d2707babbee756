"""The stage-1 sampler resident on the device, run on CPU tensors (resident="on"), against the host sampler and numpy.

One class makes both (residency is a constructor choice): on a CPU the resident sampler draws from the same kind of
generator as the host one, so the two must hand out bitwise the same batches, also after a state round trip.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checks import voxel_coordinates

from gridinr_nerfstudio.data.volume_io import scene_aabb
from gridinr_nerfstudio.stages.fit.datamanager import FitDataManagerConfig
from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler, make_point_sampler, resident_fits


def _device_sampler(volume, **kwargs) -> VolumePointSampler:
    sampler = make_point_sampler(volume, scene_aabb(volume), device="cpu", resident="on", **kwargs)
    assert sampler.resident and sampler.dense is not None
    return sampler


def test_same_voxel_batches_and_trilinear_values_as_the_memmapped_sampler(small_volume):
    volume, voxels = small_volume
    aabb = scene_aabb(volume)
    device = _device_sampler(volume, subsample_factor=1)
    memmapped = VolumePointSampler(volume, aabb, subsample_factor=1, preload_max_bytes=0)  # reads the voxels itself
    assert memmapped.dense is None
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


def _draw(sampler, steps, start=0, count=40):
    return [sampler.batch(count, step) for step in range(start, start + steps)]


@pytest.mark.parametrize("memmapped", [False, True])
def test_resident_and_host_samplers_are_one_sampler(small_volume, memmapped):
    """Same generator kind (CPU), same rules: bitwise the same batches, epochs crossed, coarse phase included."""
    volume, _ = small_volume
    options = dict(continuous_fraction=0.25, subsample_factor=2, coarse_steps=2, seed=3)
    host = VolumePointSampler(volume, scene_aabb(volume), preload_max_bytes=0 if memmapped else 1 << 30, **options)
    resident = _device_sampler(volume, **options)
    for (host_points, host_values), (points, values) in zip(_draw(host, 12), _draw(resident, 12)):
        assert torch.equal(host_points, points)
        torch.testing.assert_close(host_values, values, rtol=0, atol=1e-6 if memmapped else 0)


def test_resident_state_round_trip_continues_the_same_batches(small_volume):
    """A resumed run repeats the uninterrupted one: the state saved mid-epoch brings back the epoch's shuffle.

    (The former subclass rewrote the epoch logic without the epoch state: after set_state it drew a new shuffle.)"""
    volume, _ = small_volume
    first, second = _device_sampler(volume, seed=7, subsample_factor=1), _device_sampler(volume, seed=7,
                                                                                          subsample_factor=1)
    _draw(first, 2)  # 80 of 105 voxels: mid-epoch
    state = first.get_state()
    expected = _draw(first, 6, start=2)  # across epoch boundaries
    _draw(second, 5)  # elsewhere, then restored
    second.set_state(state)
    for (p1, v1), (p2, v2) in zip(expected, _draw(second, 6, start=2)):
        assert torch.equal(p1, p2) and torch.equal(v1, v2)
    host = VolumePointSampler(volume, scene_aabb(volume), seed=7, subsample_factor=1)
    host.set_state(state)  # a CPU-resident state is a CPU stream: the host sampler continues it too
    for (p1, _), (p2, _) in zip(expected, _draw(host, 6, start=2)):
        assert torch.equal(p1, p2)


def test_evaluation_batches_leave_the_training_stream_untouched(small_volume):
    volume, _ = small_volume
    evaluated, plain = (_device_sampler(volume, seed=2, continuous_fraction=0.25, subsample_factor=1) for _ in range(2))
    before = evaluated.get_state()
    points, values = evaluated.eval_batch(64)
    assert points.shape == (64, 3) and values.shape == (64,)
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b
               for a, b in zip(before.values(), evaluated.get_state().values()))
    for step in range(4):
        evaluated.eval_batch(50)
        for ours, theirs in zip(evaluated.batch(40, step), plain.batch(40, step)):
            assert torch.equal(ours, theirs)
    again = evaluated.eval_batch(64)[0]
    assert not torch.equal(again, points)  # its own stream moves on


def test_choice_of_residency(small_volume):
    volume, _ = small_volume
    aabb = scene_aabb(volume)
    assert not make_point_sampler(volume, aabb, device="cpu").resident  # auto: never on a CPU
    assert not make_point_sampler(volume, aabb, device="cpu", resident="off").resident
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
    assert isinstance(manager.sampler, VolumePointSampler) and manager.sampler.resident
    points, batch = manager.next_train(step=0)
    assert len({tuple(v) for v in np.rint(voxel_coordinates(volume, manager.aabb, points)).astype(int)}) == 105
    torch.testing.assert_close(batch["values"], manager.values_at(points), rtol=0, atol=1e-5)
