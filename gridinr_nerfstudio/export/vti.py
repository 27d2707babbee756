"""A small streaming writer of VTK ImageData XML (.vti) files, readable by ParaView and VTK.

No maintained light writer is installed with the project (VTK itself is ~100 MB; meshio and pyevtk are not
dependencies), and ImageData is a short, stable format, so we write it ourselves:

- file format version 1.0 with `header_type="UInt64"` (arrays over 4 GiB), little endian;
- one point-data array (values sit on the grid points: voxel centres at `Origin + index * Spacing`), x fastest;
- inline `format="binary"`: base64 of the byte count (one UInt64), then base64 of the raw values. VTK decodes the
  header separately from the data, so the two are encoded separately (the header ends in '=' padding).

The values arrive in z-slabs and are encoded as they come (base64 carries leftover bytes to the next slab so the
concatenated output equals one encoding of the whole array), so memory stays bounded by the slab size.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import quoteattr

import numpy as np

VTK_TYPES = {
    "int8": "Int8", "uint8": "UInt8", "int16": "Int16", "uint16": "UInt16", "int32": "Int32", "uint32": "UInt32",
    "int64": "Int64", "uint64": "UInt64", "float32": "Float32", "float64": "Float64",
}
"""numpy dtype -> VTK type name (VTK has no float16: such values are written as Float32)."""


class _Base64Writer:
    """Base64-encodes a byte stream written in pieces, as one encoding of their concatenation."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.pending = b""

    def write(self, data: bytes) -> None:
        data = self.pending + data
        whole = len(data) // 3 * 3
        self.handle.write(base64.b64encode(data[:whole]))
        self.pending = data[whole:]

    def close(self) -> None:
        self.handle.write(base64.b64encode(self.pending))
        self.pending = b""


def vtk_dtype(dtype: np.dtype | str) -> np.dtype:
    """The dtype a .vti file stores `dtype` as (float16 widens to float32)."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def write_vti(
    path: Path,
    slabs: Iterable[np.ndarray],
    dims: Sequence[int],
    spacing: Sequence[float],
    dtype: np.dtype | str,
    name: str = "value",
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> None:
    """Write (z, Y, X) slabs of a volume of `dims` (X, Y, Z) as one point-data array named `name`."""
    dtype = vtk_dtype(dtype)
    if dtype.name not in VTK_TYPES:
        raise ValueError(f"{path}: no VTK type for dtype {dtype.name}")
    x, y, z = (int(n) for n in dims)
    extent = f"0 {x - 1} 0 {y - 1} 0 {z - 1}"
    numbers = lambda values: " ".join(repr(float(v)) for v in values)  # noqa: E731
    head = (
        '<?xml version="1.0"?>\n'
        '<VTKFile type="ImageData" version="1.0" byte_order="LittleEndian" header_type="UInt64">\n'
        f'  <ImageData WholeExtent="{extent}" Origin="{numbers(origin)}" Spacing="{numbers(spacing)}">\n'
        f'    <Piece Extent="{extent}">\n'
        f"      <PointData Scalars={quoteattr(name)}>\n"
        f'        <DataArray type="{VTK_TYPES[dtype.name]}" Name={quoteattr(name)} NumberOfComponents="1" '
        'format="binary">\n'
    )
    tail = "\n        </DataArray>\n      </PointData>\n      <CellData>\n      </CellData>\n    </Piece>\n" \
           "  </ImageData>\n</VTKFile>\n"
    little = dtype.newbyteorder("<")
    with open(path, "wb") as handle:
        handle.write(head.encode("ascii"))
        handle.write(b"          ")
        handle.write(base64.b64encode(np.uint64(x * y * z * dtype.itemsize).astype("<u8").tobytes()))
        encoder = _Base64Writer(handle)
        written = 0
        for slab in slabs:
            encoder.write(np.ascontiguousarray(slab, dtype=little).tobytes())
            written += slab.size
        encoder.close()
        handle.write(tail.encode("ascii"))
    if written != x * y * z:
        raise ValueError(f"{path}: wrote {written} values, expected {x * y * z}")
