"""The thread policy: the ladder controller fed synthetic step times (idle and busy machines, load that comes and
goes), `AdaptiveThreads` applying its choices, and the kernels' results under any thread count."""

from __future__ import annotations

import itertools
import os
import sys
import threading

import pytest
import torch

from gridinr_nerfstudio import thread_policy
from gridinr_nerfstudio.fields.hash_grid import _backend
from gridinr_nerfstudio.fields.hash_grid._torch_impl import torch_encode, torch_sparse_adam_step
from gridinr_nerfstudio.fields.hash_grid.encoding import HashGridEncoding
from gridinr_nerfstudio.thread_policy import AdaptiveThreads, ThreadLadderController, ThreadSetting, thread_ladder

# Seconds per step of the three settings (one thread; kernels on all; all), shaped like the measurements on two
# cores (docs/cpu_profiles.md): idle, more threads are faster; beside a busy process, torch's ops on two threads
# stall at every barrier.
IDLE = (1.0, 0.72, 0.6)
BUSY = (0.95, 0.93, 6.0)


def simulate(controller: ThreadLadderController, seconds, steps: int, start: int = 0) -> list[int]:
    """Run `steps` steps; `seconds(step, option)` is each step's time. Returns the option of every step."""
    used = []
    for step in range(start, start + steps):
        option = controller.option()
        used.append(option)
        controller.record(seconds(step, option))
    return used


def total_time(used: list[int], seconds, start: int = 0) -> float:
    return sum(seconds(step, option) for step, option in enumerate(used, start))


def probe_length(controller: ThreadLadderController) -> int:
    """Steps one probe takes: the candidate's settling steps, then its measured steps alternated with as many at
    the setting in use."""
    return controller.settle_steps + 2 * controller.probe_steps


def drifting(costs, period: int, amplitude: float = 0.12):
    """Step times of `costs` on a machine whose speed drifts: every setting `amplitude` slower for `period` / 2
    steps, then as much faster (a co-runner's phases; measured on the brain MRI beside `yes`: 14 against 18 steps
    per second, for seconds at a time, on one and the same setting)."""
    return lambda step, option: costs[option] * (1.0 + amplitude * (1 if (step // (period // 2)) % 2 else -1))


def test_idle_machine_settles_on_all_threads():
    steady = lambda step, option: IDLE[option]  # noqa: E731
    controller = ThreadLadderController(3, start=0)
    used = simulate(controller, steady, 2000)
    assert used[-1] == 2 and used[-100:].count(2) >= 95
    assert total_time(used, steady) <= 1.03 * 2000 * min(IDLE)  # probes included


def test_busy_machine_leaves_the_stalling_setting_and_rarely_tries_it_again():
    steady = lambda step, option: BUSY[option]  # noqa: E731
    controller = ThreadLadderController(3, start=2)  # starts at all threads, as torch does
    used = simulate(controller, steady, 2000)
    assert used[-1] in (0, 1)
    assert used.count(2) <= 6  # the first measured steps, then never again: kernels-on-all did not beat one thread
    assert total_time(used, steady) <= 1.03 * 2000 * min(BUSY)


def test_the_default_start_never_runs_all_threads_on_a_busy_machine_and_reaches_them_on_an_idle_one():
    """The default start is the middle setting: beside a busy process no step runs on the setting that stalls (the
    steps a start at the top ran before its first measurement cost more than all probes), idle the first round moves
    up, and either way the run is within 3% of the best setting's time, probes included."""
    for costs, best in ((BUSY, (0, 1)), (IDLE, (2,))):
        controller = ThreadLadderController(3)
        assert controller.current == 1
        steady = lambda step, option, costs=costs: costs[option]  # noqa: E731
        used = simulate(controller, steady, 2000)
        assert used[-1] in best and total_time(used, steady) <= 1.03 * 2000 * min(costs)
        if costs is BUSY:
            assert 2 not in used
        else:
            assert used.index(2) <= 3 + 2 * probe_length(controller)
    assert ThreadLadderController(1).current == 0 and ThreadLadderController(2).current == 1


def test_starting_from_one_thread_on_a_busy_machine_never_tries_all_threads():
    steady = lambda step, option: BUSY[option]  # noqa: E731
    used = simulate(ThreadLadderController(3, start=0), steady, 2000)
    assert 2 not in used


def test_load_that_comes_is_left_within_a_few_steps():
    seconds = lambda step, option: (IDLE if step < 1000 else BUSY)[option]  # noqa: E731
    controller = ThreadLadderController(3, start=0)
    used = simulate(controller, seconds, 2000)
    assert used[990:1000] == [2] * 10  # settled on all threads while idle
    assert used[1000:].count(2) <= 2 + controller.probe_steps  # the drop shows within probe_steps steps
    assert used[-1] in (0, 1)


def test_load_that_goes_is_noticed_within_the_longest_period():
    seconds = lambda step, option: (BUSY if step < 1000 else IDLE)[option]  # noqa: E731
    controller = ThreadLadderController(3, start=0, max_period=200)
    used = simulate(controller, seconds, 2000)
    back = next(step for step in range(1000, 2000) if used[step] == 2 and used[step + 10] == 2)
    assert back - 1000 <= 2 * (200 + 2 * probe_length(controller))
    assert used[-1] == 2


@pytest.mark.parametrize("period", [12, 24, 40, 64, 100])
def test_a_drifting_machine_is_compared_step_for_step(period):
    """On a machine whose speed drifts by 12% either way over a few dozen steps, as much as the settings differ,
    the choice is still right: beside a busy process (one thread and the middle setting within 2%) it never tries
    the stalling top setting, idle the top is reached in the first round and kept; either way within 3% of the best
    setting's time. Probes alternate candidate and current steps, so both see the same drift (the code before
    compared a probe with the steps before it: beside the burner it tried the top setting on the drift alone)."""
    for costs, best in ((BUSY, (0, 1)), (IDLE, (2,))):
        seconds = drifting(costs, period)
        controller = ThreadLadderController(3)
        used = simulate(controller, seconds, 2000)
        fastest = min(sum(seconds(step, option) for step in range(2000)) for option in best)
        assert used[-1] in best and total_time(used, seconds) <= 1.03 * fastest, (costs, period)
        if costs is BUSY:
            assert 2 not in used
        else:
            assert used.index(2) <= 3 + 2 * probe_length(controller) and used[-100:].count(2) >= 90


def test_a_candidate_that_stalls_sits_out_more_rounds_each_time():
    """When the middle setting pays over one thread but the top stalls (beside a busy process), each probe of the
    top ends after its first step, and the top then sits out 1, 2, then `max_skip` rounds: it is tried in about
    one round in `max_skip` + 1, not in every round."""
    costs = (1.0, 0.8, 8.0)
    controller = ThreadLadderController(3, first_period=20, max_period=40, max_skip=4)
    used = simulate(controller, lambda step, option: costs[option], 3000)
    assert used[-1] == 1 and controller.rounds >= 50
    assert controller.aborted == used.count(2) <= 2 + controller.rounds // 5  # one step per probe of the top


def test_a_co_runner_that_leaves_brings_the_skipped_candidate_back():
    """After the top was skipped beside a busy process, the machine going idle (the setting in use 30% faster or
    more, or the skips running out) brings it back within `max_skip` + 1 rounds of the longest period."""
    busy = (1.0, 0.8, 8.0)
    seconds = lambda step, option: (busy if step < 1000 else IDLE)[option]  # noqa: E731
    controller = ThreadLadderController(3, max_period=200, max_skip=2)
    used = simulate(controller, seconds, 3000)
    assert 2 in used[:1000] and used[990:1000] == [1] * 10
    back = next(step for step in range(1000, 3000) if used[step] == 2 and used[step + 10] == 2)
    assert back - 1000 <= (controller.max_skip + 1) * (200 + 2 * probe_length(controller))
    assert used[-1] == 2


def test_ties_go_to_fewer_threads():
    """Beside a busy process one thread and the middle setting train equally fast: the first round settles on one
    thread (as fast, and the other process keeps a core) and noise below the margin never moves it up again."""
    noisy = lambda step, option: (1.0, 1.0, 6.0)[option] * (1.0 + 0.01 * ((step * 7919) % 3 - 1))  # noqa: E731
    controller = ThreadLadderController(3)
    used = simulate(controller, noisy, 2000)
    assert controller.switches == 1 and used[3 + probe_length(controller)] == 0  # the first round moved down
    assert used.count(0) >= 0.95 * len(used) and 2 not in used


def test_near_equal_settings_do_not_flip_flop():
    noisy = lambda step, option: (1.0, 1.01, 1.02)[option] * (1.0 + 0.01 * ((step * 7919) % 3 - 1))  # noqa: E731
    controller = ThreadLadderController(3, start=1)
    simulate(controller, noisy, 3000)
    assert controller.switches <= 1 and controller.rounds >= 5


def test_rounds_grow_rarer_while_the_choice_holds():
    controller = ThreadLadderController(3, start=2, first_period=10, max_period=160)
    simulate(controller, lambda step, option: IDLE[option], 3000)
    assert controller.period == 160 and controller.switches == 0
    assert controller.rounds <= 5 + 3000 // 160


def test_a_single_setting_is_never_probed():
    controller = ThreadLadderController(1)
    assert simulate(controller, lambda step, option: 1.0 + step % 5, 500) == [0] * 500 and controller.rounds == 0


def test_work_per_step_is_what_is_compared():
    """Rates, not step times: a setting whose steps do twice the work in 1.5x the time is the faster one."""
    controller = ThreadLadderController(2, start=0, probe_steps=3, settle_steps=0)
    used = []
    for _ in range(200):
        option = controller.option()
        used.append(option)
        controller.record(1.0 if option == 0 else 1.5, work=1.0 if option == 0 else 2.0)
    assert used[-1] == 1


def test_ladder_of_settings():
    assert thread_ladder(1) == [ThreadSetting(1, 1)]
    assert thread_ladder(2) == [ThreadSetting(1, 1), ThreadSetting(1, 2), ThreadSetting(2, 2)]
    assert thread_ladder(16)[1:] == [ThreadSetting(1, 16), ThreadSetting(16, 16)]


def test_adaptive_threads_applies_the_controllers_choice_and_times_the_step():
    """A fake clock advances by the step cost of the applied setting: the choice follows the costs, and the setting
    is only applied when it changes."""
    now = [0.0]
    applied: list[ThreadSetting] = []
    settings = thread_ladder(2)
    threads = AdaptiveThreads(settings, ThreadLadderController(3, start=0), apply=applied.append,
                              current=lambda: applied[-1] if applied else None, clock=lambda: now[0])
    for _ in range(300):
        with threads.step() as setting:
            assert setting == applied[-1]
            now[0] += dict(zip(settings, BUSY))[setting]
    assert threads.setting in settings[:2] and all(a != b for a, b in itertools.pairwise(applied))
    summary = threads.summary()
    assert sum(summary["steps_at"].values()) == 300 and summary["current"] == str(threads.setting)


def test_kernel_thread_count_follows_torch_until_set():
    before = torch.get_num_threads()
    try:
        thread_policy.set_kernel_threads(0)
        assert thread_policy.kernel_threads() == torch.get_num_threads()
        thread_policy.set_kernel_threads(3)
        assert thread_policy.kernel_threads() == 3
        with pytest.raises(ValueError):
            thread_policy.set_kernel_threads(-1)
    finally:
        thread_policy.set_kernel_threads(0)
        torch.set_num_threads(before)


# The kernels under any thread count ------------------------------------------------------------------------------

requires_cpp = pytest.mark.skipif(not _backend.cpp_extension_available(), reason="C++ extension not built")


def kernel_results(encoding: HashGridEncoding, positions: torch.Tensor, grad_out: torch.Tensor, threads: int):
    """Forward, both backward kernels and one lazy Adam step of the C++ kernels on `threads` threads."""
    scales, level_info, shift = encoding._kernel_arguments
    params, features = encoding.params.detach(), encoding.features_per_level
    cpp = _backend.cpp
    out = cpp.forward(positions, params, scales, level_info, shift, features, threads)
    grad_params = torch.zeros_like(params)
    cpp.backward_params(positions, grad_out, grad_params, scales, level_info, shift, features, threads)
    grad_positions = cpp.backward_positions(positions, params, grad_out, scales, level_info, shift, features, threads)
    moved, moments = params.clone(), [torch.full_like(params, 0.1), torch.full_like(params, 0.2)]
    grad = grad_params.clone()
    cpp.sparse_adam_step(moved, grad, *moments, 1e-2, 0.9, 0.99, 1e-15, threads)
    return out, grad_params, grad_positions, moved, *moments


@requires_cpp
@pytest.mark.parametrize("torch_threads", [1, 2])
def test_kernels_give_identical_results_for_any_thread_count(torch_threads):
    """Bit for bit, 1 to 7 threads (both pools: torch's OpenMP team when it is as large, else the inter-op pool),
    and equal to the pure-PyTorch reference."""
    encoding = HashGridEncoding(num_levels=6, features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                                max_resolution=64, backend="cpp")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        encoding.params.normal_(generator=generator)
    positions = torch.rand(5000, 3, generator=generator)  # 20 blocks of 256 points, the last one partial
    grad_out = torch.randn(5000, 12, generator=generator)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(torch_threads)
        results = {threads: kernel_results(encoding, positions, grad_out, threads) for threads in (1, 2, 3, 7)}
    finally:
        torch.set_num_threads(before)
    for threads, result in results.items():
        for got, expected in zip(result, results[1]):
            assert torch.equal(got, expected), f"{threads} threads differ from one"
    reference_out = torch_encode(positions, encoding.params.detach(), encoding.geometry, 2)
    torch.testing.assert_close(results[1][0], reference_out)
    params = encoding.params.detach().clone().requires_grad_(True)
    (torch_encode(positions, params, encoding.geometry, 2) * grad_out).sum().backward()
    torch.testing.assert_close(results[1][1], params.grad, rtol=1e-4, atol=1e-5)
    moved, moments = encoding.params.detach().clone(), [torch.full_like(params, 0.1), torch.full_like(params, 0.2)]
    torch_sparse_adam_step(moved, params.grad.clone(), *moments, 1e-2, 0.9, 0.99, 1e-15)
    torch.testing.assert_close(results[1][3], moved, rtol=1e-4, atol=1e-5)


@requires_cpp
def test_kernels_never_wait_for_a_helper_that_cannot_start():
    """With every thread of torch's inter-op pool held busy, a kernel asked for 4 threads still finishes (its
    caller claims every item) with the one-thread result; the helpers it queued find nothing left later."""
    encoding = HashGridEncoding(num_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=32,
                                backend="cpp")
    positions = torch.rand(3000, 3, generator=torch.Generator().manual_seed(1))
    scales, level_info, shift = encoding._kernel_arguments
    expected = _backend.cpp.forward(positions, encoding.params.detach(), scales, level_info, shift, 2, 1)
    before = torch.get_num_threads()
    result: dict = {}

    def run() -> None:
        result["out"] = _backend.cpp.forward(positions, encoding.params.detach(), scales, level_info, shift, 2, 4)

    torch.set_num_threads(1)  # torch's ops on one thread: our kernels use the inter-op pool
    _backend.cpp._occupy_helpers(torch.get_num_interop_threads())
    try:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout=120)  # a hang guard, not a speed limit: waiting for a helper would never end
        finished = not worker.is_alive()
    finally:
        _backend.cpp._release_helpers()
        torch.set_num_threads(before)
    assert finished, "the kernel waited for helpers that could not start"
    assert torch.equal(result["out"], expected)


def train_few_steps(setting: ThreadSetting, steps: int = 8) -> list[torch.Tensor]:
    """`gridinr-bench fit`'s contender `ours` (the method's CPU defaults, a small table) trained `steps` steps on
    the built-in volume under `setting`; its parameters."""
    import argparse

    from gridinr_nerfstudio.scripts.bench import fit

    parser = argparse.ArgumentParser()
    fit.add_parser(parser.add_subparsers())
    args = parser.parse_args(["fit", "--contenders", "ours", "--device", "cpu", "--log2-table", "14", "--batch", "8192"])
    thread_policy.apply_setting(setting)
    contender = fit.setup_contenders(args).contenders[0]
    for step in range(steps):
        contender.step(args.batch, step / steps)
    return [p.detach().clone() for p in contender.model.parameters()]


@requires_cpp
def test_training_is_bit_identical_with_our_kernels_on_any_number_of_threads():
    """The two lower settings of the ladder train the same numbers bit for bit (torch's ops on one thread, our
    kernels' results independent of their threads); all threads differ only by float rounding (torch's own
    reductions split by thread)."""
    before = torch.get_num_threads()
    try:
        one, kernels_on_two, all_on_two = (train_few_steps(s) for s in thread_ladder(2))
    finally:
        thread_policy.apply_setting(ThreadSetting(before, 0))
    assert all(torch.equal(a, b) for a, b in zip(one, kernels_on_two))
    for a, b in zip(one, all_on_two):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_trainer_runs_its_steps_under_the_adaptive_policy(tmp_path, monkeypatch):
    """A tiny ns-train gridinr-fit run on two threads: every step goes through the policy, the settings it applies
    are the ones torch then runs with, and a fake clock that makes one thread fastest moves it there."""
    from tiny_runs import train_tiny_fit

    from gridinr_nerfstudio import trainer as trainer_module

    seen: list[tuple[int, int]] = []
    now = [0.0]
    cost = dict(zip(thread_ladder(2), (0.8, 1.0, 6.0)))  # one thread is fastest

    def apply(setting: ThreadSetting) -> None:
        thread_policy.apply_setting(setting)
        seen.append((torch.get_num_threads(), thread_policy.kernel_threads()))

    def clock() -> float:  # read at the start and the end of a step: a step lasts its setting's cost
        now[0] += cost[created[-1].applied]
        return now[0]

    created: list[AdaptiveThreads] = []

    def policy() -> AdaptiveThreads:
        created.append(AdaptiveThreads(thread_ladder(2), apply=apply, clock=clock))
        return created[-1]

    monkeypatch.setattr(trainer_module, "AdaptiveThreads", policy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train_tiny_fit(tmp_path, iterations=60)
        (threads,) = created
        assert sum(threads.controller.steps_at) == 60
        assert threads.setting == ThreadSetting(1, 1) and threads.controller.rounds >= 1
        assert set(seen) <= {(1, 1), (1, 2), (2, 2)} and seen[-1] == (1, 1)

        created.clear()
        train_tiny_fit(tmp_path / "fixed", iterations=5, configure=lambda config: setattr(config, "cpu_threads", "fixed"))
        assert created == []  # "fixed": no policy, torch's count throughout
    finally:
        thread_policy.apply_setting(ThreadSetting(before, 0))


def test_contention_bench_measures_every_policy_and_the_code_before_in_one_run(tmp_path, capsys):
    """``gridinr-bench contention`` with a burner: one row per load, a cell per policy (each a fresh training
    process) and the ``--before`` interpreter's own ``gridinr-bench fit`` on 1 and all threads beside the same load;
    the burners are gone afterwards."""
    import json
    import subprocess

    from gridinr_nerfstudio.scripts.bench.cli import main as bench_main

    output = tmp_path / "contention.json"
    bench_main(["contention", "--seconds", "0.5", "--busy", "1", "--policies", "adaptive",
                "--before", sys.executable, "--before-policies", "1,all,adaptive", "--json", str(output)])
    result = json.loads(output.read_text())
    assert list(result["rows"]) == ["idle", "1 busy"]
    cores = torch.get_num_threads()  # 1 under the tests' pinning: "before all" is then "before 1"
    for row in result["rows"].values():
        assert set(row) == {"adaptive", "before:1", f"before:{cores}", "before:adaptive"}
        assert all(cell["points_per_s"] > 0 and cell["steps"] >= 1 for cell in row.values())
        assert sum(row["adaptive"]["threads"]["steps_at"].values()) == row["adaptive"]["steps"]
    for label, row in result["rows"].items():  # adaptive over each other cell of its round
        paired = result["adaptive_per_round"][label]
        assert set(paired) == set(row) - {"adaptive"}
        for policy, ratio in paired.items():
            assert ratio["per_round"] == [row["adaptive"]["points_per_s"] / row[policy]["points_per_s"]]
    printed = capsys.readouterr().out
    assert "1 busy" in printed and "before adaptive" in printed and "adaptive/before 1 thread" in printed
    burners = subprocess.run(["pgrep", "-P", str(os.getpid()), "yes"], capture_output=True, text=True).stdout
    assert burners.strip() == ""
