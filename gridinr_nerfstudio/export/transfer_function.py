"""A run's transfer function as a ParaView preset (JSON), with its range in data units, so the look designed
here (a colormap and opacity ramp, a shipped preset, or the transfer MLP a gridinr-edit run learned) can be
applied to the raw data in ParaView.

- gridinr-fit run: the run's transfer function (render settings) node for node: colour nodes and opacity
  points, RGB colour space (presets in other colour spaces were already resampled into dense RGB nodes on import).
- gridinr-edit run: the edited transfer function (the warm-start MLP plus every target's residual) at its own
  1024-entry table, which is exactly what the renderer interpolates, or sampled at `samples` evenly spaced values;
  its extinction sigma becomes a ParaView opacity `a = 1 - exp(-sigma * unit_distance)` (DESIGN.md, Rendering).
  Each target's part shows in the preset: ParaView's colour legend labels its range (`Annotations`: the value at
  the middle of the part, "n: label [low, high]"), and `gridinr_targets` lists each target with its range in data
  units, its kind and label (ParaView ignores keys it does not know).

ParaView's opacity is per "Scalar Opacity Unit Distance" (a property of the volume display, not of the preset): set
it to the printed physical unit distance (one voxel of the longest axis by default) for the same look. Our import
(transfer/paraview.py) reads the preset back to the same function (its data range is rescaled to [0, 1]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gridinr_nerfstudio.export.source import ExportError, ExportSource
from gridinr_nerfstudio.export.volume import Units, check_output
from gridinr_nerfstudio.safe_write import write_text


@dataclass
class PresetExport:
    path: Path
    preset: dict[str, Any]
    unit_distance_world: float
    unit_distance_physical: float
    nodes: int
    kind: str  # "transfer function" or "transfer MLP"


def unit_distances(source: ExportSource) -> tuple[float, float]:
    """(world, physical) opacity unit distance of the run's rendering."""
    from gridinr_nerfstudio.data.volume_io import voxel_size_world

    model = source.model
    world = model.render_settings.unit_distance or voxel_size_world(model.volume)
    return float(world), float(world * source.meta.extent.max() / 2.0)


def opacity_from_sigma(sigma: np.ndarray, unit_distance: float) -> np.ndarray:
    """ParaView opacity over one unit distance; the inverse of transfer_function.sigma_from_opacity."""
    from gridinr_nerfstudio.transfer.transfer_function import MAX_OPACITY

    return np.minimum(-np.expm1(-np.asarray(sigma, dtype=np.float64) * unit_distance), MAX_OPACITY)


def run_transfer_nodes(source: ExportSource, samples: Optional[int] = None):
    """(colour nodes, colours (K, 3), opacity points (P, 2)), all in normalised values, and the kind."""
    from gridinr_nerfstudio.transfer.transfer_mlp import interpolate_table

    model = source.model
    world, _ = unit_distances(source)
    mlp = getattr(model, "transfer_mlp", None)
    if mlp is None:
        tf = model.transfer_function()
        return tf.color_nodes, tf.colors, tf.opacity_points, "transfer function"
    parts = getattr(model, "part_transfer", None)
    edited = parts is not None and bool(parts.active.any())
    with torch.no_grad():
        table = model.transfer_table() if edited else mlp.table()
        if samples is None:
            nodes = np.linspace(0.0, 1.0, table.shape[0])
            rgb, sigma = table[:, :3].double().cpu().numpy(), table[:, 3].double().cpu().numpy()
        else:
            if samples < 2:
                raise ExportError(f"--samples must be at least 2, got {samples}")
            nodes = np.linspace(0.0, 1.0, samples)
            values = torch.as_tensor(nodes, dtype=torch.float32, device=table.device)
            # Edited: the table as the renderer reads it; the MLP alone: the MLP itself between its nodes.
            rgb_t, sigma_t = interpolate_table(table, values) if edited else mlp.evaluate(values)
            rgb, sigma = rgb_t.double().cpu().numpy(), sigma_t.double().cpu().numpy()
    opacity = opacity_from_sigma(sigma, world)
    kind = "edited transfer function (transfer MLP + targets)" if edited else "transfer MLP"
    return nodes, np.clip(rgb, 0.0, 1.0), np.stack([nodes, opacity], axis=1), kind


def target_annotations(source: ExportSource, to_units) -> tuple[list[str], list[dict[str, Any]]]:
    """ParaView `Annotations` (value, label, ...) at the middle of each target's part, and the targets listed
    with their ranges in the preset's units; empty for runs without targets."""
    model = source.model
    parts = getattr(model, "part_transfer", None)
    if parts is None:
        return [], []
    annotations: list[str] = []
    listed: list[dict[str, Any]] = []
    targets = getattr(model, "targets", [])
    for slot in parts.active_slots():
        low, high, softness = (float(v) for v in parts.ranges[slot].tolist())
        data_low, data_high = (float(v) for v in to_units(np.array([low, high])))
        label = parts.labels[slot] or f"part {slot + 1}"
        target = targets[slot] if slot < len(targets) else None
        annotations += [f"{float(to_units(np.array([(low + high) / 2.0]))[0]):.7g}",
                        f"{slot + 1}: {label} [{data_low:.4g}, {data_high:.4g}]"]
        listed.append({"target": slot + 1, "label": label, "range": [data_low, data_high],
                       "kind": getattr(target, "kind", "unknown"), "edits_opacity": bool(parts.opacity[slot])})
    return annotations, listed


def build_preset(source: ExportSource, name: str, units: Units = "data", samples: Optional[int] = None):
    """The ParaView preset object and what it was built from."""
    meta = source.meta
    if source.model is None:
        raise ExportError(f"{source.origin}: a transfer function needs a run folder (--load-config), not a model file")
    if units == "data" and not meta.value_max > meta.value_min:
        raise ExportError(f"{source.origin}: the data range [{meta.value_min:g}, {meta.value_max:g}] is empty")
    color_nodes, colors, opacity_points, kind = run_transfer_nodes(source, samples)
    to_units = meta.to_data_units if units == "data" else (lambda v: np.asarray(v, dtype=np.float64))
    rgb_points = np.concatenate([to_units(color_nodes)[:, None], colors], axis=1)
    points = np.stack([to_units(opacity_points[:, 0]), opacity_points[:, 1],
                       np.full(len(opacity_points), 0.5), np.zeros(len(opacity_points))], axis=1)
    world, physical = unit_distances(source)
    preset = {
        "Name": name,
        "Creator": (f"gridinr-export from {source.origin} ({kind}); data range [{meta.value_min:.7g}, "
                    f"{meta.value_max:.7g}]; opacity per unit distance {physical:.6g} (physical units): set the "
                    f"volume's Scalar Opacity Unit Distance to it"),
        "ColorSpace": "RGB",
        "RGBPoints": rgb_points.reshape(-1).tolist(),
        "Points": points.reshape(-1).tolist(),
    }
    annotations, targets = target_annotations(source, to_units)
    if annotations:
        preset["Annotations"] = annotations
        preset["gridinr_targets"] = targets
    return preset, kind, world, physical, len(color_nodes)


def preset_json(preset: dict[str, Any]) -> str:
    """A one-preset ParaView file, with one node per line in "RGBPoints" (x r g b) and "Points" (x a mid sharp)."""
    lines = ["[", " {"]
    items = list(preset.items())
    for index, (key, value) in enumerate(items):
        comma = "," if index < len(items) - 1 else ""
        if key == "gridinr_targets":
            lines.append(f"  {json.dumps(key)}: [")
            lines.extend(f"   {json.dumps(item)}{',' if i < len(value) - 1 else ''}" for i, item in enumerate(value))
            lines.append(f"  ]{comma}")
        elif key in ("RGBPoints", "Points"):
            rows = [", ".join(json.dumps(v) for v in value[i : i + 4]) for i in range(0, len(value), 4)]
            lines.append(f"  {json.dumps(key)}: [")
            lines.extend(f"   {row}{',' if i < len(rows) - 1 else ''}" for i, row in enumerate(rows))
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    return "\n".join(lines + [" }", "]"]) + "\n"


def export_preset(source: ExportSource, output: Path, name: Optional[str] = None, units: Units = "data",
                  samples: Optional[int] = None, overwrite: bool = False) -> PresetExport:
    """Write the run's transfer function to `output` (.json, a list holding one preset, as ParaView exports)
    through safe_write.py."""
    output = Path(output)
    check_output(output, (".json",), overwrite)
    name = name or f"{source.meta.name} {source.meta.variable} (gridinr)"
    preset, kind, world, physical, count = build_preset(source, name, units, samples)
    try:
        write_text(output, preset_json(preset), overwrite, source.inputs)
    except OSError as error:
        raise ExportError(f"{output}: cannot write ({error.strerror or error})") from None
    return PresetExport(output, preset, world, physical, count, kind)
