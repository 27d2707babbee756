"""How many CPU threads repeated work (training steps, render chunks) runs on: the faster count, measured as it runs.

Why: on a CPU shared with other work, a parallel region is as slow as its slowest thread. With as many threads as
cores, one busy process elsewhere takes a core from one of ours, and every OpenMP region (our kernels and each of
torch's ops, about a hundred per training step) then waits at its end for that thread's next time slice, while the
waiting thread spins on its core. Measured on 2 cores (`gridinr-bench contention`, docs/cpu_profiles.md): two
threads train 1.5x faster than one on an idle machine and up to 10x slower with one `yes` running beside them. No
fixed setting is right for both, and a program cannot know what else will run, so `ThreadLadderController`
measures: now and then it runs a few steps at the neighbouring settings, alternated with steps at the setting in
use, compares points (work) per second, keeps the faster one and probes less often while its choice holds (the
period doubles, up to `max_period` steps; a sudden slowdown or speed-up of the setting in use re-probes at once).

Results do not depend on the count beyond float rounding: our hash-grid kernels give bit-identical results for
any thread count (each thread owns whole levels of the table gradient; forward, position gradient and Adam are
per point or per entry; tested), but torch's own reductions (the loss mean, the MLP's weight gradients) split
their sums by thread, so a run whose count changes is reproducible to rounding, not bit for bit. A fixed count
(`--machine`... `cpu-threads fixed`, or OMP_NUM_THREADS=1) keeps runs bit-for-bit repeatable.

`AdaptiveThreads` applies a controller to torch (``torch.set_num_threads``, which also sizes the OpenMP teams of
our C++ kernels); the controller itself is plain logic fed with timings, so it is tested with synthetic ones.
Anything repeated can use it: ``with threads.step(work=n): ...``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch


_kernel_threads = 0
"""Threads of our C++ kernels as set by `set_kernel_threads` (0: torch's intra-op count)."""
_this_thread = threading.local()
"""`kernels`: the kernels' count inside a `torch_ops_on_one_thread` block of this Python thread."""


def kernel_threads() -> int:
    """How many threads our C++ kernels use: the count set by `set_kernel_threads`, else torch's intra-op count
    (inside `torch_ops_on_one_thread`: the count from before the block).

    Kept apart from torch's count because the two degrade differently on a busy machine: our kernels share their
    work out item by item and never wait for a thread that has not started (csrc/work_sharing.h), torch's ops
    split theirs evenly between OpenMP threads and wait for all of them.
    """
    inside = getattr(_this_thread, "kernels", 0)
    if inside > 0:
        return inside
    return _kernel_threads if _kernel_threads > 0 else torch.get_num_threads()


@contextmanager
def torch_ops_on_one_thread() -> Iterator[int]:
    """Within the block, torch's own ops of this Python thread run on one thread and our kernels on as many as
    before (yielded): what a render frame of the fused ray marcher uses, whatever the policy in force.

    Why: around the kernel a frame runs a few dozen small torch ops (buffers, compositing) that gain nothing from a
    second thread on an idle machine (memory-bound, microseconds each), but beside one busy process each OpenMP
    region of them can wait a whole time slice for its descheduled team thread (measured: 60 ms per 256x256 frame,
    README "On a busy machine"). Our kernel then runs on work_sharing.h's helpers that wait passively. torch's
    intra-op count is per OS thread (an OpenMP setting), so a viewer thread rendering here does not change the
    training thread's count; the count is restored when the block ends.
    """
    kernels = kernel_threads()
    previous_torch, previous_inside = torch.get_num_threads(), getattr(_this_thread, "kernels", 0)
    if previous_torch != 1:
        torch.set_num_threads(1)
    _this_thread.kernels = kernels
    try:
        yield kernels
    finally:
        _this_thread.kernels = previous_inside
        if previous_torch != 1:
            torch.set_num_threads(previous_torch)


def set_kernel_threads(count: int) -> None:
    """Threads for our C++ kernels from now on (0: follow torch's intra-op count again)."""
    global _kernel_threads
    if count < 0:
        raise ValueError(f"kernel thread count must be >= 0, got {count}")
    _kernel_threads = int(count)


class ThreadSetting(NamedTuple):
    """Threads of torch's own ops (intra-op, OpenMP) and of our C++ kernels."""

    torch: int
    kernels: int

    def __str__(self) -> str:
        return f"torch {self.torch} / kernels {self.kernels}"


def thread_ladder(max_threads: int) -> list[ThreadSetting]:
    """The settings compared, from least to most parallel: one thread; our kernels on all threads and torch's ops on
    one (our kernels never wait for a thread that has not started, torch's static OpenMP split does); everything
    on all threads (fastest on an idle machine). One core: just one thread."""
    top = max(1, int(max_threads))
    ladder = [ThreadSetting(1, 1), ThreadSetting(1, top), ThreadSetting(top, top)]
    return list(dict.fromkeys(ladder))  # drops the repeats of max_threads == 1


class ThreadLadderController:
    """Picks, step after step, the setting on a ladder (least to most parallel) that does the most work per second;
    tried by measuring its neighbours now and then (see the module doc).

    Call `option()` for the index of the setting the next step should use, then `record(seconds, work)` once it
    is done. A measurement round probes the next setting down, then the next one up, but the one up only from the
    bottom or when the setting in use beat the one below by `escalate` (more threads pay only while each step up
    pays; on a busy machine this spares the costly top setting). A probe runs `settle_steps` unrecorded steps on
    the candidate, then `probe_steps` steps on the candidate alternating with as many on the setting in use, and
    takes the median of the rates of each candidate step over the step after it: paired, because on a shared
    machine the speed of every setting drifts by 10-20% over seconds (a co-runner's phases, which core it shares),
    as much as the settings differ, and steps taken back to back see the same drift. A candidate with more threads
    replaces the setting in use when it is faster by `margin`, one with fewer threads unless it is slower by
    `fewer_slack`: ties go to fewer threads, as fast for us and a core left to the other process (beside a busy
    process one thread and the middle setting train at the same speed). The slack is small because idle the top
    setting beats the middle one by only 10-15% on 2 cores, and every wrong step down costs that. A probe ends
    early once a candidate step runs at less than `abort` of the current rate; that candidate then sits out the
    next round, the next `max_skip` after another such probe (beside a busy process one step on the top setting
    costs ~10 of the others).

    The next round starts `period` steps later: `first_period` after a change, doubled each time the choice
    holds, at most `max_period`; at once when the median of the last `probe_steps` steps at the setting in use
    falls below (1 - `drop`) of its rate at the last round (a co-runner appeared) or, while a candidate sits out,
    rises above (1 + `drop`) of it (one left: the skipped candidates are tried again).

    It starts (`start` None) on the second setting of the ladder, not the top: beside a busy process a step on the
    top setting (torch's ops on all threads) costs ~10x one on the others (`gridinr-bench contention`), so the
    steps run there before the first measurement cost more than all later probes; on an idle machine the second
    setting is the nearer to the top, and the first round (from the fourth step) moves up. `escalate` (1.12) lies
    between what the middle setting gains over one thread idle (1.33x measured on 2 cores) and beside a busy
    process (1.0x).
    """

    def __init__(self, size: int, start: int | None = None, probe_steps: int = 3, settle_steps: int = 1,
                 first_period: int = 20, max_period: int = 640, margin: float = 0.05, escalate: float = 1.12,
                 abort: float = 0.5, drop: float = 0.3, max_skip: int = 2, fewer_slack: float = 0.02):
        if size < 1:
            raise ValueError(f"need at least one setting, got {size}")
        if probe_steps < 1 or settle_steps < 0 or first_period < 1 or max_period < first_period or max_skip < 0:
            raise ValueError("need probe_steps >= 1, settle_steps >= 0, 1 <= first_period <= max_period and "
                             "max_skip >= 0")
        self.size = size
        self.current = min(1, size - 1) if start is None else int(start)
        if not 0 <= self.current < size:
            raise ValueError(f"start {start} is not an index of {size} settings")
        self.probe_steps, self.settle_steps = probe_steps, settle_steps
        self.first_period, self.max_period = first_period, max_period
        self.margin, self.escalate, self.abort, self.drop = margin, escalate, abort, drop
        self.max_skip, self.fewer_slack = max_skip, fewer_slack
        self.period = first_period
        self.recent: deque[float] = deque(maxlen=probe_steps)
        """Rates (work per second) of the last steps at `current`."""
        self.reference_rate: float | None = None
        """The rate `current` had at the last round (None before the first round)."""
        self.steps_until_round = 0  # the first round starts as soon as `current` has its rate
        self._probing: int | None = None  # the candidate being measured, if a round is on
        self._schedule: list[bool] = []  # the probe's remaining steps: True on the candidate, False on `current`
        self._candidate_rates: list[float] = []
        self._current_rates: list[float] = []
        self._round_ratios: dict[int, float] = {}  # candidate -> its rate over current's, paired
        self._round_rates: dict[int, float] = {}  # candidate -> its rate
        self._skip_rounds = [0] * size  # rounds each candidate sits out (after an aborted probe)
        self._skip_next = [0] * size  # the rounds it sits out after its next aborted probe
        self.steps_at = [0] * size
        """Steps run at each setting (what logs and the bench report)."""
        self.rounds = 0
        self.switches = 0
        self.aborted = 0
        """Probes ended early on a clearly slower candidate."""

    def option(self) -> int:
        """Index of the setting of the next step."""
        if self._probing is None and self.size > 1 and self.steps_until_round <= 0 and len(self.recent) == self.recent.maxlen:
            self._round_ratios, self._round_rates = {}, {}
            self._next_probe(self.current - 1 if self.current > 0 else self.current + 1)
        if self._probing is None:
            return self.current
        return self._probing if self._schedule[0] else self.current

    def record(self, seconds: float, work: float = 1.0) -> None:
        """The step just run at `option()` took `seconds` for `work` units (points, rays; 1 for equal steps)."""
        index = self.option()
        self.steps_at[index] += 1
        rate = work / max(seconds, 1e-12)
        if self._probing is None:
            self._record_current(rate)
            if self.reference_rate is not None and len(self.recent) == self.recent.maxlen:
                median = statistics.median(self.recent)
                if median < (1.0 - self.drop) * self.reference_rate:
                    self.steps_until_round = 0  # slowed down: a co-runner came, measure the neighbours now
                elif median > (1.0 + self.drop) * self.reference_rate and any(self._skip_rounds):
                    self.steps_until_round = 0  # sped up: one left, so the skipped candidates may pay again
                    self._skip_rounds = [0] * self.size
                    self._skip_next = [0] * self.size
            return
        on_candidate = self._schedule.pop(0)
        settling = on_candidate and len(self._schedule) >= 2 * self.probe_steps  # the probe's first steps
        if on_candidate and rate < self.abort * statistics.median(self.recent):  # clearly worse: stop measuring it
            self._candidate_rates, self._current_rates = [rate], [statistics.median(self.recent)]
            self._end_probe(aborted=True)
            return
        if on_candidate and not settling:
            self._candidate_rates.append(rate)
        elif not on_candidate:
            self._current_rates.append(rate)
            self._record_current(rate)
        if not self._schedule:
            self._end_probe(aborted=False)

    def _record_current(self, rate: float) -> None:
        self.recent.append(rate)
        self.steps_until_round -= 1

    def _next_probe(self, index: int) -> None:
        """Probe `index` unless it sits this round out (then go on with the round)."""
        if self._skip_rounds[index] > 0:
            self._skip_rounds[index] -= 1
            self._round_ratios[index] = 0.0  # not a contender this round, and no reason to go further up
            self._decide()
            return
        self._probing = index
        self._schedule = [True] * self.settle_steps + [True, False] * self.probe_steps
        self._candidate_rates, self._current_rates = [], []

    def _end_probe(self, aborted: bool) -> None:
        probed = self._probing
        self._probing, self._schedule = None, []
        self._round_rates[probed] = statistics.median(self._candidate_rates)
        pairs = zip(self._candidate_rates, self._current_rates)  # each candidate step and the step after it
        self._round_ratios[probed] = statistics.median(candidate / current for candidate, current in pairs)
        if aborted:
            self.aborted += 1
            self._skip_next[probed] = min(max(1, 2 * self._skip_next[probed]), self.max_skip)
            self._skip_rounds[probed] = self._skip_next[probed]
        else:
            self._skip_next[probed] = 0
        upper = self.current + 1
        if probed < self.current and upper < self.size and self._round_ratios[probed] * self.escalate <= 1.0:
            self._next_probe(upper)  # the step up to the current setting paid: try one more
            return
        self._decide()

    def _decide(self) -> None:
        self.rounds += 1
        # a candidate below replaces the setting in use unless slower by `fewer_slack` (ties go to fewer threads),
        # one above when faster by `margin`
        gains = {index: ratio * (1.0 + self.fewer_slack) if index < self.current else ratio / (1.0 + self.margin)
                 for index, ratio in self._round_ratios.items()}
        best = max(gains, key=lambda index: (gains[index], -index))
        if gains[best] >= 1.0:
            self.current = best
            self.switches += 1
            self.period = self.first_period
            self.recent.clear()  # judged afresh at the new setting
            self.reference_rate = self._round_rates[best]
        else:
            self.period = min(2 * self.period, self.max_period)
            self.reference_rate = statistics.median(self.recent)
        self.steps_until_round = self.period

    def summary(self) -> dict:
        """Steps per setting, measurement rounds, switches and aborted probes (for logs and benchmarks)."""
        return {"current": self.current, "steps_at": list(self.steps_at), "rounds": self.rounds,
                "switches": self.switches, "aborted": self.aborted}


class AdaptiveThreads:
    """A `ThreadLadderController` over `thread_ladder` settings, applied to torch and our kernels around timed work.

    ``with threads.step(work):`` applies the setting the controller asks for (unless `current()` already is it:
    several policies may take turns, as the contenders of ``gridinr-bench fit`` do), times the body and reports
    it. `apply`, `current` and `clock` default to torch's and our kernels' counts and ``time.perf_counter``
    (tests pass others). With one core (or ``OMP_NUM_THREADS=1``, or ``torch.set_num_threads(1)`` before) the
    ladder has one setting and nothing ever changes.
    """

    def __init__(self, settings: list[ThreadSetting] | None = None, controller: ThreadLadderController | None = None,
                 apply: Callable[[ThreadSetting], None] | None = None,
                 current: Callable[[], ThreadSetting | None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.settings = thread_ladder(torch.get_num_threads()) if settings is None else list(settings)
        self.controller = ThreadLadderController(len(self.settings)) if controller is None else controller
        if self.controller.size != len(self.settings):
            raise ValueError("the controller must have one option per setting")
        self.apply = apply_setting if apply is None else apply
        self.current = current_setting if current is None else current
        self.clock = clock
        self.applied: ThreadSetting | None = None
        """The setting this policy applied last."""

    @property
    def setting(self) -> ThreadSetting:
        """The setting in use (the controller's choice, probes aside)."""
        return self.settings[self.controller.current]

    def apply_now(self) -> ThreadSetting:
        """Apply the setting the next step will use (e.g. before building models), and return it."""
        setting = self.settings[self.controller.option()]
        if setting != self.current():
            self.apply(setting)
        self.applied = setting
        return setting

    @contextmanager
    def step(self, work: float = 1.0) -> Iterator[ThreadSetting]:
        setting = self.apply_now()
        started = self.clock()
        yield setting
        self.controller.record(self.clock() - started, work)

    def summary(self) -> dict:
        """Steps per setting (by name), rounds, switches and aborted probes."""
        info = self.controller.summary()
        return {"current": str(self.setting), "rounds": info["rounds"], "switches": info["switches"],
                "aborted": info["aborted"], "steps_at": {str(s): n for s, n in zip(self.settings, info["steps_at"])}}


_policy_torch_threads = 0
"""torch's count in the setting `apply_setting` applied last (0: none yet), for `follow_policy_threads`."""


def follow_policy_threads() -> None:
    """In a helper thread of the same work (the batch prefetcher): take on torch's count of the setting the policy
    applied last, if it differs from this thread's.

    Why: torch's count is per OS thread and fixed in a thread at its first parallel op; `torch.set_num_threads` in
    the training thread does not reach a thread already running. Without this the prefetch thread kept the count in
    force when it started (the middle setting's one thread) and made every batch on one thread, also while training
    ran on all of them (measured: 0.94x all threads idle with 94% of the steps on all threads).
    """
    count = _policy_torch_threads
    if count > 0 and torch.get_num_threads() != count:
        torch.set_num_threads(count)


def current_setting() -> ThreadSetting:
    """The counts in force: torch's intra-op threads and our kernels' threads."""
    return ThreadSetting(torch.get_num_threads(), kernel_threads())


def apply_setting(setting: ThreadSetting) -> None:
    """Set torch's intra-op thread count and our kernels' thread count (and the count helper threads follow)."""
    global _policy_torch_threads
    _policy_torch_threads = int(setting.torch)
    torch.set_num_threads(setting.torch)
    set_kernel_threads(setting.kernels)
