"""``gridinr-bench fit``: our gridinr-fit field vs the same model on nerfstudio's torch HashEncoding, equal time.

Both contenders get the same volume, point sampler, levels, features, table size, MLP, optimizers and
learning-rate schedule (decaying over the time budget). Steps alternate between them and each clock counts
only its own steps, so load from other processes hits both alike. Volume PSNR is measured afterwards at
native resolution over every voxel (not part of the budget).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from nerfstudio.field_components.encodings import HashEncoding
from nerfstudio.field_components.mlp import MLP
from torch import nn

from gridinr_nerfstudio.fit_model import volume_psnr
from gridinr_nerfstudio.hash_encoding import HashGridAdam
from gridinr_nerfstudio.volume_datamanager import VolumePointSampler
from gridinr_nerfstudio.volume_dataparser import BUILTIN_DEFAULT, scene_aabb
from gridinr_nerfstudio.volume_field import VolumeField, VolumeFieldSettings
from gridinr_nerfstudio.volume_io import open_volume


def add_parser(subparsers) -> argparse.ArgumentParser:
    defaults = VolumeFieldSettings()
    parser = subparsers.add_parser(
        "fit",
        help="stage-1 fitting at equal wall time, ours vs nerfstudio torch HashEncoding",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=BUILTIN_DEFAULT, help="volume (default: the built-in one)")
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall time per contender")
    parser.add_argument("--batch", type=int, default=1 << 16, help="points per step")
    parser.add_argument("--levels", type=int, default=defaults.num_levels)
    parser.add_argument("--features", type=int, default=defaults.features_per_level)
    parser.add_argument("--log2-table", type=int, default=defaults.log2_hashmap_size)
    parser.add_argument("--base-resolution", type=int, default=defaults.base_resolution)
    parser.add_argument("--max-resolution", type=int, default=defaults.max_resolution)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lr-final", type=float, default=1e-4)
    parser.add_argument("--contenders", default="ours,nerfstudio_torch", help="comma-separated subset to run")
    return parser


class NerfstudioBaseline(nn.Module):
    """nerfstudio's torch HashEncoding + the same MLP as ours, on unit-cube inputs."""

    def __init__(self, settings: VolumeFieldSettings):
        super().__init__()
        self.encoding = HashEncoding(
            num_levels=settings.num_levels,
            min_res=settings.base_resolution,
            max_res=settings.max_resolution,
            log2_hashmap_size=settings.log2_hashmap_size,
            features_per_level=settings.features_per_level,
            implementation="torch",
        )
        self.mlp = MLP(
            in_dim=settings.num_levels * settings.features_per_level,
            num_layers=settings.num_hidden_layers + 1,
            layer_width=settings.hidden_dim,
            out_dim=1,
            activation=nn.ReLU(),
            implementation="torch",
        )

    def forward_unit(self, unit: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.encoding(unit)).squeeze(-1)


class Contender:
    """One model with its optimizers and its own clock."""

    def __init__(self, name: str, model: nn.Module, lr: float):
        self.name = name
        self.model = model
        self.optimizers = [
            HashGridAdam(model.encoding.parameters(), lr=lr, eps=1e-15),
            torch.optim.Adam(model.mlp.parameters(), lr=lr, eps=1e-15),
        ]
        self.seconds = 0.0
        self.iterations = 0

    def step(self, unit: torch.Tensor, targets: torch.Tensor, lr: float) -> None:
        started = time.perf_counter()
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss = (self.model.forward_unit(unit) - targets).square().mean()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        self.seconds += time.perf_counter() - started
        self.iterations += 1


def run(args: argparse.Namespace) -> dict:
    volume = open_volume(None if args.data == BUILTIN_DEFAULT else args.data)
    aabb = scene_aabb(volume)
    settings = VolumeFieldSettings(
        num_levels=args.levels,
        features_per_level=args.features,
        log2_hashmap_size=args.log2_table,
        base_resolution=args.base_resolution,
        max_resolution=args.max_resolution,
    )
    builders = {
        "ours": lambda: VolumeField(aabb, settings),
        "nerfstudio_torch": lambda: NerfstudioBaseline(settings),
    }
    names = [name.strip() for name in args.contenders.split(",") if name.strip()]
    torch.manual_seed(0)
    contenders = [Contender(name, builders[name](), args.lr) for name in names]
    sampler = VolumePointSampler(volume, aabb, subsample_factor=1)
    print(f"volume {volume.info.name} {volume.info.dims} {volume.info.dtype}; {args.seconds:.0f} s per contender, "
          f"batch {args.batch}, {args.levels} levels x {args.features} features, table 2^{args.log2_table}, "
          f"resolutions {args.base_resolution}..{args.max_resolution}; torch threads {torch.get_num_threads()}", flush=True)
    step = 0
    while True:
        pending = [c for c in contenders if c.seconds < args.seconds]
        if not pending:
            break
        points, targets = sampler.batch(args.batch, step)
        unit = (points - aabb[0]) / (aabb[1] - aabb[0])
        contender = min(pending, key=lambda c: c.seconds)  # whoever is behind in its own time goes next
        progress = min(contender.seconds / args.seconds, 1.0)
        contender.step(unit, targets, args.lr * (args.lr_final / args.lr) ** progress)
        step += 1

    volume_bytes = int(np.prod(volume.info.dims)) * np.dtype(volume.info.dtype).itemsize
    results = {}
    for contender in contenders:
        model = contender.model.eval()
        params = sum(p.numel() for p in model.parameters())
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        results[contender.name] = {
            "volume_psnr_db": volume_psnr(model.forward_unit, volume),
            "train_points_per_s": contender.iterations * args.batch / contender.seconds,
            "iterations": contender.iterations,
            "train_seconds": contender.seconds,
            "params": params,
            "compression_ratio": volume_bytes / model_bytes,
        }
    print_table(results)
    return results


def print_table(results: dict) -> None:
    columns = ["iterations", "train_points_per_s", "volume_psnr_db", "params", "compression_ratio"]
    print(f"{'contender':<18}" + "".join(f"{c:>22}" for c in columns))
    for name, row in results.items():
        print(f"{name:<18}" + "".join(f"{row[c]:>22.4g}" for c in columns))
    if {"ours", "nerfstudio_torch"} <= results.keys():
        ours, base = results["ours"], results["nerfstudio_torch"]
        print(f"{'ours/baseline':<18}"
              f"{ours['iterations'] / max(base['iterations'], 1):>22.3g}"
              f"{ours['train_points_per_s'] / base['train_points_per_s']:>22.3g}"
              f"{ours['volume_psnr_db'] - base['volume_psnr_db']:>+19.2f} dB"
              f"{ours['params'] / base['params']:>22.3g}{ours['compression_ratio'] / base['compression_ratio']:>22.3g}")
        if not math.isfinite(ours["volume_psnr_db"]):
            print("note: ours reconstructs the volume exactly (infinite PSNR)")
