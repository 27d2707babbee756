"""`gridinr-render orbit`: a video of a trained run (either stage) circling the volume: rgb, depth or normals.

Frames come from the model's own `get_outputs_for_camera`, the code path of the viewer, ns-eval and
ns-render, so the video shows what they show. Depth uses one near/far range for the whole video (colours
mean the same distance in every frame); depth and normals are composited over black by the accumulation,
as nerfstudio's `apply_depth_colormap` does over white. Writes a video (.mp4, .mov, .mkv, .webm, .avi
through imageio-ffmpeg), a .gif, or a folder of PNG frames (an output path without a suffix). An existing output
is replaced only with --overwrite, and appears only when complete (safe_write.py).

`gridinr-render dataset` (rendered training sets in nerfstudio's format) lives in render_dataset.py.

Bad input ends with exit status 1 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gridinr_nerfstudio.rendering.images import to_uint8
from gridinr_nerfstudio.scripts import render_dataset

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
FRAME_PATTERN = "frame_*.png"
OutputKind = Literal["rgb", "depth", "normals"]
PathKind = Literal["orbit", "spiral"]


class RenderError(Exception):
    """A problem with the command's input, reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridinr-render",
                                     description="Videos of trained gridinr runs, and rendered training sets.")
    commands = parser.add_subparsers(dest="command", required=True)
    render_dataset.add_parser(commands)
    orbit = commands.add_parser("orbit", help="circle (or spiral) around the volume, looking at its centre")
    orbit.add_argument("--load-config", type=Path, required=True, help="the run's config.yml (as for ns-eval)")
    orbit.add_argument("--output", type=Path, required=True,
                       help="video (.mp4 .mov .mkv .webm .avi), .gif, or a folder (no suffix) of PNG frames")
    orbit.add_argument("--overwrite", action="store_true",
                       help="replace an existing video/GIF, or the frame_*.png of an existing folder (default: refuse)")
    orbit.add_argument("--frames", type=int, default=120, help="frames per turn (default 120)")
    orbit.add_argument("--output-kind", choices=("rgb", "depth", "normals"), default="rgb", help="what to show")
    orbit.add_argument("--path", choices=("orbit", "spiral"), default="orbit",
                       help="orbit: a circle at --elevation; spiral: elevation swings between +-elevation, twice a turn")
    orbit.add_argument("--image-size", type=int, default=256, help="square frames, pixels per side (default 256)")
    orbit.add_argument("--fps", type=float, default=30.0, help="frames per second (default 30)")
    orbit.add_argument("--elevation", type=float, default=20.0, help="degrees above the xy plane (default 20)")
    orbit.add_argument("--radius", type=float, default=2.5, help="camera distance from the centre (default 2.5)")
    orbit.add_argument("--fov", type=float, default=45.0, help="vertical field of view in degrees (default 45)")
    orbit.add_argument("--depth-colormap", default="viridis", help="matplotlib colormap for depth (default viridis)")
    orbit.add_argument("--time-range", default=None, metavar="A:B",
                       help="a sequence run: time steps (1-based, as in the file names) shown from the first frame to "
                            "the last, in between interpolated (default: the run's first step)")
    return parser


def path_cameras(path: PathKind, frames: int, image_size: int, radius: float, elevation_deg: float, fov_degrees: float):
    """Cameras of one turn around the volume; the spiral's elevation is `elevation_deg * cos(2 azimuth)`."""
    from gridinr_nerfstudio.data.orbit_cameras import circle_cameras, look_at, pinhole_cameras

    if path == "orbit":
        return circle_cameras(frames, image_size, fov_degrees, radius, elevation_deg)
    azimuth = torch.linspace(0.0, 2.0 * math.pi, frames + 1)[:-1]
    elevation = math.radians(elevation_deg) * torch.cos(2.0 * azimuth)
    eyes = radius * torch.stack(
        [torch.cos(elevation) * torch.cos(azimuth), torch.cos(elevation) * torch.sin(azimuth), torch.sin(elevation)],
        dim=-1,
    )
    return pinhole_cameras(look_at(eyes), image_size, fov_degrees)


def frame_times(model, time_range: str | None, frames: int) -> torch.Tensor | None:
    """Time (frames,) in [0, 1] of each frame, going from step A to step B of the run's steps; None: no time."""
    if time_range is None:
        return None
    steps = list(getattr(model, "timesteps", [1]))
    parts = time_range.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise RenderError(f"--time-range must be A:B (1-based steps), got {time_range!r}")
    first, last = int(parts[0]), int(parts[1])
    for step in (first, last):
        if step not in steps:
            raise RenderError(f"--time-range: step {step} is not in this run (its steps: {steps[0]}..{steps[-1]})")
    if len(steps) == 1:
        return None
    start, stop = (steps.index(step) / (len(steps) - 1) for step in (first, last))
    return torch.linspace(start, stop, frames) if frames > 1 else torch.tensor([start])


def with_times(cameras, times: torch.Tensor | None):
    """The cameras, each carrying its frame's time (unchanged when `times` is None)."""
    if times is None:
        return cameras
    from nerfstudio.cameras.cameras import Cameras

    return Cameras(camera_to_worlds=cameras.camera_to_worlds, fx=cameras.fx, fy=cameras.fy, cx=cameras.cx,
                   cy=cameras.cy, width=cameras.width, height=cameras.height, camera_type=cameras.camera_type,
                   times=times[:, None].float())


def render_outputs(model, cameras, kind: OutputKind) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(value (H, W, C), accumulation (H, W, 1)) per camera.

    For normals, the model's `compute_normals` is on while frames are drawn (restored when the frames run out
    or the generator is closed).
    """
    from rich.progress import track

    compute_normals = model.config.compute_normals
    model.config.compute_normals = compute_normals or kind == "normals"
    cameras = cameras.to(model.device)
    try:
        for index in track(range(len(cameras)), description=f"Rendering {kind}", transient=True):
            with torch.no_grad():
                outputs = model.get_outputs_for_camera(cameras[index : index + 1])
            yield outputs[kind].float().cpu().numpy(), outputs["accumulation"].float().cpu().numpy()
    finally:
        model.config.compute_normals = compute_normals


def depth_range(depths: list[np.ndarray], accumulations: list[np.ndarray]) -> tuple[float, float]:
    """Near and far depth of the whole video, over pixels that show at least 5% of the volume."""
    depth, accumulation = np.concatenate([d.ravel() for d in depths]), np.concatenate([a.ravel() for a in accumulations])
    visible = depth[accumulation >= 0.05]
    if visible.size == 0:
        visible = depth[accumulation > 0]
    if visible.size == 0:
        return 0.0, 1.0
    return float(visible.min()), float(visible.max())


def render_frames(model, cameras, kind: OutputKind, depth_colormap: str = "viridis") -> Iterator[np.ndarray]:
    """uint8 frames (H, W, 3) of `kind` for each camera (depth frames come after all depths are rendered)."""
    if kind == "rgb":
        for rgb, _ in render_outputs(model, cameras, kind):
            yield to_uint8(rgb)
    elif kind == "normals":
        for normals, accumulation in render_outputs(model, cameras, kind):
            yield to_uint8((normals + 1.0) / 2.0 * accumulation)
    else:
        import matplotlib

        colormap = matplotlib.colormaps[depth_colormap]
        depths, accumulations = zip(*render_outputs(model, cameras, kind))
        near, far = depth_range(list(depths), list(accumulations))
        for depth, accumulation in zip(depths, accumulations):
            normalised = np.clip((depth[..., 0] - near) / max(far - near, 1e-10), 0.0, 1.0)
            yield to_uint8(colormap(normalised)[..., :3] * accumulation)


def write_frames(frames: Iterable[np.ndarray], output: Path, fps: float, overwrite: bool = False) -> int:
    """Write frames as a video, a GIF or PNGs in a folder (by `output`'s suffix); returns how many.

    Through safe_write.py: an existing output is replaced only with `overwrite`, and it appears only when complete
    (a failed or interrupted render leaves what was there)."""
    import imageio.v2 as imageio_v2
    import imageio.v3 as imageio

    from gridinr_nerfstudio.safe_write import atomic_output, staged_folder

    suffix = output.suffix.lower()
    count = 0
    if suffix == "":
        with staged_folder(output, FRAME_PATTERN, overwrite) as staging:
            for frame in frames:
                imageio.imwrite(staging / f"frame_{count:05d}.png", frame)
                count += 1
        return count
    with atomic_output(output, overwrite) as temporary:  # (the temporary name keeps the suffix: it picks the format)
        if suffix == ".gif":
            stack = np.stack(list(frames))
            imageio.imwrite(temporary, stack, plugin="pillow", duration=1000.0 / fps, loop=0)
            return len(stack)
        # macro_block_size=2: even sizes pass unchanged (yuv420p needs even sides); odd ones are scaled up by a pixel.
        with imageio_v2.get_writer(temporary, format="FFMPEG", mode="I", fps=fps, macro_block_size=2) as writer:
            for frame in frames:
                writer.append_data(frame)
                count += 1
    return count


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before the (slow) loading of the run."""
    if not args.load_config.is_file():
        raise RenderError(f"{args.load_config}: no such config file (give a run's config.yml)")
    suffix = args.output.suffix.lower()
    if suffix not in VIDEO_SUFFIXES + (".gif", ""):
        raise RenderError(f"{args.output}: unsupported output type {suffix!r} (use {' '.join(VIDEO_SUFFIXES)} .gif or a folder)")
    check_output(args.output, args.overwrite)
    if args.frames < 1 or args.image_size < 2 or args.fps <= 0 or args.radius <= 0 or not 0 < args.fov < 180:
        raise RenderError("--frames must be >= 1, --image-size >= 2, --fps and --radius > 0, --fov in (0, 180)")
    import matplotlib

    if args.depth_colormap not in matplotlib.colormaps:
        raise RenderError(f"--depth-colormap: unknown matplotlib colormap {args.depth_colormap!r}")


def check_output(output: Path, overwrite: bool = False) -> None:
    """Fail before rendering when the output cannot be written, or exists without --overwrite (nothing is created)."""
    from gridinr_nerfstudio.safe_write import check_target

    if output.suffix and output.is_dir():
        raise RenderError(f"{output}: is a folder (give a file name, or no suffix for a folder of PNG frames)")
    if not output.suffix and output.exists() and not output.is_dir():
        raise RenderError(f"{output}: exists and is not a folder (PNG frames go into a folder)")
    if output.suffix:
        check_target(output, overwrite)
    elif output.is_dir() and any(output.glob(FRAME_PATTERN)) and not overwrite:
        raise RenderError(f"{output} holds {FRAME_PATTERN} frames (use --overwrite to replace them)")
    existing = output if not output.suffix else output.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RenderError(f"{output}: cannot write there ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RenderError(f"{output}: cannot write there (permission denied)")


def load_model(config_path: Path):
    """The run's model (inference mode: no image datasets loaded)."""
    return load_run_model(config_path)[0]


def load_run_model(config_path: Path):
    """(model, checkpoint path) of a run (inference mode: no image datasets loaded)."""
    from gridinr_nerfstudio.runs import RunConfigError, load_run_pipeline
    from gridinr_nerfstudio.stages.base_model import StageModel

    try:
        _, pipeline, checkpoint, _ = load_run_pipeline(config_path, test_mode="inference")
    except (RunConfigError, FileNotFoundError) as error:
        raise RenderError(str(error)) from None
    if not isinstance(pipeline.model, StageModel):
        raise RenderError(f"{config_path}: not a gridinr run (model {type(pipeline.model).__name__})")
    return pipeline.model, checkpoint


def main(argv: list[str] | None = None) -> int:
    from gridinr_nerfstudio.safe_write import OutputError

    args = build_parser().parse_args(argv)
    if args.command == "dataset":
        return render_dataset.run(args)
    try:
        check_arguments(args)
        model = load_model(args.load_config)
        cameras = path_cameras(args.path, args.frames, args.image_size, args.radius, args.elevation, args.fov)
        cameras = with_times(cameras, frame_times(model, args.time_range, args.frames))
        frames = render_frames(model, cameras, args.output_kind, args.depth_colormap)
        count = write_frames(frames, args.output, args.fps, args.overwrite)
    except (RenderError, OutputError, OSError) as error:
        print(f"gridinr-render: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {count} {args.output_kind} frames ({args.image_size}x{args.image_size}, {args.path}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
