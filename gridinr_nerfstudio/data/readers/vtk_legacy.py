"""Legacy VTK files (``.vtk``) holding STRUCTURED_POINTS, ASCII or binary, file versions up to 5.1.

Point-data arrays given as SCALARS (one component) or in a FIELD are variables (default: the first SCALARS);
other attributes (VECTORS, NORMALS, multi-component arrays, cell data) are listed but are not volumes. Binary
data is big endian and lies in the file as is, so binary arrays are memory-mapped at their offset; ASCII arrays
are parsed whole. meshio reads these files too, but turns the grid into points and hexahedra (memory many times
the volume) and has no ImageData reader, so the grammar below is ours.
"""

from __future__ import annotations

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
)

TYPES = {
    "bit": None, "unsigned_char": "u1", "char": "i1", "signed_char": "i1", "unsigned_short": "u2", "short": "i2",
    "unsigned_int": "u4", "int": "i4", "unsigned_long": "u8", "long": "i8", "vtktypeint64": "i8",
    "vtktypeuint64": "u8", "float": "f4", "double": "f8", "vtkidtype": "i8",
}
_ATTRIBUTE_COMPONENTS = {"VECTORS": 3, "NORMALS": 3, "TENSORS": 9, "TENSORS6": 6}


class _Tokens:
    """Whitespace-separated tokens of a legacy file read line by line; binary blocks are skipped by offset."""

    def __init__(self, handle, path: Path) -> None:
        self.handle, self.path, self.pending = handle, path, []

    def next(self) -> str:
        while not self.pending:
            line = self.handle.readline()
            if not line:
                raise VolumeError(f"{self.path}: legacy VTK file ends early")
            self.pending = line.decode("latin-1").split()
        return self.pending.pop(0)

    def peek(self) -> str | None:
        while not self.pending:
            line = self.handle.readline()
            if not line:
                return None
            self.pending = line.decode("latin-1").split()
        return self.pending[0]

    def line(self) -> str:
        if self.pending:
            rest, self.pending = " ".join(self.pending), []
            return rest
        line = self.handle.readline()
        if not line:
            raise VolumeError(f"{self.path}: legacy VTK file ends early")
        return line.decode("latin-1").strip()

    def integer(self, what: str) -> int:
        token = self.next()
        try:
            return int(token)
        except ValueError:
            raise VolumeError(f"{self.path}: expected an integer for {what}, got {token!r}") from None

    def numbers(self, count: int, what: str) -> list[float]:
        values = [self.next() for _ in range(count)]
        try:
            return [float(v) for v in values]
        except ValueError:
            raise VolumeError(f"{self.path}: expected {count} numbers for {what}, got {' '.join(values)!r}") from None

    def block(self, count: int, dtype: np.dtype | None, binary: bool):
        """(offset of binary data, or the parsed ASCII values) of `count` values, skipping them in the file."""
        if binary:
            self.pending = []
            offset = self.handle.tell()
            nbytes = (count + 7) // 8 if dtype is None else count * dtype.itemsize
            self.handle.seek(offset + nbytes)
            return offset
        values = [self.next() for _ in range(count)]
        return values if dtype is not None else None


def _dtype(name: str, path: Path) -> np.dtype | None:
    key = name.lower()
    if key not in TYPES:
        raise VolumeError(f"{path}: unknown legacy VTK data type {name!r}")
    return None if TYPES[key] is None else np.dtype(">" + TYPES[key])


def _parse(path: Path) -> dict:
    """Header, geometry and every array of a legacy STRUCTURED_POINTS file (binary arrays as file offsets)."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise VolumeError(f"{path}: unreadable: {error.strerror or error}") from None
    with handle:
        first = handle.readline().decode("latin-1")
        if not first.startswith("# vtk DataFile"):
            raise VolumeError(f"{path}: not a legacy VTK file (no '# vtk DataFile' first line)")
        title = handle.readline().decode("latin-1").strip()
        tokens = _Tokens(handle, path)
        mode = tokens.next().upper()
        if mode not in ("ASCII", "BINARY"):
            raise VolumeError(f"{path}: expected ASCII or BINARY on line 3, got {mode!r}")
        binary = mode == "BINARY"
        if tokens.next().upper() != "DATASET":
            raise VolumeError(f"{path}: expected DATASET on line 4")
        kind = tokens.next().upper()
        if kind != "STRUCTURED_POINTS":
            raise VolumeError(f"{path}: legacy VTK dataset {kind}: only STRUCTURED_POINTS is a volume we read")
        found = {"title": title, "binary": binary, "arrays": {}, "others": [], "scalars": []}
        section, count = None, 0
        while (keyword := tokens.peek()) is not None:
            keyword = tokens.next().upper()
            if keyword == "DIMENSIONS":
                found["dims"] = check_dims([tokens.integer("DIMENSIONS") for _ in range(3)], path)
            elif keyword in ("SPACING", "ASPECT_RATIO"):
                found["spacing"] = check_spacing(tokens.numbers(3, keyword), path)
            elif keyword == "ORIGIN":
                found["origin"] = check_origin(tokens.numbers(3, keyword), path)
            elif keyword in ("POINT_DATA", "CELL_DATA"):
                section, count = keyword, tokens.integer(keyword)
            elif keyword == "FIELD":
                tokens.next()
                for _ in range(tokens.integer("FIELD array count")):
                    name = tokens.next()
                    if name.upper() == "METADATA":
                        _skip_metadata(tokens)
                        name = tokens.next()
                    components, tuples, dtype = tokens.integer(name), tokens.integer(name), _dtype(tokens.next(), path)
                    _add(found, section, name, components, tuples, count, dtype, tokens.block(components * tuples,
                                                                                             dtype, binary))
            elif keyword in ("SCALARS", "VECTORS", "NORMALS", "TENSORS", "TENSORS6", "TEXTURE_COORDINATES",
                             "COLOR_SCALARS"):
                fields = tokens.line().split()
                if len(fields) < 1 + (keyword not in ("COLOR_SCALARS",)):
                    raise VolumeError(f"{path}: malformed {keyword} line")
                name = fields[0]
                if keyword == "COLOR_SCALARS":
                    components, dtype = int(fields[1]), np.dtype("u1") if binary else np.dtype("f4")
                elif keyword == "TEXTURE_COORDINATES":
                    components, dtype = int(fields[1]), _dtype(fields[2], path)
                elif keyword == "SCALARS":
                    components, dtype = int(fields[2]) if len(fields) > 2 else 1, _dtype(fields[1], path)
                    if tokens.peek() is not None and tokens.peek().upper() == "LOOKUP_TABLE":
                        tokens.line()
                else:
                    components, dtype = _ATTRIBUTE_COMPONENTS[keyword], _dtype(fields[1], path)
                data = tokens.block(components * count, dtype, binary)
                _add(found, section, name, components, count, count, dtype, data,
                     scalars=keyword == "SCALARS", what=keyword)
            elif keyword == "LOOKUP_TABLE":
                tokens.next()
                size = tokens.integer("LOOKUP_TABLE size")
                tokens.block(4 * size, np.dtype("u1") if binary else np.dtype("f4"), binary)
            elif keyword == "METADATA":
                _skip_metadata(tokens)
            else:
                raise VolumeError(f"{path}: unexpected keyword {keyword!r} in a legacy STRUCTURED_POINTS file")
    if "dims" not in found:
        raise VolumeError(f"{path}: legacy VTK file without DIMENSIONS")
    return found


def _skip_metadata(tokens: _Tokens) -> None:
    """METADATA blocks (file version 5) end at an empty line."""
    tokens.pending = []
    while (line := tokens.handle.readline()) and line.strip():
        pass


def _add(found: dict, section: str | None, name: str, components: int, tuples: int, count: int,
         dtype: np.dtype | None, data, scalars: bool = False, what: str = "FIELD") -> None:
    if section != "POINT_DATA":
        found["others"].append(f"{name} (cell data)")
    elif dtype is None or components != 1 or tuples != count:
        detail = "bit array" if dtype is None else f"{components} components" if components != 1 else \
            f"{tuples} tuples for {count} points"
        found["others"].append(f"{name} (point {what.lower()}, {detail})")
    else:
        found["arrays"][name] = (dtype, data)
        if scalars:
            found["scalars"].append(name)


def read_vtk_info(path: Path, variable: str | None = None) -> VolumeInfo:
    found = _parse(path)
    variables = list(found["arrays"])
    default = found["scalars"][0] if found["scalars"] else (variables[0] if variables else None)
    chosen = choose_variable(path, variables, variable, default)
    dtype = found["arrays"][chosen][0]
    storage = "binary, big endian (memory-mapped)" if found["binary"] else "ASCII (read whole)"
    return VolumeInfo(path=path, name=path.stem, dims=found["dims"], dtype=dtype.newbyteorder("=").name,
                      spacing=found.get("spacing", (1.0, 1.0, 1.0)), variables=variables, total_samples=1,
                      description=found["title"] or f"legacy VTK file {path.name}", format="vtk",
                      origin=found.get("origin", (0.0, 0.0, 0.0)), storage=storage, other_arrays=found["others"],
                      default_variable=default, variable=chosen)


def open_vtk(info: VolumeInfo, variable: str, timestep: int) -> Voxels:
    found = _parse(info.path)
    dtype, data = found["arrays"][variable]
    x, y, z = found["dims"]
    if found["binary"]:
        if data + x * y * z * dtype.itemsize > info.path.stat().st_size:
            raise VolumeError(f"{info.path}: the file ends inside array {variable!r} (truncated?)")
        return Voxels(np.memmap(info.path, dtype=dtype, mode="r", offset=data, shape=(z, y, x)), info.path)
    try:
        values = np.array(data, dtype=np.float64 if dtype.kind == "f" else np.int64)
    except ValueError:
        raise VolumeError(f"{info.path}: array {variable!r} holds values that are not numbers") from None
    return Voxels(values.astype(dtype.newbyteorder("=")).reshape(z, y, x), info.path)
