"""`gridinr-data convert`: any readable volume (one variable, one time step) rewritten as NRRD, VTK ImageData
(.vti), .npy (Z, Y, X) or our dataset format (raw + dataset.json), streamed in z-slabs so memory does not grow
with the volume.

Values are the file's own, in its dtype (float16 becomes float32 in .vti and NRRD, which have no half type).
Where the file packs its values (NIfTI scl_slope/scl_inter, CF scale_factor/add_offset/_FillValue), the output
holds the unpacked values as float32 (fill values as NaN), since none of the outputs can carry the packing.
Spacing and origin are kept (.npy has no room for them). The output is written to a temporary name beside it and
renamed when complete; an existing output is replaced only with `overwrite`, and the input never.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gridinr_nerfstudio.data.volume_io import VolumeError, VolumeInfo, Voxels, open_voxels, z_slabs

OUTPUT_SUFFIXES = (".nrrd", ".vti", ".npy", ".raw")
SLAB_VOXELS = 1 << 22
"""Voxels read and written at once."""


@dataclass
class Conversion:
    """What `convert_volume` wrote."""

    output: Path  # the file, or the dataset folder for .raw
    info: VolumeInfo
    variable: str
    timestep: int
    dtype: str
    unpacked: bool  # values were unpacked to float32 (scale/offset/fill of the input)
    bytes_written: int


def checked_destination(output: Path, inputs: list[Path], overwrite: bool) -> Path:
    """Where `output` lands (the dataset folder for .raw), refusing an existing one without `overwrite` and any
    that is, holds or lies inside an input. One rule, kept here until the shared safe-write helper lands."""
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise VolumeError(f"{output}: unknown output type {output.suffix or '(none)'!r} "
                          f"(use {' '.join(OUTPUT_SUFFIXES)}; .raw writes a dataset folder)")
    target = output.with_suffix("") if output.suffix.lower() == ".raw" else output
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise VolumeError(f"{output}: cannot write: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise VolumeError(f"{output}: cannot write: folder {parent} is not writable")
    resolved = target.resolve()
    for source in inputs:
        source = source.resolve()
        clash = "is the input" if resolved == source else "lies inside the input" if \
            resolved.is_relative_to(source) else "holds the input" if source.is_relative_to(resolved) else None
        if clash:
            raise VolumeError(f"{target}: {clash} {source}; write the conversion elsewhere")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise VolumeError(f"{target}: already exists (pass --overwrite to replace it)")
        if target.is_dir() != (output.suffix.lower() == ".raw"):
            raise VolumeError(f"{target}: exists and is a {'folder' if target.is_dir() else 'file'}; "
                              "not replacing it with a different kind")
    return target


def _slabs(voxels: Voxels, dtype: np.dtype, unpack: bool) -> Iterator[np.ndarray]:
    data = voxels.data
    for z0, z1 in z_slabs(data.shape, SLAB_VOXELS):
        raw = np.asarray(data[z0:z1])
        if unpack:
            values = raw.astype(np.float64) * voxels.value_scale + voxels.value_offset
            if voxels.fill_value is not None:
                values[raw == voxels.fill_value] = np.nan
            yield values.astype(dtype)
        else:
            yield raw.astype(dtype, copy=False)


def convert_volume(source: Path, output: Path, variable: str | None = None, timestep: int = 1,
                   overwrite: bool = False) -> Conversion:
    """Rewrite one variable/time step of `source` as `output` (type by suffix); see the module docstring."""
    info, variable, voxels = open_voxels(source, variable, timestep)
    inputs = [info.path, Path(voxels.source_file)]
    target = checked_destination(Path(output), inputs, overwrite)
    unpack = voxels.value_scale != 1.0 or voxels.value_offset != 0.0 or voxels.fill_value is not None
    suffix = Path(output).suffix.lower()
    dtype = np.dtype(np.float32) if unpack else np.dtype(info.dtype)
    if dtype == np.float16 and suffix in (".vti", ".nrrd"):
        dtype = np.dtype(np.float32)
    dtype = dtype.newbyteorder("<")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    writer = {".nrrd": _write_nrrd, ".vti": _write_vti, ".npy": _write_npy, ".raw": _write_dataset}[suffix]
    try:
        writer(partial, _slabs(voxels, dtype, unpack), info, variable, timestep, dtype, target.name)
        _replace(partial, target)
    except OSError as error:
        raise VolumeError(f"{target}: cannot write ({error.strerror or error})") from None
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        elif partial.exists():
            partial.unlink()
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) if target.is_dir() else \
        target.stat().st_size
    return Conversion(target, info, variable, timestep, dtype.name, unpack, size)


def _replace(partial: Path, target: Path) -> None:
    """Move the complete output into place (a folder replaces an old one only after it is complete)."""
    if partial.is_dir() and target.is_dir():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(retired)
        partial.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(partial, target)


def _content(info: VolumeInfo, variable: str, timestep: int) -> str:
    return f"{info.name} {variable} t={timestep} converted by gridinr-data from {info.path.name} ({info.format})"


def _write_npy(path: Path, slabs: Iterator[np.ndarray], info: VolumeInfo, variable: str, timestep: int,
               dtype: np.dtype, name: str) -> None:
    x, y, z = info.dims
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(z, y, x))
    start = 0
    for slab in slabs:
        array[start : start + slab.shape[0]] = slab
        start += slab.shape[0]
    array.flush()
    del array


def _write_nrrd(path: Path, slabs: Iterator[np.ndarray], info: VolumeInfo, variable: str, timestep: int,
                dtype: np.dtype, name: str) -> None:
    """Raw-encoded NRRD: pynrrd formats the header (its `write` wants the whole array), the slabs follow it."""
    import nrrd.writer

    header = {"encoding": "raw", "space dimension": 3, "space directions": np.diag(np.asarray(info.spacing)),
              "space origin": np.asarray(info.origin, dtype=np.float64), "content": _content(info, variable, timestep)}
    header = nrrd.writer._handle_header(np.empty((1, 1, 1), dtype=dtype), header, index_order="C")
    header["sizes"] = list(info.dims)
    with open(path, "wb") as handle:
        nrrd.writer._write_header(handle, header)
        for slab in slabs:
            handle.write(np.ascontiguousarray(slab).tobytes())


def _write_vti(path: Path, slabs: Iterator[np.ndarray], info: VolumeInfo, variable: str, timestep: int,
               dtype: np.dtype, name: str) -> None:
    from gridinr_nerfstudio.export.vti import write_vti

    write_vti(path, slabs, info.dims, info.spacing, dtype, name=variable.replace("/", "_"), origin=info.origin)


def _write_dataset(folder: Path, slabs: Iterator[np.ndarray], info: VolumeInfo, variable: str, timestep: int,
                   dtype: np.dtype, name: str) -> None:
    """Our dataset format: FOLDER/dataset.json and FOLDER/VAR/NAME-VAR-1.raw (x fastest, little endian), NAME the
    output folder's name."""
    var = variable.replace("/", "_")
    (folder / var).mkdir(parents=True)
    with open(folder / var / f"{name}-{var}-1.raw", "wb") as handle:
        for slab in slabs:
            handle.write(np.ascontiguousarray(slab).tobytes())
    meta = {"name": name, "dims": list(info.dims), "vars": [var], "total_samples": 1, "dtype": dtype.name,
            "spacing": list(info.spacing), "description": _content(info, variable, timestep)}
    if any(o != 0.0 for o in info.origin):
        meta["origin"] = list(info.origin)
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
