"""Appearance randomisation of rendered datasets (domain randomisation): a look per image.

Each image draws, from a numpy Generator: a look from a pool of ParaView presets and matplotlib colormaps (or the
base look), a shift of the colours and of the opacity curve along the value axis, a factor on the opacities,
shading on or off, and a background colour. `draw_appearances` returns one JSON-ready record per image (stored per
frame in transforms.json); `appearance_settings` and `appearance_transfer_function` rebuild the look from a record
alone, so a frame can be rendered again from what its record says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np

from gridinr_nerfstudio.rendering.settings import RenderSettings
from gridinr_nerfstudio.transfer.transfer_function import TransferFunction

NAMED_BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "gray": (0.5, 0.5, 0.5)}
SHADING_CHOICES = ("on", "off", "random")


class AppearanceError(ValueError):
    """A bad appearance option, as one line."""


@dataclass
class AppearanceOptions:
    """What varies from image to image (defaults: nothing; every image has the base look)."""

    presets: list[str] = field(default_factory=list)
    """ParaView presets to draw from: shipped names or JSON files."""
    colormaps: list[str] = field(default_factory=list)
    """matplotlib colormaps to draw from (with the base look's opacity ramp)."""
    colormap_shift: float = 0.0
    """Colours slide along the value axis by U(-s, s) (normalised values)."""
    opacity_shift: float = 0.0
    """The opacity curve slides along the value axis by U(-s, s)."""
    opacity_scale: tuple[float, float] = (1.0, 1.0)
    """Opacities are multiplied by a factor log-uniform in this range (clipped to 1)."""
    shading: Optional[str] = None
    """"on", "off" or "random" (a coin per image); None: the base look's."""
    backgrounds: list[str] = field(default_factory=list)
    """Background choices: black, white, gray, random (uniform RGB) or R,G,B in [0, 1]; empty: the base look's."""

    def changes_transfer_function(self) -> bool:
        return bool(self.presets or self.colormaps or self.colormap_shift or self.opacity_shift
                    or tuple(self.opacity_scale) != (1.0, 1.0))


def parse_background(spec: str) -> tuple[float, float, float] | None:
    """A background choice: a named or R,G,B colour, or None for "random"; raises AppearanceError."""
    text = spec.strip().lower()
    if text == "random":
        return None
    if text in NAMED_BACKGROUNDS:
        return NAMED_BACKGROUNDS[text]
    try:
        colour = tuple(float(part) for part in text.split(","))
    except ValueError:
        colour = ()
    if len(colour) != 3 or not all(0.0 <= c <= 1.0 for c in colour):
        raise AppearanceError(f"--background {spec!r}: use black, white, gray, random or R,G,B with values in [0, 1]")
    return colour


def check_options(options: AppearanceOptions, voxel_size: float = 2.0 / 127.0) -> None:
    """Every preset and colormap loads, ranges make sense; raises AppearanceError naming the option."""
    import matplotlib

    from gridinr_nerfstudio.transfer.paraview import load_preset

    for name in options.presets:
        try:
            load_preset(name, unit_distance=voxel_size)
        except ValueError as error:
            raise AppearanceError(f"--presets: {error}") from None
    for name in options.colormaps:
        if name not in matplotlib.colormaps:
            raise AppearanceError(f"--colormaps: unknown matplotlib colormap {name!r}")
    if not 0.0 <= options.colormap_shift <= 1.0 or not 0.0 <= options.opacity_shift <= 1.0:
        raise AppearanceError("--colormap-shift and --opacity-shift must lie in [0, 1] (normalised values)")
    low, high = options.opacity_scale
    if not 0.0 < low <= high:
        raise AppearanceError(f"--opacity-scale {low:g}:{high:g} needs 0 < A <= B")
    if options.shading is not None and options.shading not in SHADING_CHOICES:
        raise AppearanceError(f"--shading {options.shading!r}: use on, off or random")
    for spec in options.backgrounds:
        parse_background(spec)


def draw_appearances(options: AppearanceOptions, base: RenderSettings, count: int, rng: np.random.Generator,
                     learned_look: bool = False) -> list[dict[str, Any]]:
    """One record per image. `learned_look`: the base look is a learned transfer function (an edit run), which only
    background and shading vary. The same draws are made whatever the options, so a seed fixes them all."""
    looks = [("preset", name) for name in options.presets] + [("colormap", name) for name in options.colormaps]
    backgrounds = [parse_background(spec) for spec in options.backgrounds]
    log_low, log_high = (math.log(v) for v in options.opacity_scale)
    records = []
    for _ in range(count):
        look_index = int(rng.integers(0, max(len(looks), 1)))
        colormap_shift = float(rng.uniform(-options.colormap_shift, options.colormap_shift))
        opacity_shift = float(rng.uniform(-options.opacity_shift, options.opacity_shift))
        opacity_scale = float(math.exp(rng.uniform(log_low, log_high)))
        coin = bool(rng.integers(0, 2))
        background_index = int(rng.integers(0, max(len(backgrounds), 1)))
        random_colour = [float(c) for c in rng.uniform(0.0, 1.0, 3)]

        shading = {"on": True, "off": False, "random": coin, None: base.shading}[options.shading]
        if not backgrounds:
            background = [float(c) for c in base.background]
        else:
            chosen = backgrounds[background_index]
            background = random_colour if chosen is None else [float(c) for c in chosen]
        if learned_look:
            records.append({"transfer_function": "learned", "shading": shading, "background": background})
            continue
        if looks:
            kind, name = looks[look_index]
            preset, colormap = (name, None) if kind == "preset" else (None, name)
        else:
            preset, colormap = base.preset, (None if base.preset else base.colormap)
        record: dict[str, Any] = {"preset": preset, "colormap": colormap}
        if colormap is not None:
            record["opacity_ramp"] = [base.opacity_low, base.opacity_high, base.opacity_scale]
        record.update(colormap_shift=colormap_shift, opacity_shift=opacity_shift, opacity_scale=opacity_scale,
                      shading=shading, background=background)
        records.append(record)
    return records


def appearance_settings(record: dict[str, Any], base: RenderSettings) -> RenderSettings:
    """The render settings a record names (before its shifts and opacity factor)."""
    settings = replace(base, shading=bool(record["shading"]), background=tuple(float(c) for c in record["background"]))
    if record.get("transfer_function") == "learned":
        return settings
    if record.get("preset"):
        return replace(settings, preset=record["preset"])
    low, high, scale = record.get("opacity_ramp", (base.opacity_low, base.opacity_high, base.opacity_scale))
    return replace(settings, preset=None, colormap=record["colormap"], opacity_low=low, opacity_high=high,
                   opacity_scale=scale)


def appearance_transfer_function(record: dict[str, Any], base: RenderSettings, voxel_size: float) -> TransferFunction:
    """The transfer function of a record: its preset or colormap, shifted and scaled as it says."""
    function = appearance_settings(record, base).transfer_function(voxel_size)
    return jittered(function, record.get("colormap_shift", 0.0), record.get("opacity_shift", 0.0),
                    record.get("opacity_scale", 1.0))


def jittered(function: TransferFunction, colormap_shift: float, opacity_shift: float,
             opacity_scale: float) -> TransferFunction:
    """`function` with its colour nodes and opacity points moved along the value axis and its opacities scaled
    (the ends extend beyond a shift, as the table clamps at [0, 1])."""
    if colormap_shift == 0.0 and opacity_shift == 0.0 and opacity_scale == 1.0:
        return function
    opacity = function.opacity_points.copy()
    opacity[:, 0] += opacity_shift
    opacity[:, 1] = np.clip(opacity[:, 1] * opacity_scale, 0.0, 1.0)
    return TransferFunction(function.color_nodes + colormap_shift, function.colors, opacity, function.unit_distance)
