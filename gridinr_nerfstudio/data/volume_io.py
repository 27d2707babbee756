"""Volumes as `Volume`: one variable at one time step, voxels left in their file, with validation, value range
and trilinear sampling.

Containers (one reader module each in `data/readers/`): our dataset format (``dataset.json`` +
``VAR/NAME-VAR-N.raw|.dat``), a bare Open SciVis file (``name_XxYxZ_dtype.raw``), ``.npy`` (shape (Z, Y, X)),
NRRD (pynrrd), NIfTI (nibabel; the fourth axis of a 4-D file is time), VTK ImageData (``.vti``) and legacy
STRUCTURED_POINTS (``.vtk``), HDF5 and NetCDF-4 (``.h5``/``.hdf5``/``.nc``; h5py; a leading fourth axis is time)
and Zarr v2/v3 directory stores. Voxels stay on disk: memmaps where the bytes lie uncompressed in the file, else a
`ChunkedArray` decoding chunk by chunk (read whole only where the container cannot be read in parts: inline
ascii VTK, compressed NRRD/NIfTI). The value range is computed in z-slabs and sampling reads only the voxels it
needs, so volumes bigger than RAM work. Axes and the scene box follow DESIGN.md.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from gridinr_nerfstudio.data.file_digest import file_digest, stat_key
from gridinr_nerfstudio.data.readers import hdf5, nifti, npy, nrrd, raw_dataset, vti, vtk_legacy, zarr_store
from gridinr_nerfstudio.data.readers.base import (  # noqa: F401  (re-exported: the one interface)
    SINGLE_FILE_VARIABLE,
    SUPPORTED_DTYPES,
    VolumeError,
    VolumeInfo,
    Voxels,
    choose_variable,
)
from gridinr_nerfstudio.data.readers.raw_dataset import write_dataset  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import torch

DEFAULT_CHUNK_VOXELS = 1 << 23  # voxels per z-slab in chunked passes (64 MiB as float64)
SAMPLE_BLOCK_POINTS = 1 << 16  # points per gather of `sample_normalized` (8 neighbours each, one read)
NanPolicy = Literal["error", "replace"]

_FORMATS_HELP = ("a dataset folder or its dataset.json, name_XxYxZ_dtype.raw, .npy, .nrrd/.nhdr, .nii/.nii.gz, "
                 ".vti, .vtk, .h5/.hdf5/.nc or a Zarr store")
# (suffixes, read_info(path, variable), open(info, variable, timestep)) per single-file container
_READERS = (
    ((".npy",), npy.read_npy_info, npy.open_npy),
    ((".nrrd", ".nhdr"), nrrd.read_nrrd_info, nrrd.open_nrrd),
    ((".nii", ".nii.gz"), nifti.read_nifti_info, nifti.open_nifti),
    ((".vti",), vti.read_vti_info, vti.open_vti),
    ((".vtk",), vtk_legacy.read_vtk_info, vtk_legacy.open_vtk),
    (hdf5.SUFFIXES, hdf5.read_hdf5_info, hdf5.open_hdf5),
    (raw_dataset.DATA_SUFFIXES, raw_dataset.read_scivis_info, raw_dataset.open_scivis),
)
_OPENERS = {
    "dataset": raw_dataset.open_dataset, "scivis": raw_dataset.open_scivis, "npy": npy.open_npy,
    "nrrd": nrrd.open_nrrd, "nifti": nifti.open_nifti, "vti": vti.open_vti, "vtk": vtk_legacy.open_vtk,
    "hdf5": hdf5.open_hdf5, "netcdf": hdf5.open_hdf5, "zarr": zarr_store.open_zarr,
}

# Value ranges by file version and selection: a chunked pass over a big volume is paid once per process.
_RANGE_CACHE: dict[str, tuple[float, float]] = {}


@dataclass
class Volume:
    """One variable at one time step: voxels (usually a memmap) plus what is needed to normalise and sample them."""

    info: VolumeInfo
    variable: str
    timestep: int  # 1-based
    data: np.ndarray  # (Z, Y, X) memmap, array or ChunkedArray in the file's dtype (before value_scale/offset)
    value_min: float  # original units, finite values (and replace_value when some were replaced)
    value_max: float
    source_file: Path | None  # the file holding the voxels; None for the procedural default volume
    nan_policy: NanPolicy = "error"
    replace_value: float = 0.0  # original units; substitutes NaN/Inf when nan_policy == "replace"
    value_scale: float = 1.0  # original value = raw * value_scale + value_offset (NIfTI scl_*, CF scale_factor)
    value_offset: float = 0.0
    fill_value: float | None = None  # raw value marking a missing voxel (CF _FillValue): read as NaN

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

        Indices are clamped to the volume; only the 8 neighbours of each point are read, in one gather (a chunked
        container decodes each touched chunk once), so the voxels stay on disk.
        """
        coords = np.asarray(voxel_xyz, dtype=np.float64).reshape(-1, 3)
        if not np.isfinite(coords).all():
            raise ValueError("voxel coordinates must be finite")
        if len(coords) > SAMPLE_BLOCK_POINTS:  # bounded temporaries for any number of points
            return np.concatenate([self.sample_normalized(coords[i : i + SAMPLE_BLOCK_POINTS])
                                   for i in range(0, len(coords), SAMPLE_BLOCK_POINTS)])
        upper = np.asarray(self.info.dims, dtype=np.int64) - 1
        coords = np.clip(coords, 0.0, upper)
        low = np.minimum(np.floor(coords).astype(np.int64), np.maximum(upper - 1, 0))
        frac = coords - low
        index = [(low[:, axis], np.minimum(low[:, axis] + 1, upper[axis])) for axis in range(3)]
        weight = [(1.0 - frac[:, axis], frac[:, axis]) for axis in range(3)]
        corners = list(itertools.product((0, 1), repeat=3))
        gathered = self.data[tuple(np.concatenate([index[axis][c[axis]] for c in corners]) for axis in (2, 1, 0))]
        gathered = self._original_values(gathered).reshape(len(corners), len(coords))
        values = np.zeros(len(coords), dtype=np.float64)
        for (cx, cy, cz), corner in zip(corners, gathered):
            values += weight[0][cx] * weight[1][cy] * weight[2][cz] * corner
        return np.clip(self._to_unit(values), 0.0, 1.0).astype(np.float32)

    def normalized_array(self, max_chunk_voxels: int = DEFAULT_CHUNK_VOXELS) -> np.ndarray:
        """The whole volume (Z, Y, X) as float32 in [0, 1]; only for volumes that fit in memory."""
        out = np.empty(self.data.shape, dtype=np.float32)
        for z0, z1 in z_slabs(self.data.shape, max_chunk_voxels):
            out[z0:z1] = self.normalized_slab(z0, z1)
        return out

    def normalized_slab(self, z0: int, z1: int) -> np.ndarray:
        """Slices z0..z1-1 (z1 - z0, Y, X) as float32 in [0, 1], read through the memmap or chunks."""
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
               self.nan_policy, replacement, self.value_scale, self.value_offset, self.fill_value)
        return hashlib.sha256(repr(key).encode()).hexdigest()[:16]

    def _original_values(self, raw: np.ndarray) -> np.ndarray:
        """Raw voxels -> float64 in original units (fill values as NaN); NaN/Inf replaced if nan_policy == "replace"."""
        raw = np.asarray(raw)
        values = raw.astype(np.float64) * self.value_scale + self.value_offset
        if self.fill_value is not None:
            values[raw == self.fill_value] = np.nan
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


def value_range(data: np.ndarray, max_chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
                fill_value: float | None = None) -> tuple[float, float, int]:
    """(min, max) of the finite values and the number of NaN/Inf (and fill values), read in z-slabs so a memmap or
    chunked array never loads whole.

    With no finite value, min is +inf and max -inf.
    """
    low, high, nonfinite = np.inf, -np.inf, 0
    for z0, z1 in z_slabs(data.shape, max_chunk_voxels):
        slab = np.asarray(data[z0:z1])
        if slab.dtype.kind == "f" or fill_value is not None:
            finite = np.isfinite(slab) if slab.dtype.kind == "f" else np.ones(slab.shape, dtype=bool)
            if fill_value is not None:
                finite &= slab != fill_value
            count = slab.size - int(np.count_nonzero(finite))
            if count:
                nonfinite += count
                slab = slab[finite]
        if slab.size:
            low, high = min(low, float(slab.min())), max(high, float(slab.max()))
    return low, high, nonfinite


def read_info(path: str | Path, variable: str | None = None) -> VolumeInfo:
    """Metadata of a volume source; PATH may be a dataset folder, its dataset.json, a Zarr store or a single volume
    file. Containers whose arrays differ (HDF5, NetCDF, Zarr, VTK) describe `variable` (default: their default)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if path.is_dir():
        if zarr_store.is_zarr_store(path):
            return zarr_store.read_zarr_info(path, variable)
        json_path = path / "dataset.json"
        if not json_path.is_file():
            raise VolumeError(f"{path}: missing dataset.json (expected {_FORMATS_HELP})")
        return raw_dataset.read_dataset_json(json_path)
    lower = path.name.lower()
    if lower.endswith(".json"):
        return raw_dataset.read_dataset_json(path)
    for suffixes, read, _ in _READERS:
        if lower.endswith(suffixes):
            return read(path, variable)
    raise VolumeError(f"{path}: unknown volume format (expected {_FORMATS_HELP})")


def open_voxels(path: str | Path, variable: str | None = None, timestep: int = 1) -> tuple[VolumeInfo, str, Voxels]:
    """(info, variable, voxels) of one selection, without the value-range pass (`gridinr-data convert`)."""
    info = read_info(path, variable)
    variable = select_variable(info, variable, timestep)
    return info, variable, _OPENERS[info.format](info, variable, timestep)


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
    info, variable, voxels = open_voxels(path, variable, timestep)
    volume = Volume(info, variable, timestep, voxels.data, np.nan, np.nan, voxels.source_file, nan_policy,
                    float(replace_value), voxels.value_scale, voxels.value_offset, voxels.fill_value)
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
    variable = choose_variable(info.path, info.variables, variable, info.default_variable)
    valid_int = isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool)
    if not valid_int or not 1 <= timestep <= info.total_samples:
        raise VolumeError(f"{info.path}: time step {timestep!r} out of range (valid: 1..{info.total_samples})")
    return variable


def _checked_range(volume: Volume) -> tuple[float, float]:
    low, high, nonfinite = value_range(volume.data, fill_value=volume.fill_value)
    where = volume.source_file or volume.info.path
    if nonfinite and volume.nan_policy == "error":
        raise VolumeError(
            f"{where}: {nonfinite} NaN/Inf{' or fill' if volume.fill_value is not None else ''} values "
            "(open with nan_policy='replace' to substitute replace_value)"
        )
    ends = [low * volume.value_scale + volume.value_offset, high * volume.value_scale + volume.value_offset]
    ends = ends if low <= high else []
    if nonfinite:
        ends.append(volume.replace_value)
    return float(min(ends)), float(max(ends))


# --- world geometry (DESIGN.md, "Coordinates") --------------------------------------------------------------------


def scene_aabb(volume: Volume) -> torch.Tensor:
    """Scene box (2, 3) of the volume: [-h, h] per DESIGN.md."""
    import torch  # here: reading volumes needs no torch (and stays light under tight memory limits)

    half = torch.as_tensor(np.asarray(volume.half_size, dtype=np.float32))
    return torch.stack([-half, half])


def voxel_size_world(volume: Volume) -> float:
    """World size of one voxel along the longest axis (default opacity unit distance)."""
    return float(2.0 / max(max(volume.info.dims) - 1, 1))
