"""nerfstudio DataParser `gridinr-volume`: orbit cameras around a volume plus reference DVR renderings.

The "images" nerfstudio trains and evaluates against are renderings of the raw voxels (trilinear sampling)
with the default transfer function. They are written as PNG files, so nerfstudio's datasets, `ns-eval` and
the viewer load them as usual, and cached by volume content (a digest of the file) + render settings + cameras.

Import only nerfstudio's dataparser and camera modules here: this module is reached from the dataparser
entry point while nerfstudio builds its registries (importing datamanagers/pipelines would be circular).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Type

import imageio.v3 as iio
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.plugins.registry_dataparser import DataParserSpecification
from nerfstudio.utils.rich_utils import CONSOLE

from gridinr_nerfstudio.data.default_volume import BUILTIN_DEFAULT, is_builtin, open_data
from gridinr_nerfstudio.data.orbit_cameras import split_orbit_cameras
from gridinr_nerfstudio.data.timesteps import cameras_over_time, parse_timesteps, share_value_range, step_times
from gridinr_nerfstudio.data.volume_io import Volume, read_info, scene_aabb, voxel_size_world
from gridinr_nerfstudio.rendering.settings import RenderSettings


class SharedVolume:
    """Holds a Volume in dataparser metadata without copying it.

    nerfstudio deep-copies dataset metadata; deep-copying a memmap would read the whole file into memory.
    """

    def __init__(self, volume: Volume):
        self.volume = volume

    def __deepcopy__(self, memo) -> "SharedVolume":
        return self


def default_cache_dir() -> Path:
    """Where reference renderings are cached (never inside the user's data folder, which may be read-only)."""
    base = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(base) / "gridinr-nerfstudio" / "references"


@dataclass
class VolumeDataParserConfig(DataParserConfig):
    """Orbit views of a scientific volume, with reference renderings of its raw voxels."""

    _target: Type = field(default_factory=lambda: VolumeDataParser)
    data: Path = BUILTIN_DEFAULT
    """Volume: dataset folder (dataset.json), its dataset.json, a .raw/.dat/.npy/.nrrd/.nii file, or builtin-default."""
    variable: Optional[str] = None
    """Variable to use (default: the first one)."""
    timestep: int = 1
    """Time step to use (1-based) when `timesteps` is not given."""
    timesteps: Optional[str] = None
    """Time steps fitted by one model: 'all', one step 'N' or a range 'A:B' (1-based, inclusive, as in the file
    names). Default: the single step `timestep`. Steps of a sequence share one value range."""
    nan_policy: str = "error"
    """What to do with NaN/Inf voxels: 'error' or 'replace' (with `replace_value`)."""
    replace_value: float = 0.0
    """Value that replaces NaN/Inf voxels when nan_policy is 'replace'."""
    image_size: int = 256
    """Width and height of the rendered views."""
    fov_degrees: float = 45.0
    """Vertical field of view."""
    camera_radius: float = 2.5
    """Distance of the cameras from the volume centre (volume normalised into [-1, 1]^3)."""
    num_train_views: int = 50
    """Orbit views used for training."""
    num_eval_views: int = 20
    """Novel orbit views used for evaluation (different from the training views)."""
    render: RenderSettings = field(default_factory=RenderSettings)
    """Transfer function and ray marching of the reference renderings."""
    cache_dir: Optional[Path] = None
    """Reference-rendering cache (default: $XDG_CACHE_HOME/gridinr-nerfstudio/references)."""
    preload_max_bytes: int = 2 << 30
    """Reference renderings of volumes whose float32 copy is at most this size read an in-memory copy; larger ones
    read only the voxels around each ray sample through the memmap (memory and time ~ pixels x samples)."""


class VolumeDataParser(DataParser):
    """Builds orbit cameras and reference renderings for one variable and time step of a volume."""

    config: VolumeDataParserConfig

    def __init__(self, config: VolumeDataParserConfig):
        super().__init__(config)
        self._volumes: Optional[list[Volume]] = None
        self.timesteps = self._selected_steps()
        self.includes_time = len(self.timesteps) > 1  # nerfstudio's viewer then shows its time slider

    def _selected_steps(self) -> list[int]:
        if self.config.timesteps is None:
            return [self.config.timestep]
        if is_builtin(self.config.data):
            total = 1
        else:  # HDF5/NetCDF/Zarr variables have their own time steps
            total = read_info(self.config.data, self.config.variable).total_samples
        return parse_timesteps(self.config.timesteps, self.config.timestep, total, self.config.data)

    @property
    def volumes(self) -> list[Volume]:
        """The volume of each selected step, opened once (memory-mapped), sharing one value range."""
        if self._volumes is None:
            self._volumes = [
                open_data(
                    self.config.data,
                    variable=self.config.variable,
                    timestep=step,
                    nan_policy=self.config.nan_policy,
                    replace_value=self.config.replace_value,
                )
                for step in self.timesteps
            ]
            share_value_range(self._volumes)
        return self._volumes

    @property
    def volume(self) -> Volume:
        """The (first selected step's) volume."""
        return self.volumes[0]

    def cameras_for_split(self, split: str) -> Cameras:
        """Training views and eval views are different points of one spiral, so eval views are novel."""
        return split_orbit_cameras(
            split,
            self.config.num_train_views,
            self.config.num_eval_views,
            image_size=self.config.image_size,
            fov_degrees=self.config.fov_degrees,
            radius=self.config.camera_radius,
        )

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        """Orbit cameras and reference renderings; for a sequence, every camera once per step (step-major), with
        the step's time (see `timesteps.step_times`)."""
        volumes = self.volumes
        cameras = self.cameras_for_split(split)
        aabb = scene_aabb(volumes[0])
        image_filenames = []
        for volume in volumes:
            image_filenames += reference_renderings(volume, cameras, self.config.render,
                                                    self._cache_folder(split, cameras, volume),
                                                    dense_max_bytes=self.config.preload_max_bytes)
        if len(volumes) > 1:
            cameras = cameras_over_time(cameras, step_times(len(volumes)))
        return DataparserOutputs(
            image_filenames=image_filenames,
            cameras=cameras,
            scene_box=SceneBox(aabb=aabb),
            metadata={
                "volume": SharedVolume(volumes[0]),
                "volumes": SharedVolume(volumes),
                "timesteps": list(self.timesteps),
                "render_settings": self.config.render,
            },
        )

    def _cache_folder(self, split: str, cameras: Cameras, volume: Optional[Volume] = None) -> Path:
        volume = volume or self.volume
        camera_key = hashlib.sha1(cameras.camera_to_worlds.numpy().tobytes()).hexdigest()[:8]
        key = f"{volume.fingerprint()}-{self.config.render.fingerprint()}-{self.config.image_size}-{camera_key}"
        if len(self.timesteps) > 1:  # the shared value range changes the normalised voxels
            key += "-" + hashlib.sha1(repr((volume.value_min, volume.value_max)).encode()).hexdigest()[:8]
        return (self.config.cache_dir or default_cache_dir()) / key / split


def reference_renderings(volume: Volume, cameras: Cameras, settings: RenderSettings, folder: Path,
                         dense_max_bytes: int = 2 << 30) -> list[Path]:
    """PNG renderings of the raw voxels for each camera; reused when the same volume/settings/cameras were rendered.

    Volumes over `dense_max_bytes` as float32 are sampled through their memmap (see `raw_voxel_field`).

    A cache entry appears whole or not at all: views render into a private temporary folder that is renamed into
    place once complete. A concurrent run that finishes first wins; the other uses its folder.
    """
    names = [f"view_{index:03d}.png" for index in range(len(cameras))]
    if _complete(folder, names):
        return [folder / name for name in names]
    from gridinr_nerfstudio.fields.memmap_grid import raw_voxel_field
    from gridinr_nerfstudio.rendering.fused_march import GridSamples
    from gridinr_nerfstudio.rendering.images import render_camera, to_uint8

    folder.parent.mkdir(parents=True, exist_ok=True)
    CONSOLE.print(f"Rendering {len(cameras)} reference views of {volume.info.name} into {folder}")
    grid = raw_voxel_field(volume, dense_max_bytes)
    transfer_function = settings.transfer_function(voxel_size_world(volume))
    background = torch.tensor(settings.background, dtype=torch.float32)
    sample_fn = GridSamples(grid, transfer_function)  # the fused ray marcher on a CPU (render_rays dispatches)

    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with torch.no_grad():
            for index, name in enumerate(names):
                out = render_camera(
                    cameras, index, sample_fn, scene_aabb(volume), num_samples=settings.num_samples,
                    background=background,
                )
                image = to_uint8(out["rgb"].numpy())
                iio.imwrite(temporary / name, image, extension=".png")
        (temporary / "complete.json").write_text(json.dumps({"volume": volume.info.name, "views": len(names)}))
        _move_into_place(temporary, folder, names)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return [folder / name for name in names]


def _complete(folder: Path, names: list[str]) -> bool:
    return (folder / "complete.json").is_file() and all((folder / name).is_file() for name in names)


def _move_into_place(temporary: Path, folder: Path, names: list[str]) -> None:
    """Rename a finished entry into place; an incomplete leftover (a run killed under the old layout) is replaced."""
    for _ in range(3):
        try:
            os.rename(temporary, folder)
            return
        except OSError:
            if _complete(folder, names):
                return  # another run finished the same entry first: same content, use it
            shutil.rmtree(folder, ignore_errors=True)
    os.rename(temporary, folder)


gridinr_volume_dataparser = DataParserSpecification(
    config=VolumeDataParserConfig(),
    description="Scientific volume (dataset.json + raw/dat, Open SciVis raw, npy, NRRD, NIfTI) seen by orbit cameras.",
)
"""The `gridinr-volume` entry point (nerfstudio.dataparser_configs)."""
