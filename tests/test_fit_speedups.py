"""Stage-1 speed-ups: voxel-centre sampling (epochs, sorted batches, exact targets) and the fit benchmark's wiring."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from checks import voxel_coordinates

from gridinr_nerfstudio.data.volume_io import scene_aabb
from gridinr_nerfstudio.stages.fit.datamanager import FitDataManagerConfig
from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler


@pytest.mark.parametrize("preload", [True, False])
def test_voxel_batches_are_voxel_centres_with_exact_targets(small_volume, preload):
    volume, voxels = small_volume
    aabb = scene_aabb(volume)
    sampler = VolumePointSampler(volume, aabb, sampling="voxels", subsample_factor=1,
                                 preload_max_bytes=(1 << 40) if preload else 0)
    points, values = sampler.batch(40, step=0)
    coordinates = voxel_coordinates(volume, aabb, points)
    index = np.rint(coordinates).astype(np.int64)
    assert np.allclose(coordinates, index, atol=1e-4)
    reference = (voxels.astype(np.float64) - voxels.min()) / (voxels.max() - voxels.min())
    assert np.allclose(values.numpy(), reference[index[:, 2], index[:, 1], index[:, 0]], atol=1e-6)
    assert torch.allclose(values, sampler.values_at(points), atol=1e-5)  # same as trilinear lookup at the centres


def test_voxel_epochs_visit_every_voxel_once_in_sorted_batches(small_volume):
    volume, _ = small_volume
    sampler = VolumePointSampler(volume, scene_aabb(volume), sampling="voxels", subsample_factor=1)
    size = 7 * 5 * 3
    batches = [sampler.epoch_indices(count) for count in (40, 40, 25)]  # exactly one epoch of 105 voxels
    for batch in batches:
        assert bool((batch[1:] > batch[:-1]).all())  # sorted, no repeats inside a batch
    assert torch.equal(torch.cat(batches).sort().values.long(), torch.arange(size))
    larger = sampler.epoch_indices(2 * size + 10)  # a batch spanning three epochs
    counts = torch.bincount(larger.long(), minlength=size)
    assert larger.numel() == 2 * size + 10 and int(counts.min()) >= 2 and int(counts.max()) <= 3


def test_coarse_phase_then_voxel_epochs(small_volume):
    volume, _ = small_volume
    aabb = scene_aabb(volume)
    sampler = VolumePointSampler(volume, aabb, sampling="voxels", subsample_factor=2, coarse_steps=3)
    coarse, _ = sampler.batch(200, step=2)
    index = np.rint(voxel_coordinates(volume, aabb, coarse)).astype(np.int64)
    assert (index % 2 == 0).all()
    fine, _ = sampler.batch(105, step=3)
    fine_index = np.rint(voxel_coordinates(volume, aabb, fine)).astype(np.int64)
    assert len({tuple(v) for v in fine_index}) == 105  # one full epoch: every voxel once


def test_continuous_fraction_mixes_trilinear_points_into_voxel_batches(small_volume):
    volume, _ = small_volume
    aabb = scene_aabb(volume)
    sampler = VolumePointSampler(volume, aabb, sampling="voxels", continuous_fraction=0.25, subsample_factor=1)
    points, values = sampler.batch(100, step=0)
    assert points.shape == (100, 3) and values.shape == (100,)
    coordinates = voxel_coordinates(volume, aabb, points)
    off_centre = np.abs(coordinates - np.rint(coordinates)).max(axis=1) > 1e-3
    assert not off_centre[:75].any() and off_centre[75:].all()  # 75 voxel centres, then 25 continuous points
    assert ((points >= aabb[0]) & (points <= aabb[1])).all()
    expected = volume.sample_normalized(coordinates)  # trilinear reference from the voxels themselves
    assert np.allclose(values.numpy(), expected, atol=1e-5)
    for fraction in (-0.1, 1.0):
        with pytest.raises(ValueError, match="continuous_fraction"):
            VolumePointSampler(volume, aabb, continuous_fraction=fraction)


def test_sampling_option_reaches_the_datamanager_and_is_validated(small_volume, tmp_path):
    volume, _ = small_volume
    with pytest.raises(ValueError, match="sampling"):
        VolumePointSampler(volume, scene_aabb(volume), sampling="centres")
    config = FitDataManagerConfig(sampling="voxels", continuous_fraction=0.0, batch_size=105, subsample_factor=1)
    config.dataparser.data = volume.info.path
    config.dataparser.num_train_views, config.dataparser.num_eval_views, config.dataparser.image_size = 2, 2, 8
    config.dataparser.render.num_samples = 8
    config.dataparser.cache_dir = tmp_path
    manager = config.setup(device="cpu")
    points, batch = manager.next_train(step=0)
    coordinates = voxel_coordinates(volume, manager.aabb, points)
    assert np.allclose(coordinates, np.rint(coordinates), atol=1e-4)
    assert len({tuple(v) for v in np.rint(coordinates).astype(int)}) == 105
    assert torch.allclose(batch["values"], manager.values_at(points), atol=1e-5)


def test_fit_benchmark_trains_both_contenders_on_the_method_defaults(small_volume):
    """A 1-second run: both contenders train, the curve is recorded, and unset options follow the method config."""
    from gridinr_nerfstudio.gridinr_config import fit_trainer_config
    from gridinr_nerfstudio.scripts.bench import fit

    volume, _ = small_volume
    parser = fit.add_parser(argparse.ArgumentParser().add_subparsers())
    args = parser.parse_args(["--data", str(volume.info.path), "--seconds", "1", "--batch", "64", "--levels", "2",
                              "--log2-table", "10", "--max-resolution", "8", "--curve", "0.1"])
    method = fit_trainer_config()
    assert args.sampling == method.pipeline.datamanager.sampling
    assert args.continuous_fraction == method.pipeline.datamanager.continuous_fraction
    assert args.hidden_layers == method.pipeline.model.field.num_hidden_layers
    results = fit.run(args)
    for name in ("ours", "nerfstudio_torch"):
        row = results[name]
        assert row["iterations"] >= 1 and np.isfinite(row["volume_psnr_db"])
        assert set(row["psnr_curve_db"]) == {"0.1", "1"}
    assert results["config"]["lr_final"] == method.optimizers["encoding"]["scheduler"].lr_final


def _field_pair(progress: float):
    """A small VolumeField with the coarse-to-fine schedule at `progress`, and its unscheduled twin (same weights)."""
    from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings

    settings = VolumeFieldSettings(num_levels=4, features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                                   max_resolution=32, hidden_dim=16, num_hidden_layers=1, coarse_to_fine=0.5)
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    torch.manual_seed(0)
    field = VolumeField(aabb, settings)
    with torch.no_grad():
        field.encoding.params.normal_()
    twin = VolumeField(aabb, settings)
    twin.load_state_dict(field.state_dict())
    field.level_progress = progress
    return field, twin


def test_coarse_to_fine_hides_fine_levels_early_and_changes_nothing_at_the_end():
    points = torch.rand(300, 3, generator=torch.Generator().manual_seed(1))
    field, twin = _field_pair(progress=0.0)  # only level 0 counts
    fine = field.encoding.params.detach().clone()
    values = field.forward_unit(points)
    values.sum().backward()
    grad = field.encoding.params.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    # Perturbing every table entry except level 0's changes nothing at progress 0.
    with torch.no_grad():
        first = int(field.encoding.geometry.table_offsets[1]) * field.encoding.features_per_level
        field.encoding.params[first:] += 1.0
        assert torch.equal(field.forward_unit(points), values.detach())
        assert float(grad[first:].abs().sum()) == 0.0  # no gradient reaches the hidden levels
        field.encoding.params.copy_(fine)
    # Half way: the two coarsest levels count fully, the finest not at all (4 levels: ramp 2 - l + 1).
    field.level_progress = 0.5
    assert field.level_weights().tolist() == [1.0, 1.0, 1.0, 0.0]
    # Done: exactly the unscheduled field, through the fused inference path and through autograd.
    field.level_progress = 1.0
    assert field.level_weights() is None
    with torch.no_grad():
        assert torch.equal(field.forward_unit(points), twin.forward_unit(points))
    assert torch.equal(field.forward_unit(points), twin.forward_unit(points))


def test_coarse_to_fine_without_gradients_matches_the_autograd_path():
    points = torch.rand(200, 3, generator=torch.Generator().manual_seed(2))
    field, _ = _field_pair(progress=0.3)
    with torch.no_grad():
        inference = field.forward_unit(points)  # not the fused kernel: it knows no level weights
    torch.testing.assert_close(inference, field.forward_unit(points).detach(), atol=1e-6, rtol=0)


def test_fit_model_callback_advances_the_schedule(tmp_path):
    from nerfstudio.engine.callbacks import TrainingCallbackLocation
    from tiny_runs import run_of, train_tiny_fit

    from gridinr_nerfstudio.runs import load_run_pipeline

    config_path = train_tiny_fit(tmp_path, iterations=5)
    _, pipeline, _, _ = load_run_pipeline(config_path, test_mode="test")
    model = pipeline.model
    assert model.field.level_progress == 1.0  # loaded runs use every level
    model.config.field.coarse_to_fine = 0.5
    callbacks = model.get_training_callbacks(run_of(20))  # a run of 20 steps: the schedule spans steps 0..10
    for callback in callbacks:
        callback.run_callback_at_location(step=4, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    assert model.field.level_progress == pytest.approx(0.4)
    for callback in callbacks:
        callback.run_callback_at_location(step=25, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    assert model.field.level_progress == 1.0
