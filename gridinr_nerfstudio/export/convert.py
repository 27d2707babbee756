"""`gridinr-data convert`: any readable volume (one variable, one time step) rewritten as NRRD, VTK ImageData
(.vti), .npy (Z, Y, X) or our dataset format (raw + dataset.json), streamed in z-slabs so memory does not grow
with the volume.

Values are the file's own, in its dtype (float16 becomes float32 in .vti and NRRD, which have no half type).
Where the file packs its values (NIfTI scl_slope/scl_inter, CF scale_factor/add_offset/_FillValue), the output
holds the unpacked values as float32 (fill values as NaN), since none of the outputs can carry the packing.
Spacing and origin are kept (.npy has no room for them). Writing follows safe_write.py's rule: the output is written
to a temporary name beside it and renamed when complete (a dataset folder's raw file first, dataset.json last); an
existing output file is replaced only with `overwrite`; the input's files never (by path or by identity: links),
and nothing is written into or over a folder that holds the input (a dataset folder, a Zarr store).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gridinr_nerfstudio.data.volume_io import VolumeError, VolumeInfo, Voxels, open_voxels, z_slabs
from gridinr_nerfstudio.safe_write import OutputError, ProtectedFiles, check_target, staged_outputs

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


def output_files(output: Path, variable: str) -> tuple[Path, list[Path]]:
    """(where `output` lands, the files written there in publishing order): the file itself, or for .raw the dataset
    folder's raw file and then its dataset.json."""
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise VolumeError(f"{output}: unknown output type {output.suffix or '(none)'!r} "
                          f"(use {' '.join(OUTPUT_SUFFIXES)}; .raw writes a dataset folder)")
    if suffix != ".raw":
        return output, [output]
    folder, var = output.with_suffix(""), variable.replace("/", "_")
    return folder, [folder / var / f"{folder.name}-{var}-1.raw", folder / "dataset.json"]


def input_files(info: VolumeInfo, voxels: Voxels) -> ProtectedFiles:
    """The files a conversion reads: never written over, not even with --overwrite."""
    protected = ProtectedFiles([(Path(voxels.source_file), "the input volume")])
    if Path(info.path).is_dir():
        protected.add(Path(info.path) / "dataset.json", "the input's dataset.json")
    elif Path(info.path) != Path(voxels.source_file):
        protected.add(Path(info.path), "the input's header file")
    return protected


def check_folders(target: Path, inputs: list[Path]) -> None:
    """Refuse an output that is, holds or lies inside an input folder (a dataset folder, a Zarr store): files of
    the input are also protected one by one (`input_files`), this keeps a conversion out of the input's folders."""
    resolved = target.resolve()
    for source in inputs:
        source = source.resolve()
        clash = "is the input" if resolved == source else "lies inside the input" if \
            resolved.is_relative_to(source) and source.is_dir() else "holds the input" if \
            source.is_relative_to(resolved) else None
        if clash:
            raise VolumeError(f"{target}: {clash} {source}; write the conversion elsewhere")


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
    target, files = output_files(Path(output), variable)
    protected = input_files(info, voxels)
    check_folders(target, [Path(info.path), Path(voxels.source_file)])
    unpack = voxels.value_scale != 1.0 or voxels.value_offset != 0.0 or voxels.fill_value is not None
    suffix = Path(output).suffix.lower()
    dtype = np.dtype(np.float32) if unpack else np.dtype(info.dtype)
    if dtype == np.float16 and suffix in (".vti", ".nrrd"):
        dtype = np.dtype(np.float32)
    dtype = dtype.newbyteorder("<")
    try:
        with staged_outputs(files, overwrite, protected) as temporaries:
            slabs = _slabs(voxels, dtype, unpack)
            if suffix == ".raw":
                _write_dataset(temporaries, slabs, info, variable, timestep, dtype, target.name)
            else:
                writer = {".nrrd": _write_nrrd, ".vti": _write_vti, ".npy": _write_npy}[suffix]
                writer(temporaries[0], slabs, info, variable, timestep, dtype, target.name)
    except OutputError as error:
        raise VolumeError(str(error)) from None
    except OSError as error:
        raise VolumeError(f"{target}: cannot write ({error.strerror or error})") from None
    return Conversion(target, info, variable, timestep, dtype.name, unpack, sum(path.stat().st_size for path in files))


def _content(info: VolumeInfo, variable: str, timestep: int) -> str:
    return f"{info.name} {variable} t={timestep} converted by gridinr-data from {info.path.name} ({info.format})"


def write_npy_slabs(path: Path, slabs: Iterator[np.ndarray], dims: "tuple[int, int, int] | list[int]", dtype: np.dtype) -> Path:
    """z-slabs of an (X, Y, Z)-sized volume into a .npy of shape (Z, Y, X) through a memmap (memory stays a slab)."""
    x, y, z = dims
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(z, y, x))
    start = 0
    for slab in slabs:
        array[start : start + slab.shape[0]] = slab
        start += slab.shape[0]
    array.flush()
    del array
    return path


def _write_npy(path: Path, slabs: Iterator[np.ndarray], info: VolumeInfo, variable: str, timestep: int,
               dtype: np.dtype, name: str) -> None:
    write_npy_slabs(path, slabs, info.dims, dtype)


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


def _write_dataset(files: list[Path], slabs: Iterator[np.ndarray], info: VolumeInfo, variable: str, timestep: int,
                   dtype: np.dtype, name: str) -> None:
    """Our dataset format: FOLDER/VAR/NAME-VAR-1.raw (x fastest, little endian) and FOLDER/dataset.json, NAME the
    output folder's name (`files`: where to write the two)."""
    var = variable.replace("/", "_")
    with open(files[0], "wb") as handle:
        for slab in slabs:
            handle.write(np.ascontiguousarray(slab).tobytes())
    meta = {"name": name, "dims": list(info.dims), "vars": [var], "total_samples": 1, "dtype": dtype.name,
            "spacing": list(info.spacing), "description": _content(info, variable, timestep)}
    if any(o != 0.0 for o in info.origin):
        meta["origin"] = list(info.origin)
    files[1].write_text(json.dumps(meta, indent=2) + "\n")
