"""numpy ``.npy`` volumes: one (Z, Y, X) array, memory-mapped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gridinr_nerfstudio.data.readers.base import (
    SINGLE_FILE_VARIABLE,
    VolumeError,
    VolumeInfo,
    Voxels,
    check_dims,
    check_dtype,
    one_line,
)


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise VolumeError(f"{path}: unreadable .npy file (truncated or not .npy?): {one_line(error)}") from None


def read_npy_info(path: Path, variable: str | None = None) -> VolumeInfo:
    array = load_npy(path)
    if array.ndim != 3:
        raise VolumeError(f"{path}: expected a 3-D array of shape (Z, Y, X), got shape {array.shape}")
    dims = check_dims([int(n) for n in array.shape[::-1]], path)
    return VolumeInfo(path=path, name=path.stem, dims=dims, dtype=check_dtype(array.dtype.name, path),
                      spacing=(1.0, 1.0, 1.0), variables=[SINGLE_FILE_VARIABLE], total_samples=1,
                      description=f"numpy file {path.name}", format="npy", storage="npy (memory-mapped)",
                      default_variable=SINGLE_FILE_VARIABLE)


def open_npy(info: VolumeInfo, variable: str, timestep: int) -> Voxels:
    return Voxels(load_npy(info.path), info.path)
