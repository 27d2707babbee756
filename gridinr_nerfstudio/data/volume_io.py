"""Reading scientific volumes as memory maps, with validation, value range and trilinear sampling.

Formats: the dataset format (``dataset.json`` + ``VAR/NAME-VAR-N.raw|.dat``), a bare Open SciVis file
(``name_XxYxZ_dtype.raw``), ``.npy`` (shape (Z, Y, X)), NRRD (pynrrd) and NIfTI (nibabel; the fourth axis
of a 4-D file is time). Voxels stay on disk: arrays are memmaps (compressed NRRD/NIfTI cannot be mapped
and are read whole), the value range is computed in z-slabs and sampling reads only the voxels it needs,
so volumes bigger than RAM work. Axes and the scene box follow DESIGN.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from gridinr_nerfstudio.data.file_digest import file_digest, stat_key
from gridinr_nerfstudio.safe_write import staged_outputs

if TYPE_CHECKING:
    import torch

SUPPORTED_DTYPES = (
    "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64",
)
SINGLE_FILE_VARIABLE = "value"  # the one variable of a single-file volume (Open SciVis, npy, NRRD, NIfTI)
DEFAULT_CHUNK_VOXELS = 1 << 23  # voxels per z-slab in chunked passes (64 MiB as float64)
NanPolicy = Literal["error", "replace"]

_DATA_SUFFIXES = (".raw", ".dat")
_SCIVIS_NAME = re.compile(r"^(?P<name>.+)_(?P<x>\d+)x(?P<y>\d+)x(?P<z>\d+)_(?P<dtype>[A-Za-z0-9]+)\.(raw|dat)$")
_REQUIRED_KEYS = ("name", "dims", "vars", "total_samples")
_FORMATS_HELP = "a dataset folder or its dataset.json, name_XxYxZ_dtype.raw, .npy, .nrrd/.nhdr or .nii/.nii.gz"

# Value ranges by file version and selection: a chunked pass over a big volume is paid once per process.
_RANGE_CACHE: dict[str, tuple[float, float]] = {}
class VolumeError(ValueError):
    """Bad volume input; the message is one line naming the file and the problem."""


@dataclass
class VolumeInfo:
    """What a volume source holds, read from its metadata only (no voxels)."""

    path: Path  # the dataset folder, or the single file
    name: str
    dims: tuple[int, int, int]  # (X, Y, Z), x fastest in the file
    dtype: str  # numpy name, e.g. "uint8"
    spacing: tuple[float, float, float]
    variables: list[str]
    total_samples: int  # time steps per variable, numbered from 1
    description: str
    format: str = "dataset"  # dataset | scivis | npy | nrrd | nifti | procedural


@dataclass
class Volume:
    """One variable at one time step: voxels (usually a memmap) plus what is needed to normalise and sample them."""

    info: VolumeInfo
    variable: str
    timestep: int  # 1-based
    data: np.ndarray  # (Z, Y, X), memmap or array in the file's dtype (raw values, before value_scale/offset)
    value_min: float  # original units, finite values (and replace_value when some were replaced)
    value_max: float
    source_file: Path | None  # the file holding the voxels; None for the procedural default volume
    nan_policy: NanPolicy = "error"
    replace_value: float = 0.0  # original units; substitutes NaN/Inf when nan_policy == "replace"
    value_scale: float = 1.0  # original value = raw * value_scale + value_offset (NIfTI scl_slope / scl_inter)
    value_offset: float = 0.0

    @property
    def half_size(self) -> np.ndarray:
        """Scene-box half-size h (x, y, z): physical extent over the longest extent (DESIGN.md)."""
        extent = (np.asarray(self.info.dims, dtype=np.float64) - 1) * np.asarray(self.info.spacing, dtype=np.float64)
        longest = extent.max()
        return extent / longest if longest > 0 else np.zeros(3)

    def world_to_voxel(self, points: np.ndarray) -> np.ndarray:
        """World points (N, 3) in the scene box [-h, h] -> continuous voxel indices (N, 3), order (x, y, z)."""
        half = self.half_size
        safe_half = np.where(half > 0, half, 1.0)  # a one-voxel axis maps to index 0
        upper = np.asarray(self.info.dims, dtype=np.float64) - 1
        return (np.asarray(points, dtype=np.float64) + half) / (2 * safe_half) * upper

    def sample_normalized(self, voxel_xyz: np.ndarray) -> np.ndarray:
        """Trilinear values in [0, 1] (float32, (N,)) at continuous voxel indices (N, 3) (x, y, z).

        Indices are clamped to the volume; only the 8 neighbours of each point are read, so a memmap stays on disk.
        """
        coords = np.asarray(voxel_xyz, dtype=np.float64).reshape(-1, 3)
        if not np.isfinite(coords).all():
            raise ValueError("voxel coordinates must be finite")
        upper = np.asarray(self.info.dims, dtype=np.int64) - 1
        coords = np.clip(coords, 0.0, upper)
        low = np.minimum(np.floor(coords).astype(np.int64), np.maximum(upper - 1, 0))
        frac = coords - low
        index = [(low[:, axis], np.minimum(low[:, axis] + 1, upper[axis])) for axis in range(3)]
        weight = [(1.0 - frac[:, axis], frac[:, axis]) for axis in range(3)]
        values = np.zeros(len(coords), dtype=np.float64)
        for cx, cy, cz in itertools.product((0, 1), repeat=3):
            corner = self._original_values(self.data[index[2][cz], index[1][cy], index[0][cx]])
            values += weight[0][cx] * weight[1][cy] * weight[2][cz] * corner
        return np.clip(self._to_unit(values), 0.0, 1.0).astype(np.float32)

    def normalized_array(self, max_chunk_voxels: int = DEFAULT_CHUNK_VOXELS) -> np.ndarray:
        """The whole volume (Z, Y, X) as float32 in [0, 1]; only for volumes that fit in memory."""
        out = np.empty(self.data.shape, dtype=np.float32)
        for z0, z1 in z_slabs(self.data.shape, max_chunk_voxels):
            out[z0:z1] = self.normalized_slab(z0, z1)
        return out

    def normalized_slab(self, z0: int, z1: int) -> np.ndarray:
        """Slices z0..z1-1 (z1 - z0, Y, X) as float32 in [0, 1], read through the memmap."""
        return np.clip(self._to_unit(self._original_values(self.data[z0:z1])), 0.0, 1.0).astype(np.float32)

    def fingerprint(self) -> str:
        """Stable hash of what determines the normalised voxels (file content, selection), for caches on disk.

        Keyed on the bytes (SHA-256, once per process per file version), not path/size/mtime: a file rewritten
        with its mtime restored, or copied elsewhere, gets the key its content deserves.
        """
        origin = (file_digest(self.source_file),) if self.source_file is not None else self._origin()
        return self._key(origin)

    def _origin(self) -> tuple:
        """Cheap identity of the source within one process (the file's stat, ctime included), for in-memory caches."""
        if self.source_file is None:
            return (self.info.format, self.info.name, self.info.description)
        return stat_key(self.source_file)

    def _key(self, origin: tuple) -> str:
        replacement = self.replace_value if self.nan_policy == "replace" else None
        key = (*origin, self.variable, self.timestep, self.info.dims, self.info.dtype, self.info.spacing,
               self.nan_policy, replacement, self.value_scale, self.value_offset)
        return hashlib.sha256(repr(key).encode()).hexdigest()[:16]

    def _original_values(self, raw: np.ndarray) -> np.ndarray:
        """Raw voxels -> float64 in original units, NaN/Inf replaced when nan_policy == "replace"."""
        values = np.asarray(raw, dtype=np.float64) * self.value_scale + self.value_offset
        if self.nan_policy == "replace":
            values = np.where(np.isfinite(values), values, self.replace_value)
        return values

    def _to_unit(self, values: np.ndarray) -> np.ndarray:
        span = self.value_max - self.value_min
        return (values - self.value_min) / span if span > 0 else np.zeros_like(values)

    def __reduce_ex__(self, protocol):
        """Pickle a file-backed volume as a reference, so worker processes re-map the file instead of copying voxels."""
        if self.source_file is None:
            return super().__reduce_ex__(protocol)
        selection = (self.info.path, self.variable, self.timestep, self.nan_policy, self.replace_value)
        return _reopen, (*selection, self.value_min, self.value_max)


def z_slabs(shape: Sequence[int], max_chunk_voxels: int = DEFAULT_CHUNK_VOXELS) -> list[tuple[int, int]]:
    """[z0, z1) ranges of a (Z, Y, X) array holding at most max_chunk_voxels each (at least one z-slice)."""
    per_slice = max(int(shape[1]) * int(shape[2]), 1)
    step = max(max_chunk_voxels // per_slice, 1)
    return [(z0, min(z0 + step, int(shape[0]))) for z0 in range(0, int(shape[0]), step)]


def value_range(data: np.ndarray, max_chunk_voxels: int = DEFAULT_CHUNK_VOXELS) -> tuple[float, float, int]:
    """(min, max) of the finite values and the number of NaN/Inf, read in z-slabs so a memmap never loads whole.

    With no finite value, min is +inf and max -inf.
    """
    low, high, nonfinite = np.inf, -np.inf, 0
    for z0, z1 in z_slabs(data.shape, max_chunk_voxels):
        slab = data[z0:z1]
        if slab.dtype.kind == "f":
            finite = np.isfinite(slab)
            count = slab.size - int(np.count_nonzero(finite))
            if count:
                nonfinite += count
                slab = slab[finite]
        if slab.size:
            low, high = min(low, float(slab.min())), max(high, float(slab.max()))
    return low, high, nonfinite


def read_info(path: str | Path) -> VolumeInfo:
    """Metadata of a volume source; PATH may be a dataset folder, its dataset.json, or a single volume file."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if path.is_dir():
        json_path = path / "dataset.json"
        if not json_path.is_file():
            raise VolumeError(f"{path}: missing dataset.json (expected {_FORMATS_HELP})")
        return _read_dataset_json(json_path)
    lower = path.name.lower()
    if lower.endswith(".json"):
        return _read_dataset_json(path)
    if lower.endswith(".npy"):
        return _read_npy_info(path)
    if lower.endswith((".nrrd", ".nhdr")):
        return _read_nrrd_info(path)
    if lower.endswith((".nii", ".nii.gz")):
        return _read_nifti_info(path)
    if lower.endswith(_DATA_SUFFIXES):
        return _read_scivis_info(path)
    raise VolumeError(f"{path}: unknown volume format (expected {_FORMATS_HELP})")


def open_volume(
    path: str | Path,
    variable: str | None = None,
    timestep: int = 1,
    nan_policy: NanPolicy = "error",
    replace_value: float = 0.0,
) -> Volume:
    """Open one variable at one time step (1-based) of the volume file or dataset folder at PATH.

    The value range comes from a chunked pass (cached per process). NaN/Inf raise VolumeError unless
    nan_policy="replace", which substitutes replace_value whenever values are read (the file is never written).
    """
    return _open(path, variable, timestep, nan_policy, replace_value, known_range=None)


def check_trainable(volume: Volume) -> None:
    """Raise VolumeError (one line) when a volume opens but cannot be fitted or rendered.

    One rule for `gridinr-data info` and `ns-train`: a one-voxel axis makes a flat scene box that orbit views
    see edge-on (nothing to render), and a constant volume normalises to zero everywhere (blank references).
    """
    where = volume.source_file or volume.info.path
    if min(volume.info.dims) < 2:
        x, y, z = volume.info.dims
        raise VolumeError(f"{where}: needs at least 2 voxels along each axis to render, got {x} x {y} x {z} "
                          "(X x Y x Z); stack a slice twice to view a 2-D image as a thin volume")
    if not volume.value_max > volume.value_min:
        raise VolumeError(f"{where}: variable {volume.variable!r} t={volume.timestep} is constant "
                          f"(every voxel is {volume.value_min:.7g}): its renderings are blank, nothing to fit")


def write_dataset(
    out_dir: str | Path,
    name: str,
    variables: dict[str, Sequence[np.ndarray]],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    description: str = "",
    overwrite: bool = False,
) -> Path:
    """Write (Z, Y, X) arrays in the dataset format: {variable: [step 1, step 2, ...]}, one shape and dtype for all.

    Existing files are replaced only with `overwrite`; all files are staged and renamed in, dataset.json last."""
    arrays = [np.asarray(a) for steps in variables.values() for a in steps]
    counts = {len(steps) for steps in variables.values()}
    if not arrays or len(counts) != 1 or len({(a.shape, a.dtype) for a in arrays}) != 1 or arrays[0].ndim != 3:
        raise ValueError("write_dataset needs 3-D arrays of one shape and dtype, the same step count per variable")
    out_dir = Path(out_dir)
    files = [out_dir / var / f"{name}-{var}-{step}.raw" for var, steps in variables.items()
             for step in range(1, len(steps) + 1)]
    z, y, x = arrays[0].shape
    meta = {"name": name, "dims": [x, y, z], "vars": list(variables), "total_samples": counts.pop(),
            "dtype": arrays[0].dtype.name, "spacing": [float(s) for s in spacing], "description": description}
    with staged_outputs([*files, out_dir / "dataset.json"], overwrite) as temporaries:
        for array, temporary in zip(arrays, temporaries):
            array.astype(array.dtype.newbyteorder("<")).tofile(temporary)
        temporaries[-1].write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


# --- opening ---------------------------------------------------------------------------------------------------


def _open(
    path: str | Path,
    variable: str | None,
    timestep: int,
    nan_policy: NanPolicy,
    replace_value: float,
    known_range: tuple[float, float] | None,
) -> Volume:
    if nan_policy not in ("error", "replace"):
        raise VolumeError(f"nan_policy must be 'error' or 'replace', got {nan_policy!r}")
    info = read_info(path)
    variable = select_variable(info, variable, timestep)
    data, source_file, scale, offset = _map_data(info, variable, timestep)
    volume = Volume(info, variable, timestep, data, np.nan, np.nan, source_file, nan_policy, float(replace_value),
                    scale, offset)
    if known_range is None:
        key = volume._key(volume._origin())
        if key not in _RANGE_CACHE:
            _RANGE_CACHE[key] = _checked_range(volume)
        known_range = _RANGE_CACHE[key]
    volume.value_min, volume.value_max = known_range
    return volume


def _reopen(path: Path, variable: str, timestep: int, nan_policy: NanPolicy, replace_value: float,
            value_min: float, value_max: float) -> Volume:
    return _open(path, variable, timestep, nan_policy, replace_value, known_range=(value_min, value_max))


def select_variable(info: VolumeInfo, variable: str | None, timestep: int) -> str:
    if variable is None:
        variable = info.variables[0]
    elif variable not in info.variables:
        raise VolumeError(f"{info.path}: no variable {variable!r} (available: {', '.join(info.variables)})")
    valid_int = isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool)
    if not valid_int or not 1 <= timestep <= info.total_samples:
        raise VolumeError(f"{info.path}: time step {timestep!r} out of range (valid: 1..{info.total_samples})")
    return variable


def _checked_range(volume: Volume) -> tuple[float, float]:
    low, high, nonfinite = value_range(volume.data)
    where = volume.source_file or volume.info.path
    if nonfinite and volume.nan_policy == "error":
        raise VolumeError(
            f"{where}: {nonfinite} NaN/Inf values (open with nan_policy='replace' to substitute replace_value)"
        )
    ends = [low * volume.value_scale + volume.value_offset, high * volume.value_scale + volume.value_offset]
    ends = ends if low <= high else []
    if nonfinite:
        ends.append(volume.replace_value)
    return float(min(ends)), float(max(ends))


def _map_data(info: VolumeInfo, variable: str, timestep: int) -> tuple[np.ndarray, Path, float, float]:
    """(data (Z, Y, X), file holding it, value scale, value offset) for one selection."""
    if info.format == "dataset":
        data_file = _dataset_file(info, variable, timestep)
        return _map_raw(data_file, info.dims, info.dtype, offset=0), data_file, 1.0, 0.0
    if info.format == "scivis":
        return _map_raw(info.path, info.dims, info.dtype, offset=0), info.path, 1.0, 0.0
    if info.format == "npy":
        return _load_npy(info.path), info.path, 1.0, 0.0
    if info.format == "nrrd":
        data, data_file = _map_nrrd(info.path)
        return data, data_file, 1.0, 0.0
    return _map_nifti(info.path, timestep)


def _dataset_file(info: VolumeInfo, variable: str, timestep: int) -> Path:
    stem = f"{info.name}-{variable}-{timestep}"
    candidates = [info.path / variable / f"{stem}{suffix}" for suffix in _DATA_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise VolumeError(f"{candidates[0]}: missing data file (nor {candidates[1].name}) for variable {variable!r} "
                      f"time step {timestep}")


def _map_raw(path: Path, dims: tuple[int, int, int], dtype: str, offset: int) -> np.memmap:
    """Memory-map headerless x-fastest little-endian voxels, checking the file size first."""
    x, y, z = dims
    expected = x * y * z * np.dtype(dtype).itemsize
    actual = path.stat().st_size - offset
    if actual != expected:
        raise VolumeError(f"{path}: wrong file size: {actual} bytes, expected {expected} bytes "
                          f"for dims {x}x{y}x{z} (X x Y x Z) of {dtype}")
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=offset, shape=(z, y, x))


# --- dataset.json and Open SciVis ---------------------------------------------------------------------------------


def _read_dataset_json(json_path: Path) -> VolumeInfo:
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
        dims=_check_dims(meta["dims"], json_path),
        dtype=_check_dtype(meta.get("dtype", "float32"), json_path),
        spacing=_check_spacing(meta.get("spacing", 1.0), json_path),
        variables=list(variables),
        total_samples=total,
        description=str(meta.get("description", "")),
        format="dataset",
    )


def _read_scivis_info(path: Path) -> VolumeInfo:
    match = _SCIVIS_NAME.match(path.name)
    if match is None:
        raise VolumeError(f"{path}: cannot tell dims and dtype of a bare raw file; name it NAME_XxYxZ_DTYPE.raw "
                          f"(e.g. skull_256x256x256_uint8.raw) or pass its dataset folder")
    dims = _check_dims([int(match[axis]) for axis in "xyz"], path)
    return VolumeInfo(path=path, name=match["name"], dims=dims, dtype=_check_dtype(match["dtype"], path),
                      spacing=(1.0, 1.0, 1.0), variables=[SINGLE_FILE_VARIABLE], total_samples=1,
                      description=f"Open SciVis raw file {path.name}", format="scivis")


def _check_dims(value: object, where: Path) -> tuple[int, int, int]:
    valid = (isinstance(value, (list, tuple)) and len(value) == 3
             and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value))
    if not valid:
        raise VolumeError(f"{where}: dims must be three positive integers [X, Y, Z], got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


def _check_dtype(value: object, where: Path) -> str:
    if value not in SUPPORTED_DTYPES:
        raise VolumeError(f"{where}: unknown dtype {value!r} (supported: {', '.join(SUPPORTED_DTYPES)})")
    return str(value)


def _check_spacing(value: object, where: Path) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else value
    valid = (isinstance(values, (list, tuple)) and len(values) == 3
             and all(isinstance(s, (int, float)) and not isinstance(s, bool) and np.isfinite(s) and s > 0
                     for s in values))
    if not valid:
        raise VolumeError(f"{where}: spacing must be a positive number or three positive numbers, got {value!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


# --- npy -----------------------------------------------------------------------------------------------------------


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise VolumeError(f"{path}: unreadable .npy file (truncated or not .npy?): {_one_line(error)}") from None


def _read_npy_info(path: Path) -> VolumeInfo:
    array = _load_npy(path)
    if array.ndim != 3:
        raise VolumeError(f"{path}: expected a 3-D array of shape (Z, Y, X), got shape {array.shape}")
    dims = _check_dims([int(n) for n in array.shape[::-1]], path)
    return VolumeInfo(path=path, name=path.stem, dims=dims, dtype=_check_dtype(array.dtype.name, path),
                      spacing=(1.0, 1.0, 1.0), variables=[SINGLE_FILE_VARIABLE], total_samples=1,
                      description=f"numpy file {path.name}", format="npy")


# --- NRRD ----------------------------------------------------------------------------------------------------------


def _read_nrrd_header(path: Path) -> tuple[dict, int]:
    """pynrrd's parsed header and the header's length in bytes (where attached data starts)."""
    import nrrd

    try:
        with open(path, "rb") as handle:
            header = nrrd.read_header(handle)
            return header, handle.tell()
    except StopIteration:
        raise VolumeError(f"{path}: malformed NRRD header: empty file") from None
    except (nrrd.NRRDError, ValueError, KeyError) as error:
        raise VolumeError(f"{path}: malformed NRRD header: {_one_line(error)}") from None


def _nrrd_dtype(header: dict, path: Path) -> np.dtype:
    import nrrd

    try:
        dtype = nrrd.reader._determine_datatype(header)  # pynrrd's own type and endianness mapping
    except (KeyError, nrrd.NRRDError) as error:
        raise VolumeError(f"{path}: unknown dtype in NRRD header: {_one_line(error)}") from None
    _check_dtype(dtype.name, path)
    return dtype


def _read_nrrd_info(path: Path) -> VolumeInfo:
    header, _ = _read_nrrd_header(path)
    sizes = [int(n) for n in header.get("sizes", [])]
    if header.get("dimension") != 3 or len(sizes) != 3:
        raise VolumeError(f"{path}: expected a 3-D NRRD volume, got dimension {header.get('dimension')} "
                          f"sizes {sizes}")
    dtype = _nrrd_dtype(header, path)
    if "spacings" in header:
        spacing = [float(s) for s in header["spacings"]]
    elif "space directions" in header:
        spacing = [float(np.linalg.norm(row)) for row in np.asarray(header["space directions"], dtype=np.float64)]
    else:
        spacing = [1.0, 1.0, 1.0]
    spacing = [s if np.isfinite(s) else 1.0 for s in spacing]  # non-spatial axes are NaN in pynrrd
    return VolumeInfo(path=path, name=path.name.rsplit(".", 1)[0], dims=_check_dims(sizes, path), dtype=dtype.name,
                      spacing=_check_spacing(spacing, path), variables=[SINGLE_FILE_VARIABLE], total_samples=1,
                      description=str(header.get("content", f"NRRD file {path.name}")), format="nrrd")


def _map_nrrd(path: Path) -> tuple[np.ndarray, Path]:
    """Raw-encoded NRRD data as a memmap (attached or detached); compressed encodings are read whole by pynrrd."""
    import nrrd

    header, header_bytes = _read_nrrd_header(path)
    dtype = _nrrd_dtype(header, path)
    x, y, z = (int(n) for n in header["sizes"])
    if header.get("encoding") != "raw":
        try:
            with open(path, "rb") as handle:
                nrrd.read_header(handle)
                return nrrd.read_data(header, handle, str(path), index_order="C"), path
        except (nrrd.NRRDError, ValueError, OSError, EOFError) as error:
            raise VolumeError(f"{path}: unreadable NRRD data: {_one_line(error)}") from None
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
    return np.memmap(data_file, dtype=dtype, mode="r", offset=offset, shape=(z, y, x)), data_file


# --- NIfTI ---------------------------------------------------------------------------------------------------------


def _load_nifti(path: Path):
    import nibabel

    try:
        return nibabel.load(str(path))
    except (nibabel.filebasedimages.ImageFileError, ValueError, OSError, EOFError) as error:
        raise VolumeError(f"{path}: unreadable NIfTI file: {_one_line(error)}") from None


def _read_nifti_info(path: Path) -> VolumeInfo:
    image = _load_nifti(path)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) not in (3, 4):
        raise VolumeError(f"{path}: expected a 3-D NIfTI volume or 4-D with time last, got shape {shape}")
    zooms = [float(s) for s in image.header.get_zooms()[:3]]
    description = image.header["descrip"].item().decode("latin-1").strip() if "descrip" in image.header else ""
    name = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    return VolumeInfo(path=path, name=name, dims=_check_dims(list(shape[:3]), path),
                      dtype=_check_dtype(image.get_data_dtype().name, path), spacing=_check_spacing(zooms, path),
                      variables=[SINGLE_FILE_VARIABLE], total_samples=shape[3] if len(shape) == 4 else 1,
                      description=description or f"NIfTI file {path.name}", format="nifti")


def _map_nifti(path: Path, timestep: int) -> tuple[np.ndarray, Path, float, float]:
    """Unscaled voxels through nibabel's proxy (a memmap when uncompressed), (X, Y, Z[, T]) -> (Z, Y, X)."""
    image = _load_nifti(path)
    try:
        raw = image.dataobj.get_unscaled()
    except (ValueError, OSError, EOFError) as error:
        raise VolumeError(f"{path}: unreadable NIfTI data (truncated?): {_one_line(error)}") from None
    if raw.ndim == 4:
        raw = raw[..., timestep - 1]
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    return raw.T, path, slope, inter


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- world geometry (DESIGN.md, "Coordinates") --------------------------------------------------------------------


def scene_aabb(volume: Volume) -> torch.Tensor:
    """Scene box (2, 3) of the volume: [-h, h] per DESIGN.md."""
    import torch  # here: reading volumes needs no torch (and stays light under tight memory limits)

    half = torch.as_tensor(np.asarray(volume.half_size, dtype=np.float32))
    return torch.stack([-half, half])


def voxel_size_world(volume: Volume) -> float:
    """World size of one voxel along the longest axis (default opacity unit distance)."""
    return float(2.0 / max(max(volume.info.dims) - 1, 1))
