"""``gridinr-bench sequence``: time-varying fields side by side on sequences whose features move.

For each sequence (generated motions, see moving_sequences.py, or ``--data``) and each step:
- a single-step field (the method's defaults) trains ``--iterations`` on that step alone (the issue's reference);
- one model per step at the same TOTAL budget as one sequence model: each with 1/T of the table entries
  (log2 size minus ceil(log2 T)) and ``--iterations`` / T iterations;
then each ``--variants`` sequence field (fields/time_features.py: step_grids, hash4d) trains
``--iterations`` on all steps (every batch holds points of every step). Volume PSNR is measured at every voxel of
every step; each row gives mean and min PSNR, parameters, training seconds. The issue's bar: a sequence mean within
3 dB of the single-step mean, each step within 3 dB of the sequence mean, at most 2x one single-step model's
parameters, and at least the per-step models' mean at equal budget. ``--many-steps N`` also trains the default
field on an N-step translation sequence and reports parameters against steps (they should grow sub-linearly).
Optimizers and learning-rate schedule are the method's (``ns-train gridinr-fit``) over the iterations.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gridinr_nerfstudio.data.timesteps import parse_timesteps, share_value_range, step_times
from gridinr_nerfstudio.data.volume_io import open_volume, read_info, scene_aabb
from gridinr_nerfstudio.fields.time_features import TIME_FIELDS
from gridinr_nerfstudio.fields.volume_field import VolumeField
from gridinr_nerfstudio.gridinr_config import fit_trainer_config
from gridinr_nerfstudio.scripts.bench.moving_sequences import MOTIONS, generate_sequence
from gridinr_nerfstudio.stages.fit.model import volume_psnr
from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler
from gridinr_nerfstudio.stages.fit.sequence import SequencePointSampler

DEFAULT_MOTIONS = "translation,rotation,growth,front,advected"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sequence",
        help="time-varying fields vs single-step fits and one model per step, same iteration budget",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=None, help="a dataset with several steps (default: generated)")
    parser.add_argument("--timesteps", default="all", help="'all', 'N' or 'A:B' (1-based, inclusive)")
    parser.add_argument("--motions", default=DEFAULT_MOTIONS,
                        help=f"generated sequences without --data, comma-separated, of {','.join(MOTIONS)}")
    parser.add_argument("--variants", default=",".join(TIME_FIELDS), help="time fields to train, comma-separated")
    parser.add_argument("--iterations", type=int, default=300, help="training iterations of every model")
    parser.add_argument("--batch", type=int, default=1 << 16, help="points per iteration (split across the steps)")
    parser.add_argument("--size", type=int, default=64, help="side of the generated volumes")
    parser.add_argument("--steps", type=int, default=4, help="steps of the generated sequences")
    parser.add_argument("--same-points-per-step", action="store_true",
                        help="also train the default field with T times the batch (each step then sees as many "
                             "points per iteration as a single-step fit)")
    parser.add_argument("--no-references", action="store_true", help="skip the single-step and per-step models")
    parser.add_argument("--many-steps", type=int, default=0,
                        help="also train the default field on an N-step translation sequence (0: skip)")
    parser.add_argument("--many-variants", default="hash4d,step_grids", help="time fields of the --many-steps run")
    parser.add_argument("--many-iterations", type=int, default=1000, help="iterations of the --many-steps run")
    parser.add_argument("--figure", type=Path, default=None,
                        help="PNG of middle slices (data, field at the steps, field between steps) of the first "
                             "sequence and the first variant")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser


def train(field: VolumeField, sampler, aabb: torch.Tensor, iterations: int, batch: int) -> float:
    """Train `field` with the method's optimizers and schedule; returns seconds."""
    method = fit_trainer_config()
    groups = field.param_groups()
    optimizers = [method.optimizers[name]["optimizer"].setup(params) for name, params in groups.items()]
    for name, optimizer in zip(groups, optimizers):
        method.optimizers[name]["scheduler"].max_steps = iterations
    schedulers = [method.optimizers[name]["scheduler"].setup().get_scheduler(optimizer, optimizer.param_groups[0]["lr"])
                  for name, optimizer in zip(groups, optimizers)]
    ramp = field.settings.coarse_to_fine * iterations
    started = time.perf_counter()
    for step in range(iterations):
        field.level_progress = min(1.0, step / ramp) if ramp > 0 else 1.0
        drawn = sampler.batch(batch, step)
        points, targets = drawn[0], drawn[1]
        times = drawn[2] if len(drawn) == 3 else None
        unit = (points - aabb[0]) / (aabb[1] - aabb[0])
        loss = (field.forward_unit(unit, times) - targets).square().mean()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.step()
            scheduler.step()
    field.level_progress = 1.0
    return time.perf_counter() - started


def count(field: VolumeField) -> int:
    return int(sum(p.numel() for p in field.parameters()))


def summary(name: str, psnr: list[float], params: int, seconds: float, reference_params: int) -> dict:
    row = {"model": name, "mean": float(np.mean(psnr)), "min": float(np.min(psnr)), "per_step": psnr,
           "params": params, "params_ratio": params / reference_params, "seconds": seconds}
    print(f"  {name:<34} mean {row['mean']:6.2f} dB  min {row['min']:6.2f} dB  params {params / 1e6:6.2f} M "
          f"({row['params_ratio']:.2f}x)  {seconds:6.1f} s   per step: " + ", ".join(f"{v:.2f}" for v in psnr),
          flush=True)
    return row


def compare(data: Path, timesteps: str, args: argparse.Namespace) -> dict:
    """Every model on one sequence; rows as `summary` returns them."""
    steps = parse_timesteps(timesteps, 1, read_info(data).total_samples, data)
    volumes = [open_volume(data, timestep=step) for step in steps]
    share_value_range(volumes)
    aabb = scene_aabb(volumes[0])
    config = fit_trainer_config()
    settings, datamanager = config.pipeline.model.field, config.pipeline.datamanager
    count_steps = len(volumes)

    def sampler(volume, seed):
        return VolumePointSampler(volume, aabb, sampling=datamanager.sampling,
                                  continuous_fraction=datamanager.continuous_fraction, seed=seed)

    print(f"{data}: steps {steps}, {volumes[0].info.dims}, {args.iterations} iterations of {args.batch} points",
          flush=True)
    reference_params = count(VolumeField(aabb, settings))
    rows = []
    if not args.no_references:
        budgets = (("single-step fit (each step alone)", settings, args.iterations),
                   ("one model per step, equal budget",
                    dataclasses.replace(settings, log2_hashmap_size=settings.log2_hashmap_size
                                        - math.ceil(math.log2(count_steps))),
                    max(1, args.iterations // count_steps)))
        for name, step_settings, iterations in budgets:
            psnr, seconds, params = [], 0.0, 0
            for index, volume in enumerate(volumes):
                torch.manual_seed(0)
                field = VolumeField(aabb, step_settings)
                seconds += train(field, sampler(volume, index), aabb, iterations, args.batch)
                psnr.append(volume_psnr(field.forward_unit, volume))
                params += count(field)
            if name.startswith("single"):
                params //= count_steps  # one such model
            rows.append(summary(name, psnr, params, seconds, reference_params))
    times = step_times(count_steps).tolist()
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        torch.manual_seed(0)
        field = VolumeField(aabb, dataclasses.replace(settings, time_field=variant), num_times=count_steps)
        seconds = train(field, SequencePointSampler([sampler(v, i) for i, v in enumerate(volumes)]), aabb,
                        args.iterations, args.batch)
        psnr = [volume_psnr(lambda unit, t=t: field.forward_unit(unit, t), volume) for volume, t in zip(volumes, times)]
        rows.append(summary(f"sequence: {variant}", psnr, count(field), seconds, reference_params))
        if args.figure is not None and not getattr(args, "figure_written", False):
            save_figure(args.figure, field, volumes, f"{data.name}, {variant}", args.overwrite)
            args.figure_written = True
    if args.same_points_per_step:  # the cause of a gap: each step gets 1/T of a batch; here T times the batch
        torch.manual_seed(0)
        field = VolumeField(aabb, settings, num_times=count_steps)
        seconds = train(field, SequencePointSampler([sampler(v, i) for i, v in enumerate(volumes)]), aabb,
                        args.iterations, args.batch * count_steps)
        psnr = [volume_psnr(lambda unit, t=t: field.forward_unit(unit, t), volume) for volume, t in zip(volumes, times)]
        rows.append(summary(f"sequence: {field.time_field}, {count_steps}x batch", psnr, count(field), seconds,
                            reference_params))
    return {"data": str(data), "steps": steps, "iterations": args.iterations, "rows": rows}


@torch.no_grad()
def save_figure(path: Path, field: VolumeField, volumes: list, title: str, overwrite: bool = False) -> None:
    """Middle z slices: the data at each step, the field at each step's time, the field halfway between steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gridinr_nerfstudio.safe_write import atomic_output

    size_x, size_y, size_z = volumes[0].info.dims
    middle = size_z // 2
    grid_y, grid_x = torch.meshgrid(torch.linspace(0, 1, size_y), torch.linspace(0, 1, size_x), indexing="ij")
    unit = torch.stack([grid_x, grid_y, torch.full_like(grid_x, middle / max(size_z - 1, 1))], -1).reshape(-1, 3)
    steps = len(volumes)

    def at(time):
        return field.forward_unit(unit, time).clamp(0, 1).reshape(size_y, size_x).numpy()

    figure, axes = plt.subplots(3, steps, figsize=(2.2 * steps, 6.8))
    for k in range(steps):
        axes[0, k].imshow(volumes[k].normalized_slab(middle, middle + 1)[0], cmap="magma", vmin=0, vmax=1, origin="lower")
        axes[0, k].set_title(f"data, step {k + 1}", fontsize=9)
        axes[1, k].imshow(at(k / (steps - 1)), cmap="magma", vmin=0, vmax=1, origin="lower")
        axes[1, k].set_title(f"field, t = step {k + 1}", fontsize=9)
        if k < steps - 1:
            axes[2, k].imshow(at((k + 0.5) / (steps - 1)), cmap="magma", vmin=0, vmax=1, origin="lower")
            axes[2, k].set_title(f"field, step {k + 1.5:g}", fontsize=9)
    for axis in axes.flat:
        axis.set_axis_off()
    figure.suptitle(f"{title}: middle z slice", fontsize=10)
    figure.tight_layout()
    with atomic_output(path, overwrite=overwrite) as staged:
        figure.savefig(staged, format="png", dpi=90)
    plt.close(figure)
    print(f"wrote {path}", flush=True)


def many_steps(folder: Path, args: argparse.Namespace) -> dict:
    """`--many-variants` on an N-step translation sequence: parameters against steps, PSNR of the N-step runs."""
    config = fit_trainer_config()
    base, datamanager = config.pipeline.model.field, config.pipeline.datamanager
    data = generate_sequence(folder / "many", "translation", args.size, args.many_steps)
    volumes = [open_volume(data, timestep=step) for step in range(1, args.many_steps + 1)]
    share_value_range(volumes)
    aabb = scene_aabb(volumes[0])
    times = step_times(len(volumes)).tolist()
    result = {"steps": args.many_steps, "iterations": args.many_iterations, "variants": {}}
    for variant in [v.strip() for v in args.many_variants.split(",") if v.strip()]:
        settings = dataclasses.replace(base, time_field=variant)
        params = {1: count(VolumeField(aabb, settings))}
        for steps in sorted({2, 4, 16, args.many_steps}):
            params[steps] = count(VolumeField(aabb, settings, num_times=steps))
        samplers = [VolumePointSampler(v, aabb, sampling=datamanager.sampling,
                                       continuous_fraction=datamanager.continuous_fraction, seed=i)
                    for i, v in enumerate(volumes)]
        torch.manual_seed(0)
        field = VolumeField(aabb, settings, num_times=len(volumes))
        seconds = train(field, SequencePointSampler(samplers), aabb, args.many_iterations, args.batch)
        psnr = [volume_psnr(lambda unit, t=t: field.forward_unit(unit, t), volume) for volume, t in zip(volumes, times)]
        print(f"{variant}: parameters against steps " + ", ".join(f"{k}: {v / 1e6:.2f} M" for k, v in params.items())
              + f"; {args.many_steps} steps of {args.size}^3, {args.many_iterations} iterations ({seconds:.0f} s): "
              f"mean {np.mean(psnr):.2f} dB, min {np.min(psnr):.2f} dB, max {np.max(psnr):.2f} dB", flush=True)
        result["variants"][variant] = {"params_by_steps": params, "mean": float(np.mean(psnr)),
                                       "min": float(np.min(psnr)), "per_step": psnr, "seconds": seconds}
    return result


def run(args: argparse.Namespace) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp())
    result = {"sequences": []}
    if args.data is not None:
        result["sequences"].append(compare(args.data, args.timesteps, args))
    else:
        for motion in [m.strip() for m in args.motions.split(",") if m.strip()]:
            result["sequences"].append(compare(generate_sequence(folder, motion, args.size, args.steps), "all", args))
    if args.many_steps > 1:
        result["many_steps"] = many_steps(folder, args)
    return result
