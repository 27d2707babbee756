"""``gridinr-bench sequence``: one model for a time range vs one model per step, at the same iteration budget.

For each selected step a single-step field (the method's defaults) trains ``--iterations`` steps on that step
alone; then one sequence field (a shared hash grid plus a grid per step, see fields/volume_field.py) trains
``--iterations`` steps on all of them (every batch holds points of every step). Volume PSNR is measured at every
voxel of every step. The quality bar: the sequence's mean within 3 dB of the single-step mean, each step within
3 dB of the sequence mean, at most 2x the parameters of one single-step model. Without ``--data`` a sequence with
moving and growing features is generated (a ball moving across the box, a blob growing, a static textured slab).
Optimizers and learning-rate schedule are the method's (``ns-train gridinr-fit``) over ``--iterations``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gridinr_nerfstudio.data.timesteps import parse_timesteps, share_value_range, step_times
from gridinr_nerfstudio.data.volume_io import open_volume, read_info, scene_aabb, write_dataset
from gridinr_nerfstudio.fields.volume_field import VolumeField
from gridinr_nerfstudio.gridinr_config import fit_trainer_config
from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler
from gridinr_nerfstudio.stages.fit.model import volume_psnr
from gridinr_nerfstudio.stages.fit.sequence import SequencePointSampler


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sequence",
        help="one field for several time steps vs one field per step, same iteration budget",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=None, help="a dataset with several steps (default: generated)")
    parser.add_argument("--timesteps", default="all", help="'all', 'N' or 'A:B' (1-based, inclusive)")
    parser.add_argument("--iterations", type=int, default=300, help="training iterations of every model")
    parser.add_argument("--batch", type=int, default=1 << 16, help="points per step")
    parser.add_argument("--size", type=int, default=48, help="side of the generated volume")
    parser.add_argument("--steps", type=int, default=4, help="steps of the generated sequence")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser


def generate_sequence(folder: Path, size: int = 64, steps: int = 4) -> Path:
    """uint8 steps (Z, Y, X): a ball moving along x, a blob growing, a static sinusoidal slab."""
    axis = np.linspace(-1.0, 1.0, size)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    texture = np.where(np.abs(z + 0.6) < 0.15, 0.35 + 0.15 * np.sin(9 * x) * np.cos(7 * y), 0.0)
    frames = []
    for step in range(steps):
        phase = step / max(steps - 1, 1)
        ball = np.clip(1.0 - np.sqrt((x + 0.6 - 1.2 * phase) ** 2 + (y - 0.3) ** 2 + (z - 0.2) ** 2) / 0.3, 0, 1)
        radius = 0.1 + 0.3 * phase
        blob = np.exp(-((x + 0.3) ** 2 + (y + 0.4) ** 2 + (z - 0.3) ** 2) / (2 * radius**2))
        frames.append((255 * np.clip(texture + ball + 0.8 * blob, 0, 1)).astype(np.uint8))
    return write_dataset(folder / "moving", "moving", {"value": frames}, description="moving and growing features")


def train(field: VolumeField, sampler, aabb: torch.Tensor, iterations: int, batch: int) -> float:
    """Train `field` with the method's optimizers and schedule; returns seconds."""
    method = fit_trainer_config()
    groups = {"encoding": list(field.encoding.parameters()) + field.time_parameters(),
              "mlp": list(field.mlp.parameters())}
    optimizers = [method.optimizers[name]["optimizer"].setup(params) for name, params in groups.items()]
    for name, optimizer in zip(groups, optimizers):
        method.optimizers[name]["scheduler"].max_steps = iterations
    schedulers = [method.optimizers[name]["scheduler"].setup().get_scheduler(optimizer, optimizer.param_groups[0]["lr"])
                  for name, optimizer in zip(groups, optimizers)]
    started = time.perf_counter()
    for step in range(iterations):
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
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data = args.data if args.data is not None else generate_sequence(Path(tempfile.mkdtemp()), args.size, args.steps)
    steps = parse_timesteps(args.timesteps, 1, read_info(data).total_samples, data)
    volumes = [open_volume(data, timestep=step) for step in steps]
    share_value_range(volumes)
    aabb = scene_aabb(volumes[0])
    settings = fit_trainer_config().pipeline.model.field
    datamanager = fit_trainer_config().pipeline.datamanager

    def sampler(volume, seed):
        return VolumePointSampler(volume, aabb, sampling=datamanager.sampling,
                                  continuous_fraction=datamanager.continuous_fraction, seed=seed)

    print(f"{data}: steps {steps}, {volumes[0].info.dims}, {args.iterations} iterations of {args.batch} points",
          flush=True)
    single, params_single = {}, 0
    for index, (step, volume) in enumerate(zip(steps, volumes)):
        torch.manual_seed(0)
        field = VolumeField(aabb, settings)
        seconds = train(field, sampler(volume, index), aabb, args.iterations, args.batch)
        single[step] = volume_psnr(field.forward_unit, volume)
        params_single = sum(p.numel() for p in field.parameters())
        print(f"single-step model, step {step}: {single[step]:.2f} dB ({seconds:.0f} s)", flush=True)
    torch.manual_seed(0)
    field = VolumeField(aabb, settings, num_times=len(volumes))
    seconds = train(field, SequencePointSampler([sampler(v, i) for i, v in enumerate(volumes)]), aabb,
                    args.iterations, args.batch)
    times = step_times(len(volumes)).tolist()
    sequence = {step: volume_psnr(lambda unit, t=t: field.forward_unit(unit, t), volume)
                for step, volume, t in zip(steps, volumes, times)}
    params_sequence = sum(p.numel() for p in field.parameters())
    for step in steps:
        print(f"sequence model, step {step}: {sequence[step]:.2f} dB", flush=True)
    single_mean, sequence_mean = float(np.mean(list(single.values()))), float(np.mean(list(sequence.values())))
    spread = max(abs(v - sequence_mean) for v in sequence.values())
    print(f"mean: single-step {single_mean:.2f} dB, sequence {sequence_mean:.2f} dB ({seconds:.0f} s); "
          f"gap {single_mean - sequence_mean:.2f} dB; largest step deviation from the mean {spread:.2f} dB; "
          f"parameters {params_sequence} vs {params_single} ({params_sequence / params_single:.3f}x)")
    return {"data": str(data), "steps": steps, "iterations": args.iterations, "single_psnr": single,
            "sequence_psnr": sequence, "single_mean": single_mean, "sequence_mean": sequence_mean,
            "largest_deviation": spread, "params_single": params_single, "params_sequence": params_sequence}
