"""The INR decoded on a grid and written for other tools: NRRD, VTK ImageData (.vti), our dataset format (.raw)
and .npy.

The grid spans the volume's physical box (voxel centres from the first to the last): the native dims by default,
`--resolution N` (N voxels on the longest axis, the others in proportion) or `--dims X Y Z`; the spacing is then
`extent / (n - 1)` per axis and the origin the first voxel centre (0, 0, 0), so the output overlays the raw volume.
Values are the field clamped to [0, 1] (as the volume PSNR and the renderers read it), written in the data's
own units and dtype (`units="data"`: `v * (max - min) + min`, rounded and clipped for integer dtypes) or as
float32 normalised values (`units="normalized"`).

The field is decoded in z-slabs of at most `slab_voxels` voxels and each slab is written before the next is
decoded, so memory stays bounded for outputs larger than RAM. Disk space and the memory of one slab are checked
before anything is written; files go through safe_write.py (never over the run's inputs, over existing files only
with --overwrite, renamed into place when complete).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from gridinr_nerfstudio.export.convert import write_npy_slabs
from gridinr_nerfstudio.export.source import ExportError, ExportSource, VolumeMeta
from gridinr_nerfstudio.safe_write import check_free_space, check_target, format_bytes, staged_outputs

Units = Literal["data", "normalized"]
VOLUME_SUFFIXES = (".nrrd", ".vti", ".raw", ".npy")
DEFAULT_SLAB_VOXELS = 1 << 22
"""Voxels decoded and written at once (16 MiB as float32)."""
POINT_CHUNK = 1 << 18
"""Points per field evaluation."""


@dataclass(frozen=True)
class OutputGrid:
    """The grid an export decodes: dims (X, Y, Z) and physical spacing, origin at the first voxel centre."""

    dims: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def voxels(self) -> int:
        return int(np.prod(self.dims))


def output_grid(meta: VolumeMeta, resolution: Optional[int] = None, dims: Optional[Sequence[int]] = None) -> OutputGrid:
    """Native dims, N voxels along the longest axis (others in proportion, at least 2), or explicit dims."""
    native = np.asarray(meta.dims, dtype=np.int64)
    if resolution is not None and dims is not None:
        raise ExportError("give --resolution or --dims, not both")
    if resolution is not None:
        if resolution < 2:
            raise ExportError(f"--resolution must be at least 2, got {resolution}")
        grid = np.maximum(2, np.round(native * resolution / native.max())).astype(np.int64)
        grid[native == 1] = 1
    elif dims is not None:
        grid = np.asarray([int(n) for n in dims], dtype=np.int64)
        if grid.shape != (3,) or np.any(grid < 1) or np.any((grid == 1) != (native == 1)):
            raise ExportError(f"--dims must be three sizes >= 2 (1 only where the volume is flat), got {list(dims)}")
    else:
        grid = native
    extent = meta.extent
    spacing = [extent[i] / (grid[i] - 1) if grid[i] > 1 else meta.spacing[i] for i in range(3)]
    return OutputGrid(tuple(int(n) for n in grid), tuple(float(s) for s in spacing))


def slab_bounds(grid: OutputGrid, slab_voxels: int = DEFAULT_SLAB_VOXELS) -> list[tuple[int, int]]:
    x, y, z = grid.dims
    step = max(1, slab_voxels // (x * y))
    return [(z0, min(z, z0 + step)) for z0 in range(0, z, step)]


def unit_axis(n: int) -> torch.Tensor:
    """Unit-cube coordinates of n voxel centres along one axis (0 when the axis is flat)."""
    return torch.linspace(0.0, 1.0, n) if n > 1 else torch.zeros(1)


@torch.no_grad()
def decode_slab(field, grid: OutputGrid, z0: int, z1: int) -> np.ndarray:
    """Normalised field values (z1 - z0, Y, X) at the grid's voxel centres, clamped to [0, 1], float32."""
    x, y, z = grid.dims
    axis_z = unit_axis(z)[z0:z1]
    zz, yy, xx = torch.meshgrid(axis_z, unit_axis(y), unit_axis(x), indexing="ij")
    device = field.aabb.device
    unit = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3).to(device)
    values = torch.cat([field.forward_unit(unit[i : i + POINT_CHUNK]) for i in range(0, unit.shape[0], POINT_CHUNK)])
    return values.clamp(0.0, 1.0).float().cpu().numpy().reshape(z1 - z0, y, x)


def decode_grid(field, grid: OutputGrid, slab_voxels: int = DEFAULT_SLAB_VOXELS) -> Iterator[tuple[int, int, np.ndarray]]:
    """(z0, z1, normalised slab) for the whole grid, one slab at a time."""
    for z0, z1 in slab_bounds(grid, slab_voxels):
        yield z0, z1, decode_slab(field, grid, z0, z1)


def output_dtype(meta: VolumeMeta, units: Units) -> np.dtype:
    return np.dtype(meta.dtype) if units == "data" else np.dtype(np.float32)


def convert(normalized: np.ndarray, meta: VolumeMeta, units: Units) -> np.ndarray:
    """Normalised values -> the output's values and dtype (see the module docstring)."""
    if units == "normalized":
        return normalized.astype(np.float32)
    dtype = np.dtype(meta.dtype)
    values = meta.to_data_units(normalized)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), max(info.min, math.ceil(meta.value_min)), min(info.max, math.floor(meta.value_max)))
    return values.astype(dtype)


@dataclass
class VolumeExport:
    """What `export_volume` wrote, and how close the decoded field is to the raw voxels (when it could tell)."""

    path: Path  # the file written (the dataset folder for .raw)
    grid: OutputGrid
    dtype: str
    units: str
    bytes_written: int
    psnr_db: Optional[float]  # field vs raw voxels, normalised units; None unless native dims and a run's volume


def check_output(path: Path, suffixes: Sequence[str], overwrite: bool = False) -> None:
    """Fail early, in one line, on an unknown extension, a folder we cannot write into, or an existing output
    (without --overwrite); run inputs are checked once the run is loaded (`export_volume`, safe_write.py)."""
    import os

    if path.suffix.lower() not in suffixes:
        raise ExportError(f"{path}: unknown output type {path.suffix or '(none)'!r} (use {' '.join(suffixes)})")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"{path}: cannot write: {parent} is not a folder")
    if not parent.is_dir():
        raise ExportError(f"{path}: cannot write: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"{path}: cannot write: folder {parent} is not writable")
    first = path.with_suffix("") / "dataset.json" if path.suffix.lower() == ".raw" else path
    check_target(first, overwrite)


def volume_output_files(output: Path, variable: str) -> list[Path]:
    """The files a volume export writes: `output`, or for .raw the dataset folder's raw file and dataset.json."""
    if output.suffix.lower() != ".raw":
        return [output]
    folder = output.with_suffix("")
    return [folder / variable / f"{folder.name}-{variable}-1.raw", folder / "dataset.json"]


DECODE_BYTES_PER_VOXEL = 64
"""Peak memory per voxel of a slab while it is decoded, compared and converted (coordinates, values, float64
copies); at least one z-slice (X x Y voxels) is decoded at once whatever --slab-voxels says. Measured (VmHWM):
40 bytes per voxel without the PSNR comparison (a 384^3 export in slabs of 4.1 M voxels); the comparison adds a
float32 and two float64 copies of the slab."""


def check_resources(output: Path, grid: OutputGrid, dtype: np.dtype, slab_voxels: int) -> None:
    """One line, before anything is written, when the export cannot fit: disk space for the file, memory for a slab."""
    x, y, z = grid.dims
    payload = grid.voxels * dtype.itemsize
    if output.suffix.lower() == ".vti":
        payload = payload * 4 // 3  # base64
    check_free_space(output, payload + (1 << 16))
    slab = max(1, slab_voxels // (x * y)) * x * y
    needed, available = slab * DECODE_BYTES_PER_VOXEL, available_memory()
    if needed > available:
        raise ExportError(f"{output}: decoding the {x} x {y} x {z} grid needs about {format_bytes(needed)} of memory "
                          f"per slab (at least one {x} x {y} slice, {DECODE_BYTES_PER_VOXEL} bytes per voxel), "
                          f"{format_bytes(available)} available: choose a smaller --resolution or --dims")


def available_memory() -> int:
    """Bytes of memory available to a new allocation without swapping (psutil)."""
    import psutil

    return int(psutil.virtual_memory().available)


def export_volume(source: ExportSource, output: Path, grid: OutputGrid, units: Units = "data",
                  slab_voxels: int = DEFAULT_SLAB_VOXELS, overwrite: bool = False) -> VolumeExport:
    """Decode `source.field` on `grid` slab by slab and write it to `output` (format by suffix).

    Never over the run's inputs, over an existing file only with `overwrite`, through temporary files renamed into
    place when complete (safe_write.py). The PSNR compares the decoded slabs with the source volume as read."""
    output = Path(output)
    check_output(output, VOLUME_SUFFIXES, overwrite)
    meta, dtype = source.meta, output_dtype(source.meta, units)
    targets = volume_output_files(output, meta.variable)
    for target in targets:
        check_target(target, overwrite, source.inputs)
    check_resources(output, grid, dtype, slab_voxels)
    compare = source.volume is not None and grid.dims == tuple(meta.dims)
    squared_error = [0.0, 0]

    def slabs() -> Iterator[np.ndarray]:
        for z0, z1, normalized in decode_grid(source.field, grid, slab_voxels):
            if compare:
                target = source.volume.normalized_slab(z0, z1)
                squared_error[0] += float(np.square(normalized.astype(np.float64) - target).sum())
                squared_error[1] += target.size
            yield convert(normalized, meta, units)

    suffix = output.suffix.lower()
    try:
        with staged_outputs(targets, overwrite, source.inputs) as temporaries:
            if suffix == ".raw":
                write_raw_dataset(temporaries[0], temporaries[1], output.with_suffix("").name, slabs(), grid, dtype, meta)
            else:
                writer = {".nrrd": write_nrrd, ".vti": write_vti_file, ".npy": write_npy}[suffix]
                writer(temporaries[0], slabs(), grid, dtype, meta)
    except OSError as error:
        raise ExportError(f"{output}: cannot write ({error.strerror or error})") from None
    psnr = None
    if compare and squared_error[1]:
        mse = squared_error[0] / squared_error[1]
        psnr = float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
    written = output.with_suffix("") if suffix == ".raw" else output
    return VolumeExport(written, grid, dtype.name, units, sum(t.stat().st_size for t in targets), psnr)


# --- writers: (file, slabs (z, Y, X) in dtype, grid, dtype, meta), into the temporary files export_volume made ---


def write_npy(path: Path, slabs: Iterator[np.ndarray], grid: OutputGrid, dtype: np.dtype, meta: VolumeMeta) -> Path:
    """numpy .npy of shape (Z, Y, X), written through a memmap (the spacing is not stored: .npy has no header room)."""
    return write_npy_slabs(path, slabs, grid.dims, dtype)


def write_raw_dataset(raw_file: Path, json_file: Path, name: str, slabs: Iterator[np.ndarray], grid: OutputGrid,
                      dtype: np.dtype, meta: VolumeMeta) -> None:
    """Our dataset format (see data/volume_io.py's write_dataset): a folder NAME holding dataset.json and
    VAR/NAME-VAR-1.raw (x fastest, little endian), VAR the run's variable."""
    with open(raw_file, "wb") as handle:
        for slab in slabs:
            handle.write(np.ascontiguousarray(slab, dtype=dtype.newbyteorder("<")).tobytes())
    x, y, z = grid.dims
    description = (f"{meta.name} {meta.variable} t={meta.timestep} decoded from a gridinr INR by gridinr-export; "
                   f"original value range [{meta.value_min:.7g}, {meta.value_max:.7g}]")
    dataset = {"name": name, "dims": [x, y, z], "vars": [meta.variable], "total_samples": 1, "dtype": dtype.name,
               "spacing": list(grid.spacing), "description": description}
    json_file.write_text(json.dumps(dataset, indent=2) + "\n")


def write_nrrd(path: Path, slabs: Iterator[np.ndarray], grid: OutputGrid, dtype: np.dtype, meta: VolumeMeta) -> Path:
    """NRRD with raw encoding: pynrrd formats the header (type, endianness, sizes, space directions and origin),
    then the slabs are appended as they are decoded (pynrrd's `write` needs the whole array in memory)."""
    import nrrd.writer

    x, y, z = grid.dims
    header = {
        "encoding": "raw",
        "space dimension": 3,
        "space directions": np.diag(np.asarray(grid.spacing, dtype=np.float64)),
        "space origin": np.zeros(3),
        "content": f"{meta.name} {meta.variable} decoded from a gridinr INR",
    }
    header = nrrd.writer._handle_header(np.empty((1, 1, 1), dtype=dtype), header, index_order="C")
    header["sizes"] = [x, y, z]
    with open(path, "wb") as handle:
        nrrd.writer._write_header(handle, header)
        for slab in slabs:
            handle.write(np.ascontiguousarray(slab, dtype=dtype).tobytes())
    return path


def write_vti_file(path: Path, slabs: Iterator[np.ndarray], grid: OutputGrid, dtype: np.dtype,
                   meta: VolumeMeta) -> Path:
    """VTK ImageData XML through our small writer (export/vti.py); origin at the first voxel centre."""
    from gridinr_nerfstudio.export.vti import write_vti

    write_vti(path, slabs, grid.dims, grid.spacing, dtype, name=meta.variable)
    return path
