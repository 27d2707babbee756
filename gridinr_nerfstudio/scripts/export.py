"""`gridinr-export`: results out to ParaView and friends.

    gridinr-export volume --load-config RUN/config.yml --output out.{nrrd,vti,raw,npy} [--resolution N | --dims X Y Z]
                          [--timestep T] [--units data|normalized]      (or --model model.safetensors instead of a run)
    gridinr-export mesh --load-config RUN/config.yml --isovalue V --output out.{ply,obj} [--normals] [--resolution N]
    gridinr-export transfer-function --load-config RUN/config.yml --output tf.json [--name NAME] [--samples N]
    gridinr-export model --load-config RUN/config.yml --output model.safetensors [--half]

Every subcommand also takes --overwrite: without it an existing output is refused; with it, it is replaced. No
export ever writes over a file the run reads (its volume, dataset.json, config, checkpoints), and files appear only
when complete (safe_write.py). Bad input ends with exit status 1 and one line on stderr, never a traceback.
See gridinr_nerfstudio/export/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_source(parser: argparse.ArgumentParser, model_file: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--load-config", type=Path, help="the run's config.yml (gridinr-fit or gridinr-edit)")
    if model_file:
        group.add_argument("--model", type=Path, help="a field file written by `gridinr-export model` (no run needed)")


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output if it exists (default: refuse); never a file the run reads")


def _add_grid(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--resolution", type=int, help="voxels along the longest axis (others in proportion)")
    grid.add_argument("--dims", type=int, nargs=3, metavar=("X", "Y", "Z"), help="output grid size")
    parser.add_argument("--timestep", type=float, help="time step (1-based, as in the file names) of a sequence run "
                        "(default: its first); a fraction between two steps (2.5) decodes the field in between; a "
                        "single-step run has only its own")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridinr-export", description="Export fitted volumes for ParaView and friends.")
    commands = parser.add_subparsers(dest="command", required=True)

    volume = commands.add_parser("volume", help="the INR decoded on a grid: .nrrd, .vti, .raw (dataset folder) or .npy")
    _add_overwrite(volume)
    _add_source(volume)
    volume.add_argument("--output", type=Path, required=True, help="out.nrrd, out.vti, out.raw (writes folder out/) or out.npy")
    _add_grid(volume)
    volume.add_argument("--units", choices=("data", "normalized"), default="data",
                        help="data: the volume's own units and dtype (default); normalized: float32 in [0, 1]")
    volume.add_argument("--slab-voxels", type=int, default=1 << 22, help="voxels decoded at once (memory bound)")

    mesh = commands.add_parser("mesh", help="an isosurface of the INR: .ply or .obj, vertices in physical units")
    _add_overwrite(mesh)
    _add_source(mesh)
    mesh.add_argument("--isovalue", type=float, required=True, help="in data units (see --units)")
    mesh.add_argument("--output", type=Path, required=True, help="out.ply or out.obj")
    _add_grid(mesh)
    mesh.add_argument("--units", choices=("data", "normalized"), default="data", help="units of --isovalue")
    mesh.add_argument("--normals", action="store_true", help="vertex normals from the field's gradient")

    tf = commands.add_parser("transfer-function", help="the run's transfer function as a ParaView preset (JSON)")
    _add_overwrite(tf)
    _add_source(tf, model_file=False)
    tf.add_argument("--output", type=Path, required=True, help="tf.json")
    tf.add_argument("--name", help="preset name (default: volume and variable)")
    tf.add_argument("--units", choices=("data", "normalized"), default="data", help="range of the preset's values")
    tf.add_argument("--samples", type=int,
                    help="gridinr-edit runs: nodes at which to sample the edited transfer function (default: its own "
                         "lookup table)")

    model = commands.add_parser("model", help="the field alone (table + MLP + geometry + metadata) as safetensors")
    _add_overwrite(model)
    _add_source(model, model_file=False)
    model.add_argument("--output", type=Path, required=True, help="model.safetensors")
    model.add_argument("--half", action="store_true", help="store the table and MLP as float16")
    model.add_argument("--no-psnr", action="store_true", help="skip the volume PSNR (a pass over the raw volume)")
    return parser


def _load_source(args: argparse.Namespace):
    from gridinr_nerfstudio.export.model import load_model
    from gridinr_nerfstudio.export.source import from_run

    source = load_model(args.model) if getattr(args, "model", None) is not None else from_run(args.load_config)
    if args.command == "model":
        return source  # the whole field, every step of a sequence
    return source.at_timestep(getattr(args, "timestep", None))


def _fmt_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return str(count)


def _fmt_psnr(psnr) -> str:
    return "n/a" if psnr is None else f"{psnr:.2f} dB"


def compression_line(source) -> str:
    """Volume bytes, model bytes (fp32 and fp16) and parameters: printed by every export of a field."""
    from gridinr_nerfstudio.export.model import field_parameter_count

    params = field_parameter_count(source.field)
    volume_bytes = source.meta.volume_bytes
    return (f"volume {_fmt_bytes(volume_bytes)} ({source.meta.dtype}); model {params:,} parameters: "
            f"{_fmt_bytes(4 * params)} fp32 (ratio {volume_bytes / (4 * params):.3g}), "
            f"{_fmt_bytes(2 * params)} fp16 (ratio {volume_bytes / (2 * params):.3g})")


def run_volume(args: argparse.Namespace) -> None:
    from gridinr_nerfstudio.export.volume import VOLUME_SUFFIXES, check_output, export_volume, output_grid

    check_output(args.output, VOLUME_SUFFIXES, args.overwrite)
    if args.slab_voxels < 1:
        from gridinr_nerfstudio.export.source import ExportError

        raise ExportError(f"--slab-voxels must be positive, got {args.slab_voxels}")
    source = _load_source(args)
    grid = output_grid(source.meta, args.resolution, args.dims)
    result = export_volume(source, args.output, grid, args.units, args.slab_voxels, args.overwrite)
    x, y, z = grid.dims
    print(f"wrote {result.path}: {x} x {y} x {z} {result.dtype} ({result.units} units), spacing "
          f"{' '.join(f'{s:g}' for s in grid.spacing)}, origin 0 0 0 (first voxel centre), "
          f"{_fmt_bytes(result.bytes_written)}")
    print(compression_line(source) + f"; volume PSNR {_fmt_psnr(result.psnr_db)}"
          + ("" if result.psnr_db is not None else " (needs the run's raw volume and the native dims)"))


def run_mesh(args: argparse.Namespace) -> None:
    from gridinr_nerfstudio.export.mesh import MESH_SUFFIXES, export_mesh
    from gridinr_nerfstudio.export.volume import check_output, output_grid

    check_output(args.output, MESH_SUFFIXES, args.overwrite)
    source = _load_source(args)
    grid = output_grid(source.meta, args.resolution, args.dims)
    result = export_mesh(source, args.output, grid, args.isovalue, args.units, args.normals, args.overwrite)
    low, high = result.bounds
    print(f"wrote {result.path}: {result.vertices:,} vertices, {result.faces:,} triangles at isovalue "
          f"{result.isovalue:g} ({args.units} units; {result.level:.4g} normalised) on a "
          f"{' x '.join(map(str, grid.dims))} grid; bounds {' '.join(f'{v:.4g}' for v in low)} .. "
          f"{' '.join(f'{v:.4g}' for v in high)} (physical units){'; normals from the field gradient' if args.normals else ''}")


def run_transfer_function(args: argparse.Namespace) -> None:
    from gridinr_nerfstudio.export.transfer_function import export_preset
    from gridinr_nerfstudio.export.volume import check_output

    check_output(args.output, (".json",), args.overwrite)
    source = _load_source(args)
    result = export_preset(source, args.output, args.name, args.units, args.samples, args.overwrite)
    meta = source.meta
    value_range = f"[{meta.value_min:.7g}, {meta.value_max:.7g}]" if args.units == "data" else "[0, 1]"
    print(f"wrote {result.path}: ParaView preset {result.preset['Name']!r} from the run's {result.kind}, "
          f"{result.nodes} colour nodes, range {value_range} ({args.units} units)")
    for target in result.preset.get("gridinr_targets", []):
        low, high = target["range"]
        print(f"  target {target['target']} ({target['kind']}): {target['label']} on [{low:.6g}, {high:.6g}] "
              f"({args.units} units){'' if target['edits_opacity'] else ', colour only'}")
    print(f"in ParaView: Import Presets, then set the volume's Scalar Opacity Unit Distance to "
          f"{result.unit_distance_physical:.6g} (one voxel of the longest axis, physical units)")


def run_model(args: argparse.Namespace) -> None:
    from gridinr_nerfstudio.export.model import save_model
    from gridinr_nerfstudio.export.volume import check_output

    check_output(args.output, (".safetensors",), args.overwrite)
    source = _load_source(args)
    result = save_model(source, args.output, args.half, measure_psnr=not args.no_psnr, overwrite=args.overwrite)
    precision = "fp16" if args.half else "fp32"
    print(f"wrote {result.path}: {result.params:,} parameters ({precision}), {_fmt_bytes(result.file_bytes)} on disk; "
          f"compression ratio {result.compression_ratio:.3g} against the raw volume "
          f"({_fmt_bytes(result.volume_bytes)}, {source.meta.dtype})")
    print(compression_line(source) + f"; volume PSNR fp32 {_fmt_psnr(result.psnr_fp32_db)}, "
          f"fp16 {_fmt_psnr(result.psnr_fp16_db)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gridinr_nerfstudio.data.volume_io import VolumeError
    from gridinr_nerfstudio.export.source import ExportError
    from gridinr_nerfstudio.safe_write import OutputError

    commands = {"volume": run_volume, "mesh": run_mesh, "transfer-function": run_transfer_function, "model": run_model}
    try:
        commands[args.command](args)
    except (ExportError, VolumeError, OutputError) as error:
        print(f"gridinr-export: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"gridinr-export: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
