"""`gridinr-data`: inspect a volume (`info PATH`) or write the built-in default volume (`default OUT_DIR`).

`default` refuses to replace an existing dataset.json or raw file unless `--overwrite` (safe_write.py).

Bad input ends with exit status 1 and one line on stderr naming the file and the problem, never a traceback.
A volume that opens but cannot be trained (one voxel along an axis, constant values) is reported in full, then
gets the same one-line error `ns-train` gives it, and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gridinr_nerfstudio.data.default_volume import DEFAULT_SIZE, write_default_dataset
from gridinr_nerfstudio.data.volume_io import VolumeError, check_trainable, open_volume, read_info
from gridinr_nerfstudio.safe_write import OutputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridinr-data", description="Inspect volumes and write the default volume.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="dims, dtype, spacing, variables, time steps and value ranges of PATH")
    info.add_argument("path", type=Path, help="dataset folder or dataset.json, name_XxYxZ_dtype.raw, .npy, NRRD, NIfTI")
    info.add_argument("--variable", help="only this variable (default: all)")
    info.add_argument("--timestep", type=int, help="only this time step, 1-based (default: all)")
    info.add_argument("--nan-policy", choices=("error", "replace"), default="error",
                      help="NaN/Inf values: fail (default) or replace them with --replace-value")
    info.add_argument("--replace-value", type=float, default=0.0, help="substitute for NaN/Inf (original units)")

    default = commands.add_parser("default", help="write the built-in procedural volume in the dataset format")
    default.add_argument("out_dir", type=Path, help="folder to write dataset.json and value/default-value-1.raw into")
    default.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"voxels per axis (default {DEFAULT_SIZE})")
    default.add_argument("--overwrite", action="store_true",
                         help="replace dataset.json and the raw file if they exist (default: refuse)")
    return parser


def info_lines(
    path: Path, variable: str | None, timestep: int | None, nan_policy: str, replace_value: float,
    problems: list[str] | None = None,
) -> list[str]:
    """The report of `gridinr-data info`, built whole before printing so a failure prints only its error.

    Why a selection cannot be trained (check_trainable) is appended to `problems` when given."""
    info = read_info(path)
    x, y, z = info.dims
    lines = [
        f"path:        {info.path}",
        f"format:      {info.format}",
        f"name:        {info.name}",
        f"dims:        {x} x {y} x {z} (X x Y x Z)",
        f"dtype:       {info.dtype}",
        f"spacing:     {' '.join(f'{s:g}' for s in info.spacing)}",
        f"variables:   {', '.join(info.variables)}",
        f"time steps:  {info.total_samples}",
        f"description: {info.description}",
        "value range:",
    ]
    variables = info.variables if variable is None else [variable]
    timesteps = range(1, info.total_samples + 1) if timestep is None else [timestep]
    for var in variables:
        for step in timesteps:
            volume = open_volume(path, var, step, nan_policy=nan_policy, replace_value=replace_value)
            lines.append(f"  {var} t={step}: [{volume.value_min:.7g}, {volume.value_max:.7g}]")
            try:
                check_trainable(volume)
            except VolumeError as error:
                if problems is not None and str(error) not in problems:
                    problems.append(str(error))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            problems: list[str] = []
            print("\n".join(info_lines(args.path, args.variable, args.timestep, args.nan_policy, args.replace_value,
                                       problems)))
            for problem in problems:
                print(f"gridinr-data: error: {problem}", file=sys.stderr)
            if problems:
                return 1
        else:
            if args.size < 2:
                raise VolumeError(f"{args.out_dir}: --size must be at least 2, got {args.size}")
            out_dir = write_default_dataset(args.out_dir, args.size, overwrite=args.overwrite)
            print(f"wrote the default volume ({args.size}x{args.size}x{args.size} float32) to {out_dir}")
    except (VolumeError, OutputError, OSError) as error:
        print(f"gridinr-data: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
