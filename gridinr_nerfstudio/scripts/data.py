"""`gridinr-data`: inspect a volume (`info PATH`), rewrite one in another container (`convert IN OUT`) or write the
built-in default volume (`default OUT_DIR`).

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
from gridinr_nerfstudio.data.volume_io import VolumeError, VolumeInfo, check_trainable, open_volume, read_info
from gridinr_nerfstudio.safe_write import OutputError

FORMATS = "dataset folder or dataset.json, name_XxYxZ_dtype.raw, .npy, NRRD, NIfTI, .vti, .vtk, HDF5/NetCDF-4, Zarr"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridinr-data",
                                     description="Inspect and convert volumes, write the default volume.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="dims, dtype, spacing, variables, time steps and value ranges of PATH")
    info.add_argument("path", type=Path, help=FORMATS)
    info.add_argument("--variable", help="only this variable, array or dataset path (default: all)")
    info.add_argument("--timestep", type=int, help="only this time step, 1-based (default: all)")
    info.add_argument("--nan-policy", choices=("error", "replace"), default="error",
                      help="NaN/Inf values: fail (default) or replace them with --replace-value")
    info.add_argument("--replace-value", type=float, default=0.0, help="substitute for NaN/Inf (original units)")

    convert = commands.add_parser("convert", help="one variable and time step of IN as NRRD, .vti, .npy or raw + "
                                  "dataset.json, streamed in slabs")
    convert.add_argument("input", type=Path, help=FORMATS)
    convert.add_argument("output", type=Path, help="OUT.nrrd, OUT.vti, OUT.npy (Z, Y, X) or OUT.raw (writes the "
                         "dataset folder OUT/ with dataset.json)")
    convert.add_argument("--variable", help="variable, array or dataset path (default: the file's only or default one)")
    convert.add_argument("--timestep", type=int, default=1, help="time step, 1-based (default 1)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never the input)")

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
    info = read_info(path, variable)
    variables = info.variables if variable is None else [info.variable or variable]
    each = info.variable is not None and len(variables) > 1  # arrays of their own shapes: each described
    lines = [
        f"path:        {info.path}",
        f"format:      {info.format}",
        f"name:        {info.name}",
        *([] if each else _geometry_lines(info)),
        f"variables:   {', '.join(_marked(info))}",
        f"description: {info.description}",
    ]
    if info.other_arrays:
        lines.append(f"not volumes: {', '.join(info.other_arrays)}")
    if each:
        for var in variables:
            lines.append(f"variable {var}:")
            lines += [f"  {line}" for line in _geometry_lines(read_info(path, var))]
    lines.append("value range:")
    for var in variables:
        total = read_info(path, var).total_samples if info.variable is not None else info.total_samples
        for step in (range(1, total + 1) if timestep is None else [timestep]):
            volume = open_volume(path, var, step, nan_policy=nan_policy, replace_value=replace_value)
            lines.append(f"  {var} t={step}: [{volume.value_min:.7g}, {volume.value_max:.7g}]")
            try:
                check_trainable(volume)
            except VolumeError as error:
                if problems is not None and str(error) not in problems:
                    problems.append(str(error))
    return lines


def _marked(info: VolumeInfo) -> list[str]:
    """Variable names, the default one marked when there are several."""
    several = len(info.variables) > 1
    return [f"{v} (default)" if several and v == info.default_variable else v for v in info.variables]


def _geometry_lines(info: VolumeInfo) -> list[str]:
    x, y, z = info.dims
    return [
        f"dims:        {x} x {y} x {z} (X x Y x Z)",
        f"dtype:       {info.dtype}",
        f"spacing:     {' '.join(f'{s:g}' for s in info.spacing)}",
        f"origin:      {' '.join(f'{s:g}' for s in info.origin)}",
        f"time steps:  {info.total_samples}",
        f"storage:     {info.storage}",
    ]


def convert(args: argparse.Namespace) -> str:
    """Run `gridinr-data convert`; the line it prints."""
    from gridinr_nerfstudio.export.convert import convert_volume

    done = convert_volume(args.input, args.output, args.variable, args.timestep, args.overwrite)
    x, y, z = done.info.dims
    unpacked = ", values unpacked to float32" if done.unpacked else ""
    return (f"wrote {done.output} ({x} x {y} x {z} {done.dtype}{unpacked}, {done.bytes_written} bytes) from "
            f"{done.info.path} variable {done.variable} t={done.timestep}")


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
        elif args.command == "convert":
            print(convert(args))
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
