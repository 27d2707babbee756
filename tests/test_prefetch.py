"""PrefetchingSampler on CPU tensors: the plain sampler's batches, exact resumes, errors in the caller, clean stops."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from gridinr_nerfstudio.data.volume_io import open_volume, scene_aabb
from gridinr_nerfstudio.stages.fit.datamanager import FitDataManagerConfig
from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler
from gridinr_nerfstudio.stages.fit.prefetch import PrefetchingSampler
from gridinr_nerfstudio.stages.fit.sequence import SequencePointSampler

# (sampler options, batch size): epochs of 105 voxels end inside batches; coarse phase for the first 3 steps.
CASES = {
    "voxels": dict(continuous_fraction=0.25, subsample_factor=2, coarse_steps=3),
    "voxels_memmapped": dict(continuous_fraction=0.25, subsample_factor=1, preload_max_bytes=0),
    "continuous": dict(sampling="continuous", subsample_factor=1),
}


def _plain(volume, seed: int = 3, **kwargs) -> VolumePointSampler:
    return VolumePointSampler(volume, scene_aabb(volume), seed=seed, **kwargs)


def _assert_same(got, expected) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("staging", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_same_batches_as_the_plain_sampler(small_volume, case, staging):
    volume, _ = small_volume
    plain = _plain(volume, **CASES[case])
    prefetching = PrefetchingSampler(_plain(volume, **CASES[case]), staging=staging)
    try:
        handed_out = []
        for step in range(40):
            batch = prefetching.batch(40, step)
            _assert_same(batch, plain.batch(40, step))
            handed_out.append(batch)
        # Staging buffers are reused: batches handed out earlier are untouched by later ones.
        replay = _plain(volume, **CASES[case])
        for step, batch in enumerate(handed_out):
            _assert_same(batch, replay.batch(40, step))
    finally:
        prefetching.close()


def test_requests_off_the_prediction(small_volume):
    """Another batch size, a repeated step (evaluation batches), a jump into or out of the coarse phase: the
    prefetched batch is dropped and the requested one made, as the plain sampler would."""
    volume, _ = small_volume
    options = CASES["voxels"]
    plain, prefetching = _plain(volume, **options), PrefetchingSampler(_plain(volume, **options))
    try:
        for count, step in [(40, 0), (40, 1), (40, 1), (25, 2), (25, 5), (25, 0), (25, 1), (40, 9), (40, 9)]:
            _assert_same(prefetching.batch(count, step), plain.batch(count, step))
    finally:
        prefetching.close()


def test_sequences(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "seq"
    (root / "v").mkdir(parents=True)
    for step in (1, 2, 3):
        rng.random((3, 4, 5), dtype=np.float32).tofile(root / "v" / f"seq-v-{step}.raw")
    (root / "dataset.json").write_text('{"name": "seq", "dims": [5, 4, 3], "vars": ["v"], "total_samples": 3, '
                                       '"dtype": "float32"}')
    volumes = [open_volume(root, timestep=step) for step in (1, 2, 3)]

    def sequence():
        return SequencePointSampler([_plain(v, seed=index, continuous_fraction=0.25, subsample_factor=1)
                                     for index, v in enumerate(volumes)])

    plain, prefetching = sequence(), PrefetchingSampler(sequence(), staging=True)
    try:
        for step in range(20):
            batch = prefetching.batch(50, step)
            assert len(batch) == 3
            _assert_same(batch, plain.batch(50, step))
        state = prefetching.get_state()
        resumed = PrefetchingSampler(sequence())
        resumed.set_state(state)
        for step in range(20, 30):
            _assert_same(resumed.batch(50, step), plain.batch(50, step))
        resumed.close()
    finally:
        prefetching.close()


@pytest.mark.parametrize("case", ["voxels", "continuous"])
def test_state_saved_midway_resumes_the_same_batches(small_volume, case):
    """The state is that of the batches handed out, not of the one prefetched behind them."""
    volume, _ = small_volume
    options = CASES[case]
    uninterrupted = _plain(volume, **options)
    expected = [uninterrupted.batch(40, step) for step in range(30)]
    first = PrefetchingSampler(_plain(volume, **options))
    for step in range(11):
        _assert_same(first.batch(40, step), expected[step])
    state = first.get_state()
    _assert_same(first.batch(40, 11), expected[11])  # the run goes on after its checkpoint
    first.close()
    resumed = PrefetchingSampler(_plain(volume, seed=99, **options))  # another seed: all comes from the state
    resumed.set_state(state)
    for step in range(11, 30):
        _assert_same(resumed.batch(40, step), expected[step])
    # Interchangeable with the plain sampler's state.
    plain = _plain(volume, seed=99, **options)
    plain.set_state(resumed.get_state())
    _assert_same(plain.batch(40, 30), uninterrupted.batch(40, 30))
    # set_state on a sampler with a batch in flight drops it.
    resumed.set_state(state)
    _assert_same(resumed.batch(40, 11), expected[11])
    resumed.close()


class _Failing:
    """A sampler whose batch at step `fail_at` raises."""

    def __init__(self, fail_at: int):
        self.fail_at, self.position = fail_at, 0

    def batch(self, count, step):
        if step == self.fail_at:
            raise ValueError(f"no batch at step {step}")
        self.position += 1
        return torch.full((count,), float(step)), torch.full((count,), float(self.position))

    def batch_key(self, step):
        return step  # every step draws its own kind of batch

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_worker_errors_surface_in_the_caller():
    sampler = PrefetchingSampler(_Failing(fail_at=2))
    try:
        assert float(sampler.batch(3, 0)[0][0]) == 0.0
        assert float(sampler.batch(3, 1)[0][0]) == 1.0  # step 2 is being made now, and fails
        with pytest.raises(ValueError, match="no batch at step 2"):
            sampler.batch(3, 2)
        assert sampler.get_state() == {"position": 2}
        steps, positions = sampler.batch(3, 3)  # the sampler goes on from where the handed-out batches left it
        assert float(steps[0]) == 3.0 and float(positions[0]) == 3.0
    finally:
        sampler.close()


def test_close_stops_the_thread(small_volume):
    volume, _ = small_volume
    sampler = PrefetchingSampler(_plain(volume, **CASES["voxels"]))
    sampler.batch(40, 0)
    thread = sampler._thread
    assert thread.daemon and thread.is_alive()
    state = sampler.get_state()
    sampler.close()
    assert not thread.is_alive()
    assert sampler.get_state() is state
    with pytest.raises(RuntimeError, match="closed"):
        sampler.batch(40, 1)
    sampler.close()  # twice is fine


def test_unclosed_samplers_stop_when_collected_and_at_exit(small_volume):
    volume, _ = small_volume
    sampler = PrefetchingSampler(_plain(volume, **CASES["voxels"]))
    sampler.batch(40, 0)
    thread = sampler._thread
    del sampler
    thread.join(timeout=60)
    assert not thread.is_alive()
    script = (
        "import torch\n"
        "from gridinr_nerfstudio.stages.fit.prefetch import PrefetchingSampler\n"
        "class Slow:\n"
        "    def batch(self, count, step): return (torch.zeros(count),)\n"
        "    def get_state(self): return {}\n"
        "keep = PrefetchingSampler(Slow())\n"
        "keep.batch(4, 0)\n"
        "print('done')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"


def test_datamanager_choice(small_volume, tmp_path):
    volume, _ = small_volume

    def manager(**options):
        config = FitDataManagerConfig(continuous_fraction=0.25, batch_size=40, subsample_factor=1, **options)
        config.dataparser.data = volume.info.path
        config.dataparser.num_train_views, config.dataparser.num_eval_views, config.dataparser.image_size = 2, 2, 8
        config.dataparser.render.num_samples = 8
        config.dataparser.cache_dir = tmp_path
        return config.setup(device="cpu")

    assert type(manager().sampler) is VolumePointSampler  # auto: CUDA only
    assert type(manager(prefetch="on", device_resident="on").sampler) is not PrefetchingSampler  # resident wins
    plain, prefetching = manager(prefetch="off"), manager(prefetch="on")
    assert isinstance(prefetching.sampler, PrefetchingSampler) and not prefetching.sampler.pin
    for step in range(5):
        points, batch = prefetching.next_train(step)
        expected_points, expected = plain.next_train(step)
        assert torch.equal(points, expected_points) and torch.equal(batch["values"], expected["values"])
    prefetching.set_sampler_state(plain.get_sampler_state())
    torch.testing.assert_close(prefetching.values_at(points), plain.values_at(points))
    prefetching.sampler.close()


class _CountingSampler:
    """Records torch's thread count of the thread that makes each batch."""

    def __init__(self):
        self.counts: list[int] = []

    def batch(self, count: int, step: int):
        torch.ones(4).sum()  # a parallel op: a new thread fixes its count here
        self.counts.append(torch.get_num_threads())
        return (torch.zeros(count),)

    def batch_key(self, step: int):
        return 0

    def get_state(self):
        return len(self.counts)

    def set_state(self, state) -> None:
        pass


def test_the_prefetch_thread_follows_the_thread_policy():
    """The batches are made on torch's count of the setting the thread policy applied last: torch's count is per OS
    thread and fixed at a thread's first parallel op, so without this the worker kept the count it started with."""
    from gridinr_nerfstudio import thread_policy
    from gridinr_nerfstudio.thread_policy import ThreadSetting

    before = torch.get_num_threads()
    try:
        thread_policy.apply_setting(ThreadSetting(1, 1))
        sampler = _CountingSampler()
        prefetching = PrefetchingSampler(sampler)

        def step(index: int) -> None:  # hand out batch `index`, then wait until the worker made the next one
            prefetching.batch(8, index)
            deadline = time.monotonic() + 30
            while len(sampler.counts) < index + 2 and time.monotonic() < deadline:
                time.sleep(0.001)

        step(0)  # batches 0 and 1 made on one thread
        thread_policy.apply_setting(ThreadSetting(2, 2))
        step(1)  # batch 1 handed out; batch 2 made on two threads
        step(2)
        thread_policy.apply_setting(ThreadSetting(1, 2))
        step(3)  # batch 4 on one thread again
        prefetching.close()
        assert sampler.counts == [1, 1, 2, 2, 1]
    finally:
        thread_policy.apply_setting(ThreadSetting(before, 0))
