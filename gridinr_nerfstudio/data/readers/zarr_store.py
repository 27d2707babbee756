"""Zarr v2 and v3 directory stores (the `zarr` package): an array store, or a group whose 3-D/4-D arrays are the
variables (named by their path in the store, ``group/name``). Geometry and CF packing follow `array_meta.py`
(coordinates named by xarray's `_ARRAY_DIMENSIONS` or v3 `dimension_names`). Voxels are read chunk by chunk
through `ChunkedArray`: missing chunks read as the fill value, as zarr defines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gridinr_nerfstudio.data.readers import array_meta
from gridinr_nerfstudio.data.readers.base import (
    SINGLE_FILE_VARIABLE,
    VolumeError,
    VolumeInfo,
    Voxels,
    choose_variable,
    one_line,
)

_METADATA = (".zarray", ".zgroup", "zarr.json")
_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError)


def is_zarr_store(path: Path) -> bool:
    return path.is_dir() and (path.suffix.lower() == ".zarr" or any((path / m).is_file() for m in _METADATA))


def _open_store(path: Path):
    import zarr

    if not any((path / m).is_file() for m in _METADATA):
        raise VolumeError(f"{path}: a .zarr folder without Zarr metadata (.zarray, .zgroup or zarr.json)")
    try:
        return zarr.open(store=str(path), mode="r")
    except _ERRORS as error:
        raise VolumeError(f"{path}: unreadable Zarr store: {one_line(error)}") from None


def _arrays(root) -> dict[str, object]:
    """{variable name: array} of every array in the store ("value" for an array store)."""
    import zarr

    if isinstance(root, zarr.Array):
        return {SINGLE_FILE_VARIABLE: root}
    found = {name: item for name, item in root.members(max_depth=None) if isinstance(item, zarr.Array)}
    return dict(sorted(found.items()))  # zarr lists members in no fixed order


def _dimension_names(array) -> list[str] | None:
    names = getattr(array.metadata, "dimension_names", None) or array.attrs.get("_ARRAY_DIMENSIONS")
    return list(names) if names is not None and len(names) == array.ndim else None


def _coordinates(root, name: str, array, arrays: dict) -> list[np.ndarray | None]:
    names = _dimension_names(array)
    found = []
    for axis in range(array.ndim - 3, array.ndim):
        values = None
        if names is not None and names[axis]:
            parent = name.rpartition("/")[0]
            for candidate in (f"{parent}/{names[axis]}" if parent else names[axis], names[axis]):
                coordinate = arrays.get(candidate)
                if coordinate is not None and coordinate.ndim == 1 and coordinate.shape[0] == array.shape[axis]:
                    values = np.asarray(coordinate[:])
                    break
        found.append(values)
    return found


def _storage(array) -> str:
    codecs = [type(c).__name__ if not hasattr(c, "cname") else f"{type(c).__name__}({c.cname})"
              for c in (*array.filters, *array.compressors)]
    shards = getattr(array, "shards", None)
    chunk_text = " x ".join(str(n) for n in array.chunks[::-1])
    axes = "(X x Y x Z x T)" if array.ndim == 4 else "(X x Y x Z)"
    return (f"Zarr v{array.metadata.zarr_format}, chunks {chunk_text} {axes}"
            f"{', shards ' + ' x '.join(str(n) for n in shards[::-1]) if shards else ''}, "
            f"{', '.join(codecs) if codecs else 'uncompressed'} (read chunk by chunk)")


def read_zarr_info(path: Path, variable: str | None = None) -> VolumeInfo:
    root = _open_store(path)
    try:
        arrays = _arrays(root)
        variables, others = [], []
        for name, array in arrays.items():
            reason = array_meta.volume_reason(array.shape, array.dtype)
            (variables if reason is None else others).append(name if reason is None else f"{name} ({reason})")
        # described: the one asked for, else the first; opening one of several needs a choice (default None)
        chosen = choose_variable(path, variables, variable, variables[0] if variables else None)
        array, what = arrays[chosen], f"variable {chosen!r}"
        dtype = array_meta.check_volume(array.shape, array.dtype, path, what)
        dims, steps = array_meta.dims_and_steps(array.shape)
        spacing, origin, note = array_meta.geometry(array.attrs, _coordinates(root, chosen, array, arrays), path,
                                                    what)
        title = str(root.attrs.get("title", array.attrs.get("long_name", "")))
        units = array.attrs.get("units")
        description = "; ".join(p for p in (title or f"Zarr store {path.name}", f"units {units}" if units else "",
                                            note) if p)
        return VolumeInfo(path=path, name=path.stem, dims=dims, dtype=dtype, spacing=spacing, variables=variables,
                          total_samples=steps, description=description, format="zarr", origin=origin,
                          storage=_storage(array), other_arrays=array_meta.listed(others),
                          default_variable=variables[0] if len(variables) == 1 else None,
                          variable=chosen)
    except _ERRORS as error:
        raise VolumeError(f"{path}: damaged Zarr store: {one_line(error)}") from None


def open_zarr(info: VolumeInfo, variable: str, timestep: int) -> Voxels:
    root = _open_store(info.path)
    array = _arrays(root)[variable]
    what = f"variable {variable!r}"
    scale, offset, fill = array_meta.packing(array.attrs, info.path, what)
    folder = info.path if variable == SINGLE_FILE_VARIABLE and not hasattr(root, "members") else \
        info.path / variable
    data = array_meta.one_step(array, array.shape, array.dtype, array.chunks, timestep, info.path, what, _ERRORS)
    return Voxels(data, folder if folder.is_dir() else info.path, scale, offset, fill)
