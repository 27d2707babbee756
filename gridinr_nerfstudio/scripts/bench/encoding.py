"""``gridinr-bench encoding``: our HashGridEncoding vs nerfstudio's torch HashEncoding, same config, one run.

Both encoders are timed in alternation (median of ``--repeats``) so that load from other processes hits both.
Besides points/s it times one training step of ours per optimizer (forward, backward, step), because on CPU a
dense Adam step over the table, and the fresh table-sized gradient buffer of each backward, cost as much as the
encoding itself; ``HashGridAdam`` avoids both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from nerfstudio.field_components.encodings import HashEncoding

from gridinr_nerfstudio.fields.hash_grid.encoding import HashGridEncoding
from gridinr_nerfstudio.fields.hash_grid.optim import HashGridAdam


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "encoding",
        help="hash-grid encoding throughput, ours vs nerfstudio torch",
        description="Our HashGridEncoding vs nerfstudio's torch HashEncoding, same config, timed side by side.",
    )
    parser.add_argument("--levels", type=int, default=16)
    parser.add_argument("--features", type=int, default=2)
    parser.add_argument("--log2-table", type=int, default=19)
    parser.add_argument("--base-resolution", type=int, default=16)
    parser.add_argument("--max-resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch/OpenMP threads")
    return parser


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _time_alternating(contenders: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each contender, run in turn after one warm-up call each."""
    for fn in contenders.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: _median_ms(values) for name, values in samples.items()}


def _forward(encoder: torch.nn.Module, positions: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            encoder(positions)

    return run


def _forward_backward(encoder: torch.nn.Module, positions: torch.Tensor, upstream: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for param in encoder.parameters():
            param.grad = None
        encoder(positions).backward(upstream)

    return run


def _training_step_ms(
    encoder: HashGridEncoding,
    optimizer: torch.optim.Optimizer,
    positions: torch.Tensor,
    upstream: torch.Tensor,
    repeats: int,
) -> dict[str, float]:
    """Median milliseconds of forward, backward and optimizer step of a training step (after one warm-up step)."""
    samples: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        encoded = encoder(positions)
        forward_done = time.perf_counter()
        encoded.backward(upstream)
        backward_done = time.perf_counter()
        optimizer.step()
        step_done = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if repeat:
            samples["forward"].append(forward_done - start)
            samples["backward"].append(backward_done - forward_done)
            samples["step"].append(step_done - backward_done)
    parts = {name: _median_ms(values) for name, values in samples.items()}
    parts["total"] = sum(parts.values())
    return parts


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    positions = torch.rand(args.batch, 3, generator=generator)
    upstream = torch.randn(args.batch, args.levels * args.features, generator=generator)
    ours = HashGridEncoding(
        num_levels=args.levels,
        features_per_level=args.features,
        log2_hashmap_size=args.log2_table,
        base_resolution=args.base_resolution,
        max_resolution=args.max_resolution,
    )
    nerfstudio = HashEncoding(
        num_levels=args.levels,
        min_res=args.base_resolution,
        max_res=args.max_resolution,
        log2_hashmap_size=args.log2_table,
        features_per_level=args.features,
        implementation="torch",
    )
    print(
        f"config: {args.levels} levels x {args.features} features, table 2^{args.log2_table}, resolution "
        f"{args.base_resolution}..{args.max_resolution}, batch {args.batch}, {args.threads} threads, "
        f"ours on backend '{ours.backend_for(positions.device)}' ({ours.params.numel() / 1e6:.1f} M params)",
        flush=True,
    )
    forward_ms = _time_alternating(
        {"ours": _forward(ours, positions), "nerfstudio_torch": _forward(nerfstudio, positions)}, args.repeats
    )
    fwd_bwd_ms = _time_alternating(
        {
            "ours": _forward_backward(ours, positions, upstream),
            "nerfstudio_torch": _forward_backward(nerfstudio, positions, upstream),
        },
        args.repeats,
    )
    result = {
        name: {
            "fwd_points_per_s": args.batch / (forward_ms[name] / 1e3),
            "fwd_bwd_points_per_s": args.batch / (fwd_bwd_ms[name] / 1e3),
        }
        for name in ("ours", "nerfstudio_torch")
    }
    result["ratio"] = {
        "fwd": result["ours"]["fwd_points_per_s"] / result["nerfstudio_torch"]["fwd_points_per_s"],
        "fwd_bwd": result["ours"]["fwd_bwd_points_per_s"] / result["nerfstudio_torch"]["fwd_bwd_points_per_s"],
    }
    print(f"{'':18s}{'fwd M points/s':>16s}{'fwd+bwd M points/s':>20s}")
    for name in ("ours", "nerfstudio_torch"):
        print(
            f"{name:18s}{result[name]['fwd_points_per_s'] / 1e6:16.3f}{result[name]['fwd_bwd_points_per_s'] / 1e6:20.3f}"
        )
    print(f"{'ratio':18s}{result['ratio']['fwd']:15.1f}x{result['ratio']['fwd_bwd']:19.1f}x")

    params = [ours.params]
    optimizers = {
        "torch_adam": torch.optim.Adam(params, lr=1e-2, eps=1e-15),  # CPU default: for-loop implementation
        "torch_adam_fused": torch.optim.Adam(params, lr=1e-2, eps=1e-15, fused=True),
        "hash_grid_adam": HashGridAdam(params, lr=1e-2, eps=1e-15),  # backward reuses the buffer it hands back
    }
    result["training_step_ms"] = {
        name: _training_step_ms(ours, optimizer, positions, upstream, args.repeats)
        for name, optimizer in optimizers.items()
    }
    print("one training step of ours (fresh gradient buffer each step, except hash_grid_adam), ms (median):")
    print(f"{'':18s}" + "".join(f"{part:>10s}" for part in ("forward", "backward", "step", "total")))
    for name, parts in result["training_step_ms"].items():
        print(f"{name:18s}" + "".join(f"{value:10.1f}" for value in parts.values()))
    return result
