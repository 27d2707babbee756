"""Device choice and timing shared by the benchmarks: ``--device auto|cpu|cuda``, CUDA-event timing on a GPU;
CPU burners to time work on a busy machine.

On CUDA, work is asynchronous: a host clock around a call measures the launch, not the kernels. ``Clock`` records
CUDA events around the timed work and synchronises before reading them; on a CPU it is ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; a CUDA device without CUDA stops with one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"gridinr-bench: --device {name} but torch sees no CUDA device")
    return device


class Clock:
    """Seconds of one piece of work on ``device`` (CUDA events there, perf_counter elsewhere)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def time(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def time_alternating(contenders: dict[str, Callable[[], None]], repeats: int, clock: Clock) -> dict[str, float]:
    """Median milliseconds of each contender, run in turn after one warm-up call each."""
    for fn in contenders.values():
        fn()
    clock.sync()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(clock.time(fn))
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


@contextmanager
def cpu_burners(count: int) -> Iterator[None]:
    """`count` co-runners (``yes > /dev/null``, normal priority) for the duration of the block, each killed by its
    own process group when the block ends, however it ends."""
    yes = shutil.which("yes")
    command = [yes] if yes else [sys.executable, "-c", "while True: pass"]
    started = []
    try:
        for _ in range(count):
            started.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True))
        if started:
            time.sleep(0.2)  # scheduled and running before the timed work starts
        yield
    finally:
        for process in started:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
