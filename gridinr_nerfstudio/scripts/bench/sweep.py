"""``gridinr-bench sweep``: stage-1 settings side by side at one time budget, on several volumes.

Each variant changes a few settings of the ``gridinr-fit`` defaults (field sizes, decoder, batch, learning rate,
continuous fraction). On each volume every variant trains in the same process with its own clock, its own
optimizers (the method's, learning rate decaying log-linearly over the budget) and its own sampler with the same
seed; the variant that is behind in its own time steps next, so load from other processes hits all of them
alike (``gridinr-bench fit``'s protocol, with N contenders). With one torch thread (the default) the budget is
CPU time of the training thread (``time.thread_time``), not wall time: on a machine shared with other work a
variant then gets the steps it would get alone on one core, whatever the load (with more threads: wall time). Volume PSNR at native resolution is measured
outside the clocks. ``--markdown`` writes the table (one row per variant, one column per volume, the mean and
the worst margin to the best variant per volume) for docs/.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from gridinr_nerfstudio.data.default_volume import open_data
from gridinr_nerfstudio.data.volume_io import scene_aabb
from gridinr_nerfstudio.device_defaults import resolve
from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings
from gridinr_nerfstudio.gridinr_config import fit_trainer_config
from gridinr_nerfstudio.safe_write import write_text
from gridinr_nerfstudio.scripts.bench.fit import Contender
from gridinr_nerfstudio.scripts.bench.timing import Clock
from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler
from gridinr_nerfstudio.stages.fit.error_sampling import ErrorWeightedSampler
from gridinr_nerfstudio.stages.fit.model import volume_psnr

# name -> overrides of the base: the field's class defaults (instant-ngp's 16 levels x 2 features, 2^21 table,
# MLP 2 x 64, whatever the machine) with gridinr-fit's batch, learning rates and sampling. Overrides are field
# settings by name, plus "batch", "lr", "lr_final", "continuous_fraction" and "coarse_to_fine" (the share of the
# time budget over which the levels are switched on from coarse to fine, as the field's `coarse_to_fine` does with steps)
# and "error_weighted" (the share of each batch drawn by `ErrorWeightedSampler`, as the datamanager's
# `error_weighted_fraction` does).
COMPACT = {"num_levels": 8, "features_per_level": 1, "num_hidden_layers": 0}
CPU_DEFAULT = {"num_levels": 8, "features_per_level": 2, "num_hidden_layers": 1, "hidden_dim": 16}
# ("cpu_default" below: the field of the first session-4 decision, before its coarse-to-fine schedule was added.)
VARIANTS: dict[str, dict] = {
    "16x2_mlp2x64": {},  # the defaults before this sweep
    "compact_8x1_linear": COMPACT,
    "8x2": {"num_levels": 8, "features_per_level": 2},
    "16x1": {"features_per_level": 1},
    "table_2^19": {"log2_hashmap_size": 19},
    "mlp_1x32": {"hidden_dim": 32, "num_hidden_layers": 1},
    "batch_2^14": {"batch": 1 << 14},
    "batch_2^18": {"batch": 1 << 18},
    "lr_3e-2": {"lr": 3e-2},
    "lr_3e-3": {"lr": 3e-3},
    "continuous_0": {"continuous_fraction": 0.0},
    "continuous_0.5": {"continuous_fraction": 0.5},
    # Changes of the compact field (the CPU default since the first sweep), one at a time.
    "compact_8x2_linear": {**COMPACT, "features_per_level": 2},
    "compact_16x1_linear": {**COMPACT, "num_levels": 16},
    "compact_12x1_linear": {**COMPACT, "num_levels": 12},
    "compact_table_2^22": {**COMPACT, "log2_hashmap_size": 22},
    "compact_table_2^19": {**COMPACT, "log2_hashmap_size": 19},
    "compact_batch_2^15": {**COMPACT, "batch": 1 << 15},
    "compact_batch_2^17": {**COMPACT, "batch": 1 << 17},
    "compact_lr_3e-2": {**COMPACT, "lr": 3e-2},
    "compact_continuous_0": {**COMPACT, "continuous_fraction": 0.0},
    "compact_mlp_1x16": {**COMPACT, "hidden_dim": 16, "num_hidden_layers": 1},
    # The CPU default since session 4 (8 x 2, hidden 16) and changes of it.
    "cpu_default": CPU_DEFAULT,
    "cpu_default_coarse_to_fine_0.2": {**CPU_DEFAULT, "coarse_to_fine": 0.2},
    "cpu_default_coarse_to_fine_0.5": {**CPU_DEFAULT, "coarse_to_fine": 0.5},
    "cpu_default_error_weighted_0.25": {**CPU_DEFAULT, "error_weighted": 0.25},
    "cpu_default_error_weighted_0.5": {**CPU_DEFAULT, "error_weighted": 0.5},
    "cpu_default_coarse_to_fine_0.1": {**CPU_DEFAULT, "coarse_to_fine": 0.1},
    "cpu_default_coarse_to_fine_0.2_error_weighted_0.25": {**CPU_DEFAULT, "coarse_to_fine": 0.2, "error_weighted": 0.25},
    "compact_8x2_mlp_1x16": {**COMPACT, "features_per_level": 2, "hidden_dim": 16, "num_hidden_layers": 1},
    "compact_8x2_mlp_1x32": {**COMPACT, "features_per_level": 2, "hidden_dim": 32, "num_hidden_layers": 1},
    "compact_8x4_mlp_1x16": {**COMPACT, "features_per_level": 4, "hidden_dim": 16, "num_hidden_layers": 1},
    "16x2_mlp_1x16": {"hidden_dim": 16, "num_hidden_layers": 1},
}
TRAINING_KEYS = ("batch", "lr", "lr_final", "continuous_fraction", "coarse_to_fine", "error_weighted")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sweep", help="stage-1 settings side by side at one time budget on several volumes", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", action="append", required=True,
                        help="a volume (repeat for several; 'builtin-default' is the built-in one)")
    parser.add_argument("--seconds", type=float, default=60.0, help="training time per variant and volume")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see gridinr-bench fit)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table as Markdown to this file")
    return parser


def sweep_volume(data: str, names: list[str], seconds: float) -> dict:
    """Train every variant on one volume for `seconds` of its own time; their volume PSNR and step counts."""
    volume = open_data(data)
    aabb = scene_aabb(volume)
    method = fit_trainer_config()
    base_field = VolumeFieldSettings()
    datamanager = method.pipeline.datamanager
    contenders, batches = [], {}
    torch.manual_seed(0)
    for name in names:
        overrides = VARIANTS[name]
        settings = replace(base_field, **{k: v for k, v in overrides.items() if k not in TRAINING_KEYS})
        variant_method = fit_trainer_config()
        lr_finals = {}
        for group_name, group in variant_method.optimizers.items():
            if "lr" in overrides:
                group["optimizer"].lr = overrides["lr"]
            lr_finals[group_name] = overrides.get("lr_final", group["scheduler"].lr_final)
        sampler = VolumePointSampler(volume, aabb, sampling=datamanager.sampling, subsample_factor=1,
                                     continuous_fraction=overrides.get("continuous_fraction", datamanager.continuous_fraction))
        if overrides.get("error_weighted", 0.0) > 0:
            sampler = ErrorWeightedSampler(sampler, overrides["error_weighted"])
        contenders.append(Contender(name, VolumeField(aabb, settings), variant_method, lr_finals, None, sampler, aabb,
                                    Clock(torch.device("cpu")), coarse_to_fine=overrides.get("coarse_to_fine", 0.0)))
        batches[name] = overrides.get("batch", resolve(datamanager.batch_size, "batch_size", "cpu"))
    started = time.perf_counter()
    cpu = {c.name: 0.0 for c in contenders}  # CPU seconds of this thread (see module docstring)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    while True:
        pending = [c for c in contenders if cpu[c.name] < seconds]
        if not pending:
            break
        contender = min(pending, key=lambda c: cpu[c.name])
        progress = min(cpu[contender.name] / seconds, 1.0)
        tick = clock()
        contender.step(batches[contender.name], progress)
        cpu[contender.name] += clock() - tick
    wall = time.perf_counter() - started
    rows = {}
    for contender in contenders:
        rows[contender.name] = {
            "volume_psnr_db": volume_psnr(contender.model.eval().forward_unit, volume),
            "iterations": contender.iterations,
            "train_points_per_s": contender.iterations * batches[contender.name] / cpu[contender.name],
        }
    print(f"{volume.info.name} {volume.info.dims}: {len(names)} variants x {seconds:g} s in {wall:.0f} s wall", flush=True)
    for name, row in rows.items():
        print(f"  {name:<22}{row['volume_psnr_db']:>8.2f} dB{row['iterations']:>8d} steps", flush=True)
    return rows


def run(args: argparse.Namespace) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    volumes = {str(data): sweep_volume(data, names, args.seconds) for data in args.data}
    summary = summarise(volumes, names)
    results = {"volumes": volumes, "summary": summary,
               "config": {"seconds": args.seconds, "threads": torch.get_num_threads(), "variants": {n: VARIANTS[n] for n in names}}}
    table = markdown_table(results)
    print(table)
    if args.markdown is not None:
        write_text(args.markdown, table + "\n", overwrite=getattr(args, "overwrite", False))
    return results


def summarise(volumes: dict, names: list[str]) -> dict:
    """Per variant: mean PSNR over volumes and worst margin to the best variant of each volume (dB)."""
    best = {data: max(rows[n]["volume_psnr_db"] for n in names) for data, rows in volumes.items()}
    summary = {}
    for name in names:
        scores = [volumes[data][name]["volume_psnr_db"] for data in volumes]
        finite = [s for s in scores if math.isfinite(s)]
        summary[name] = {
            "mean_psnr_db": float(np.mean(finite)) if finite else float("nan"),
            "worst_margin_db": float(min(volumes[d][name]["volume_psnr_db"] - best[d] for d in volumes)),
        }
    return summary


def markdown_table(results: dict) -> str:
    volumes, summary = results["volumes"], results["summary"]
    labels = [Path(data).name or data for data in volumes]
    clock = "CPU seconds (training thread)" if results["config"]["threads"] == 1 else "wall-clock seconds"
    lines = [f"Volume PSNR (dB) after {results['config']['seconds']:g} {clock} of training per variant, "
             f"{results['config']['threads']} torch thread(s), variants alternated in one process.", "",
             "| variant | " + " | ".join(labels) + " | mean | worst margin to best |",
             "| --- |" + " ---: |" * (len(labels) + 2)]
    for name, row in summary.items():
        cells = [f"{volumes[data][name]['volume_psnr_db']:.2f} ({volumes[data][name]['iterations']} steps)" for data in volumes]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['mean_psnr_db']:.2f} | {row['worst_margin_db']:+.2f} |")
    return "\n".join(lines)
