"""NRRD volumes (pynrrd reads the header): raw encodings memory-mapped (attached or detached data), compressed
encodings read whole by pynrrd."""

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
    check_spacing,
    one_line,
)


def _read_header(path: Path) -> tuple[dict, int]:
    """pynrrd's parsed header and the header's length in bytes (where attached data starts)."""
    import nrrd

    try:
        with open(path, "rb") as handle:
            header = nrrd.read_header(handle)
            return header, handle.tell()
    except StopIteration:
        raise VolumeError(f"{path}: malformed NRRD header: empty file") from None
    except (nrrd.NRRDError, ValueError, KeyError) as error:
        raise VolumeError(f"{path}: malformed NRRD header: {one_line(error)}") from None


def _dtype(header: dict, path: Path) -> np.dtype:
    import nrrd

    try:
        dtype = nrrd.reader._determine_datatype(header)  # pynrrd's own type and endianness mapping
    except (KeyError, nrrd.NRRDError) as error:
        raise VolumeError(f"{path}: unknown dtype in NRRD header: {one_line(error)}") from None
    check_dtype(dtype.name, path)
    return dtype


def read_nrrd_info(path: Path, variable: str | None = None) -> VolumeInfo:
    header, _ = _read_header(path)
    sizes = [int(n) for n in header.get("sizes", [])]
    if header.get("dimension") != 3 or len(sizes) != 3:
        raise VolumeError(f"{path}: expected a 3-D NRRD volume, got dimension {header.get('dimension')} "
                          f"sizes {sizes}")
    dtype = _dtype(header, path)
    if "spacings" in header:
        spacing = [float(s) for s in header["spacings"]]
    elif "space directions" in header:
        spacing = [float(np.linalg.norm(row)) for row in np.asarray(header["space directions"], dtype=np.float64)]
    else:
        spacing = [1.0, 1.0, 1.0]
    spacing = [s if np.isfinite(s) else 1.0 for s in spacing]  # non-spatial axes are NaN in pynrrd
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64).ravel()
    origin = tuple(float(o) for o in origin) if origin.shape == (3,) and np.isfinite(origin).all() else (0.0,) * 3
    encoding = str(header.get("encoding", "raw"))
    storage = "raw (memory-mapped)" if encoding == "raw" else f"{encoding} (read whole)"
    return VolumeInfo(path=path, name=path.name.rsplit(".", 1)[0], dims=check_dims(sizes, path), dtype=dtype.name,
                      spacing=check_spacing(spacing, path), variables=[SINGLE_FILE_VARIABLE], total_samples=1,
                      description=str(header.get("content", f"NRRD file {path.name}")), format="nrrd",
                      origin=origin, storage=storage, default_variable=SINGLE_FILE_VARIABLE)


def open_nrrd(info: VolumeInfo, variable: str, timestep: int) -> Voxels:
    """Raw-encoded NRRD data as a memmap (attached or detached); compressed encodings are read whole by pynrrd."""
    import nrrd

    path = info.path
    header, header_bytes = _read_header(path)
    dtype = _dtype(header, path)
    x, y, z = (int(n) for n in header["sizes"])
    if header.get("encoding") != "raw":
        try:
            with open(path, "rb") as handle:
                nrrd.read_header(handle)
                return Voxels(nrrd.read_data(header, handle, str(path), index_order="C"), path)
        except (nrrd.NRRDError, ValueError, OSError, EOFError) as error:
            raise VolumeError(f"{path}: unreadable NRRD data: {one_line(error)}") from None
    detached = header.get("data file", header.get("datafile"))
    data_file = path if detached is None else path.parent / str(detached)
    if not data_file.is_file():
        raise VolumeError(f"{data_file}: missing data file (named by NRRD header {path})")
    with open(data_file, "rb") as handle:
        handle.seek(header_bytes if detached is None else 0)
        for _ in range(int(header.get("line skip", header.get("lineskip", 0)))):
            handle.readline()
        start = handle.tell()
    expected = x * y * z * dtype.itemsize
    byte_skip = int(header.get("byte skip", header.get("byteskip", 0)))
    offset = data_file.stat().st_size - expected if byte_skip == -1 else start + byte_skip
    actual = data_file.stat().st_size - offset
    if offset < 0 or actual != expected:
        raise VolumeError(f"{data_file}: wrong data size: {actual} bytes after the header, expected {expected} bytes "
                          f"for dims {x}x{y}x{z} (X x Y x Z) of {dtype.name}")
    return Voxels(np.memmap(data_file, dtype=dtype, mode="r", offset=offset, shape=(z, y, x)), data_file)
