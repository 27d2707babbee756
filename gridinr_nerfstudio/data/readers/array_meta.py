"""What HDF5, NetCDF-4 and Zarr arrays share: which arrays are volumes, their geometry from coordinate variables or
attributes, CF packing (`scale_factor`, `add_offset`, `_FillValue`) and the chunked reading of one time step.

Conventions, in this order (axes in the array's own order, (Z, Y, X), x the last and fastest):
- coordinate variables (CF: a 1-D variable named like the dimension, attached as an HDF5 dimension scale, or the
  xarray `_ARRAY_DIMENSIONS` / Zarr v3 `dimension_names` name of a 1-D array beside it): spacing is the mean step
  between the first and last coordinate, origin the first coordinate (a non-uniform axis is taken at its mean
  step, and `gridinr-data info` says so);
- else a `spacing` attribute (one number, or one per axis) and an `origin` attribute (one per axis);
- else `element_size_um` (ImageJ/Fiji and ilastik HDF5, one per axis); else spacing 1 and origin 0.
A 4-D array's first axis is time: its steps are time steps 1..T.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np

from gridinr_nerfstudio.data.readers.base import VolumeError, check_origin, check_spacing, volume_dtype
from gridinr_nerfstudio.data.readers.chunked import ChunkedArray

MAX_LISTED = 20
"""Other arrays named in `gridinr-data info` (the rest are counted)."""


def volume_reason(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why an array is not a volume (None if it is one): 3-D (Z, Y, X) or 4-D (T, Z, Y, X) numbers."""
    if len(shape) not in (3, 4):
        return f"{len(shape)}-D"
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf" or dtype.newbyteorder("=").name not in (
            "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64"):
        return f"dtype {dtype}"
    if min(shape) < 1:
        return "empty"
    return None


def listed(others: list[str]) -> list[str]:
    return others if len(others) <= MAX_LISTED else others[:MAX_LISTED] + [f"... {len(others) - MAX_LISTED} more"]


def _number_list(value, count: int) -> list[float] | None:
    values = np.asarray(value, dtype=np.float64).ravel() if value is not None else np.empty(0)
    if values.size == 1:
        values = np.repeat(values, count)
    return [float(v) for v in values[-count:]] if values.size >= count else None


def geometry(attrs, coordinates: list[np.ndarray | None], where: Path, what: str
             ) -> tuple[tuple[float, float, float], tuple[float, float, float], str]:
    """(spacing (x, y, z), origin (x, y, z), note) of a (…, Z, Y, X) array from its coordinates and attributes."""
    spacing, origin, notes = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], []
    from_attributes = _number_list(attrs.get("spacing"), 3) or _number_list(attrs.get("element_size_um"), 3)
    if from_attributes is not None:
        spacing = from_attributes[::-1]
    attr_origin = _number_list(attrs.get("origin"), 3)
    if attr_origin is not None:
        origin = attr_origin[::-1]
    for axis, values in zip((2, 1, 0), coordinates):
        if values is None or values.size < 1 or values.dtype.kind not in "iuf":
            continue
        values = values.astype(np.float64)
        origin[axis] = float(values[0])
        if values.size > 1:
            steps = np.diff(values)
            spacing[axis] = float(abs(values[-1] - values[0]) / (values.size - 1))
            if not np.allclose(steps, steps[0], rtol=1e-4, atol=0):
                notes.append(f"coordinate {'xyz'[axis]} is not uniform (steps {abs(steps).min():.4g} to "
                             f"{abs(steps).max():.4g}): voxels are placed at its mean step")
    try:
        return (check_spacing(spacing, where), check_origin(origin, where), "; ".join(notes))
    except VolumeError as error:
        raise VolumeError(f"{str(error).split(': ', 1)[0]}: {what}: {str(error).split(': ', 1)[1]}") from None


def packing(attrs, where: Path, what: str) -> tuple[float, float, float | None]:
    """CF packing of an array: (scale_factor, add_offset, _FillValue or missing_value)."""
    def scalar(name: str, default):
        value = attrs.get(name)
        if value is None:
            return default
        values = np.asarray(value).ravel()
        if values.size < 1 or values.dtype.kind not in "iuf":
            raise VolumeError(f"{where}: {what}: attribute {name} must be a number, got {value!r}")
        return float(values[0])

    fill = scalar("_FillValue", None)
    return scalar("scale_factor", 1.0), scalar("add_offset", 0.0), fill if fill is not None else \
        scalar("missing_value", None)


def dims_and_steps(shape: tuple[int, ...]) -> tuple[tuple[int, int, int], int]:
    """((X, Y, Z), time steps) of a (Z, Y, X) or (T, Z, Y, X) array."""
    return (int(shape[-1]), int(shape[-2]), int(shape[-3])), (int(shape[0]) if len(shape) == 4 else 1)


def one_step(array, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...] | None, timestep: int,
             where: Path, what: str, errors: tuple[type[BaseException], ...]) -> ChunkedArray:
    """Time step `timestep` (1-based) of a 3-D or 4-D h5py/zarr array as a ChunkedArray over its own chunks
    (contiguous arrays: slabs of a few MiB)."""
    volume_shape = tuple(int(n) for n in shape[-3:])
    if chunks is None:
        per_slice = volume_shape[1] * volume_shape[2] * np.dtype(dtype).itemsize
        chunks = (max(1, (4 << 20) // per_slice), volume_shape[1], volume_shape[2])
    prefix = (timestep - 1,) if len(shape) == 4 else ()

    def read_box(box: tuple[slice, slice, slice]) -> np.ndarray:
        try:
            return np.asarray(array[prefix + box])
        except errors as error:
            message = " ".join(str(error).split()) or type(error).__name__
            raise VolumeError(f"{where}: cannot read {what}: {message}") from None

    return ChunkedArray(volume_shape, np.dtype(dtype), tuple(chunks)[-3:], read_box)


def check_volume(shape: tuple[int, ...], dtype, where: Path, what: str) -> str:
    reason = volume_reason(shape, dtype)
    if reason is not None:
        raise VolumeError(f"{where}: {what} is not a volume ({reason}; need 3-D (Z, Y, X) or 4-D (T, Z, Y, X) numbers)")
    return volume_dtype(dtype, where, what)

