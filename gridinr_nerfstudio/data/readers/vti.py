"""VTK XML ImageData (``.vti``) as ParaView and VTK write it: inline (ascii, base64) or appended (raw, base64) data,
uncompressed or in zlib / lz4 / lzma blocks, UInt32 or UInt64 headers, either byte order.

Every one-component point-data array is a variable (default: the active scalars); its values sit on the grid
points `Origin + index * Spacing` (x fastest), so the origin of the volume is the first point. Appended raw
uncompressed arrays are memory-mapped at their offset; other appended and inline base64 arrays are decoded in
z-slabs on demand (`ChunkedArray`): only the compressed blocks (or base64 characters) under a slab are decoded.
Inline ascii arrays are parsed whole. The XML head is parsed with the standard library; the appended section,
which is not XML, is located by its `_` marker as VTK's own reader does.
"""

from __future__ import annotations

import base64
import mmap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from gridinr_nerfstudio.data.readers.base import (
    VolumeError,
    VolumeInfo,
    Voxels,
    check_dims,
    check_origin,
    check_spacing,
    choose_variable,
    one_line,
)
from gridinr_nerfstudio.data.readers.chunked import ChunkedArray

VTK_NUMBER_TYPES = {
    "Int8": "i1", "UInt8": "u1", "Int16": "i2", "UInt16": "u2", "Int32": "i4", "UInt32": "u4", "Int64": "i8",
    "UInt64": "u8", "Float32": "f4", "Float64": "f8",
    "Char": "i1", "UnsignedChar": "u1", "Short": "i2", "UnsignedShort": "u2", "Int": "i4", "UnsignedInt": "u4",
    "Float": "f4", "Double": "f8",  # older VTK type names
}
COMPRESSORS = {"vtkZLibDataCompressor": "zlib", "vtkLZ4DataCompressor": "lz4", "vtkLZMADataCompressor": "lzma"}
SLAB_BYTES = 4 << 20
"""Decoded bytes per z-slab chunk of a compressed or encoded array."""


def _decompress(kind: str, data: bytes, size: int) -> bytes:
    if kind == "zlib":
        import zlib

        return zlib.decompress(data)
    if kind == "lz4":
        import lz4.block

        return lz4.block.decompress(data, uncompressed_size=size)
    import lzma

    return lzma.decompress(data)


class _Stream:
    """Decoded bytes of one array's stored stream, from `start` in `buffer`: raw bytes or base64 characters."""

    def __init__(self, buffer, start: int, encoded: bool) -> None:
        self.buffer, self.start, self.encoded = buffer, start, encoded

    def read(self, begin: int, end: int) -> bytes:
        if not self.encoded:
            data = bytes(self.buffer[self.start + begin : self.start + end])
        else:
            first, last = self.start + begin // 3 * 4, self.start + -(-end // 3) * 4
            skip = begin % 3
            data = base64.b64decode(bytes(self.buffer[first:last]))[skip : skip + end - begin]
        if len(data) != end - begin:
            raise EOFError(f"array data ends after {len(data)} of {end - begin} bytes")
        return data

    def after_header(self, size: int) -> "_Stream":
        """The data after a `size`-byte header. In base64 the header is either its own run, padded with '=' (VTK's
        compressed arrays, our export writer) or the start of one run with the data (VTK's uncompressed arrays)."""
        if not self.encoded:
            return _Stream(self.buffer, self.start + size, False)
        chars = -(-size // 3) * 4
        if size % 3 and bytes(self.buffer[self.start + chars - 1 : self.start + chars]) == b"=":
            return _Stream(self.buffer, self.start + chars, True)
        return _OffsetStream(self, size)


class _OffsetStream(_Stream):
    def __init__(self, stream: _Stream, shift: int) -> None:
        super().__init__(stream.buffer, stream.start, stream.encoded)
        self.shift = shift

    def read(self, begin: int, end: int) -> bytes:
        return super().read(begin + self.shift, end + self.shift)


class _VtiFile:
    """The parsed head of a .vti file: grid, arrays, where their data lies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                self.buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
        except OSError as error:
            raise VolumeError(f"{path}: unreadable: {error.strerror or error}") from None
        marker = self.buffer.find(b"<AppendedData")
        self.appended_start, self.appended_encoded = None, False
        try:
            if marker < 0:
                root = ET.fromstring(bytes(self.buffer))
            else:
                root = ET.fromstring(bytes(self.buffer[:marker]) + b"</VTKFile>")
                tag_end = self.buffer.find(b">", marker)
                tag = ET.fromstring(bytes(self.buffer[marker : tag_end + 1]) + b"</AppendedData>")
                underscore = self.buffer.find(b"_", tag_end)
                if tag_end < 0 or underscore < 0:
                    raise VolumeError(f"{path}: malformed VTK XML: AppendedData without its '_' marker")
                self.appended_start, self.appended_encoded = underscore + 1, tag.get("encoding") == "base64"
        except ET.ParseError as error:
            raise VolumeError(f"{path}: malformed VTK XML: {one_line(error)}") from None
        if root.tag != "VTKFile":
            raise VolumeError(f"{path}: not a VTK XML file (root element {root.tag!r})")
        if root.get("type") != "ImageData":
            raise VolumeError(f"{path}: VTK XML file of type {root.get('type')!r}; only ImageData (.vti) is a volume")
        self.big_endian = root.get("byte_order", "LittleEndian") == "BigEndian"
        self.header_type = root.get("header_type", "UInt32")
        if self.header_type not in ("UInt32", "UInt64"):
            raise VolumeError(f"{path}: unknown header_type {self.header_type!r} (UInt32 or UInt64)")
        compressor = root.get("compressor")
        if compressor is not None and compressor not in COMPRESSORS:
            raise VolumeError(f"{path}: unknown compressor {compressor!r} (known: {', '.join(COMPRESSORS)})")
        self.compression = COMPRESSORS.get(compressor)
        image = root.find("ImageData")
        pieces = image.findall("Piece") if image is not None else []
        if image is None or len(pieces) != 1:
            raise VolumeError(f"{path}: expected one ImageData element with one Piece, got "
                              f"{'no ImageData' if image is None else f'{len(pieces)} pieces'}")
        extent = self._numbers(pieces[0].get("Extent") or image.get("WholeExtent"), 6, "Extent", int)
        self.dims = check_dims([extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1],
                               path)
        self.spacing = check_spacing(self._numbers(image.get("Spacing", "1 1 1"), 3, "Spacing", float), path)
        origin = self._numbers(image.get("Origin", "0 0 0"), 3, "Origin", float)
        self.origin = check_origin([origin[i] + extent[2 * i] * self.spacing[i] for i in range(3)], path)
        direction = self._numbers(image.get("Direction", "1 0 0 0 1 0 0 0 1"), 9, "Direction", float)
        self.rotated = not np.allclose(direction, np.eye(3).ravel())
        point_data = pieces[0].find("PointData")
        self.arrays = {a.get("Name", f"array{i}"): a for i, a in enumerate(point_data.findall("DataArray"))} \
            if point_data is not None else {}
        self.active = point_data.get("Scalars") if point_data is not None else None
        cell_data = pieces[0].find("CellData")
        self.cell_arrays = [a.get("Name", "?") for a in cell_data.findall("DataArray")] if cell_data is not None else []

    def _numbers(self, text: str | None, count: int, what: str, kind):
        try:
            values = [kind(float(v)) if kind is int else kind(v) for v in (text or "").split()]
        except ValueError:
            values = []
        if len(values) != count:
            raise VolumeError(f"{self.path}: {what} must be {count} numbers, got {text!r}")
        return values

    def volume_arrays(self) -> tuple[list[str], list[str]]:
        """(names of one-component number arrays, descriptions of the other arrays)."""
        variables, others = [], []
        for name, array in self.arrays.items():
            components = int(array.get("NumberOfComponents", "1"))
            if array.get("type") not in VTK_NUMBER_TYPES:
                others.append(f"{name} (point data of type {array.get('type')})")
            elif components != 1:
                others.append(f"{name} (point data, {components} components)")
            else:
                variables.append(name)
        others += [f"{name} (cell data)" for name in self.cell_arrays]
        return variables, others

    def dtype(self, array) -> np.dtype:
        return np.dtype(("<" if not self.big_endian else ">") + VTK_NUMBER_TYPES[array.get("type")])

    def header_dtype(self) -> np.dtype:
        return np.dtype(("<" if not self.big_endian else ">") + ("u4" if self.header_type == "UInt32" else "u8"))

    def storage(self, array) -> str:
        form = array.get("format", "ascii")
        where = ("appended " + ("base64" if self.appended_encoded else "raw")) if form == "appended" else \
            f"inline {'base64' if form == 'binary' else form}"
        compression = f", {self.compression} blocks" if self.compression and form != "ascii" else ""
        headers = "" if form == "ascii" else f", {self.header_type} headers"
        lazy = "read whole" if form == "ascii" else \
            "memory-mapped" if where == "appended raw" and not self.compression else "decoded in z-slabs"
        return f"{where}{compression}{headers} ({lazy})"

    def stream(self, array) -> _Stream:
        form = array.get("format", "ascii")
        if form == "appended":
            if self.appended_start is None:
                raise VolumeError(f"{self.path}: array {array.get('Name')!r} is appended but there is no AppendedData")
            return _Stream(self.buffer, self.appended_start + int(array.get("offset", "0")), self.appended_encoded)
        return _Stream("".join((array.text or "").split()).encode("ascii"), 0, True)


def read_vti_info(path: Path, variable: str | None = None) -> VolumeInfo:
    vti = _VtiFile(path)
    variables, others = vti.volume_arrays()
    default = vti.active if vti.active in variables else (variables[0] if variables else None)
    chosen = choose_variable(path, variables, variable, default)
    array = vti.arrays[chosen]
    note = "; its Direction matrix is not the identity: voxels are read axis-aligned" if vti.rotated else ""
    return VolumeInfo(path=path, name=path.stem, dims=vti.dims, dtype=vti.dtype(array).newbyteorder("=").name,
                      spacing=vti.spacing, variables=variables, total_samples=1,
                      description=f"VTK ImageData file {path.name}{note}", format="vti", origin=vti.origin,
                      storage=vti.storage(array), other_arrays=others, default_variable=default, variable=chosen)


def open_vti(info: VolumeInfo, variable: str, timestep: int) -> Voxels:
    vti = _VtiFile(info.path)
    array = vti.arrays[variable]
    dtype, (x, y, z) = vti.dtype(array), vti.dims
    expected = x * y * z * dtype.itemsize
    try:
        if array.get("format", "ascii") == "ascii":
            values = np.array((array.text or "").split(), dtype=np.float64 if dtype.kind == "f" else np.int64)
            if values.size != x * y * z:
                raise EOFError(f"{values.size} values, expected {x * y * z}")
            return Voxels(values.astype(dtype.newbyteorder("=")).reshape(z, y, x), info.path)
        return Voxels(_lazy_array(vti, array, dtype, expected), info.path)
    except (EOFError, ValueError, OSError, ImportError) as error:
        raise VolumeError(f"{info.path}: unreadable data of array {variable!r}: {one_line(error)}") from None


def _lazy_array(vti: _VtiFile, array, dtype: np.dtype, expected: int):
    """The array as a memmap (appended raw, uncompressed) or a ChunkedArray of z-slabs."""
    x, y, z = vti.dims
    stream, header = vti.stream(array), vti.header_dtype()
    size = header.itemsize
    if vti.compression is None:
        stored = int(np.frombuffer(stream.read(0, size), dtype=header)[0])
        if stored != expected:
            raise EOFError(f"header says {stored} bytes, dims and type need {expected}")
        if not stream.encoded and isinstance(stream.buffer, mmap.mmap):
            if stream.start + size + expected > len(stream.buffer):
                raise EOFError(f"the file ends before the array's {expected} bytes")
            return np.memmap(vti.path, dtype=dtype, mode="r", offset=stream.start + size, shape=(z, y, x))
        read_bytes = stream.after_header(size).read
    else:
        count = int(np.frombuffer(stream.read(0, 3 * size), dtype=header)[0])
        fields = np.frombuffer(stream.read(0, (3 + count) * size), dtype=header).astype(np.int64)
        block, last, compressed = int(fields[1]), int(fields[2]), fields[3:]
        total = block * (count - 1) + (last or block) if count else 0
        if total != expected:
            raise EOFError(f"compressed header says {total} bytes, dims and type need {expected}")
        data, starts = stream.after_header((3 + count) * size), np.concatenate([[0], np.cumsum(compressed)])

        def read_bytes(begin: int, end: int) -> bytes:
            first, final = begin // block, (end - 1) // block
            pieces = []
            for i in range(first, final + 1):
                raw_size = (last or block) if i == count - 1 else block
                pieces.append(_decompress(vti.compression, data.read(int(starts[i]), int(starts[i + 1])), raw_size))
            joined = b"".join(pieces)
            return joined[begin - first * block : end - first * block]

    slice_bytes = x * y * dtype.itemsize

    def read_box(box: tuple[slice, slice, slice]) -> np.ndarray:
        z0, z1 = box[0].start, box[0].stop
        slab = np.frombuffer(read_bytes(z0 * slice_bytes, z1 * slice_bytes), dtype=dtype).reshape(z1 - z0, y, x)
        return slab[:, box[1], box[2]]

    return ChunkedArray((z, y, x), dtype, (max(1, SLAB_BYTES // slice_bytes), y, x), read_box)
