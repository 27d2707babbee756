"""HDF5 and NetCDF-4 files (``.h5``, ``.hdf5``, ``.he5``, ``.nc``, ``.nc4``) through h5py: netCDF-4 files are HDF5.

Every 3-D or 4-D number dataset (not a dimension scale) is a variable, named by its path (``group/name``);
with several, the caller chooses one. A 4-D dataset's first axis is time. Geometry and CF packing follow
`array_meta.py`. Contiguous uncompressed datasets are memory-mapped at their file offset; chunked (possibly
compressed) datasets are read chunk by chunk through `ChunkedArray`. The file stays open while the volume lives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gridinr_nerfstudio.data.readers import array_meta
from gridinr_nerfstudio.data.readers.base import VolumeError, VolumeInfo, Voxels, choose_variable, one_line

SUFFIXES = (".h5", ".hdf5", ".he5", ".nc", ".nc4")
_PHONY_DIMENSION = b"This is a netCDF dimension but not a netCDF variable"


def _open_file(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as error:
        message = one_line(error)
        if "signature" in message and path.suffix.lower() == ".nc":
            raise VolumeError(f"{path}: not an HDF5-based netCDF-4 file (netCDF-3 classic? convert it with "
                              "'nccopy -k nc4 IN OUT')") from None
        if "signature" in message:
            raise VolumeError(f"{path}: not an HDF5 file (damaged, or another format)") from None
        raise VolumeError(f"{path}: unreadable HDF5 file: {message}") from None


def _is_dimension_scale(dataset) -> bool:
    value = dataset.attrs.get("CLASS")
    return (value.decode() if isinstance(value, bytes) else str(value)) == "DIMENSION_SCALE" if value is not None \
        else False


def _scan(handle) -> tuple[list[str], list[str]]:
    """(volume datasets, descriptions of the other datasets), in file order of their paths."""
    import h5py

    variables, others = [], []

    def visit(name: str, item) -> None:
        if not isinstance(item, h5py.Dataset):
            return
        if _is_dimension_scale(item):
            return
        reason = array_meta.volume_reason(item.shape, item.dtype) if item.dtype.kind != "O" else "dtype object"
        if reason is None:
            variables.append(name)
        else:
            others.append(f"{name} ({reason})")

    try:
        handle.visititems(visit)
    except (OSError, RuntimeError, KeyError) as error:
        raise VolumeError(f"{handle.filename}: damaged HDF5 structure: {one_line(error)}") from None
    return variables, array_meta.listed(others)


def _coordinates(dataset) -> list[np.ndarray | None]:
    """CF coordinate variables of the last three axes (z, y, x), from the dimension scales attached to them."""
    found = []
    for axis in range(dataset.ndim - 3, dataset.ndim):
        values = None
        try:
            scales = dataset.dims[axis]
            if len(scales):
                scale = scales[0]
                name = scale.attrs.get("NAME", b"")
                phony = (name if isinstance(name, bytes) else str(name).encode()).startswith(_PHONY_DIMENSION)
                if not phony and scale.ndim == 1 and scale.shape[0] == dataset.shape[axis]:
                    values = np.asarray(scale[()])
        except (OSError, RuntimeError, KeyError, ValueError):
            values = None
        found.append(values)
    return found


def _storage(dataset) -> str:
    layout = "chunked" if dataset.chunks is not None else "contiguous"
    if dataset.is_virtual:
        layout = "virtual"
    parts = [layout]
    if dataset.chunks is not None:
        parts.append("chunks " + " x ".join(str(n) for n in dataset.chunks[::-1]) + " (X x Y x Z" +
                     (" x T)" if dataset.ndim == 4 else ")"))
    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(i)[3].decode("latin-1", "replace") for i in range(plist.get_nfilters())]
    parts.append(", ".join(filters) if filters else "uncompressed")
    parts.append("(memory-mapped)" if _offset(dataset) is not None else "(read chunk by chunk)")
    return ", ".join(parts[:-1]) + " " + parts[-1]


def _offset(dataset) -> int | None:
    """File offset of a contiguous, unfiltered, allocated dataset (memory-mappable), else None."""
    if dataset.chunks is not None or dataset.is_virtual or dataset.dtype.kind not in "iuf":
        return None
    if dataset.id.get_create_plist().get_nfilters():
        return None
    try:
        return dataset.id.get_offset()
    except (OSError, RuntimeError):
        return None


def read_hdf5_info(path: Path, variable: str | None = None) -> VolumeInfo:
    with _open_file(path) as handle:
        variables, others = _scan(handle)
        # described: the one asked for, else the first; opening one of several needs a choice (default None)
        chosen = choose_variable(path, variables, variable, variables[0] if variables else None)
        dataset = handle[chosen]
        what = f"variable {chosen!r}"
        dtype = array_meta.check_volume(dataset.shape, dataset.dtype, path, what)
        dims, steps = array_meta.dims_and_steps(dataset.shape)
        spacing, origin, note = array_meta.geometry(dataset.attrs, _coordinates(dataset), path, what)
        netcdf = "_NCProperties" in handle.attrs or path.suffix.lower() in (".nc", ".nc4")
        title = handle.attrs.get("title", dataset.attrs.get("long_name", b""))
        title = title.decode("utf-8", "replace") if isinstance(title, bytes) else str(title)
        units = dataset.attrs.get("units")
        units = units.decode("utf-8", "replace") if isinstance(units, bytes) else units
        description = "; ".join(p for p in (title or f"{'netCDF-4' if netcdf else 'HDF5'} file {path.name}",
                                            f"units {units}" if units else "", note) if p)
        return VolumeInfo(path=path, name=path.stem, dims=dims, dtype=dtype, spacing=spacing, variables=variables,
                          total_samples=steps, description=description, format="netcdf" if netcdf else "hdf5",
                          origin=origin, storage=_storage(dataset), other_arrays=others,
                          default_variable=variables[0] if len(variables) == 1 else None,
                          variable=chosen)


def open_hdf5(info: VolumeInfo, variable: str, timestep: int) -> Voxels:
    handle = _open_file(info.path)
    dataset = handle[variable]
    what = f"variable {variable!r}"
    scale, offset, fill = array_meta.packing(dataset.attrs, info.path, what)
    start = _offset(dataset)
    if start is not None:
        x, y, z = info.dims
        step_bytes = x * y * z * dataset.dtype.itemsize
        start += (timestep - 1) * step_bytes
        dtype = dataset.dtype
        handle.close()
        if start + step_bytes > info.path.stat().st_size:
            raise VolumeError(f"{info.path}: {what} ends past the end of the file (truncated?)")
        data = np.memmap(info.path, dtype=dtype, mode="r", offset=start, shape=(z, y, x))
    else:
        data = array_meta.one_step(dataset, dataset.shape, dataset.dtype, dataset.chunks, timestep, info.path, what,
                                   (OSError, RuntimeError, ValueError))
    return Voxels(data, info.path, scale, offset, fill)
