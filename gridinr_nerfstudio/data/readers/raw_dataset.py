"""Our dataset format (``dataset.json`` + ``VAR/NAME-VAR-N.raw|.dat``) and bare Open SciVis raw files
(``name_XxYxZ_dtype.raw``): headerless little-endian voxels, x fastest, memory-mapped."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from gridinr_nerfstudio.data.readers.base import (
    SINGLE_FILE_VARIABLE,
    VolumeError,
    VolumeInfo,
    Voxels,
    check_dims,
    check_dtype,
    check_origin,
    check_spacing,
)
from gridinr_nerfstudio.safe_write import staged_outputs

DATA_SUFFIXES = (".raw", ".dat")
_SCIVIS_NAME = re.compile(r"^(?P<name>.+)_(?P<x>\d+)x(?P<y>\d+)x(?P<z>\d+)_(?P<dtype>[A-Za-z0-9]+)\.(raw|dat)$")
_REQUIRED_KEYS = ("name", "dims", "vars", "total_samples")


def read_dataset_json(json_path: Path) -> VolumeInfo:
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        position = f"line {error.lineno} column {error.colno}"
        raise VolumeError(f"{json_path}: malformed JSON at {position}: {error.msg}") from None
    except UnicodeDecodeError:
        raise VolumeError(f"{json_path}: not UTF-8 text") from None
    if not isinstance(meta, dict):
        raise VolumeError(f"{json_path}: expected a JSON object with keys {', '.join(_REQUIRED_KEYS)}")
    missing = [key for key in _REQUIRED_KEYS if key not in meta]
    if missing:
        raise VolumeError(f"{json_path}: missing key(s) {', '.join(missing)} (required: {', '.join(_REQUIRED_KEYS)})")
    name, variables, total = meta["name"], meta["vars"], meta["total_samples"]
    if not isinstance(name, str) or not name:
        raise VolumeError(f"{json_path}: name must be a non-empty string, got {name!r}")
    if (not isinstance(variables, list) or not variables or len(set(map(str, variables))) != len(variables)
            or not all(isinstance(v, str) and v for v in variables)):
        raise VolumeError(f"{json_path}: vars must be a non-empty list of distinct names, got {variables!r}")
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise VolumeError(f"{json_path}: total_samples must be a positive integer, got {total!r}")
    return VolumeInfo(
        path=json_path.parent,
        name=name,
        dims=check_dims(meta["dims"], json_path),
        dtype=check_dtype(meta.get("dtype", "float32"), json_path),
        spacing=check_spacing(meta.get("spacing", 1.0), json_path),
        origin=check_origin(meta.get("origin", [0.0, 0.0, 0.0]), json_path),
        variables=list(variables),
        total_samples=total,
        description=str(meta.get("description", "")),
        format="dataset",
        storage="one raw file per variable and time step (memory-mapped)",
        default_variable=variables[0],
    )


def read_scivis_info(path: Path, variable: str | None = None) -> VolumeInfo:
    match = _SCIVIS_NAME.match(path.name)
    if match is None:
        raise VolumeError(f"{path}: cannot tell dims and dtype of a bare raw file; name it NAME_XxYxZ_DTYPE.raw "
                          f"(e.g. skull_256x256x256_uint8.raw) or pass its dataset folder")
    dims = check_dims([int(match[axis]) for axis in "xyz"], path)
    return VolumeInfo(path=path, name=match["name"], dims=dims, dtype=check_dtype(match["dtype"], path),
                      spacing=(1.0, 1.0, 1.0), variables=[SINGLE_FILE_VARIABLE], total_samples=1,
                      description=f"Open SciVis raw file {path.name}", format="scivis",
                      storage="raw, little endian (memory-mapped)", default_variable=SINGLE_FILE_VARIABLE)


def open_dataset(info: VolumeInfo, variable: str, timestep: int) -> Voxels:
    data_file = dataset_file(info, variable, timestep)
    return Voxels(map_raw(data_file, info.dims, info.dtype, offset=0), data_file)


def open_scivis(info: VolumeInfo, variable: str, timestep: int) -> Voxels:
    return Voxels(map_raw(info.path, info.dims, info.dtype, offset=0), info.path)


def dataset_file(info: VolumeInfo, variable: str, timestep: int) -> Path:
    stem = f"{info.name}-{variable}-{timestep}"
    candidates = [info.path / variable / f"{stem}{suffix}" for suffix in DATA_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise VolumeError(f"{candidates[0]}: missing data file (nor {candidates[1].name}) for variable {variable!r} "
                      f"time step {timestep}")


def map_raw(path: Path, dims: tuple[int, int, int], dtype: str | np.dtype, offset: int) -> np.memmap:
    """Memory-map headerless x-fastest voxels (little endian unless `dtype` says otherwise), checking the size."""
    x, y, z = dims
    dtype = np.dtype(dtype)
    expected = x * y * z * dtype.itemsize
    actual = path.stat().st_size - offset
    if actual != expected:
        raise VolumeError(f"{path}: wrong file size: {actual} bytes, expected {expected} bytes "
                          f"for dims {x}x{y}x{z} (X x Y x Z) of {dtype.name}")
    if dtype.byteorder == "=":
        dtype = dtype.newbyteorder("<")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(z, y, x))


def write_dataset(
    out_dir: str | Path,
    name: str,
    variables: dict[str, Sequence[np.ndarray]],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    description: str = "",
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    overwrite: bool = False,
) -> Path:
    """Write (Z, Y, X) arrays in the dataset format: {variable: [step 1, step 2, ...]}, one shape and dtype for all.

    Existing files are replaced only with `overwrite`; all files are staged and renamed in, dataset.json last
    (safe_write.py)."""
    arrays = [np.asarray(a) for steps in variables.values() for a in steps]
    counts = {len(steps) for steps in variables.values()}
    if not arrays or len(counts) != 1 or len({(a.shape, a.dtype) for a in arrays}) != 1 or arrays[0].ndim != 3:
        raise ValueError("write_dataset needs 3-D arrays of one shape and dtype, the same step count per variable")
    out_dir = Path(out_dir)
    files = [out_dir / var / f"{name}-{var}-{step}.raw" for var, steps in variables.items()
             for step in range(1, len(steps) + 1)]
    z, y, x = arrays[0].shape
    meta = {
        "name": name,
        "dims": [x, y, z],
        "vars": list(variables),
        "total_samples": counts.pop(),
        "dtype": arrays[0].dtype.name,
        "spacing": [float(s) for s in spacing],
        "description": description,
    }
    if any(float(o) != 0.0 for o in origin):
        meta["origin"] = [float(o) for o in origin]
    with staged_outputs([*files, out_dir / "dataset.json"], overwrite) as temporaries:
        for array, temporary in zip(arrays, temporaries):
            array.astype(array.dtype.newbyteorder("<")).tofile(temporary)
        temporaries[-1].write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir
