"""How many CPU threads repeated work (training steps, render chunks) runs on: the faster count, measured as it runs.

Why: on a CPU shared with other work, a parallel region is as slow as its slowest thread. With as many threads as
cores, one busy process elsewhere takes a core from one of ours, and every OpenMP region (our kernels and each of
torch's ops, about a hundred per training step) then waits at its end for that thread's next time slice, while the
waiting thread spins on its core. Measured on 2 cores (`gridinr-bench contention`, docs/cpu_profiles.md): two
threads train 1.7x faster than one on an idle machine and up to 3x slower with one `yes` running beside them. No
fixed count is right for both, and a program cannot know what else will run, so `ThreadCountController` measures:
now and then it runs a few steps at the other candidate counts, compares points (work) per second with the
count in use, keeps the faster one and probes less often while its choice holds (the period doubles, up to
`max_period` steps; a sudden slowdown of the count in use re-probes at once).

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
    """Picks, step after step, the setting on a ladder (least to most parallel) that did the most work per second
    recently; tried by measuring its neighbours now and then (see the module doc).

    Call `option()` for the index of the setting the next step should use, then `record(seconds, work)` once it
    is done. The setting in use is judged by the median of its last `probe_steps` steps. A measurement round
    probes the next setting down (`settle_steps` unrecorded steps, then `probe_steps` recorded ones), then the
    next one up, but only from the bottom or when the setting in use beat the one below it by `escalate` (more
    threads pay only while each step up pays; on a busy machine this spares the costly top setting). A probe ends
    early once one of its steps runs at less than `abort` of the current rate. The best setting must beat the one
    in use by `margin` to replace it. The next round starts `period` steps later: `first_period` after a change,
    doubled each time the choice holds, at most `max_period`; at once when the median of the last steps falls
    below (1 - `drop`) of the rate the setting won with (a co-runner appeared).

    It starts (`start` None) on the second setting of the ladder, not the top: beside a busy process a step on the
    top setting (torch's ops on all threads) costs ~10x one on the others (`gridinr-bench contention`), so the
    steps run there before the first measurement cost more than all later probes; on an idle machine the second
    setting is the nearer to the top, and the first round (from the third step) moves up. `escalate` (1.12) lies
    between what the middle setting gains over one thread idle (1.33x measured on 2 cores) and beside a busy
    process (1.0x), with room for the noise of a 3-step median.
    """

    def __init__(self, size: int, start: int | None = None, probe_steps: int = 3, settle_steps: int = 1,
                 first_period: int = 20, max_period: int = 640, margin: float = 0.05, escalate: float = 1.12,
                 abort: float = 0.5, drop: float = 0.3):
        if size < 1:
            raise ValueError(f"need at least one setting, got {size}")
        if probe_steps < 1 or settle_steps < 0 or first_period < 1 or max_period < first_period:
            raise ValueError("need probe_steps >= 1, settle_steps >= 0 and 1 <= first_period <= max_period")
        self.size = size
        self.current = min(1, size - 1) if start is None else int(start)
        if not 0 <= self.current < size:
            raise ValueError(f"start {start} is not an index of {size} settings")
        self.probe_steps, self.settle_steps = probe_steps, settle_steps
        self.first_period, self.max_period = first_period, max_period
        self.margin, self.escalate, self.abort, self.drop = margin, escalate, abort, drop
        self.period = first_period
        self.recent: deque[float] = deque(maxlen=probe_steps)
        """Rates (work per second) of the last steps at `current`."""
        self.reference_rate: float | None = None
        """The rate `current` had when it was last chosen (None before the first round)."""
        self.steps_until_round = 0  # the first round starts as soon as `current` has its rate
        self._probing: int | None = None  # the setting being measured, if a round is on
        self._settle_left = 0
        self._round_rates: dict[int, float] = {}
        self.steps_at = [0] * size
        """Steps run at each setting (what logs and the bench report)."""
        self.rounds = 0
        self.switches = 0

    def option(self) -> int:
        """Index of the setting of the next step."""
        if self._probing is None and self.size > 1 and self.steps_until_round <= 0 and len(self.recent) == self.recent.maxlen:
            self._round_rates = {self.current: statistics.median(self.recent)}
            self._start_probe(self.current - 1 if self.current > 0 else self.current + 1)
        return self.current if self._probing is None else self._probing

    def record(self, seconds: float, work: float = 1.0) -> None:
        """The step just run at `option()` took `seconds` for `work` units (points, rays; 1 for equal steps)."""
        index = self.option()
        self.steps_at[index] += 1
        rate = work / max(seconds, 1e-12)
        if self._probing is None:
            self.recent.append(rate)
            self.steps_until_round -= 1
            if (self.reference_rate is not None and len(self.recent) == self.recent.maxlen
                    and statistics.median(self.recent) < (1.0 - self.drop) * self.reference_rate):
                self.steps_until_round = 0  # slowed down: measure the neighbours now
            return
        if rate < self.abort * self._round_rates[self.current]:  # clearly worse: no need to finish measuring it
            self._probe_rates = [rate]
            self._end_probe()
        elif self._settle_left > 0:
            self._settle_left -= 1
        else:
            self._probe_rates.append(rate)
            if len(self._probe_rates) == self.probe_steps:
                self._end_probe()

    def _start_probe(self, index: int) -> None:
        self._probing, self._settle_left, self._probe_rates = index, self.settle_steps, []

    def _end_probe(self) -> None:
        probed = self._probing
        self._round_rates[probed] = statistics.median(self._probe_rates)
        self._probing = None
        upper = self.current + 1
        rates = self._round_rates
        if probed < self.current and upper < self.size and rates[self.current] >= self.escalate * rates[probed]:
            self._start_probe(upper)  # the step up to the current setting paid: try one more
            return
        self._decide()

    def _decide(self) -> None:
        self.rounds += 1
        rates = self._round_rates
        best = max(rates, key=lambda index: rates[index])
        if rates[best] > rates[self.current] * (1.0 + self.margin):
            self.current = best
            self.switches += 1
            self.period = self.first_period
            self.recent.clear()  # judged afresh at the new setting
        else:
            self.period = min(2 * self.period, self.max_period)
        self.reference_rate = rates[self.current]
        self.steps_until_round = self.period

    def summary(self) -> dict:
        """Steps per setting, measurement rounds and switches (for logs and benchmarks)."""
        return {"current": self.current, "steps_at": list(self.steps_at), "rounds": self.rounds,
                "switches": self.switches}


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
        """Steps per setting (by name), rounds and switches."""
        info = self.controller.summary()
        return {"current": str(self.setting), "rounds": info["rounds"], "switches": info["switches"],
                "steps_at": {str(s): n for s, n in zip(self.settings, info["steps_at"])}}


def current_setting() -> ThreadSetting:
    """The counts in force: torch's intra-op threads and our kernels' threads."""
    return ThreadSetting(torch.get_num_threads(), kernel_threads())


def apply_setting(setting: ThreadSetting) -> None:
    """Set torch's intra-op thread count and our kernels' thread count."""
    torch.set_num_threads(setting.torch)
    set_kernel_threads(setting.kernels)
