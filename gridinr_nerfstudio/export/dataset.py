"""Rendered training sets in nerfstudio's data format: `transforms.json`, `images/`, optional `depth/`, `normals/`
and `masks/`, of a run (fit or edit) or of the raw voxels, from a camera distribution, with a look per image.

What nerfstudio's `nerfstudio-data` dataparser reads: `camera_model` OPENCV without distortion, intrinsics at the top
(per frame when the field of view varies), `transform_matrix` camera-to-world (OpenGL convention), `file_path`,
`depth_file_path` (16-bit PNG of z-depth, the distance along the camera's viewing axis as nerfstudio's depth losses
expect, in world units / `depth_unit_scale_factor` = 1e-3, nerfstudio's default, 0 where no depth) and `mask_path`
(0 = ignore the pixel). Ours, ignored by nerfstudio: `time` (a sequence's time in [0, 1]), `timestep`, `camera`
(what the distribution drew), `appearance` (the look drawn for the frame), `normal_file_path` (world-frame normals as
(n + 1) / 2, black where nothing is seen) and a `gridinr` block describing the whole set.

Frames render through `rendering.images` (`camera_rays` + `render_image`) with the scene's field (a run's model:
its field cache, time and empty-space skipping; raw voxels: trilinear sampling, skipping by min/max macrocells).
Writing follows safe_write.py's rule: a folder holding files only with `overwrite` (which replaces only our
entries), never over the run's or volume's files (not even with `overwrite`), each image folder rendered into a hidden
folder and moved into place when complete, `transforms.json` published last: an interrupted run leaves what was
there and no half-written dataset.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from gridinr_nerfstudio.data.camera_distributions import CameraSet
from gridinr_nerfstudio.data.timesteps import step_times
from gridinr_nerfstudio.data.volume_io import Volume, scene_aabb, voxel_size_world
from gridinr_nerfstudio.rendering.appearance import appearance_transfer_function
from gridinr_nerfstudio.rendering.fused_march import GridNormals, GridSamples
from gridinr_nerfstudio.rendering.images import camera_rays, render_image, to_uint8
from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid
from gridinr_nerfstudio.rendering.raymarch import estimate_normals
from gridinr_nerfstudio.rendering.settings import RenderSettings
from gridinr_nerfstudio.safe_write import OutputError, ProtectedFiles, check_target, staged_folder, staged_outputs

DEPTH_UNIT_SCALE_FACTOR = 1e-3
"""Depth PNGs hold world units / this (nerfstudio's default `depth_unit_scale_factor`: read them unchanged)."""
MAX_DEPTH = 65535 * DEPTH_UNIT_SCALE_FACTOR
IMAGE_FOLDERS = ("images", "depth", "normals", "masks")
FRAME_PATTERN = "frame_*.png"
"""What a dataset folder holds of ours besides transforms.json (the only files `--overwrite` replaces)."""


class DatasetError(Exception):
    """Bad input or output of a dataset render, as one line."""


@dataclass
class DatasetOutputs:
    """Which images besides RGB each frame gets."""

    depth: bool = False
    normals: bool = False
    masks: bool = False
    mask_threshold: float = 0.05
    """Accumulation (opacity of the volume along the ray) from which a pixel is foreground: masks, depth, normals."""


class RunScene:
    """A trained run: the model's field (cache, time) and look; `learned_look` for an edit run's transfer MLP."""

    def __init__(self, model, origin: str):
        self.model, self.origin = model, origin
        self.base: RenderSettings = model.render_settings
        self.steps = [int(step) for step in getattr(model, "timesteps", [1])]
        self.learned_look = hasattr(model, "transfer_mlp")
        self.aabb = model.aabb
        self.voxel_size = voxel_size_world(model.volume)
        self.chunk_rays = model.render_chunk_rays()

    def show(self, time: float) -> None:
        """Show the run's time coordinate `time` in [0, 1] (a sequence; ignored for one step)."""
        self.model.set_render_time(time)

    def value_fn(self):
        return self.model.value_fn()

    def learned_color_fn(self):
        return self.model.color_fn()

    def grid_field(self):
        """The field cache (a grid the fused ray marcher reads), or None when the run renders its INR directly."""
        return self.model.cached_field()

    def occupancy(self, color_fn) -> Optional[OccupancyGrid]:
        return self.model.occupancy(color_fn) if self.model.config.accelerate else None


class VolumeScene:
    """Raw voxels of one or more time steps (sharing one value range), sampled trilinearly."""

    def __init__(self, volumes: list[Volume], steps: list[int], settings: RenderSettings, origin: str,
                 dense_max_bytes: int = 2 << 30, occupancy_resolution: int = 128):
        self.volumes, self.steps, self.base, self.origin = volumes, steps, settings, origin
        self.learned_look = False
        self.aabb = scene_aabb(volumes[0])
        self.voxel_size = voxel_size_world(volumes[0])
        self.chunk_rays = 1 << 15
        self.dense_max_bytes, self.occupancy_resolution = dense_max_bytes, occupancy_resolution
        self._index, self._field, self._grid = 0, None, None

    def show(self, time: float) -> None:
        """Show the step nearest to `time` in [0, 1] (first selected step at 0, last at 1)."""
        index = int(round(min(max(time, 0.0), 1.0) * (len(self.volumes) - 1)))
        if index != self._index:
            self._index, self._field, self._grid = index, None, None

    def value_fn(self):
        from gridinr_nerfstudio.fields.memmap_grid import raw_voxel_field

        if self._field is None:
            self._field = raw_voxel_field(self.volumes[self._index], self.dense_max_bytes)
        return self._field

    def grid_field(self):
        """The raw voxels as a grid (resident or memory-mapped), which the fused ray marcher reads."""
        return self.value_fn()

    def occupancy(self, color_fn) -> OccupancyGrid:
        if self._grid is None:
            volume, field = self.volumes[self._index], self.value_fn()
            half = torch.as_tensor(np.asarray(volume.half_size, dtype=np.float32))
            if hasattr(field, "volume") and torch.is_tensor(field.volume):
                self._grid = OccupancyGrid.from_volume(field.volume, half, resolution=self.occupancy_resolution)
            else:
                self._grid = OccupancyGrid.from_slabs(lambda z0, z1: torch.from_numpy(volume.normalized_slab(z0, z1)),
                                                      volume.data.shape, half, resolution=self.occupancy_resolution)
        return self._grid.update(color_fn)


@dataclass
class Frame:
    """One image: which camera, the scene time it shows, and what transforms.json says of its time."""

    camera: int
    scene_time: float
    time: Optional[float] = None
    timestep: Optional[int] = None


def plan_frames(camera_set: CameraSet, scene_steps: list[int], selected: list[int]) -> list[Frame]:
    """Frames of a set: every camera at each selected step (step-major), or, for a camera path with times on a
    sequence, each camera at its own time. `scene_steps`: all steps the scene covers (the run's, or those opened)."""
    def scene_time(step: int) -> float:
        return scene_steps.index(step) / (len(scene_steps) - 1) if len(scene_steps) > 1 else 0.0

    if len(scene_steps) > 1 and camera_set.times is not None and selected == scene_steps:
        return [Frame(index, float(t), time=float(t)) for index, t in enumerate(camera_set.times.tolist())]
    times = step_times(len(selected)).tolist()
    frames = []
    for step, time in zip(selected, times):
        for index in range(len(camera_set)):
            frames.append(Frame(index, scene_time(step), time if len(selected) > 1 else None,
                                step if len(selected) > 1 else None))
    return frames


def render_frame(scene, cameras, index: int, appearance: dict[str, Any], outputs: DatasetOutputs,
                 num_samples: int) -> dict[str, np.ndarray]:
    """rgb (H, W, 3), accumulation (H, W), z-depth (H, W) and, when asked or shading, normals (H, W, 3)."""
    if scene.learned_look:
        color_fn = scene.learned_color_fn()
    else:
        color_fn = appearance_transfer_function(appearance, scene.base, scene.voxel_size).to(scene.aabb.device)
    eps = 0.5 * scene.voxel_size
    field = scene.grid_field()
    if field is not None:  # the fused ray marcher on a CPU (render_rays dispatches; torch path elsewhere)
        sample_fn, normal_fn = GridSamples(field, color_fn), GridNormals(field, eps)
    else:
        values_at = scene.value_fn()
        sample_fn = lambda points: color_fn(values_at(points))  # noqa: E731
        normal_fn = lambda points: estimate_normals(values_at, points, eps)  # noqa: E731
    kwargs: dict[str, Any] = {
        "num_samples": num_samples,
        "background": torch.tensor(appearance["background"], dtype=torch.float32, device=scene.aabb.device),
        "shading": bool(appearance["shading"]),
    }
    if appearance["shading"] or outputs.normals:
        kwargs["normal_fn"] = normal_fn
    grid = scene.occupancy(color_fn)
    if grid is not None:
        kwargs["occupancy_grid"] = grid
    else:
        kwargs["early_stop_eps"] = 0.0
    origins, directions = camera_rays(cameras, index, scene.aabb.device)
    with torch.no_grad():
        out = render_image(origins, directions, sample_fn, scene.aabb,
                           chunk_rays=scene.chunk_rays, **kwargs)
    viewing_axis = -cameras.camera_to_worlds[index, :, 2].to(directions)
    cosine = (directions * viewing_axis).sum(dim=-1)
    result = {
        "rgb": out["rgb"].float().cpu().numpy(),
        "accumulation": out["accumulation"][..., 0].float().cpu().numpy(),
        "z_depth": (out["depth"][..., 0] * cosine).float().cpu().numpy(),
    }
    if "normals" in out:
        result["normals"] = out["normals"].float().cpu().numpy()
    return result


def check_output_folder(output: Path, overwrite: bool, inputs: list[Path],
                        protected: Optional[ProtectedFiles] = None) -> None:
    """Refuse to write where it would lose something: into a folder holding files unless `overwrite` (which then
    replaces only a dataset's own entries), into or above a run's or volume's folder, over any file in `protected`
    (the files the command reads) ever, or where one cannot write. Creates nothing."""
    output = Path(output)
    resolved = output.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise DatasetError(f"{output}: holds this command's input {source}; choose another folder")
    if output.exists() and not output.is_dir():
        raise DatasetError(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise DatasetError(f"{output}: folder is not empty (pass --overwrite to replace its dataset files)")
    try:
        check_target(output / "transforms.json", overwrite, protected)
        for folder in IMAGE_FOLDERS:
            for path in (output / folder).glob(FRAME_PATTERN):
                check_target(path, overwrite, protected)
    except OutputError as error:
        raise DatasetError(str(error)) from None


def write_dataset(scene, camera_set: CameraSet, frames: list[Frame], appearances: list[dict[str, Any]],
                  output: Path, outputs: DatasetOutputs, overwrite: bool = False, description: Optional[dict] = None,
                  progress: Optional[Callable[[int, int], None]] = None,
                  protected: Optional[ProtectedFiles] = None) -> Path:
    """Render every frame and write the dataset folder; returns its transforms.json. `appearances[i]` is frame i's
    look, `description` goes into the `gridinr` block, `protected` the files never to write over."""
    output = Path(output)
    check_output_folder(output, overwrite, [], protected)
    folders = ("images",) + tuple(name for name, on in (("depth", outputs.depth), ("normals", outputs.normals),
                                                         ("masks", outputs.masks)) if on)
    try:
        with ExitStack() as stack:  # published in reverse order of entry: the image folders, then transforms.json
            (transforms_file,) = stack.enter_context(staged_outputs([output / "transforms.json"], overwrite, protected))
            staging = {name: stack.enter_context(staged_folder(output / name, FRAME_PATTERN, overwrite, protected))
                       for name in folders}
            cameras = camera_set.cameras().to(scene.aabb.device)
            entries = []
            for number, (frame, appearance) in enumerate(zip(frames, appearances)):
                scene.show(frame.scene_time)
                images = render_frame(scene, cameras, frame.camera, appearance, outputs, scene.base.num_samples)
                entries.append(_write_frame(staging, number, frame, camera_set, appearance, images, outputs))
                if progress is not None:
                    progress(number + 1, len(frames))
            transforms = transforms_json(camera_set, entries, outputs, dict(description or {}, source=scene.origin,
                                                                           scene_box=scene.aabb.cpu().tolist()))
            transforms_file.write_text(json.dumps(transforms, indent=2))
        _remove_stale_frames(output, [name for name in IMAGE_FOLDERS if name not in folders], protected)
    except OutputError as error:
        raise DatasetError(str(error)) from None
    return output / "transforms.json"


def _remove_stale_frames(output: Path, folders: list[str], protected: Optional[ProtectedFiles]) -> None:
    """After `--overwrite`: the frames of image kinds this set has not (an older set's depth/, ...), which would
    otherwise sit beside a transforms.json that does not name them; other files stay."""
    for name in folders:
        for path in sorted((output / name).glob(FRAME_PATTERN)):
            check_target(path, True, protected)
            path.unlink()
        try:
            (output / name).rmdir()
        except OSError:
            pass


def _write_frame(folders: dict[str, Path], number: int, frame: Frame, camera_set: CameraSet, appearance: dict[str, Any],
                 images: dict[str, np.ndarray], outputs: DatasetOutputs) -> dict[str, Any]:
    import imageio.v3 as imageio

    name = f"frame_{number:05d}.png"
    imageio.imwrite(folders["images"] / name, to_uint8(images["rgb"]), extension=".png")
    pose = np.eye(4)
    pose[:3] = camera_set.camera_to_worlds[frame.camera].double().numpy()
    entry: dict[str, Any] = {"file_path": f"images/{name}", "transform_matrix": pose.tolist()}
    entry.update(_intrinsics(camera_set, frame.camera))
    if frame.time is not None:
        entry["time"] = frame.time
    if frame.timestep is not None:
        entry["timestep"] = frame.timestep
    seen = images["accumulation"] >= outputs.mask_threshold
    if outputs.depth:
        depth = np.where(seen, np.clip(images["z_depth"], 0.0, MAX_DEPTH), 0.0)
        imageio.imwrite(folders["depth"] / name, np.rint(depth / DEPTH_UNIT_SCALE_FACTOR).astype(np.uint16),
                        extension=".png")
        entry["depth_file_path"] = f"depth/{name}"
    if outputs.normals:
        normals = np.where(seen[..., None], (images["normals"] + 1.0) / 2.0, 0.0)
        imageio.imwrite(folders["normals"] / name, to_uint8(normals), extension=".png")
        entry["normal_file_path"] = f"normals/{name}"
    if outputs.masks:
        imageio.imwrite(folders["masks"] / name, np.where(seen, 255, 0).astype(np.uint8), extension=".png")
        entry["mask_path"] = f"masks/{name}"
    if camera_set.records:
        entry["camera"] = camera_set.records[frame.camera]
    entry["appearance"] = appearance
    return entry


def _intrinsics(camera_set: CameraSet, index: int) -> dict[str, Any]:
    focal = float(camera_set.focal[index])
    return {"fl_x": focal, "fl_y": focal, "cx": camera_set.width / 2.0, "cy": camera_set.height / 2.0,
            "w": camera_set.width, "h": camera_set.height}


def transforms_json(camera_set: CameraSet, entries: list[dict[str, Any]], outputs: DatasetOutputs,
                    description: dict[str, Any]) -> dict[str, Any]:
    """nerfstudio's transforms.json: intrinsics shared at the top when every frame has the same, else per frame."""
    keys = ("fl_x", "fl_y", "cx", "cy", "w", "h")
    shared = {key: entries[0][key] for key in keys if all(entry[key] == entries[0][key] for entry in entries)}
    for entry in entries:
        for key in shared:
            del entry[key]
    transforms: dict[str, Any] = {"camera_model": "OPENCV", **shared}
    if outputs.depth:
        transforms["depth_unit_scale_factor"] = DEPTH_UNIT_SCALE_FACTOR
    transforms["frames"] = entries
    transforms["gridinr"] = dict(description, outputs=asdict(outputs), conventions={
        "transform_matrix": "camera to world, OpenGL (camera looks down -z, y up); world z up, volume in [-1, 1]^3",
        "time": "a sequence's time in [0, 1]: first selected step 0, last 1",
        "depth": "z-depth along the viewing axis in world units x 1000 (uint16), 0 where accumulation < mask_threshold",
        "normals": "world-frame normals (pointing from high to low values) as (n + 1) / 2, black where not seen",
        "masks": "255 where accumulation >= mask_threshold, else 0 (nerfstudio ignores 0)",
    })
    return transforms
