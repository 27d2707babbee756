"""``gridinr-bench scale``: stage-1 data parallelism, 1 rank against N ranks at the same global batch and steps.

For each rank count, `torchrun --standalone --nproc-per-node R` runs the real gridinr-fit pipeline (the method's
field, optimizers and schedule, DDP and the sharded sampler) for ``--iterations`` steps of the same global batch
(``--batch`` points, split over the ranks), then measures on rank 0:

- points/s: global batch x steps / seconds of the training steps (the first ``--warmup`` excluded);
- the share of a step spent in DDP's all-reduce: extra steps timed with and without gradient averaging (DDP's
  ``no_sync``), alternated in blocks, side by side: 1 - t(no_sync) / t(sync);
- the all-reduce itself: one tensor of the model's size (the gradient bytes every step moves) all-reduced
  ``--allreduce-repeats`` times: ms and algorithmic bandwidth (bytes / time);
- the volume PSNR after the training steps (every voxel, the slabs split over the ranks).

The ranks share the machine: on a 2-core CPU two ranks get one core each, which this reports as it is. GPU rows
need a machine with several GPUs (``--device cuda``, NCCL).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "scale",
        help="stage-1 data parallelism under torchrun: points/s, all-reduce share and volume PSNR per rank count",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser)
    return parser


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="builtin-default", help="volume (any format gridinr-fit reads)")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    parser.add_argument("--iterations", type=int, default=200, help="training steps of every rank count")
    parser.add_argument("--batch", type=int, default=0, help="global points per step (0: the device's default)")
    parser.add_argument("--log2-hashmap-size", type=int, default=0,
                        help="hash-table entries per level, log2 (0: the method's default, 2^21): the all-reduced bytes "
                             "grow with it")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of points/s")
    parser.add_argument("--timing-steps", type=int, default=20, help="steps timed with and without all-reduce")
    parser.add_argument("--allreduce-repeats", type=int, default=10, help="all-reduces of the model's size timed")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where ranks train")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temporary folder)")


def run(args: argparse.Namespace) -> dict:
    """Run every rank count under torchrun, print a table, return {ranks: figures}."""
    try:
        counts = [int(count) for count in str(args.ranks).split(",") if count.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"gridinr-bench scale: error: --ranks {args.ranks!r}: expected rank counts such as 1,2")
    if args.iterations <= args.warmup:
        raise SystemExit(f"gridinr-bench scale: error: --iterations {args.iterations} leaves no step after "
                         f"--warmup {args.warmup} to time")
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="gridinr-scale-") as scratch:
            return _run_counts(args, counts, Path(scratch))
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    return _run_counts(args, counts, Path(args.workdir))


def _run_counts(args: argparse.Namespace, counts: list, workdir: Path) -> dict:
    results: dict = {}
    for count in counts:
        out = workdir / f"ranks{count}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(count),
                   "-m", "gridinr_nerfstudio.scripts.bench.scale", "--worker", "--out", str(out),
                   "--data", str(args.data), "--iterations", str(args.iterations), "--batch", str(args.batch),
                   "--log2-hashmap-size", str(args.log2_hashmap_size), "--warmup", str(args.warmup), "--timing-steps", str(args.timing_steps),
                   "--allreduce-repeats", str(args.allreduce_repeats), "--device", args.device,
                   "--workdir", str(workdir / f"run{count}")]
        print(f"== {count} rank(s): {' '.join(command[1:6])} ...", flush=True)
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            raise SystemExit(f"gridinr-bench scale: {count} rank(s) failed:\n{finished.stderr[-3000:]}")
        results[str(count)] = json.loads(out.read_text())
    print_table(results)
    return results


def print_table(results: dict) -> None:
    base = results.get("1")
    print(f"{'ranks':>5} {'threads':>7} {'batch/rank':>10} {'step ms':>8} {'points/s':>10} {'vs 1':>6} {'all-reduce':>10} "
          f"{'AR ms':>7} {'AR MB':>6} {'AR GB/s':>7} {'PSNR dB':>8}")
    for count, row in results.items():
        speed = row["points_per_s"] / base["points_per_s"] if base else float("nan")
        print(f"{count:>5} {row['threads']:>7} {row['batch_per_rank']:>10} {row['step_ms']:>8.1f} {row['points_per_s'] / 1e6:>9.3f}M "
              f"{speed:>6.2f} {row['allreduce_share']:>10.1%} {row['allreduce_ms']:>7.1f} "
              f"{row['allreduce_bytes'] / 1e6:>6.1f} {row['allreduce_gbps']:>7.2f} {row['volume_psnr']:>8.2f}")
    first = next(iter(results.values()))
    print(f"device {first['device']}, threads per rank as shown (the machine's cores shared by its ranks), global "
          f"batch {first['global_batch']}", flush=True)


def _trainer(args, place, workdir: Path):
    """The gridinr-fit trainer of this rank, set up as ns-train sets it up (tensorboard only, no viewer)."""
    import torch

    from gridinr_nerfstudio.device_defaults import resolve
    from gridinr_nerfstudio.gridinr_config import fit_trainer_config

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    config = fit_trainer_config()
    config.machine.device_type = device
    config.output_dir, config.timestamp, config.vis = workdir, "scale", "tensorboard"
    config.max_num_iterations = args.iterations
    config.steps_per_save = config.steps_per_eval_all_images = args.iterations + 1
    config.steps_per_eval_batch = config.steps_per_eval_image = args.iterations + 1
    dataparser = config.pipeline.datamanager.dataparser
    dataparser.data = Path(args.data)
    dataparser.num_train_views, dataparser.num_eval_views, dataparser.image_size = 2, 2, 32
    dataparser.cache_dir = workdir / "references"
    global_batch = resolve(args.batch, "batch_size", device)
    if global_batch % place.world_size:
        raise SystemExit(f"gridinr-bench scale: --batch {global_batch} does not split over {place.world_size} ranks")
    config.pipeline.datamanager.batch_size = global_batch // place.world_size
    if args.log2_hashmap_size > 0:
        config.pipeline.model.field.log2_hashmap_size = args.log2_hashmap_size
    torch.manual_seed(0)
    trainer = config.setup(local_rank=place.local_rank, world_size=place.world_size)
    trainer.setup()
    return trainer, global_batch


def _step(trainer, step: int) -> None:
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    trainer.train_iteration(step)
    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args) -> None:
    """One rank under torchrun: train, time, measure; rank 0 writes the JSON."""
    import contextlib

    import torch
    import torch.distributed as dist

    from gridinr_nerfstudio import distributed

    place = distributed.torchrun_rank()
    if place is None:
        raise SystemExit("gridinr-bench scale --worker runs under torchrun")
    device_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    distributed.start(place, device_type)
    try:
        trainer, global_batch = _trainer(args, place, Path(args.workdir))
        trainer.pipeline.train()
        distributed.barrier()
        started = None
        for step in range(args.iterations):
            if step == args.warmup:
                _synchronize(trainer.device)
                distributed.barrier()
                started = time.perf_counter()
            _step(trainer, step)
        _synchronize(trainer.device)
        distributed.barrier()
        measured_steps = args.iterations - args.warmup
        seconds = time.perf_counter() - started if started is not None else float("nan")
        psnr_per_step = trainer.pipeline.model.volume_psnr_per_step(split=True)
        psnr = sum(psnr_per_step.values()) / len(psnr_per_step)

        # Steps with and without gradient averaging, alternated in blocks of 5 (the ranks diverge from here on).
        model = trainer.pipeline._model
        with_sync, without_sync = [], []
        step = args.iterations
        for block in range(max(1, args.timing_steps // 5)):
            for sync, times in ((True, with_sync), (False, without_sync)):
                context = contextlib.nullcontext() if sync or place.world_size == 1 else model.no_sync()
                with context:
                    for _ in range(5):
                        _synchronize(trainer.device)
                        distributed.barrier()
                        begin = time.perf_counter()
                        trainer.train_iteration(step)
                        _synchronize(trainer.device)
                        times.append(time.perf_counter() - begin)
                        step += 1
        synced, local = sorted(with_sync)[len(with_sync) // 2], sorted(without_sync)[len(without_sync) // 2]

        parameters = sum(p.numel() for p in trainer.pipeline.model.parameters() if p.requires_grad)
        allreduce_ms, allreduce_gbps = 0.0, float("nan")
        if place.world_size > 1:
            payload = torch.zeros(parameters, device=trainer.device)
            dist.all_reduce(payload)
            _synchronize(trainer.device)
            begin = time.perf_counter()
            for _ in range(args.allreduce_repeats):
                dist.all_reduce(payload)
            _synchronize(trainer.device)
            allreduce_ms = 1000 * (time.perf_counter() - begin) / args.allreduce_repeats
            allreduce_gbps = 4 * parameters / (allreduce_ms / 1000) / 1e9
        if place.rank == 0:
            row = {
                "ranks": place.world_size, "device": trainer.device, "threads": torch.get_num_threads(),
                "global_batch": global_batch, "batch_per_rank": global_batch // place.world_size,
                "iterations": args.iterations, "step_ms": 1000 * seconds / max(measured_steps, 1),
                "points_per_s": global_batch * measured_steps / seconds,
                "sync_step_ms": 1000 * synced, "local_step_ms": 1000 * local,
                "allreduce_share": max(0.0, 1.0 - local / synced) if place.world_size > 1 else 0.0,
                "allreduce_ms": allreduce_ms, "allreduce_bytes": 4 * parameters, "allreduce_gbps": allreduce_gbps,
                "volume_psnr": psnr, "parameters": parameters,
            }
            Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    finally:
        distributed.stop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gridinr_nerfstudio.scripts.bench.scale")
    add_options(parser)
    parser.add_argument("--worker", action="store_true", help="(internal) one rank under torchrun")
    parser.add_argument("--out", type=Path, help="(internal) where rank 0 writes its figures")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
