"""The built-in procedural volume used when no data is given: smooth and sharp structure in one cube.

- a Marschner-Lobb signal (the classic smooth but high-frequency reconstruction test) fills a ball with a soft rim;
- a thin spherical shell with one octant cut away has sharp walls and edges and lets the camera see inside;
- two tubes twist around the z axis as a double helix, with sharp boundaries, piercing the shell.

Values are float32 in [0, 1] with plenty of empty space (0), generated in a few tens of milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gridinr_nerfstudio.data.volume_io import (
    SINGLE_FILE_VARIABLE,
    Volume,
    VolumeInfo,
    open_volume,
    select_variable,
    write_dataset,
)

BUILTIN_DEFAULT = Path("builtin-default")
"""`--data` value (also the default) that selects the built-in procedural volume."""
DEFAULT_SIZE = 96
DEFAULT_NAME = "default"
DEFAULT_DESCRIPTION = (
    "gridinr built-in procedural volume v1: Marschner-Lobb ball (f_M=6, alpha=0.25), spherical shell "
    "with a cut-away octant, double-helix tubes; float32 in [0, 1]"
)

ML_BALL_RADIUS = 0.55
SHELL_RADII = (0.80, 0.86)
SHELL_VALUE = 0.3
TUBE_HELIX_RADIUS = 0.62
TUBE_RADIUS = 0.07
TUBE_TURNS_PER_UNIT = 0.6
TUBE_HALF_LENGTH = 0.9
TUBE_VALUE = 1.0


def marschner_lobb(x: np.ndarray, y: np.ndarray, z: np.ndarray, f_m: float = 6.0, alpha: float = 0.25) -> np.ndarray:
    """Marschner & Lobb (1994) test signal on [-1, 1]^3, values in [0, 1]."""
    rho_r = np.cos(2 * np.pi * f_m * np.cos(np.pi * np.sqrt(x * x + y * y) / 2))
    return (1 - np.sin(np.pi * z / 2) + alpha * (1 + rho_r)) / (2 * (1 + alpha))


def default_volume_array(size: int = DEFAULT_SIZE) -> np.ndarray:
    """The procedural volume as a (Z, Y, X) float32 array of size^3 voxels spanning [-1, 1]^3."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    radius = np.sqrt(x * x + y * y + z * z)

    rim = np.clip((ML_BALL_RADIUS - radius) / 0.1, 0.0, 1.0)  # soft edge, 0.1 wide
    scale = 1.0 / ML_BALL_RADIUS
    ball = 0.7 * rim * marschner_lobb(x * scale, y * scale, z * scale)

    cut_octant = (x > 0) & (y < 0) & (z > 0)
    shell = np.where((radius >= SHELL_RADII[0]) & (radius <= SHELL_RADII[1]) & ~cut_octant, SHELL_VALUE, 0.0)

    tubes = np.zeros_like(radius)
    for phase in (0.0, np.pi):
        angle = 2 * np.pi * TUBE_TURNS_PER_UNIT * z + phase
        distance = np.hypot(x - TUBE_HELIX_RADIUS * np.cos(angle), y - TUBE_HELIX_RADIUS * np.sin(angle))
        tubes = np.where((distance <= TUBE_RADIUS) & (np.abs(z) <= TUBE_HALF_LENGTH), TUBE_VALUE, tubes)

    return np.maximum(np.maximum(ball, shell), tubes).astype(np.float32)


def make_default_volume(size: int = DEFAULT_SIZE) -> Volume:
    """The procedural volume as an in-memory Volume (variable "value", one time step, unit spacing)."""
    data = default_volume_array(size)
    info = VolumeInfo(
        path=Path(f"<{DEFAULT_NAME} volume>"),
        name=DEFAULT_NAME,
        dims=(size, size, size),
        dtype="float32",
        spacing=(1.0, 1.0, 1.0),
        variables=[SINGLE_FILE_VARIABLE],
        total_samples=1,
        description=DEFAULT_DESCRIPTION,
        format="procedural",
    )
    return Volume(info=info, variable=SINGLE_FILE_VARIABLE, timestep=1, data=data,
                  value_min=float(data.min()), value_max=float(data.max()), source_file=None)


def write_default_dataset(out_dir: str | Path, size: int = DEFAULT_SIZE, overwrite: bool = False) -> Path:
    """Write the procedural volume in the dataset format (dataset.json + value/default-value-1.raw); existing files
    are replaced only with `overwrite` (safe_write.py)."""
    return write_dataset(out_dir, DEFAULT_NAME, {SINGLE_FILE_VARIABLE: [default_volume_array(size)]},
                         description=DEFAULT_DESCRIPTION, overwrite=overwrite)


def is_builtin(data: str | Path | None) -> bool:
    """Whether a `--data` value names the built-in volume (builtin-default, or nothing)."""
    return data is None or Path(data) in (BUILTIN_DEFAULT, Path(""))


def open_data(data: str | Path | None, variable: str | None = None, timestep: int = 1, **options) -> Volume:
    """The volume a `--data` value names: the built-in one, or `open_volume(data, ...)` (the one place that decides)."""
    if is_builtin(data):
        volume = make_default_volume()
        select_variable(volume.info, variable, timestep)
        return volume
    return open_volume(data, variable=variable, timestep=timestep, **options)
