"""`gridinr-render dataset`: a nerfstudio-format training set rendered from a run (fit or edit) or the raw volume,
from a camera distribution, with a look drawn per image (see export/dataset.py for the folder's format).

Everything that can be checked is checked before the (slow) loading and rendering: bad input ends with exit status
1 and one line on stderr, and nothing is written.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from gridinr_nerfstudio.data.camera_distributions import (
    DISTRIBUTIONS,
    CameraJitter,
    CameraSpecError,
    RANDOM_JITTER,
    camera_path_set,
    make_camera_set,
)
from gridinr_nerfstudio.data.volume_io import VolumeError
from gridinr_nerfstudio.export.dataset import (
    DatasetError,
    DatasetOutputs,
    RunScene,
    VolumeScene,
    check_output_folder,
    plan_frames,
    write_dataset,
)
from gridinr_nerfstudio.rendering.appearance import AppearanceError, AppearanceOptions, check_options, draw_appearances
from gridinr_nerfstudio.rendering.settings import RenderSettings

_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")
_RANGE = re.compile(r"^\s*(-?[\d.]+)\s*:\s*(-?[\d.]+)\s*$")


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "dataset", help="a nerfstudio-format training set (transforms.json, images/, depth/, normals/, masks/)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load-config", type=Path, help="a gridinr-fit or gridinr-edit run's config.yml")
    source.add_argument("--data", type=Path, help="a volume (any format gridinr reads, or builtin-default): raw voxels")
    parser.add_argument("--output", type=Path, required=True, help="dataset folder (new or empty, or --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the dataset entries (transforms.json, images/, depth/, normals/, masks/) of a "
                             "folder that is not empty; other files stay")
    cameras = parser.add_argument_group("cameras")
    cameras.add_argument("--cameras", default="sphere", metavar="orbit|sphere|random|PATH",
                         help="orbit: rings at --elevations; sphere: evenly over the whole sphere (Fibonacci spiral); "
                              "random: uniform directions with jitter; PATH: a nerfstudio camera path .json "
                              "(viewer export). Default sphere")
    cameras.add_argument("--num-images", type=int, default=None,
                         help="cameras (default 100; for a camera path: all of its cameras, or this many evenly spaced)")
    cameras.add_argument("--image-size", default=None, metavar="S|WxH",
                         help="pixels: S (square) or WxH (default 256; a camera path sets its own)")
    cameras.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    cameras.add_argument("--radius", type=float, default=2.5, help="camera distance from the centre (default 2.5)")
    cameras.add_argument("--fov", type=float, default=45.0, help="vertical field of view, degrees (default 45)")
    cameras.add_argument("--rings", type=int, default=3, help="orbit: rings (default 3)")
    cameras.add_argument("--elevations", default="-30:60", metavar="A:B",
                         help="orbit: elevation of the lowest and highest ring, degrees (default -30:60)")
    for name, unit, default in (("radius", "fraction of --radius", RANDOM_JITTER.radius),
                                ("fov", "degrees", RANDOM_JITTER.fov_degrees),
                                ("roll", "degrees", RANDOM_JITTER.roll_degrees),
                                ("look-at", "world units per axis", RANDOM_JITTER.look_at)):
        cameras.add_argument(f"--{name}-jitter", type=float, default=None,
                             help=f"uniform +- this ({unit}); default {default:g} for random, 0 otherwise")
    look = parser.add_argument_group("appearance (drawn per image, recorded per frame)")
    look.add_argument("--presets", nargs="+", default=[], metavar="NAME",
                      help="ParaView presets to draw from: shipped names, JSON files, or 'all' (the shipped ones)")
    look.add_argument("--colormaps", nargs="+", default=[], metavar="NAME",
                      help="matplotlib colormaps to draw from (with the base opacity ramp)")
    look.add_argument("--opacity-ramp", default=None, metavar="LOW:HIGH:SCALE",
                      help="opacity ramp of colormap looks: 0 below LOW, rising to SCALE at HIGH (normalised values; "
                           "default: the run's, 0.1:0.6:0.25 for --data)")
    look.add_argument("--colormap-shift", type=float, default=0.0, help="colours slide by U(-s, s) in value")
    look.add_argument("--opacity-shift", type=float, default=0.0, help="the opacity curve slides by U(-s, s) in value")
    look.add_argument("--opacity-scale", default="1:1", metavar="A:B", help="opacities x log-uniform factor in [A, B]")
    look.add_argument("--shading", choices=("on", "off", "random"), default=None,
                      help="gradient shading (default: the run's setting; off for --data)")
    look.add_argument("--background", nargs="+", default=[], metavar="COLOUR",
                      help="choices per image: black, white, gray, random (uniform RGB) or R,G,B in [0, 1]")
    extra = parser.add_argument_group("outputs")
    extra.add_argument("--depth", action="store_true", help="depth/ (16-bit PNG z-depth, nerfstudio's depth format)")
    extra.add_argument("--normals", action="store_true", help="normals/ (world-frame normals as RGB PNG)")
    extra.add_argument("--masks", action="store_true", help="masks/ (0 = background, nerfstudio's mask_path)")
    extra.add_argument("--mask-threshold", type=float, default=0.05,
                       help="accumulation from which a pixel counts as volume (masks, depth, normals; default 0.05)")
    data = parser.add_argument_group("time steps and raw volumes")
    data.add_argument("--timesteps", default=None, metavar="all|N|A:B",
                      help="steps of a sequence, each rendered from every camera with its time (default: a run's "
                           "steps; step 1 of a volume)")
    data.add_argument("--variable", default=None, help="--data: the variable (default: the first)")
    data.add_argument("--num-samples", type=int, default=None,
                      help="samples per ray (default: the run's render setting; 128 for --data)")
    return parser


def parse_size(text: str) -> tuple[int, int]:
    match = _SIZE.match(text)
    if match is None or int(match[1]) < 2 or (match[2] is not None and int(match[2]) < 2):
        raise DatasetError(f"--image-size {text!r}: use S or WxH with sides >= 2")
    width = int(match[1])
    return width, int(match[2]) if match[2] is not None else width


def parse_range(text: str, option: str) -> tuple[float, float]:
    match = _RANGE.match(text)
    if match is None:
        raise DatasetError(f"{option} {text!r}: use A:B")
    try:
        low, high = float(match[1]), float(match[2])
    except ValueError:
        raise DatasetError(f"{option} {text!r}: use A:B with numbers") from None
    if low > high:
        raise DatasetError(f"{option} {text!r}: A must be <= B")
    return low, high


def parse_ramp(text: str) -> tuple[float, float, float]:
    try:
        low, high, scale = (float(part) for part in text.split(":"))
    except ValueError:
        raise DatasetError(f"--opacity-ramp {text!r}: use LOW:HIGH:SCALE") from None
    if not (0.0 <= low <= high <= 1.0 and 0.0 <= scale <= 1.0):
        raise DatasetError(f"--opacity-ramp {text!r}: needs 0 <= LOW <= HIGH <= 1 and 0 <= SCALE <= 1")
    return low, high, scale


def appearance_options(args: argparse.Namespace) -> AppearanceOptions:
    from gridinr_nerfstudio.transfer.paraview import available_presets

    presets = available_presets() if [p.lower() for p in args.presets] == ["all"] else list(args.presets)
    return AppearanceOptions(presets=presets, colormaps=list(args.colormaps), colormap_shift=args.colormap_shift,
                             opacity_shift=args.opacity_shift,
                             opacity_scale=parse_range(args.opacity_scale, "--opacity-scale"),
                             shading=args.shading, backgrounds=list(args.background))


def camera_jitter(args: argparse.Namespace) -> Optional[CameraJitter]:
    given = (args.radius_jitter, args.fov_jitter, args.roll_jitter, args.look_at_jitter)
    if all(value is None for value in given):
        return None
    defaults = RANDOM_JITTER if args.cameras == "random" else CameraJitter()
    radius, fov, roll, target = (default if value is None else value for value, default in
                                 zip(given, (defaults.radius, defaults.fov_degrees, defaults.roll_degrees,
                                             defaults.look_at)))
    return CameraJitter(radius=radius, fov_degrees=fov, roll_degrees=roll, look_at=target)


def camera_set_of(args: argparse.Namespace):
    if args.cameras in DISTRIBUTIONS:
        width, height = parse_size(args.image_size or "256")
        return make_camera_set(args.cameras, 100 if args.num_images is None else args.num_images, width, height,
                               radius=args.radius, fov_degrees=args.fov, jitter=camera_jitter(args), seed=args.seed,
                               rings=args.rings, elevation_range=parse_range(args.elevations, "--elevations"))
    path = Path(args.cameras)
    if path.suffix.lower() != ".json" or not path.is_file():
        raise CameraSpecError(f"--cameras {args.cameras!r}: neither {', '.join(DISTRIBUTIONS)} nor a camera path .json file")
    if args.image_size is not None:
        raise CameraSpecError(f"--image-size: the camera path {path} sets the image size (render_width, render_height)")
    return camera_path_set(path, args.num_images)


def selected_steps(spec: Optional[str], available: list[int], where: Path) -> list[int]:
    """The steps `--timesteps` picks among `available` (default: all of them)."""
    from gridinr_nerfstudio.data.timesteps import parse_timesteps

    if spec is None:
        return list(available)
    steps = parse_timesteps(spec, available[0], max(available), where)
    missing = [step for step in steps if step not in available]
    if spec.strip().lower() == "all":
        steps = list(available)
    elif missing:
        raise DatasetError(f"{where}: time step {missing[0]} is not in it (its steps: {', '.join(map(str, available))})")
    return steps


def open_scene(args: argparse.Namespace):
    """The scene to render, the steps selected and the files it reads (never written over)."""
    if args.load_config is not None:
        from gridinr_nerfstudio.export.source import run_inputs
        from gridinr_nerfstudio.scripts.render import RenderError, load_run_model

        if not args.load_config.is_file():
            raise DatasetError(f"{args.load_config}: no such config file (give a run's config.yml)")
        try:
            model, checkpoint = load_run_model(args.load_config)
        except RenderError as error:
            raise DatasetError(str(error)) from None
        stage = "gridinr-edit" if hasattr(model, "transfer_mlp") else "gridinr-fit"
        scene = RunScene(model, f"{stage} run {args.load_config}")
        if args.num_samples is not None:
            scene.base = replace(scene.base, num_samples=args.num_samples)
        return scene, selected_steps(args.timesteps, scene.steps, args.load_config), \
            run_inputs(args.load_config, checkpoint, model)
    from gridinr_nerfstudio.data.default_volume import is_builtin, open_data
    from gridinr_nerfstudio.data.timesteps import parse_timesteps, share_value_range
    from gridinr_nerfstudio.data.volume_io import read_info
    from gridinr_nerfstudio.export.source import volume_input_files
    from gridinr_nerfstudio.safe_write import ProtectedFiles

    total = 1 if is_builtin(args.data) else read_info(args.data).total_samples
    steps = parse_timesteps(args.timesteps, 1, total, args.data)
    volumes = [open_data(args.data, variable=args.variable, timestep=step) for step in steps]
    share_value_range(volumes)
    settings = RenderSettings(num_samples=args.num_samples or RenderSettings().num_samples)
    inputs = ProtectedFiles()
    for volume in volumes:
        for path, what in volume_input_files(volume):
            inputs.add(path, what.replace("the run's volume", "the volume"))
    return VolumeScene(volumes, steps, settings, f"volume {args.data}"), steps, inputs


def run(args: argparse.Namespace) -> int:
    try:
        if args.num_images is not None and args.num_images < 1:
            raise DatasetError("--num-images must be >= 1")
        if args.num_samples is not None and args.num_samples < 1:
            raise DatasetError("--num-samples must be >= 1")
        if not 0.0 < args.mask_threshold <= 1.0:
            raise DatasetError("--mask-threshold must lie in (0, 1]")
        inputs = [path for path in (args.load_config.parent if args.load_config else None, args.data) if path]
        check_output_folder(args.output, args.overwrite, inputs)
        options = appearance_options(args)
        check_options(options)
        ramp = parse_ramp(args.opacity_ramp) if args.opacity_ramp is not None else None
        camera_set = camera_set_of(args)
        scene, steps, protected = open_scene(args)
        check_output_folder(args.output, args.overwrite, inputs, protected)
        if ramp is not None:
            scene.base = replace(scene.base, opacity_low=ramp[0], opacity_high=ramp[1], opacity_scale=ramp[2])
        if scene.learned_look and (options.changes_transfer_function() or ramp is not None):
            raise DatasetError(f"{args.load_config}: an edit run's look is its learned transfer function; presets, "
                               "colormaps, ramps, shifts and opacity scales apply to fit runs and --data")
        frames = plan_frames(camera_set, scene.steps, steps)
        rng = np.random.default_rng([args.seed, 1])
        appearances = draw_appearances(options, scene.base, len(frames), rng, learned_look=scene.learned_look)
        outputs = DatasetOutputs(depth=args.depth, normals=args.normals, masks=args.masks,
                                 mask_threshold=args.mask_threshold)
        description = {
            "cameras": {"distribution": args.cameras, "count": len(camera_set), "seed": args.seed,
                        "radius": args.radius, "fov_degrees": args.fov, "rings": args.rings,
                        "elevations": args.elevations, "jitter": vars(camera_jitter(args) or (
                            RANDOM_JITTER if args.cameras == "random" else CameraJitter()))},
            "appearance": vars(options),
            "timesteps": steps,
        }
        with _progress(len(frames)) as advance:
            transforms = write_dataset(scene, camera_set, frames, appearances, args.output, outputs,
                                       overwrite=args.overwrite, description=description, progress=advance,
                                       protected=protected)
    except (DatasetError, CameraSpecError, AppearanceError, VolumeError, OSError) as error:
        print(f"gridinr-render: error: {error}", file=sys.stderr)
        return 1
    width, height = camera_set.width, camera_set.height
    print(f"wrote {len(frames)} frames ({width}x{height}) of {scene.origin} to {transforms}")
    return 0


class _progress:
    """A transient rich progress bar; `advance(done, total)` moves it."""

    def __init__(self, total: int):
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.task = self.bar.add_task("Rendering dataset", total=total)

    def __enter__(self):
        self.bar.start()
        return lambda done, total: self.bar.update(self.task, completed=done)

    def __exit__(self, *exc) -> None:
        self.bar.stop()
