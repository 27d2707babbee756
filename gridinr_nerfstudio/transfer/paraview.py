"""ParaView colormap presets: import into a TransferFunction and export from one.

ParaView presets are the JSON ParaView exports from its colour map editor: a list of objects with
"Name", "RGBPoints" [x, r, g, b, ...], optional "Points" [x, a, midpoint, sharpness, ...] and
"ColorSpace" (RGB, Lab, Diverging or HSV). The preset's data range is rescaled to [0, 1]; colour
spaces other than RGB and non-linear opacity segments are resampled into dense linear nodes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gridinr_nerfstudio.transfer.transfer_function import DEFAULT_UNIT_DISTANCE, TransferFunction

PRESET_FOLDER = Path(__file__).resolve().parent / "presets"
SUBDIVISIONS_PER_SEGMENT = 32
"""Linear nodes per preset segment when a colour space or opacity segment is not linear in RGB / value."""


def transfer_function_to_preset(transfer_function: TransferFunction, name: str) -> dict[str, Any]:
        """This transfer function as a ParaView preset object (data range [0, 1], RGB colour space)."""
        rgb_points = np.concatenate([transfer_function.color_nodes[:, None], transfer_function.colors], axis=1).reshape(-1)
        opacity = transfer_function.opacity_points
        opacity_points = np.stack(
            [opacity[:, 0], opacity[:, 1], np.full(len(opacity), 0.5), np.zeros(len(opacity))], axis=1
        )
        return {
            "Name": name,
            "ColorSpace": "RGB",
            "RGBPoints": rgb_points.tolist(),
            "Points": opacity_points.reshape(-1).tolist(),
        }

def transfer_function_from_preset(preset: dict[str, Any], unit_distance: float = DEFAULT_UNIT_DISTANCE) -> TransferFunction:
        """Build from one ParaView preset object; raises ValueError naming the problem."""
        color_nodes, colors, opacity_points = parse_paraview_preset(preset)
        return TransferFunction(color_nodes, colors, opacity_points, unit_distance)


def save_preset(path: str | Path, transfer_function: TransferFunction, name: str) -> None:
    """Write a ParaView-importable preset file holding one transfer function."""
    Path(path).write_text(json.dumps([transfer_function_to_preset(transfer_function, name)], indent=1))


def available_presets() -> list[str]:
    """Names of the presets shipped in gridinr_nerfstudio/transfer/presets."""
    return sorted(preset["Name"] for file in sorted(PRESET_FOLDER.glob("*.json")) for preset in _read_preset_file(file))


def load_preset(
    name_or_path: str | Path, unit_distance: float = DEFAULT_UNIT_DISTANCE, name: str | None = None
) -> TransferFunction:
    """TransferFunction from a shipped preset name (case-insensitive) or a ParaView JSON file.

    A file holding several presets needs `name` to pick one; otherwise its first preset is used.
    """
    path = Path(name_or_path)
    if path.suffix.lower() == ".json" and not path.is_file():
        raise ValueError(f"{path}: no such preset file")
    if path.suffix.lower() != ".json":
        wanted = str(name_or_path).lower()
        for file in sorted(PRESET_FOLDER.glob("*.json")):
            for preset in _read_preset_file(file):
                if preset["Name"].lower() == wanted or file.stem.lower() == wanted:
                    return _preset_to_transfer_function(preset, file, unit_distance)
        raise ValueError(f"{name_or_path}: neither a ParaView preset file nor a shipped preset {available_presets()}")
    presets = _read_preset_file(path)
    if name is not None:
        presets = [preset for preset in presets if preset["Name"] == name]
        if not presets:
            raise ValueError(f"{path}: no preset named {name!r}")
    return _preset_to_transfer_function(presets[0], path, unit_distance)


def _preset_to_transfer_function(preset: dict[str, Any], path: Path, unit_distance: float) -> TransferFunction:
    try:
        return transfer_function_from_preset(preset, unit_distance)
    except ValueError as error:
        raise ValueError(f"{path}: preset {preset.get('Name')!r}: {error}") from None


def _read_preset_file(path: Path) -> list[dict[str, Any]]:
    """The preset objects of a ParaView JSON file (a list of objects, or one object)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    presets = content if isinstance(content, list) else [content]
    if not presets or not all(isinstance(preset, dict) for preset in presets):
        raise ValueError(f"{path}: a ParaView preset file is a non-empty list of objects")
    for index, preset in enumerate(presets):
        if not isinstance(preset.get("Name"), str):
            raise ValueError(f'{path}: preset {index} has no string "Name"')
    return presets


def _numbers(preset: dict[str, Any], key: str, group: int) -> np.ndarray:
    """preset[key] as an (n, group) float array."""
    raw = preset[key]
    if not isinstance(raw, list) or not raw or len(raw) % group != 0:
        raise ValueError(f'"{key}" must be a non-empty list whose length is a multiple of {group}')
    try:
        array = np.asarray(raw, dtype=np.float64).reshape(-1, group)
    except (TypeError, ValueError):
        raise ValueError(f'"{key}" must hold numbers only') from None
    if not np.all(np.isfinite(array)):
        raise ValueError(f'"{key}" holds non-finite numbers')
    if np.any(np.diff(array[:, 0]) < 0):
        raise ValueError(f'"{key}" data values must be non-decreasing')
    return array


def parse_paraview_preset(preset: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(colour nodes (K,), colours (K, 3), opacity points (P, 2)) with the data range rescaled to [0, 1]."""
    if "RGBPoints" not in preset:
        raise ValueError('no "RGBPoints" (indexed/categorical presets are not supported)')
    rgb_points = _numbers(preset, "RGBPoints", 4)
    if np.any(rgb_points[:, 1:] < 0) or np.any(rgb_points[:, 1:] > 1):
        raise ValueError('"RGBPoints" colours must lie in [0, 1]')
    opacity_points = _numbers(preset, "Points", 4) if "Points" in preset else None
    if opacity_points is not None and (np.any(opacity_points[:, 1] < 0) or np.any(opacity_points[:, 1] > 1)):
        raise ValueError('"Points" opacities must lie in [0, 1]')
    if opacity_points is not None and (np.any(opacity_points[:, 2:] < 0) or np.any(opacity_points[:, 2:] > 1)):
        raise ValueError('"Points" midpoints and sharpnesses must lie in [0, 1]')
    data_values = (
        rgb_points[:, 0] if opacity_points is None else np.concatenate([rgb_points[:, 0], opacity_points[:, 0]])
    )
    low, high = data_values.min(), data_values.max()
    if not high > low:
        raise ValueError(f"data range [{low}, {high}] is empty")

    color_space = str(preset.get("ColorSpace", "RGB")).lower()
    interpolate = _COLOR_SPACE_INTERPOLATION.get(color_space)
    if interpolate is None:
        raise ValueError(f'unsupported "ColorSpace" {preset.get("ColorSpace")!r} (RGB, Lab, Diverging or HSV)')
    color_linear = np.full(len(rgb_points) - 1, interpolate is _lerp)
    color_nodes, colors = _densify(rgb_points[:, 0], rgb_points[:, 1:], interpolate, color_linear)

    if opacity_points is None:
        opacity = np.array([[low, 1.0], [high, 1.0]])
    else:
        opacity_linear = (np.abs(opacity_points[:-1, 2] - 0.5) < 1e-9) & (opacity_points[:-1, 3] < 0.01)
        nodes, values = _densify(opacity_points[:, 0], opacity_points[:, 1:], _vtk_opacity_segment, opacity_linear)
        opacity = np.stack([nodes, values[:, 0]], axis=1)
    scale = 1.0 / (high - low)
    opacity[:, 0] = (opacity[:, 0] - low) * scale
    return (color_nodes - low) * scale, np.clip(colors, 0.0, 1.0), opacity


def _densify(nodes: np.ndarray, values: np.ndarray, interpolate, linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and outputs of piecewise interpolation, with each non-linear segment split into linear pieces.

    `interpolate(s (n,), start_row, end_row) -> (n, C)` evaluates a segment at fractions s in [0, 1];
    `linear[i]` says segment i is already linear in the output, so its end node suffices.
    """
    out_nodes, out_values = [nodes[:1]], [interpolate(np.zeros(1), values[0], values[0])]
    for index in range(len(nodes) - 1):
        split = not linear[index] and nodes[index + 1] > nodes[index]
        fractions = np.linspace(0.0, 1.0, SUBDIVISIONS_PER_SEGMENT + 1)[1:] if split else np.ones(1)
        out_nodes.append(nodes[index] + fractions * (nodes[index + 1] - nodes[index]))
        out_values.append(interpolate(fractions, values[index], values[index + 1]))
    return np.concatenate(out_nodes), np.concatenate(out_values)


def _lerp(s: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    return start[None, :] + s[:, None] * (end - start)[None, :]


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.clip(rgb, 0, 1).reshape(1, -1, 3)).reshape(-1, 3)


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    from skimage.color import lab2rgb

    return np.clip(lab2rgb(lab.reshape(1, -1, 3)).reshape(-1, 3), 0, 1)


def _lab_segment(s: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    lab = _rgb_to_lab(np.stack([start, end]))
    return _lab_to_rgb(_lerp(s, lab[0], lab[1]))


def _hsv_segment(s: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """HSV interpolation taking the short way round the hue circle (VTK's HSVWrap)."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv  # here: the method entry points must not import matplotlib

    hsv = rgb_to_hsv(np.stack([start, end]))
    if abs(hsv[1, 0] - hsv[0, 0]) > 0.5:
        hsv[np.argmin(hsv[:, 0]), 0] += 1.0
    mixed = _lerp(s, hsv[0], hsv[1])
    mixed[:, 0] %= 1.0
    return hsv_to_rgb(mixed)


def _diverging_segment(s: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Moreland's Msh diverging interpolation as in vtkColorTransferFunction (white between saturated ends)."""

    def lab_to_msh(lab: np.ndarray) -> np.ndarray:
        magnitude = float(np.linalg.norm(lab))
        saturation = math.acos(lab[0] / magnitude) if magnitude > 0.001 else 0.0
        hue = math.atan2(lab[2], lab[1]) if saturation > 0.001 else 0.0
        return np.array([magnitude, saturation, hue])

    def adjust_hue(msh: np.ndarray, unsaturated_magnitude: float) -> float:
        if msh[0] >= unsaturated_magnitude - 0.1:
            return float(msh[2])
        spin = msh[1] * math.sqrt(unsaturated_magnitude**2 - msh[0] ** 2) / (msh[0] * math.sin(msh[1]))
        return float(msh[2] + spin if msh[2] > -0.3 * math.pi else msh[2] - spin)

    def angle_difference(a: float, b: float) -> float:
        difference = abs(a - b) % (2 * math.pi)
        return 2 * math.pi - difference if difference > math.pi else difference

    lab = _rgb_to_lab(np.stack([start, end]))
    results = []
    for fraction in s:
        msh1, msh2 = lab_to_msh(lab[0]), lab_to_msh(lab[1])
        if msh1[1] > 0.05 and msh2[1] > 0.05 and angle_difference(msh1[2], msh2[2]) > 0.33 * math.pi:
            white = np.array([max(88.0, msh1[0], msh2[0]), 0.0, 0.0])
            if fraction < 0.5:
                msh2, fraction = white, 2.0 * fraction
            else:
                msh1, fraction = white, 2.0 * fraction - 1.0
        if msh1[1] < 0.05 and msh2[1] > 0.05:
            msh1[2] = adjust_hue(msh2, msh1[0])
        elif msh2[1] < 0.05 and msh1[1] > 0.05:
            msh2[2] = adjust_hue(msh1, msh2[0])
        m, sat, hue = (1 - fraction) * msh1 + fraction * msh2
        results.append([m * math.cos(sat), m * math.sin(sat) * math.cos(hue), m * math.sin(sat) * math.sin(hue)])
    return _lab_to_rgb(np.asarray(results))


_COLOR_SPACE_INTERPOLATION = {
    "rgb": _lerp,
    "lab": _lab_segment,
    "cielab": _lab_segment,
    "diverging": _diverging_segment,
    "hsv": _hsv_segment,
}


def _vtk_opacity_segment(s: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """vtkPiecewiseFunction between (opacity, midpoint, sharpness) at `start` and opacity at `end`."""
    value1, value2 = start[0], end[0]
    midpoint = min(max(start[1], 1e-5), 1 - 1e-5)
    sharpness = start[2]
    x = np.where(s < midpoint, 0.5 * s / midpoint, 0.5 + 0.5 * (s - midpoint) / (1.0 - midpoint))
    if sharpness > 0.99:
        result = np.where(x < 0.5, value1, value2)
    elif sharpness < 0.01:
        result = (1 - x) * value1 + x * value2
    else:
        power = 1.0 + 10.0 * sharpness
        x = np.where(x < 0.5, 0.5 * (2 * x) ** power, np.where(x > 0.5, 1.0 - 0.5 * (2 * (1 - x)) ** power, x))
        x2, x3 = x * x, x * x * x
        tangent = (1.0 - sharpness) * (value2 - value1)
        result = (
            (2 * x3 - 3 * x2 + 1) * value1
            + (-2 * x3 + 3 * x2) * value2
            + (x3 - 2 * x2 + x) * tangent
            + (x3 - x2) * tangent
        )
        result = np.clip(result, min(value1, value2), max(value1, value2))
    return result[:, None]
