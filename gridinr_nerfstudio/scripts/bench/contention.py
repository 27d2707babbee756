"""``gridinr-bench contention``: stage-1 training speed with 1 thread, all threads and the adaptive default, on an
idle machine and beside busy co-runners, side by side in one run.

Every cell is a fresh process training ``gridinr-bench fit``'s ``ours`` contender (the method's CPU defaults) for
``--seconds`` of step time under one thread policy: ``1`` (one thread), ``all`` (torch's default: one per core)
or ``adaptive`` (what ``ns-train`` does by default, thread_policy.py: the faster of the candidate counts, measured
as it trains, probes included in the figure). Loads: ``idle``; ``--busy N`` CPU burners (``yes > /dev/null``, at
normal priority); ``--memory`` another training process on the same volume with all threads at nice 19 (it
streams its own hash tables through the caches). The co-runners are started before a row and always killed after
it (also on Ctrl-C). Run it alone on the machine (``/work/wt/cpu gridinr-bench contention ...`` here): anything
else running is an extra co-runner.

``--before PYTHON`` adds the code before this policy to the same run, as columns ``before 1`` and ``before all``:
that interpreter (e.g. a venv of an older checkout, ``/work/main/.venv/bin/python`` before the merge) runs its own
``gridinr-bench fit --contenders ours --threads 1|N`` for the same seconds, beside the same co-runners: fixed
thread counts and, there, OpenMP's static split of every kernel loop. ``--before-policies 1,all,adaptive`` also
runs its adaptive policy (``--threads adaptive``): an older controller against this one, cell beside cell.

``--phases`` also reports the median milliseconds of each phase of a step (batch making, forward, backward,
optimizer) per cell, which shows which parallel regions stall when a thread loses its core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gridinr_nerfstudio.scripts.bench.timing import cpu_burners

POLICIES = ("1", "all", "kernels", "adaptive")
PHASES = ("batch", "forward", "backward", "optimizer")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "contention",
        help="training points/s with 1 thread, all threads and the adaptive default, idle and beside co-runners",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=None, help="volume (default: the built-in one)")
    parser.add_argument("--seconds", type=float, default=10.0, help="training step time per cell")
    parser.add_argument("--busy", default="1", help="comma-separated numbers of CPU burners, one row each (0: idle)")
    parser.add_argument("--memory", action="store_true",
                        help="also a row beside another training process at nice 19 (all threads)")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help=f"comma-separated thread policies, one column each: {', '.join(POLICIES)}, or "
                        "TORCH:KERNELS thread counts")
    parser.add_argument("--rounds", type=int, default=1, help="cells per (load, policy), alternated; the median counts")
    parser.add_argument("--phases", action="store_true", help="also time the phases of each step")
    parser.add_argument("--prefetch", choices=("auto", "on", "off"), default="auto",
                        help="batches made one step ahead in a thread (the data manager's default: auto, on)")
    parser.add_argument("--before", default=None, metavar="PYTHON",
                        help="also measure `PYTHON -m gridinr_nerfstudio.scripts.bench.cli fit` (an older checkout's "
                        "venv) with 1 and all threads, as columns 'before 1' and 'before all'")
    parser.add_argument("--before-policies", default="1,all",
                        help="the --before code's policies: comma-separated 1, all, adaptive (its --threads)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the measured processes (e.g. OMP_WAIT_POLICY=PASSIVE); repeatable")
    return parser


def loads_of(args: argparse.Namespace) -> list[tuple[str, int, bool]]:
    """(label, burners, memory co-runner) per row: idle first, then each ``--busy`` count, then ``--memory``."""
    rows = [("idle", 0, False)]
    for text in args.busy.split(","):
        busy = int(text)
        if busy > 0:
            rows.append((f"{busy} busy", busy, False))
    if args.memory:
        rows.append(("memory co-runner", 0, True))
    return rows


def worker_command(data: Path | None, policy: str, seconds: float, phases: bool, prefetch: str) -> list[str]:
    spec = {"data": None if data is None else str(data), "policy": policy, "seconds": seconds, "phases": phases,
            "prefetch": prefetch}
    return [sys.executable, "-m", "gridinr_nerfstudio.scripts.bench.contention", "--worker", json.dumps(spec)]


@contextmanager
def co_runners(busy: int, memory: bool, data: Path | None, env: dict) -> Iterator[None]:
    """Start `busy` CPU burners (timing.cpu_burners) and optionally a nice-19 training process; kill each of them
    (by its process group, which only it is in) when the block ends, however it ends."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below on a kill too
    trainer = None
    try:
        with cpu_burners(busy):
            if memory:
                command = worker_command(data, "all", float("inf"), False, "off")
                trainer = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True,
                                           env=env, preexec_fn=lambda: os.nice(19))
                if trainer.stdout.readline().strip() != "ready":  # it trains from here on
                    raise RuntimeError("gridinr-bench contention: the memory co-runner did not start")
            time.sleep(0.5)
            yield
    finally:
        if trainer is not None:
            try:
                os.killpg(trainer.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            trainer.wait()
        signal.signal(signal.SIGTERM, previous)


def measure(args: argparse.Namespace, policy: str, env: dict) -> dict:
    """One cell: a fresh process trains `args.seconds` under `policy` and reports what it did."""
    command = worker_command(args.data, policy, args.seconds, args.phases, args.prefetch)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"gridinr-bench contention: a training process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_before(args: argparse.Namespace, threads: str, env: dict) -> dict:
    """One cell of the code before: ``--before``'s own ``gridinr-bench fit`` of ``ours`` with ``--threads threads``
    (a count, or ``adaptive``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "fit.json"
        command = [args.before, "-m", "gridinr_nerfstudio.scripts.bench.cli", "fit", "--contenders", "ours",
                   "--device", "cpu", "--threads", threads, "--seconds", f"{args.seconds:g}", "--json", str(output)]
        if args.data is not None:
            command += ["--data", str(args.data)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
        if result.returncode != 0 or not output.is_file():
            raise RuntimeError(f"gridinr-bench contention: --before {args.before} failed:\n{result.stderr[-3000:]}")
        ours = json.loads(output.read_text())["ours"]
    return {"points_per_s": ours["train_points_per_s"], "steps": ours["iterations"]}


def run(args: argparse.Namespace) -> dict:
    import torch

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for policy in policies:
        if policy not in POLICIES and not (policy.count(":") == 1 and policy.replace(":", "").isdigit()):
            raise SystemExit(f"gridinr-bench contention: unknown policy {policy!r} (known: {', '.join(POLICIES)}, "
                             "or TORCH:KERNELS thread counts)")
    env = dict(os.environ)
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    cores = torch.get_num_threads()
    if args.before is not None:
        if shutil.which(args.before) is None:
            raise SystemExit(f"gridinr-bench contention: --before {args.before}: no such interpreter")
        args.before = str(Path(shutil.which(args.before)).absolute())  # the cells run in a temporary folder
        before = {"1": "before:1", "all": f"before:{cores}", "adaptive": "before:adaptive"}
        for name in args.before_policies.split(","):
            if name.strip() not in before:
                raise SystemExit(f"gridinr-bench contention: unknown --before-policies entry {name!r} "
                                 "(known: 1, all, adaptive)")
            if before[name.strip()] not in policies:
                policies.append(before[name.strip()])
    print(f"volume {args.data or 'builtin-default'}; {args.seconds:g} s of steps per cell, {args.rounds} round(s); "
          f"{cores} threads = all; prefetch {args.prefetch}; extra environment {args.env or 'none'}", flush=True)
    rows: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    for label, busy, memory in loads_of(args):
        samples: dict[str, list[dict]] = {policy: [] for policy in policies}
        with co_runners(busy, memory, args.data, env):
            for _ in range(args.rounds):
                for policy in policies:
                    if policy.startswith("before:"):
                        samples[policy].append(measure_before(args, policy.split(":")[1], env))
                    else:
                        samples[policy].append(measure(args, policy, env))
        rows[label] = {}
        for policy, cells in samples.items():
            best = sorted(cells, key=lambda c: c["points_per_s"])[len(cells) // 2]  # the median cell
            rows[label][policy] = {**best, "points_per_s_all": [c["points_per_s"] for c in cells]}
        paired[label] = paired_ratios(samples) if "adaptive" in samples else {}
        print_row(label, rows[label], policies, args.phases, paired[label])
    return {"rows": rows, "adaptive_per_round": paired,
            "config": {"data": str(args.data or "builtin-default"), "seconds": args.seconds, "rounds": args.rounds,
                       "threads_all": cores, "env": args.env, "policies": policies, "prefetch": args.prefetch}}


def paired_ratios(samples: dict[str, list[dict]]) -> dict[str, dict]:
    """Adaptive's points/s over each other policy's in the same round, and their median over the rounds.

    Why: the speed of one setting varies by 20-50% from process to process on a shared machine (which core the
    co-runner shares, slow phases lasting seconds); cells of one round run back to back, so their ratio cancels
    much of that drift, and the median of the per-round ratios is the figure to compare with 1.
    """
    ratios = {}
    for policy, cells in samples.items():
        if policy == "adaptive":
            continue
        per_round = [a["points_per_s"] / c["points_per_s"] for a, c in zip(samples["adaptive"], cells)]
        ratios[policy] = {"median": statistics.median(per_round), "per_round": per_round}
    return ratios


def policy_label(policy: str) -> str:
    if policy.startswith("before:"):
        return {"before:1": "before 1", "before:adaptive": "before adaptive"}.get(policy, "before all")
    return {"1": "1 thread", "all": "all threads", "kernels": "kernels on all", "adaptive": "adaptive"}.get(
        policy, f"torch:kernels {policy}")


def print_row(label: str, row: dict, policies: list[str], phases: bool, paired: dict | None = None) -> None:
    """One load: M points/s per policy and the adaptive default against the better fixed count."""
    cells = "".join(f"{policy_label(p)} {row[p]['points_per_s'] / 1e6:6.3f}   " for p in policies)
    line = f"{label:<18} M points/s: {cells}"
    fixed = [row[p]["points_per_s"] for p in policies if p != "adaptive" and not p.startswith("before:")]
    if "adaptive" in row and fixed:
        steps = row["adaptive"]["threads"]["steps_at"]
        line += (f"adaptive/best fixed {row['adaptive']['points_per_s'] / max(fixed):.2f} "
                 f"(steps: {', '.join(f'{setting} {n}' for setting, n in steps.items())})")
    if paired and len(next(iter(paired.values()))["per_round"]) > 1:
        line += "; adaptive/policy, median of the rounds' ratios: " + ", ".join(
            f"{policy_label(p)} {paired[p]['median']:.2f}" for p in paired)
    if "adaptive" in row and "before:1" in row:
        before = {p: row[p]["points_per_s"] for p in policies if p.startswith("before:")}
        line += f"; adaptive/before 1 thread {row['adaptive']['points_per_s'] / row['before:1']['points_per_s']:.2f}"
        line += f", adaptive/before best {row['adaptive']['points_per_s'] / max(before.values()):.2f}"
    print(line, flush=True)
    if phases:
        for policy in policies:
            ms = row[policy].get("phase_ms", {})
            print(f"{'':<18} {policy_label(policy):<12} ms per step: "
                  + ", ".join(f"{phase} {ms[phase]:.1f}" for phase in PHASES if phase in ms), flush=True)


def thread_policy_of(policy: str, cores: int):
    """``1``: one thread; ``all``: torch and our kernels on all threads (torch's default); ``kernels``: our kernels on
    all, torch's ops on one; ``T:K`` torch T, kernels K; ``adaptive``: the ladder of these, measured (thread_policy.py)."""
    from gridinr_nerfstudio.thread_policy import AdaptiveThreads, ThreadLadderController, ThreadSetting

    if policy == "adaptive":
        return AdaptiveThreads()
    fixed = {"1": ThreadSetting(1, 1), "all": ThreadSetting(cores, cores), "kernels": ThreadSetting(1, cores)}
    setting = fixed.get(policy) or ThreadSetting(*(int(x) for x in policy.split(":")))
    return AdaptiveThreads([setting], ThreadLadderController(1))


def work(spec: dict) -> dict:
    """The measured process: train ``gridinr-bench fit``'s ``ours`` for ``seconds`` of steps under ``policy``."""
    import torch

    from gridinr_nerfstudio.scripts.bench import fit
    
    parser = argparse.ArgumentParser()
    fit.add_parser(parser.add_subparsers())
    argv = ["fit", "--contenders", "ours", "--device", "cpu", "--prefetch", spec["prefetch"]]
    args = parser.parse_args(argv + (["--data", spec["data"]] if spec["data"] else []))
    threads = thread_policy_of(spec["policy"], torch.get_num_threads())
    threads.apply_now()  # before the model and its warm-up are built
    contender = fit.setup_contenders(args).contenders[0]
    contender.threads = threads  # the policy of this cell times and sets every step
    print("ready", flush=True)
    phase_ms: dict[str, list[float]] = {phase: [] for phase in PHASES}
    seconds, steps = 0.0, 0
    while seconds < spec["seconds"]:
        marks = [time.perf_counter()]

        def mark(phase: str) -> None:
            if spec["phases"]:
                marks.append(time.perf_counter())
                phase_ms[phase].append((marks[-1] - marks[-2]) * 1e3)

        seconds += contender.step(args.batch, min(seconds / spec["seconds"], 1.0), mark)
        steps += 1
    result = {"points_per_s": steps * args.batch / seconds, "steps": steps, "seconds": seconds, "batch": args.batch,
              "threads": threads.summary()}
    if spec["phases"]:
        result["phase_ms"] = {phase: statistics.median(ms) for phase, ms in phase_ms.items() if ms}
    return result


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    print(json.dumps(work(json.loads(sys.argv[2]))), flush=True)
