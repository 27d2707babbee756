"""NIfTI volumes (nibabel): the fourth axis of a 4-D file is time; scl_slope/scl_inter applied on read."""

from __future__ import annotations

from pathlib import Path

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


def _load(path: Path):
    import nibabel

    try:
        return nibabel.load(str(path))
    except (nibabel.filebasedimages.ImageFileError, ValueError, OSError, EOFError) as error:
        raise VolumeError(f"{path}: unreadable NIfTI file: {one_line(error)}") from None


def read_nifti_info(path: Path, variable: str | None = None) -> VolumeInfo:
    image = _load(path)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) not in (3, 4):
        raise VolumeError(f"{path}: expected a 3-D NIfTI volume or 4-D with time last, got shape {shape}")
    zooms = [float(s) for s in image.header.get_zooms()[:3]]
    description = image.header["descrip"].item().decode("latin-1").strip() if "descrip" in image.header else ""
    name = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    storage = "gzip (read whole)" if path.name.lower().endswith(".gz") else "raw (memory-mapped)"
    return VolumeInfo(path=path, name=name, dims=check_dims(list(shape[:3]), path),
                      dtype=check_dtype(image.get_data_dtype().name, path), spacing=check_spacing(zooms, path),
                      variables=[SINGLE_FILE_VARIABLE], total_samples=shape[3] if len(shape) == 4 else 1,
                      description=description or f"NIfTI file {path.name}", format="nifti", storage=storage,
                      default_variable=SINGLE_FILE_VARIABLE)


def open_nifti(info: VolumeInfo, variable: str, timestep: int) -> Voxels:
    """Unscaled voxels through nibabel's proxy (a memmap when uncompressed), (X, Y, Z[, T]) -> (Z, Y, X)."""
    path = info.path
    image = _load(path)
    try:
        raw = image.dataobj.get_unscaled()
    except (ValueError, OSError, EOFError) as error:
        raise VolumeError(f"{path}: unreadable NIfTI data (truncated?): {one_line(error)}") from None
    if raw.ndim == 4:
        raw = raw[..., timestep - 1]
    return Voxels(raw.T, path, float(image.dataobj.slope), float(image.dataobj.inter))
