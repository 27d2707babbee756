"""``gridinr-bench encoding``: our HashGridEncoding on each available backend vs nerfstudio's torch HashEncoding.

Same config for all, one run, on ``--device`` (auto: CUDA when available). Contenders are timed in alternation
(median of ``--repeats``; CUDA-event timing on a GPU) so that load from other processes hits all of them. Ours runs
on every backend available on the device (CUDA: tcnn, triton, torch; CPU: cpp, torch; ``--backends`` picks), from
the same parameters; ``--compile`` adds ``torch.compile`` of the torch path. Besides points/s it times one
training step (forward, backward, optimizer step) of ours per optimizer, because a dense Adam step over the table,
and the fresh table-sized gradient buffer of each backward, can cost as much as the encoding; ``HashGridAdam``
(lazy: C++ on a CPU, Triton on CUDA) avoids both.

Field inference (rendering): when triton is among the backends (CUDA), it also times a whole decode, encoding then
the field's ReLU MLP (``--decoder``, default 2 hidden layers of 64), per backend as ``ours_<backend>_mlp`` (the
encoding module, then torch's Linear/ReLU) against ``ours_triton_fused`` (``_triton_fused``: both in one kernel
per block of points), at render-sized batches (``--decode-batches``), with the largest difference of their values.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from nerfstudio.field_components.encodings import HashEncoding
from torch import nn

from gridinr_nerfstudio.fields.hash_grid import _backend
from gridinr_nerfstudio.fields.hash_grid._torch_impl import torch_encode
from gridinr_nerfstudio.fields.hash_grid.encoding import HashGridEncoding
from gridinr_nerfstudio.fields.hash_grid.optim import HashGridAdam
from gridinr_nerfstudio.scripts.bench.timing import (
    Clock,
    add_device_argument,
    device_label,
    resolve_device,
    time_alternating,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "encoding",
        help="hash-grid encoding throughput, ours (each backend) vs nerfstudio torch",
        description="Our HashGridEncoding (each backend) vs nerfstudio's torch HashEncoding, same config, timed "
                    "side by side.",
    )
    parser.add_argument("--levels", type=int, default=16)
    parser.add_argument("--features", type=int, default=2)
    parser.add_argument("--log2-table", type=int, default=19)
    parser.add_argument("--base-resolution", type=int, default=16)
    parser.add_argument("--max-resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=0, help="points per call (0: 2^16 on a CPU, 2^20 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch/OpenMP threads")
    parser.add_argument("--backends", default="all",
                        help="comma-separated backends of ours (tcnn, triton, cpp, torch), or all available ones")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of our torch path")
    parser.add_argument("--no-nerfstudio", action="store_true", help="leave out nerfstudio's torch HashEncoding")
    parser.add_argument("--decoder", default="2x64",
                        help="field inference contenders (with triton): the MLP's hidden layers x width (0x0: linear)")
    parser.add_argument("--decode-batches", default="65536,1048576",
                        help="comma-separated points per field-inference call (with triton)")
    add_device_argument(parser)
    return parser


def available_backends(device: torch.device) -> list[str]:
    """Backends of ours that run on ``device``, fastest expected first."""
    if device.type == "cuda":
        names = ["tcnn"] if _backend.tcnn_available() else []
        if _backend.triton_available() and not _backend.triton_module().INTERPRETED:
            names.append("triton")
        return names + ["torch"]
    return (["cpp"] if _backend.cpp_extension_available() else []) + ["torch"]


def _forward(encoder: Callable[[torch.Tensor], torch.Tensor], positions: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            encoder(positions)

    return run


def _forward_backward(encoder: torch.nn.Module, positions: torch.Tensor, upstream: torch.Tensor,
                      call: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], None]:
    def run() -> None:
        for param in encoder.parameters():
            param.grad = None
        (call or encoder)(positions).backward(upstream)

    return run


def decoder_layers(inputs: int, spec: str, device: torch.device) -> list[nn.Linear]:
    """The field's decoder for ``spec`` = ``HIDDENxWIDTH``: Linear layers inputs -> WIDTH (x HIDDEN) -> 1."""
    hidden, width = (int(part) for part in spec.lower().split("x"))
    sizes = [inputs] + [width] * hidden + [1]
    generator = torch.Generator().manual_seed(1)
    layers = [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(std=layer.in_features ** -0.5, generator=generator)
            layer.bias.normal_(std=0.1, generator=generator)
    return [layer.to(device) for layer in layers]


def decode_benchmark(encoders: dict[str, HashGridEncoding], layers: list[nn.Linear], batches: list[int],
                     repeats: int, clock: Clock) -> dict:
    """Points/s of field inference: each encoder then the torch MLP (``<name>_mlp``), and the fused Triton kernel
    (``ours_triton_fused``) on ``encoders["ours_triton"]``; plus the largest |fused - unfused| value difference."""
    mlp = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())][:-1])
    fused_encoder = encoders["ours_triton"]
    device = fused_encoder.params.device
    result: dict = {}
    for batch in batches:
        positions = torch.rand(batch, 3, generator=torch.Generator().manual_seed(batch)).to(device)
        contenders: dict[str, Callable[[], None]] = {}
        for name, encoder in encoders.items():
            contenders[f"{name}_mlp"] = _forward(lambda x, encoder=encoder: mlp(encoder(x)), positions)
        with torch.no_grad():
            fused = fused_encoder.fused_decode(positions, layers)
            if fused is None:
                raise SystemExit("gridinr-bench encoding: the fused Triton kernel does not take this decoder "
                                 "(hidden widths up to 128)")
            unfused = mlp(fused_encoder(positions)).squeeze(-1)
        contenders["ours_triton_fused"] = _forward(lambda x: fused_encoder.fused_decode(x, layers), positions)
        ms = time_alternating(contenders, repeats, clock)
        result[str(batch)] = {name: batch / (ms[name] / 1e3) for name in contenders}
        result[str(batch)]["max_abs_diff_fused_vs_unfused"] = float((fused - unfused).abs().max()) if batch else 0.0
    return result


def _training_step_ms(
    encoder: HashGridEncoding,
    optimizer: torch.optim.Optimizer,
    positions: torch.Tensor,
    upstream: torch.Tensor,
    repeats: int,
    clock: Clock,
) -> dict[str, float]:
    """Median milliseconds of forward, backward and optimizer step of a training step (after one warm-up step)."""
    samples: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    for repeat in range(repeats + 1):
        holder: dict[str, torch.Tensor] = {}
        forward = clock.time(lambda: holder.update(encoded=encoder(positions)))
        backward = clock.time(lambda: holder["encoded"].backward(upstream))
        step = clock.time(optimizer.step)
        optimizer.zero_grad(set_to_none=True)
        if repeat:
            samples["forward"].append(forward)
            samples["backward"].append(backward)
            samples["step"].append(step)
    parts = {name: sorted(values)[len(values) // 2] * 1e3 for name, values in samples.items()}
    parts["total"] = sum(parts.values())
    return parts


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    clock = Clock(device)
    batch = args.batch or (1 << 20 if device.type == "cuda" else 1 << 16)
    generator = torch.Generator().manual_seed(0)
    positions = torch.rand(batch, 3, generator=generator).to(device)
    upstream = torch.randn(batch, args.levels * args.features, generator=generator).to(device)
    geometry = dict(num_levels=args.levels, features_per_level=args.features, log2_hashmap_size=args.log2_table,
                    base_resolution=args.base_resolution, max_resolution=args.max_resolution)
    reference = HashGridEncoding(**geometry).to(device)
    available = available_backends(device)
    backends = available if args.backends == "all" else [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        if backend not in available:
            raise SystemExit(f"gridinr-bench encoding: backend {backend!r} does not run on {device} here "
                             f"(available: {', '.join(available)})")
    encoders: dict[str, torch.nn.Module] = {}
    calls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for backend in backends:
        encoder = HashGridEncoding(backend=backend, **geometry).to(device)
        encoder.load_state_dict(reference.state_dict())
        encoders[f"ours_{backend}"], calls[f"ours_{backend}"] = encoder, encoder
    if args.compile:
        encoder = HashGridEncoding(backend="torch", **geometry).to(device)
        encoder.load_state_dict(reference.state_dict())
        compiled = torch.compile(lambda x, p=encoder.params: torch_encode(x, p, encoder.geometry, args.features))
        encoders["ours_torch_compiled"], calls["ours_torch_compiled"] = encoder, compiled
    if not args.no_nerfstudio:
        nerfstudio = HashEncoding(num_levels=args.levels, min_res=args.base_resolution, max_res=args.max_resolution,
                                  log2_hashmap_size=args.log2_table, features_per_level=args.features,
                                  implementation="torch").to(device)
        encoders["nerfstudio_torch"], calls["nerfstudio_torch"] = nerfstudio, nerfstudio
    print(
        f"config: {args.levels} levels x {args.features} features, table 2^{args.log2_table}, resolution "
        f"{args.base_resolution}..{args.max_resolution}, batch {batch}, device {device_label(device)}, "
        f"{reference.params.numel() / 1e6:.1f} M params; ours on {', '.join(backends)}",
        flush=True,
    )
    forward_ms = time_alternating({name: _forward(calls[name], positions) for name in encoders}, args.repeats, clock)
    fwd_bwd_ms = time_alternating(
        {name: _forward_backward(encoders[name], positions, upstream, calls[name]) for name in encoders},
        args.repeats, clock,
    )
    result: dict = {
        name: {"fwd_points_per_s": batch / (forward_ms[name] / 1e3), "fwd_bwd_points_per_s": batch / (fwd_bwd_ms[name] / 1e3)}
        for name in encoders
    }
    ours = [name for name in encoders if name.startswith("ours_")]
    best = max(ours, key=lambda name: result[name]["fwd_bwd_points_per_s"])
    result["ours"] = dict(result[best], backend=best.removeprefix("ours_"))
    print(f"{'':22s}{'fwd M points/s':>16s}{'fwd+bwd M points/s':>20s}")
    for name in encoders:
        print(f"{name:22s}{result[name]['fwd_points_per_s'] / 1e6:16.3f}{result[name]['fwd_bwd_points_per_s'] / 1e6:20.3f}")
    if "nerfstudio_torch" in encoders:
        result["ratio"] = {
            "fwd": result["ours"]["fwd_points_per_s"] / result["nerfstudio_torch"]["fwd_points_per_s"],
            "fwd_bwd": result["ours"]["fwd_bwd_points_per_s"] / result["nerfstudio_torch"]["fwd_bwd_points_per_s"],
        }
        print(f"{'ratio (' + best + ')':22s}{result['ratio']['fwd']:15.1f}x{result['ratio']['fwd_bwd']:19.1f}x")

    stepper = encoders[f"ours_{backends[0]}"]
    params = [stepper.params]
    optimizers = {"torch_adam_fused": torch.optim.Adam(params, lr=1e-2, eps=1e-15, fused=True),
                  "hash_grid_adam": HashGridAdam(params, lr=1e-2, eps=1e-15)}  # backward reuses its buffer
    if device.type == "cpu":
        optimizers = {"torch_adam": torch.optim.Adam(params, lr=1e-2, eps=1e-15), **optimizers}  # for-loop version
    result["training_step_ms"] = {
        name: _training_step_ms(stepper, optimizer, positions, upstream, args.repeats, clock)
        for name, optimizer in optimizers.items()
    }
    print(f"one training step of ours_{backends[0]} (fresh gradient buffer each step, except hash_grid_adam), "
          "ms (median):")
    print(f"{'':18s}" + "".join(f"{part:>10s}" for part in ("forward", "backward", "step", "total")))
    for name, parts in result["training_step_ms"].items():
        print(f"{name:18s}" + "".join(f"{value:10.2f}" for value in parts.values()))
    if "triton" in backends:  # fused field inference: only where the compiled Triton kernels run (CUDA)
        layers = decoder_layers(reference.get_out_dim(), args.decoder, device)
        batches = [int(b) for b in args.decode_batches.split(",") if b.strip()]
        ours_encoders = {name: encoders[name] for name in encoders if name.startswith("ours_") and name in calls
                         and isinstance(calls[name], HashGridEncoding)}
        result["decode"] = decode_benchmark(ours_encoders, layers, batches, args.repeats, clock)
        result["decode"]["decoder"] = args.decoder
        print(f"field inference (encoding + decoder {args.decoder}), M points/s (median):")
        names = [name for name in result["decode"][str(batches[0])] if not name.startswith("max_abs")]
        print(f"{'batch':>10s}" + "".join(f"{name:>22s}" for name in names) + f"{'max |fused-unfused|':>22s}")
        for b in batches:
            row = result["decode"][str(b)]
            print(f"{b:10d}" + "".join(f"{row[name] / 1e6:22.3f}" for name in names)
                  + f"{row['max_abs_diff_fused_vs_unfused']:22.2e}")
    result["config"] = {"device": str(device), "batch": batch, "backends": backends, **geometry,
                        "threads": torch.get_num_threads()}
    return result
