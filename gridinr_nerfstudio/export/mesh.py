"""An isosurface of the INR as a triangle mesh (.ply or .obj) that overlays the volume in ParaView.

The field is decoded on the output grid (see volume.py) and scikit-image's marching cubes extracts the surface
at the isovalue, given in data units (or normalised units) and checked against the data range. Vertices are in
physical units: voxel index x spacing, origin at the first voxel centre (the frame of the .nrrd/.vti exports).
Faces are wound so that their normals point from high to low values (out of a blob of high values). Optional
vertex normals come from the gradient of the field itself (autograd through the hash grid and MLP) rather than
from finite differences of the grid: `-grad v / |grad v|`, the renderer's convention (DESIGN.md).
trimesh writes the file (through safe_write.py). The decoded grid is held in memory (float32) while marching cubes
runs: a grid that would not fit in the memory available is refused in one line before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from gridinr_nerfstudio.export.source import ExportError, ExportSource
from gridinr_nerfstudio.export.volume import (
    DECODE_BYTES_PER_VOXEL,
    DEFAULT_SLAB_VOXELS,
    OutputGrid,
    Units,
    available_memory,
    check_output,
    decode_grid,
)
from gridinr_nerfstudio.safe_write import atomic_output, check_target, format_bytes

MESH_SUFFIXES = (".ply", ".obj")


@dataclass
class MeshExport:
    path: Path
    vertices: int
    faces: int
    isovalue: float  # as given
    level: float  # normalised isovalue used by marching cubes
    bounds: np.ndarray  # (2, 3) physical


def normalized_isovalue(source: ExportSource, isovalue: float, units: Units) -> float:
    """The isovalue in normalised units, or one line when it lies outside the data range."""
    meta = source.meta
    if units == "normalized":
        if not 0.0 <= isovalue <= 1.0:
            raise ExportError(f"isovalue {isovalue:g} is outside the normalised range [0, 1]")
        return float(isovalue)
    if not meta.value_min <= isovalue <= meta.value_max:
        raise ExportError(f"isovalue {isovalue:g} is outside the data range [{meta.value_min:.7g}, {meta.value_max:.7g}] "
                          f"of {meta.name} {meta.variable}")
    return meta.to_normalized(isovalue)


def field_gradient(field, points: torch.Tensor, extent: np.ndarray) -> torch.Tensor:
    """d value / d physical position (N, 3) of the field at physical points (N, 3)."""
    scale = torch.as_tensor(np.where(extent > 0, extent, 1.0), dtype=torch.float32)
    gradients = []
    for chunk in torch.split(points, 1 << 16):
        unit = (chunk / scale).detach().requires_grad_(True)
        with torch.enable_grad():
            value = field.forward_unit(unit.to(field.aabb.device))
            (grad,) = torch.autograd.grad(value.sum(), unit)
        gradients.append(grad.cpu() / scale)
    return torch.cat(gradients)


def extract_isosurface(source: ExportSource, grid: OutputGrid, level: float, normals: bool = False):
    """(vertices (V, 3) physical xyz, faces (F, 3), vertex normals (V, 3) or None) at normalised `level`."""
    from skimage.measure import marching_cubes

    x, y, z = grid.dims
    values = np.empty((z, y, x), dtype=np.float32)
    for z0, z1, slab in decode_grid(source.field, grid):
        values[z0:z1] = slab
    low, high = float(values.min()), float(values.max())
    if not low < level < high:
        meta = source.meta
        raise ExportError(f"the field never crosses the isovalue (decoded range "
                          f"[{meta.to_data_units(low):.7g}, {meta.to_data_units(high):.7g}] in data units, "
                          f"[{low:.4g}, {high:.4g}] normalised)")
    sx, sy, sz = grid.spacing
    vertices_zyx, faces, mc_normals, _ = marching_cubes(values, level=level, spacing=(sz, sy, sx))
    vertices = np.ascontiguousarray(vertices_zyx[:, ::-1], dtype=np.float64)
    # Reversing the axis order mirrors the mesh: reverse each face's winding to keep its orientation.
    faces = np.ascontiguousarray(faces[:, ::-1])
    vertex_normals: Optional[np.ndarray] = None
    if normals:
        gradient = field_gradient(source.field, torch.as_tensor(vertices, dtype=torch.float32), source.meta.extent)
        gradient = gradient.double().numpy()
        length = np.linalg.norm(gradient, axis=1, keepdims=True)
        fallback = mc_normals[:, ::-1]  # marching cubes' own normals where the field is flat
        vertex_normals = np.where(length > 1e-12, -gradient / np.maximum(length, 1e-12), fallback)
    return vertices, faces, vertex_normals


def orient_faces(vertices: np.ndarray, faces: np.ndarray, values_at) -> np.ndarray:
    """Faces wound so that their normals point towards lower values (checked on the field, majority vote)."""
    corners = vertices[faces]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    length = np.linalg.norm(face_normals, axis=1, keepdims=True)
    centres = corners.mean(axis=1)
    step = 0.25 * np.median(np.linalg.norm(corners[:, 1] - corners[:, 0], axis=1))
    unit = face_normals / np.maximum(length, 1e-30)
    ahead, behind = values_at(centres + step * unit), values_at(centres - step * unit)
    return faces if np.mean(ahead <= behind) >= 0.5 else np.ascontiguousarray(faces[:, ::-1])


MESH_BYTES_PER_VOXEL = 16
"""Peak memory per voxel of the grid while marching cubes runs: the decoded float32 grid, scikit-image's working
arrays and the triangles (measured: `check_mesh_memory`'s docstring)."""


def check_mesh_memory(output: Path, grid: OutputGrid, slab_voxels: int = DEFAULT_SLAB_VOXELS) -> None:
    """One line, before decoding, when the grid cannot be held in memory for marching cubes.

    Measured peak resident memory (VmHWM) of `extract_isosurface` on a tiny run of the built-in volume: 7.1 bytes
    per voxel at 384^3 (1.2 M vertices), 10.1 at 256^3, 23 at 128^3 (there the decoded slab is the whole grid), so
    the limit asks for 16 bytes per voxel plus one decoded slab. A noisy field's surface has more triangles, hence
    "about" in the message.
    """
    x, y, z = grid.dims
    needed = grid.voxels * MESH_BYTES_PER_VOXEL + max(1, slab_voxels // (x * y)) * x * y * DECODE_BYTES_PER_VOXEL
    available = available_memory()
    if needed > available:
        raise ExportError(f"{output}: marching cubes on a {x} x {y} x {z} grid needs about {format_bytes(needed)} of "
                          f"memory ({MESH_BYTES_PER_VOXEL} bytes per voxel, the grid is held whole), "
                          f"{format_bytes(available)} available: choose a smaller --resolution or --dims")


def export_mesh(source: ExportSource, output: Path, grid: OutputGrid, isovalue: float, units: Units = "data",
                normals: bool = False, overwrite: bool = False) -> MeshExport:
    """Isosurface of `source.field` at `isovalue` written to `output` (.ply binary or .obj) through safe_write.py."""
    import trimesh

    output = Path(output)
    check_output(output, MESH_SUFFIXES, overwrite)
    check_target(output, overwrite, source.inputs)
    level = normalized_isovalue(source, isovalue, units)
    check_mesh_memory(output, grid)
    vertices, faces, vertex_normals = extract_isosurface(source, grid, level, normals)
    extent = source.meta.extent
    scale = np.where(extent > 0, extent, 1.0)

    @torch.no_grad()
    def values_at(points: np.ndarray) -> np.ndarray:
        unit = torch.as_tensor(points / scale, dtype=torch.float32).to(source.field.aabb.device)
        return source.field.forward_unit(unit).cpu().numpy()

    faces = orient_faces(vertices, faces, values_at)
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_normals=vertex_normals, process=False)
    try:
        with atomic_output(output, overwrite, source.inputs) as temporary:
            if output.suffix.lower() == ".ply":
                mesh.export(temporary, file_type="ply", encoding="binary", vertex_normal=normals)
            else:
                mesh.export(temporary, file_type="obj", include_normals=normals)
    except OSError as error:
        raise ExportError(f"{output}: cannot write ({error.strerror or error})") from None
    return MeshExport(output, len(vertices), len(faces), float(isovalue), level,
                      np.stack([vertices.min(axis=0), vertices.max(axis=0)]))
