"""``gridinr-bench fit``: our gridinr-fit field vs the same model on nerfstudio's torch HashEncoding, equal time.

Defaults are those of ``ns-train gridinr-fit`` (method_specs.fit_trainer_config: field sizes, batch size, point
sampling, optimizers, learning rate and its final value), so the benchmark measures what the method trains; every
option overrides one of them. Both contenders get the same volume, the same sequence of training batches (each its
own sampler with the same seed), levels, features, table size, MLP, optimizers (built from the method's optimizer
configs) and a learning rate decaying log-linearly over the time budget instead of over iterations. Steps alternate
between them (whoever is behind in its own time goes next) and each clock counts only its own steps, so load from
other processes hits both alike. Volume PSNR is measured at native resolution over every voxel, outside the clocks:
at the end, and at the optional ``--curve`` times.

``--device`` (auto: CUDA when available) moves everything there: the models, and the volume too when it fits in a
quarter of the GPU's memory (batches are then made on the GPU, stages/fit/point_sampler.py; ``--resident``);
step times are then measured with the GPU synchronised at the end of each step. Contenders: ``ours`` (the method's
field and optimizers; backend and hash optimizer picked for the device), ``ours_<backend>`` for a backend
(tcnn, triton, cpp, torch), ``ours_dense`` / ``ours_lazy`` for the hash-table optimizer mode, ``ours_mixed``
(the decoder MLP under autocast, ``--pipeline.model.field.mixed-precision``: float16 on CUDA, bfloat16 on a CPU)
and ``nerfstudio_torch``. ``--iterations N`` trains every contender N steps instead of a time budget (learning
rate decaying over the steps): quality at equal work, e.g. ``--contenders ours,ours_mixed``.

``--threads`` defaults to ``adaptive``, what ``ns-train`` does on a CPU (thread_policy.py): each contender's steps
pick, as they run, among one thread, our kernels on all threads with torch's ops on one, and everything on all
threads (``gridinr-bench contention`` compares them idle and under load). A number fixes torch's and our
kernels' count (0: torch's default). ``--prefetch`` makes batches one step ahead in a thread, as the data manager's
option does (auto: on CUDA, never where the volume is resident on the device).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from nerfstudio.field_components.encodings import HashEncoding
from torch import nn

from gridinr_nerfstudio.data.default_volume import BUILTIN_DEFAULT, open_data
from gridinr_nerfstudio.data.volume_io import scene_aabb
from gridinr_nerfstudio.device_defaults import resolve
from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings, value_mlp
from gridinr_nerfstudio.gridinr_config import GridINRTrainerConfig, fit_trainer_config
from gridinr_nerfstudio.scripts.bench.timing import Clock, add_device_argument, device_label, resolve_device
from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler, make_point_sampler, resident_chosen
from gridinr_nerfstudio.stages.fit.prefetch import PrefetchingSampler
from gridinr_nerfstudio.stages.fit.model import volume_psnr
from gridinr_nerfstudio.thread_policy import AdaptiveThreads, ThreadSetting, apply_setting

BACKENDS = ("tcnn", "triton", "cpp", "torch")


def add_parser(subparsers) -> argparse.ArgumentParser:
    method = fit_trainer_config()
    field = method.pipeline.model.field
    datamanager = method.pipeline.datamanager
    parser = subparsers.add_parser(
        "fit",
        help="stage-1 fitting at equal wall time, ours vs nerfstudio torch HashEncoding",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=BUILTIN_DEFAULT, help="volume (default: the built-in one)")
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall time per contender")
    parser.add_argument("--iterations", type=int, default=0, help="train every contender this many steps instead "
                        "of --seconds (0: the time budget)")
    parser.add_argument("--batch", type=int, default=datamanager.batch_size,
                        help="points per step (0: the device's default, device_defaults.py)")
    parser.add_argument("--sampling", choices=("voxels", "continuous"), default=datamanager.sampling,
                        help="training positions (see volume_datamanager)")
    parser.add_argument("--continuous-fraction", type=float, default=datamanager.continuous_fraction,
                        help="with voxel sampling, share of each batch at continuous positions")
    parser.add_argument("--levels", type=int, default=field.num_levels)
    parser.add_argument("--features", type=int, default=field.features_per_level)
    parser.add_argument("--log2-table", type=int, default=field.log2_hashmap_size)
    parser.add_argument("--base-resolution", type=int, default=field.base_resolution)
    parser.add_argument("--max-resolution", type=int, default=field.max_resolution)
    parser.add_argument("--hidden-dim", type=int, default=field.hidden_dim)
    parser.add_argument("--hidden-layers", type=int, default=field.num_hidden_layers)
    parser.add_argument("--coarse-to-fine", type=float, default=field.coarse_to_fine,
                        help="share of the budget over which our fields switch their levels on from coarse to fine "
                        "(default: the method's; nerfstudio's encoder has none)")
    parser.add_argument("--lr", type=float, default=None, help="initial learning rate of both optimizers "
                        "(default: the method's, per optimizer)")
    parser.add_argument("--lr-final", type=float, default=None, help="learning rate at the end of the budget "
                        "(default: the method's scheduler)")
    parser.add_argument("--beta2", type=float, default=None, help="Adam beta2 of both optimizers (default: the "
                        "method's: HashGridAdam 0.99 unless configured, torch Adam 0.999)")
    parser.add_argument("--threads", default="adaptive",
                        help="adaptive (ns-train's CPU default, thread_policy.py) or a thread count for torch and our "
                        "kernels (0: torch's default)")
    parser.add_argument("--prefetch", choices=("auto", "on", "off"), default=datamanager.prefetch,
                        help="make each batch one step ahead in a thread (as --pipeline.datamanager.prefetch)")
    parser.add_argument("--curve", default="", help="comma-separated training times (s) at which to also measure "
                        "volume PSNR, e.g. 15,30")
    parser.add_argument("--contenders", default="ours,nerfstudio_torch",
                        help="comma-separated: ours, ours_<backend> (tcnn, triton, cpp, torch), ours_dense, ours_lazy, "
                             "ours_mixed (decoder under autocast), nerfstudio_torch")
    parser.add_argument("--resident", choices=("auto", "on", "off"), default=datamanager.device_resident,
                        help="volume and batch making on the device (auto: on CUDA when it fits)")
    add_device_argument(parser)
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
        self.mlp = value_mlp(settings)

    def forward_unit(self, unit: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.encoding(unit)).squeeze(-1)


class Contender:
    """One model with the method's optimizers, its own batches and its own clock."""

    def __init__(self, name: str, model: nn.Module, method: GridINRTrainerConfig, lr_finals: dict[str, float],
                 beta2: float | None, sampler: VolumePointSampler, aabb: torch.Tensor, clock: Clock,
                 hash_mode: str | None = None, coarse_to_fine: float = 0.0, threads: AdaptiveThreads | None = None):
        self.name = name
        self.threads = threads
        """Its own thread policy (``--threads adaptive``), else None."""
        self.coarse_to_fine = coarse_to_fine
        """Share of the budget over which a VolumeField's levels are switched on (its `level_progress`)."""
        self.clock = clock
        self.model = model
        self.sampler = sampler
        self.aabb = aabb
        groups = {"encoding": model.encoding.parameters(), "mlp": model.mlp.parameters()}
        configs = {group: method.optimizers[group]["optimizer"] for group in groups}
        if hash_mode is not None:
            configs["encoding"] = dataclasses.replace(configs["encoding"], mode=hash_mode)
        self.optimizers = [configs[group].setup(params) for group, params in groups.items()]
        self.lr_ranges = [(method.optimizers[group]["optimizer"].lr, lr_finals[group]) for group in groups]
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                if beta2 is not None:
                    group["betas"] = (group["betas"][0], beta2)
        self.seconds = 0.0
        self.iterations = 0
        self.curve: dict[str, float] = {}

    def step(self, batch_size: int, progress: float, mark: Callable[[str], None] | None = None) -> float:
        """One training step at `progress` (0..1) of the time budget: lr = lr_init * (lr_final / lr_init)^progress.
        Returns its seconds; `mark(phase)` is called as each phase ends (batch, forward, backward, optimizer)."""
        if self.coarse_to_fine > 0 and hasattr(self.model, "level_progress"):
            self.model.level_progress = min(1.0, progress / self.coarse_to_fine)
        work = lambda: self._step(batch_size, progress, mark or (lambda phase: None))  # noqa: E731
        if self.threads is None:
            seconds = self.clock.time(work)
        else:
            with self.threads.step():
                seconds = self.clock.time(work)
        self.seconds += seconds
        self.iterations += 1
        return seconds

    def warm_up(self) -> None:
        """One untimed forward, backward and optimizer step with zero gradients, then fresh optimizer state: JIT
        kernels (Triton) compile here, not on the clock, and the model and the Adam moments stay untouched."""
        points, targets = self.sampler.batch(4096, 0)
        unit = (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        (self.model.forward_unit(unit) - targets).square().mean().backward()
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.zero_()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            optimizer.state.clear()
        self.clock.sync()

    def _step(self, batch_size: int, progress: float, mark: Callable[[str], None]) -> None:
        points, targets = self.sampler.batch(batch_size, self.iterations)
        unit = (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        mark("batch")
        for optimizer, (lr_init, lr_final) in zip(self.optimizers, self.lr_ranges):
            for group in optimizer.param_groups:
                group["lr"] = lr_init * (lr_final / lr_init) ** progress
        predictions = self.model.forward_unit(unit)
        loss = (predictions - targets).square().mean()
        mark("forward")
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        for optimizer in self.optimizers:
            optimizer.step()
        mark("optimizer")
        report = getattr(self.sampler, "report", None)  # samplers that learn from the errors (sweep variants)
        if report is not None:
            report(points, (predictions.detach() - targets).square())


@dataclasses.dataclass
class FitSetup:
    """What `run` trains: the volume, the device and one `Contender` per name of ``--contenders``."""

    volume: object
    device: torch.device
    settings: VolumeFieldSettings
    contenders: list
    encoding_lr: float
    lr_final: float


def setup_contenders(args: argparse.Namespace) -> FitSetup:
    """The volume and the warmed-up contenders of ``args`` (also used by ``gridinr-bench contention``)."""
    device = resolve_device(args.device)
    clock = Clock(device)
    args.batch = resolve(args.batch, "batch_size", device)
    volume = open_data(args.data)
    aabb = scene_aabb(volume).to(device)
    method = fit_trainer_config()
    settings = VolumeFieldSettings(
        num_levels=args.levels,
        features_per_level=args.features,
        log2_hashmap_size=args.log2_table,
        base_resolution=args.base_resolution,
        max_resolution=args.max_resolution,
        hidden_dim=args.hidden_dim,
        num_hidden_layers=args.hidden_layers,
    )
    lr_finals = {}
    for name, group in method.optimizers.items():
        if args.lr is not None:
            group["optimizer"].lr = args.lr
        lr_finals[name] = group["scheduler"].lr_final if args.lr_final is None else args.lr_final
    encoding_lr, lr_final = method.optimizers["encoding"]["optimizer"].lr, lr_finals["encoding"]
    builders = {
        "ours": lambda: VolumeField(aabb, settings),
        "ours_dense": lambda: VolumeField(aabb, settings),
        "ours_lazy": lambda: VolumeField(aabb, settings),
        "ours_mixed": lambda: VolumeField(aabb, dataclasses.replace(settings, mixed_precision=True)),
        "nerfstudio_torch": lambda: NerfstudioBaseline(settings),
        **{f"ours_{b}": (lambda b=b: VolumeField(aabb, dataclasses.replace(settings, backend=b))) for b in BACKENDS},
    }
    names = [name.strip() for name in args.contenders.split(",") if name.strip()]
    for name in names:
        if name not in builders:
            raise SystemExit(f"gridinr-bench fit: unknown contender {name!r} (known: {', '.join(builders)})")
    resident = resident_chosen(args.resident, int(np.prod(volume.info.dims)), device)
    prefetch = not resident and (args.prefetch == "on" or (args.prefetch == "auto" and device.type == "cuda"))

    def sampler() -> VolumePointSampler | PrefetchingSampler:
        made = make_point_sampler(volume, aabb.cpu(), device="cpu" if prefetch else device,
                                  resident="on" if resident else "off", sampling=args.sampling,
                                  continuous_fraction=args.continuous_fraction, subsample_factor=1)
        return PrefetchingSampler(made, device) if prefetch else made

    adaptive = str(args.threads) == "adaptive"
    torch.manual_seed(0)
    contenders = [
        Contender(name, builders[name]().to(device), method, lr_finals, args.beta2, sampler(), aabb, clock,
                  hash_mode={"ours_dense": "dense", "ours_lazy": "lazy"}.get(name),
                  coarse_to_fine=getattr(args, "coarse_to_fine", 0.0),
                  threads=AdaptiveThreads() if adaptive and device.type == "cpu" else None)
        for name in names
    ]
    for contender in contenders:
        if isinstance(contender.model, VolumeField):
            contender.backend = contender.model.encoding.backend_for(device)  # fails here if it cannot run
        contender.warm_up()
    return FitSetup(volume, device, settings, contenders, encoding_lr, lr_final)


def run(args: argparse.Namespace) -> dict:
    if str(args.threads) != "adaptive":
        count = int(args.threads) if int(args.threads) > 0 else torch.get_num_threads()
        apply_setting(ThreadSetting(count, count))
    setup = setup_contenders(args)
    volume, device, settings, contenders = setup.volume, setup.device, setup.settings, setup.contenders
    encoding_lr, lr_final = setup.encoding_lr, setup.lr_final
    curve_times = sorted(float(t) for t in args.curve.split(",") if t.strip())
    samplers = {f"resident on {c.sampler.device.type}" if getattr(c.sampler, "resident", False)
                else "host, prefetched" if isinstance(c.sampler, PrefetchingSampler) else "host" for c in contenders}
    decoder = f"MLP {args.hidden_layers} x {args.hidden_dim}" if args.hidden_layers > 0 else "linear decoder"
    budget = f"{args.iterations} steps" if args.iterations > 0 else f"{args.seconds:.0f} s"
    print(f"volume {volume.info.name} {volume.info.dims} {volume.info.dtype}; {budget} per contender, "
          f"batch {args.batch} ({args.sampling}), {args.levels} levels x {args.features} features, "
          f"table 2^{args.log2_table}, resolutions {args.base_resolution}..{args.max_resolution}, {decoder}, "
          f"lr {encoding_lr:g} -> {lr_final:g}, coarse-to-fine over {getattr(args, 'coarse_to_fine', 0.0):.0%} (ours); device {device_label(device)}, sampler {', '.join(samplers)}", flush=True)
    while True:
        if args.iterations > 0:  # equal work: whoever has done fewer steps goes next
            pending = [c for c in contenders if c.iterations < args.iterations]
            if not pending:
                break
            contender = min(pending, key=lambda c: c.iterations)
            contender.step(args.batch, contender.iterations / max(args.iterations - 1, 1))
            continue
        pending = [c for c in contenders if c.seconds < args.seconds]
        if not pending:
            break
        contender = min(pending, key=lambda c: c.seconds)  # whoever is behind in its own time goes next
        contender.step(args.batch, min(contender.seconds / args.seconds, 1.0))
        for at in curve_times:
            if at < args.seconds and f"{at:g}" not in contender.curve and contender.seconds >= at:
                contender.curve[f"{at:g}"] = volume_psnr(contender.model.forward_unit, volume, device)

    volume_bytes = int(np.prod(volume.info.dims)) * np.dtype(volume.info.dtype).itemsize
    results = {}
    for contender in contenders:
        model = contender.model.eval()
        params = sum(p.numel() for p in model.parameters())
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        psnr = volume_psnr(model.forward_unit, volume, device)
        results[contender.name] = {
            "backend": getattr(contender, "backend", "nerfstudio"),
            "hash_optimizer": type(contender.optimizers[0]).__name__,
            "volume_psnr_db": psnr,
            "train_points_per_s": contender.iterations * args.batch / contender.seconds,
            "iterations": contender.iterations,
            "train_seconds": contender.seconds,
            "params": params,
            "compression_ratio": volume_bytes / model_bytes,
            "psnr_curve_db": {**contender.curve, f"{contender.seconds if args.iterations > 0 else args.seconds:g}": psnr},
        }
    print_table(results)
    results["config"] = {
        "data": str(args.data), "seconds": args.seconds, "iterations": args.iterations, "batch": args.batch, "sampling": args.sampling,
        "continuous_fraction": args.continuous_fraction,
        "field": vars(settings), "lr": encoding_lr, "lr_final": lr_final,
        "betas": dict(zip(("encoding", "mlp"), (list(o.param_groups[0]["betas"]) for o in contenders[0].optimizers))),
        "threads": str(args.threads), "prefetch": args.prefetch, "device": str(device), "sampler": sorted(samplers),
    }
    return results


def print_table(results: dict) -> None:
    columns = ["iterations", "train_points_per_s", "volume_psnr_db", "params", "compression_ratio"]
    print(f"{'contender':<18}{'backend':>12}{'hash optimizer':>16}" + "".join(f"{c:>22}" for c in columns))
    for name, row in results.items():
        print(f"{name:<18}{row['backend']:>12}{row['hash_optimizer']:>16}" + "".join(f"{row[c]:>22.4g}" for c in columns))
    for name, row in results.items():
        if len(row["psnr_curve_db"]) > 1:
            print(f"{name} volume PSNR (dB) at training time: "
                  + ", ".join(f"{t} s {psnr:.2f}" for t, psnr in row["psnr_curve_db"].items()))
    if {"ours", "nerfstudio_torch"} <= results.keys():
        ours, base = results["ours"], results["nerfstudio_torch"]
        print(f"{'ours/baseline':<46}"
              f"{ours['iterations'] / max(base['iterations'], 1):>22.3g}"
              f"{ours['train_points_per_s'] / base['train_points_per_s']:>22.3g}"
              f"{ours['volume_psnr_db'] - base['volume_psnr_db']:>+19.2f} dB"
              f"{ours['params'] / base['params']:>22.3g}{ours['compression_ratio'] / base['compression_ratio']:>22.3g}")
        if not math.isfinite(ours["volume_psnr_db"]):
            print("note: ours reconstructs the volume exactly (infinite PSNR)")
