"""``gridinr-bench compression``: how much the INR compresses a volume, and whether simpler storage does better.

Fits the hash-grid INR at three sizes (APMGSRN-style tiers: about 65 K, 1 M and 16 M parameters) to one volume,
each for the same wall-time budget with the method's sampler, optimizers and learning-rate schedule (the loop of
``gridinr-bench fit``), then measures in the same run, at each model's byte budget (fp32, and fp16 cast):

- ``INR``: volume PSNR of the field at native resolution (every voxel, normalised units, data range 1);
- ``downsampled``: the volume area-averaged to the most voxels that fit the budget in its own dtype, then
  trilinearly upsampled back (voxel centres aligned, as our coordinates are);
- ``downsampled fp16``: the same with the voxels stored as float16 (at budgets above the volume's fp16 size this
  is the whole volume cast to float16);
- ``SZ3`` (PSNR mode, target searched to fill the budget) and ``ZFP`` (fixed rate) on the normalised volume, the
  lossy compressors scientists use (`lossy_compressors.py`; skipped with a note when pysz / zfpy are missing).

``--ratios`` adds rows without an INR: the baselines and compressors at those compression ratios.

"lossless" means the raw volume itself fits the budget: the INR does not compress it at that size. The compression
ratio is the raw volume's bytes (its own dtype) over the model's. Fits are short by default (``--seconds``): the
INR PSNRs are those of a time budget, not converged values; the large tier needs more time than the small one.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gridinr_nerfstudio.data.default_volume import BUILTIN_DEFAULT, open_data
from gridinr_nerfstudio.data.volume_io import Volume, scene_aabb
from gridinr_nerfstudio.export.model import half_precision_copy
from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings
from gridinr_nerfstudio.gridinr_config import fit_trainer_config
from gridinr_nerfstudio.scripts.bench import lossy_compressors
from gridinr_nerfstudio.scripts.bench.fit import Contender
from gridinr_nerfstudio.scripts.bench.timing import Clock
from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler
from gridinr_nerfstudio.stages.fit.model import volume_psnr

TIERS = {
    # levels x features, table 2^T per level, finest resolution, MLP hidden layers x width
    "small": VolumeFieldSettings(num_levels=8, features_per_level=2, log2_hashmap_size=12, base_resolution=16,
                                 max_resolution=128, hidden_dim=32, num_hidden_layers=1),  # 66,113 parameters
    "medium": VolumeFieldSettings(num_levels=12, features_per_level=2, log2_hashmap_size=16, base_resolution=16,
                                  max_resolution=256, hidden_dim=64, num_hidden_layers=2),  # 1,206,257
    "large": VolumeFieldSettings(num_levels=16, features_per_level=2, log2_hashmap_size=20, base_resolution=16,
                                 max_resolution=256, hidden_dim=64, num_hidden_layers=2),  # 15,491,617
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compression",
        help="INR at ~65K/1M/16M parameters vs the volume downsampled to the same bytes (and fp16)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=BUILTIN_DEFAULT, help="volume (default: the built-in one)")
    parser.add_argument("--seconds", type=float, default=20.0, help="training wall time per model size")
    parser.add_argument("--batch", type=int, default=1 << 16, help="points per training step")
    parser.add_argument("--tiers", default="small,medium,large",
                        help=f"comma-separated subset of {', '.join(TIERS)}, or none (only --ratios rows)")
    parser.add_argument("--ratios", default="",
                        help="also these compression ratios (comma-separated, e.g. 8,16,64,128) for the baselines and "
                             "SZ3/ZFP, without an INR")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (0: torch's default)")
    return parser


def quantize(normalized: torch.Tensor, volume: Volume, dtype: np.dtype) -> torch.Tensor:
    """Normalised values stored as `dtype` in the volume's own units and read back (normalised)."""
    low, high = volume.value_min, volume.value_max
    data = normalized.double() * (high - low) + low
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        data = data.round().clamp(max(info.min, math.ceil(low)), min(info.max, math.floor(high)))
    else:
        data = torch.from_numpy(data.numpy().astype(dtype).astype(np.float64))
    return ((data - low) / (high - low) if high > low else data * 0).float()


def downsampled_dims(dims: tuple[int, int, int], voxels: int) -> tuple[int, int, int] | None:
    """The largest grid with the volume's proportions holding at most `voxels` (None: the full volume fits)."""
    if voxels >= int(np.prod(dims)):
        return None
    factor = (voxels / float(np.prod(dims))) ** (1.0 / 3.0)
    grid = [max(2, int(math.floor(n * factor))) for n in dims]
    while int(np.prod(grid)) > voxels and max(grid) > 2:
        grid[int(np.argmax(grid))] -= 1
    return tuple(grid)


def downsample_psnr(volume: Volume, target: torch.Tensor, budget_bytes: int, dtype: np.dtype) -> tuple[float, str]:
    """(PSNR dB, grid) of the volume area-averaged into `budget_bytes` of `dtype` and trilinearly upsampled."""
    grid = downsampled_dims(volume.info.dims, budget_bytes // dtype.itemsize)
    if grid is None:
        stored = quantize(target, volume, dtype)
        label = "full"
    else:
        x, y, z = grid
        small = F.interpolate(target[None, None], size=(z, y, x), mode="area")[0, 0]
        small = quantize(small, volume, dtype)
        stored = F.interpolate(small[None, None], size=target.shape, mode="trilinear", align_corners=True)[0, 0]
        label = f"{x}x{y}x{z}"
    mse = float((stored.clamp(0, 1).double() - target.double()).square().mean())
    return (float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)), label


def train(settings: VolumeFieldSettings, volume: Volume, aabb: torch.Tensor, seconds: float, batch: int) -> Contender:
    """One field fitted for `seconds` with the method's optimizers and a log-linear lr decay over the budget."""
    method = fit_trainer_config()
    lr_finals = {name: group["scheduler"].lr_final for name, group in method.optimizers.items()}
    torch.manual_seed(0)
    sampler = VolumePointSampler(volume, aabb, sampling=method.pipeline.datamanager.sampling,
                                 continuous_fraction=method.pipeline.datamanager.continuous_fraction, subsample_factor=1)
    contender = Contender("ours", VolumeField(aabb, settings), method, lr_finals, None, sampler, aabb,
                          Clock(torch.device("cpu")))
    while contender.seconds < seconds:
        contender.step(batch, min(contender.seconds / seconds, 1.0))
    return contender


def baseline_columns(volume: Volume, target: torch.Tensor, budget: int, notes: dict[str, str]) -> dict:
    """Downsampling (own dtype, fp16), SZ3 and ZFP at `budget` bytes: PSNR (dB), grid / bytes / setting.

    A budget at least the raw volume's size is lossless for all of them (the raw volume fits)."""
    own_dtype = np.dtype(volume.info.dtype)
    down, down_grid = downsample_psnr(volume, target, budget, own_dtype)
    down16, down16_grid = downsample_psnr(volume, target, budget, np.dtype(np.float16))
    columns = {"downsampled_psnr_db": down, "downsampled_grid": down_grid,
               "downsampled_fp16_psnr_db": down16, "downsampled_fp16_grid": down16_grid}
    raw_fits = budget >= int(np.prod(volume.info.dims)) * own_dtype.itemsize
    normalized = target.numpy()
    for name, compress in (("SZ3", lossy_compressors.sz3_at_budget), ("ZFP", lossy_compressors.zfp_at_budget)):
        key = name.lower()
        reason = lossy_compressors.missing(name)
        if reason is not None:
            notes[name] = reason
            result = None
        elif raw_fits:
            result = lossy_compressors.Compressed(budget, math.inf, "raw volume fits")
        else:
            result = compress(normalized, budget)
        columns[f"{key}_psnr_db"] = None if result is None else result.psnr_db
        columns[f"{key}_bytes"] = None if result is None else result.bytes
        columns[f"{key}_setting"] = ("not installed" if reason is not None else "does not fit" if result is None
                                     else result.setting)
    return columns


def run(args: argparse.Namespace) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    volume = open_data(args.data)
    aabb = scene_aabb(volume)
    target = torch.from_numpy(volume.normalized_array())
    own_dtype = np.dtype(volume.info.dtype)
    volume_bytes = int(np.prod(volume.info.dims)) * own_dtype.itemsize
    tiers = [name.strip() for name in args.tiers.split(",") if name.strip() and name.strip().lower() != "none"]
    unknown = [name for name in tiers if name not in TIERS]
    if unknown:
        raise SystemExit(f"gridinr-bench compression: unknown tier(s) {', '.join(unknown)} (use {', '.join(TIERS)})")
    try:
        ratios = [float(r) for r in str(getattr(args, "ratios", "") or "").split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"gridinr-bench compression: --ratios {args.ratios!r}: comma-separated numbers") from None
    if any(r <= 0 for r in ratios):
        raise SystemExit("gridinr-bench compression: --ratios must be > 0")
    print(f"volume {volume.info.name} {volume.info.dims} {volume.info.dtype}, {volume_bytes:,} bytes; "
          f"{args.seconds:g} s of training per size, batch {args.batch}, torch threads {torch.get_num_threads()}",
          flush=True)
    rows, notes = [], {}
    for name in tiers:
        contender = train(TIERS[name], volume, aabb, args.seconds, args.batch)
        field = contender.model.eval()
        params = sum(p.numel() for p in field.parameters())
        for precision, model, bytes_per_param in (("fp32", field, 4), ("fp16", half_precision_copy(field), 2)):
            budget = params * bytes_per_param
            rows.append({
                "tier": name, "precision": precision, "params": params, "bytes": budget,
                "compression_ratio": volume_bytes / budget, "iterations": contender.iterations,
                "train_seconds": contender.seconds, "inr_psnr_db": volume_psnr(model.forward_unit, volume),
                **baseline_columns(volume, target, budget, notes),
            })
        print(f"  {name}: {params:,} parameters, {contender.iterations} iterations in {contender.seconds:.1f} s",
              flush=True)
    for ratio in ratios:
        budget = int(volume_bytes / ratio)
        rows.append({"tier": f"ratio {ratio:g}", "precision": "", "params": None, "bytes": budget,
                     "compression_ratio": volume_bytes / budget, "iterations": None, "train_seconds": None,
                     "inr_psnr_db": None, **baseline_columns(volume, target, budget, notes)})
    print_table(rows)
    for note in notes.values():
        print(f"note: {note}")
    return {"rows": rows, "notes": list(notes.values()),
            "config": {"data": str(args.data), "dims": list(volume.info.dims), "dtype": volume.info.dtype,
                       "volume_bytes": volume_bytes, "seconds": args.seconds, "batch": args.batch,
                       "threads": torch.get_num_threads(), "ratios": ratios,
                       "tiers": {name: vars(TIERS[name]) for name in tiers}}}


def _psnr(value: float | None) -> str:
    if value is None:
        return "-"
    return "lossless" if math.isinf(value) else f"{value:.2f}"


def _compressed(row: dict, key: str) -> str:
    value = row.get(f"{key}_psnr_db")
    if value is None:
        return f"- ({row.get(f'{key}_setting') or 'not run'})"
    if math.isinf(value):
        return "lossless"
    return f"{value:.2f} ({row[f'{key}_bytes']:,} B)"


def print_table(rows: list[dict]) -> None:
    header = ["model", "params", "bytes", "ratio", "INR dB", "downsampled dB (grid)", "downsampled fp16 dB (grid)",
              "SZ3 dB (bytes)", "ZFP dB (bytes)"]
    print("| " + " | ".join(header) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        params = "-" if row["params"] is None else f"{row['params']:,}"
        print(f"| {row['tier']} {row['precision']} | {params} | {row['bytes']:,} | "
              f"{row['compression_ratio']:.3g} | {_psnr(row['inr_psnr_db'])} | "
              f"{_psnr(row['downsampled_psnr_db'])} ({row['downsampled_grid']}) | "
              f"{_psnr(row['downsampled_fp16_psnr_db'])} ({row['downsampled_fp16_grid']}) | "
              f"{_compressed(row, 'sz3')} | {_compressed(row, 'zfp')} |")
