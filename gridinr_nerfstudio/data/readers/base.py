"""What every volume reader shares: the metadata record, the one-line error, checks of dims, dtype and spacing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SUPPORTED_DTYPES = (
    "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64",
)
SINGLE_FILE_VARIABLE = "value"  # the one variable of a single-file volume (Open SciVis, npy, NRRD, NIfTI)


class VolumeError(ValueError):
    """Bad volume input; the message is one line naming the file and the problem."""


@dataclass
class VolumeInfo:
    """What a volume source holds, read from its metadata only (no voxels).

    Containers with several arrays of their own shapes (HDF5, NetCDF, Zarr, VTK) describe one of them: the
    variable asked for, else the default; `variables` lists every array that can be opened as a volume."""

    path: Path  # the dataset folder, or the single file (or Zarr store folder)
    name: str
    dims: tuple[int, int, int]  # (X, Y, Z), x fastest in the file
    dtype: str  # numpy name, e.g. "uint8"
    spacing: tuple[float, float, float]
    variables: list[str]
    total_samples: int  # time steps per variable, numbered from 1
    description: str
    format: str = "dataset"  # dataset | scivis | npy | nrrd | nifti | vti | vtk | hdf5 | netcdf | zarr | procedural
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # physical position of the first voxel centre (x, y, z)
    storage: str = ""  # how the voxels are stored (layout, chunks, compression), for `gridinr-data info`
    other_arrays: list[str] = field(default_factory=list)  # arrays present that are not volumes, with the reason
    default_variable: str | None = None  # None with several variables: the caller must choose one
    variable: str | None = None  # the variable this record's dims/dtype/spacing describe (None: all alike)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_dims(value: object, where: Path) -> tuple[int, int, int]:
    valid = (isinstance(value, (list, tuple)) and len(value) == 3
             and all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in value))
    if not valid:
        raise VolumeError(f"{where}: dims must be three positive integers [X, Y, Z], got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


def check_dtype(value: object, where: Path) -> str:
    if value not in SUPPORTED_DTYPES:
        raise VolumeError(f"{where}: unknown dtype {value!r} (supported: {', '.join(SUPPORTED_DTYPES)})")
    return str(value)


def check_spacing(value: object, where: Path) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else value
    valid = (isinstance(values, (list, tuple)) and len(values) == 3
             and all(isinstance(s, (int, float, np.floating, np.integer)) and not isinstance(s, bool)
                     and np.isfinite(s) and s > 0 for s in values))
    if not valid:
        raise VolumeError(f"{where}: spacing must be a positive number or three positive numbers, got {value!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


def check_origin(value: object, where: Path) -> tuple[float, float, float]:
    valid = (isinstance(value, (list, tuple)) and len(value) == 3
             and all(isinstance(s, (int, float, np.floating, np.integer)) and not isinstance(s, bool)
                     and np.isfinite(s) for s in value))
    if not valid:
        raise VolumeError(f"{where}: origin must be three finite numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def volume_dtype(dtype: np.dtype, where: Path, what: str) -> str:
    """The supported numpy name of an array's dtype (byte order aside), or a one-line VolumeError."""
    dtype = np.dtype(dtype)
    name = dtype.newbyteorder("=").name if dtype.kind in "iuf" else str(dtype)
    if name not in SUPPORTED_DTYPES:
        raise VolumeError(f"{where}: {what} has dtype {name}, not a number type we read "
                          f"(supported: {', '.join(SUPPORTED_DTYPES)})")
    return name


def choose_variable(path: Path, variables: list[str], requested: str | None, default: str | None) -> str:
    """The variable a reader describes: the requested one (listing the others when it is missing), else the
    default, else the only one; several and no default is an error naming them."""
    if not variables:
        raise VolumeError(f"{path}: no array that can be read as a volume (3-D, or 4-D with time first)")
    if requested is not None:
        if requested not in variables and requested.strip("/") in variables:  # HDF5/Zarr paths: "/group/name"
            requested = requested.strip("/")
        if requested not in variables:
            raise VolumeError(f"{path}: no variable {requested!r} (available: {', '.join(variables)})")
        return requested
    if default is not None:
        return default
    if len(variables) == 1:
        return variables[0]
    raise VolumeError(f"{path}: {len(variables)} volumes in the file ({', '.join(variables)}): choose one with "
                      "--variable NAME (ns-train: --pipeline.datamanager.dataparser.variable NAME)")


@dataclass
class Voxels:
    """One variable at one time step as a reader hands it to `Volume`: the array and how to read its values."""

    data: object  # (Z, Y, X): np.memmap, np.ndarray or ChunkedArray, in the file's dtype
    source_file: Path  # the file (or Zarr array folder) holding the voxels: content digests follow it
    value_scale: float = 1.0  # original value = raw * value_scale + value_offset (NIfTI scl_*, CF scale_factor)
    value_offset: float = 0.0
    fill_value: float | None = None  # raw value that marks a missing voxel (CF _FillValue): treated as NaN
