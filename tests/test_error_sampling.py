"""Error-weighted stage-1 batches (stages/fit/error_sampling.py): where they draw, their resumable state, and the
pipeline feeding them the field's errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gridinr_nerfstudio.data.volume_io import open_volume, scene_aabb
from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler
from gridinr_nerfstudio.stages.fit.error_sampling import ErrorWeightedSampler


def _sampler(write_raw_dataset, share=0.5, seed=0):
    voxels = np.random.default_rng(4).random((12, 14, 20)).astype(np.float32)
    volume = open_volume(write_raw_dataset({"v": [voxels]}, name="err"))
    return ErrorWeightedSampler(VolumePointSampler(volume, scene_aabb(volume), seed=seed, continuous_fraction=0.25),
                                share)


def test_state_round_trip_continues_with_the_same_batches(write_raw_dataset):
    first, second = _sampler(write_raw_dataset), _sampler(write_raw_dataset)

    def advance(sampler, steps, start):
        batches = []
        for step in range(start, start + steps):
            points, values = sampler.batch(512, step)
            sampler.report(points, (values - 0.5).square() * (points[:, 0] > 0))  # errors only where x > 0
            batches.append((points, values))
        return batches

    advance(first, 5, 0)
    state = first.get_state()
    expected = advance(first, 4, 5)
    advance(second, 2, 0)  # somewhere else, then restored
    second.set_state(state)
    for (p1, v1), (p2, v2) in zip(expected, advance(second, 4, 5)):
        assert torch.equal(p1, p2) and torch.equal(v1, v2)
    # The errors moved the drawn half towards x > 0.
    assert float((expected[-1][0][256:, 0] > 0).float().mean()) > 0.7


def test_share_is_validated(write_raw_dataset):
    with pytest.raises(ValueError, match="share"):
        _sampler(write_raw_dataset, share=1.0)


def test_fit_pipeline_reports_the_field_errors(tmp_path):
    from tiny_runs import train_tiny_fit

    from gridinr_nerfstudio.runs import load_run_pipeline

    config_path = train_tiny_fit(tmp_path, iterations=6,
                                 datamanager_overrides={"error_weighted_fraction": 0.25})
    _, pipeline, _, _ = load_run_pipeline(config_path, test_mode="val")
    sampler = pipeline.datamanager.sampler
    assert isinstance(sampler, ErrorWeightedSampler) and not sampler.started
    before = sampler.error.clone()
    pipeline.get_train_loss_dict(step=6)
    assert sampler.started and not torch.equal(sampler.error, before)
    assert sampler.error.min() >= 0 and torch.isfinite(sampler.error).all()
