"""``gridinr-bench memory``: peak anonymous memory of a short stage-1 run on a small and a large volume.

The process's own memory (``RssAnon`` in ``/proc/PID/status``: heap, tensors, not the page cache of the memmapped
file) must not grow with the volume. Two uint8 volumes are generated in a temporary folder (default 0.5 GiB and
4 GiB; zeros except a ball in a central block) in each container of ``--formats``: an Open SciVis raw file (sparse,
memory-mapped), an HDF5 file and a Zarr v3 store (both chunked, 128^3 chunks, gzip and zstd; only the chunks
holding the ball are written, the rest read as the fill value, so the chunk-by-chunk reads still visit every
chunk), then the same short ``ns-train gridinr-fit`` run
(reference renderings, voxel-centre + continuous batches, a checkpoint) runs on each in a child process with
preloading off (``preload_max_bytes 0`` for the datamanager and the reference renderings). The parent samples
RssAnon of the child and its descendants every ``--interval`` seconds and prints both peaks and their difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GIB = 1 << 30
FORMATS = ("raw", "hdf5", "zarr")
BENCH_CHUNK = 128
"""Chunk side of the HDF5 and Zarr volumes."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "memory",
        help="peak RssAnon of a short stage-1 run on a small and a large generated volume, preloading off",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes-gib", default="0.5,4", help="comma-separated volume sizes in GiB (uint8 cubes)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated containers ({', '.join(FORMATS)})")
    parser.add_argument("--iterations", type=int, default=20, help="training iterations of each run")
    parser.add_argument("--batch", type=int, default=1 << 16, help="points per training batch")
    parser.add_argument("--image-size", type=int, default=64, help="reference rendering size")
    parser.add_argument("--interval", type=float, default=0.05, help="RssAnon sampling interval (s)")
    parser.add_argument("--workdir", type=Path, default=None, help="where volumes and runs go (default: a temp dir)")
    return parser


def write_sparse_volume(folder: Path, side: int) -> Path:
    """A side^3 uint8 Open SciVis raw file: a sparse file of zeros plus a ball in the central (side/4)^3 block."""
    path = folder / f"membench_{side}x{side}x{side}_uint8.raw"
    block = max(2, side // 4)
    start = (side - block) // 2
    axis = np.linspace(-1.0, 1.0, block, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    with open(path, "wb") as handle:
        handle.truncate(side**3)
        for k, z in enumerate(axis):
            radius = np.sqrt(xx**2 + yy**2 + z**2)
            row = np.clip(255.0 * (1.0 - radius), 0, 255).astype(np.uint8)
            for j in range(block):
                handle.seek(((start + k) * side + start + j) * side + start)
                handle.write(row[j].tobytes())
    return path


def ball_block(side: int) -> tuple[int, np.ndarray]:
    """(start, block) of the central (side/4)^3 block holding the ball, as write_sparse_volume writes it."""
    block = max(2, side // 4)
    axis = np.linspace(-1.0, 1.0, block, dtype=np.float32)
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    values = np.clip(255.0 * (1.0 - np.sqrt(xx**2 + yy**2 + zz**2)), 0, 255).astype(np.uint8)
    return (side - block) // 2, values


def write_chunked_volume(folder: Path, side: int, container: str) -> Path:
    """The same volume as write_sparse_volume as a chunked HDF5 file (gzip) or Zarr v3 store (zstd); chunks that
    hold no part of the ball are never written (they read as the fill value 0)."""
    start, values = ball_block(side)
    stop = start + values.shape[0]
    chunks = (min(BENCH_CHUNK, side),) * 3
    if container == "hdf5":
        import h5py

        path = folder / f"membench_{side}.h5"
        with h5py.File(path, "w") as handle:
            dataset = handle.create_dataset("value", shape=(side,) * 3, dtype="u1", chunks=chunks, compression="gzip")
            dataset[start:stop, start:stop, start:stop] = values
        return path
    import zarr

    path = folder / f"membench_{side}.zarr"
    array = zarr.create_array(path, shape=(side,) * 3, dtype="u1", chunks=chunks, fill_value=0)
    array[start:stop, start:stop, start:stop] = values
    return path


def rss_anon_bytes(pid: int) -> int:
    """RssAnon of one process (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc/*/stat parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def peak_rss_anon(command: list[str], interval: float, log: Path, env: dict | None = None) -> tuple[int, int, float]:
    """(peak summed RssAnon of the command's process tree, exit status, seconds)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = 0
        while process.poll() is None:
            peak = max(peak, sum(rss_anon_bytes(p) for p in descendants(process.pid)))
            time.sleep(interval)
    return peak, process.returncode, time.perf_counter() - started


def child_run(spec: dict) -> None:
    """One short gridinr-fit run with preloading off (runs in the measured child process)."""
    from nerfstudio.scripts.train import main as ns_train_main

    from gridinr_nerfstudio.gridinr_config import fit_trainer_config

    config = fit_trainer_config()
    config.output_dir, config.timestamp, config.vis = Path(spec["output"]), "membench", "tensorboard"
    iterations = spec["iterations"]
    config.max_num_iterations = config.steps_per_save = iterations
    config.steps_per_eval_image = config.steps_per_eval_batch = config.steps_per_eval_all_images = iterations + 1
    config.final_evaluation = False  # training alone (the final evaluation's volume PSNR reads every voxel)
    datamanager = config.pipeline.datamanager
    datamanager.batch_size, datamanager.preload_max_bytes = spec["batch"], 0
    dataparser = datamanager.dataparser
    dataparser.data, dataparser.preload_max_bytes = Path(spec["data"]), 0
    dataparser.image_size, dataparser.num_train_views, dataparser.num_eval_views = spec["image_size"], 4, 2
    dataparser.cache_dir = Path(spec["output"]) / "references"
    ns_train_main(config)


def run(args: argparse.Namespace) -> dict:
    sizes = [float(s) for s in args.sizes_gib.split(",") if s.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SystemExit(f"--formats: unknown {', '.join(unknown)} (known: {', '.join(FORMATS)})")
    workdir = Path(tempfile.mkdtemp(prefix="gridinr-membench-")) if args.workdir is None else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    sides = [max(8, round((size * GIB) ** (1 / 3))) for size in sizes]
    written = len(formats) * sum((side // 4) ** 3 for side in sides)  # only the central blocks take disk space
    free = shutil.disk_usage(workdir).free
    if free < written + GIB:
        raise SystemExit(f"{workdir}: {free / GIB:.1f} GiB free, need {(written + GIB) / GIB:.1f} GiB")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    results: dict = {"runs": []}
    try:
        for container, (size, side) in ((c, s) for c in formats for s in zip(sizes, sides)):
            folder = workdir / f"{container}{side}"
            folder.mkdir(exist_ok=True)
            data = write_sparse_volume(folder, side) if container == "raw" else \
                write_chunked_volume(folder, side, container)
            spec = {"data": str(data), "output": str(folder / "run"), "iterations": args.iterations,
                    "batch": args.batch, "image_size": args.image_size}
            command = [sys.executable, "-m", "gridinr_nerfstudio.scripts.bench.memory", json.dumps(spec)]
            peak, status, seconds = peak_rss_anon(command, args.interval, folder / "run.log", env)
            if status != 0:
                tail = (folder / "run.log").read_text()[-2000:]
                raise SystemExit(f"run on {data} failed (exit {status}):\n{tail}")
            row = {"format": container, "size_gib": side**3 / GIB, "dims": [side] * 3, "peak_rss_anon_gib": peak / GIB,
                   "seconds": seconds}
            results["runs"].append(row)
            print(f"{container} {side}^3 uint8 ({row['size_gib']:.2f} GiB): peak RssAnon "
                  f"{row['peak_rss_anon_gib']:.2f} GiB ({seconds:.0f} s)", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["difference_by_format_gib"] = {}
    for container in formats:
        peaks = [row["peak_rss_anon_gib"] for row in results["runs"] if row["format"] == container]
        results["difference_by_format_gib"][container] = max(peaks) - min(peaks)
        print(f"{container}: peak RssAnon difference {max(peaks) - min(peaks):.2f} GiB (target: at most 0.5 GiB)")
    peaks = [row["peak_rss_anon_gib"] for row in results["runs"]]
    results["difference_gib"] = max(peaks) - min(peaks)
    return results


def _child_main(spec_json: str) -> None:
    child_run(json.loads(spec_json))


if __name__ == "__main__":
    _child_main(sys.argv[1])
