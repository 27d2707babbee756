"""The targets of an edit: what each part of the value range should look like, from the command line or a JSON file.

An edit is a list of targets; each has a value range and one of a text prompt, an image (both scored by CLIP) or
a colour target (a list of colours or a palette image, scored by a colour distance without CLIP), optional
negative prompts and a weight. `--pipeline.model.targets edits.json` gives several:

    {"targets": [
      {"range": [0.6, 1.0], "prompt": "glowing red bone", "negative": ["grey"], "weight": 1.0},
      {"range": [0.2, 0.5], "image": "tissue.png"},
      {"range": [0.0, 0.2], "colors": ["#1f77b4", "#aec7e8"]},
      {"range": [0.0, 1.0], "palette": "photo.jpg", "units": "normalized"}
    ]}

`range` is in normalised values [0, 1] unless `"units": "data"` (the volume's own units). A palette may name a
palette shipped with the package (`"palette": "ocean"`, `transfer/palettes/`). Optional keys: `soft`
(edge width, in the range's units), `negative_weight`, `opacity` (whether the target may change opacity: default
true for prompts and images, false for colour targets, which then recolour their part and leave every
accumulation map as it was) and `name`. Relative paths are relative to the JSON file. Without a file, the
command line gives one target (`--pipeline.model.prompt` / `target-image` / `target-colors` / `target-palette`,
`--pipeline.model.target-range`, `negative-prompts`, ...), as before this file existed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from gridinr_nerfstudio.transfer.transfer_mlp import LUT_SIZE as TABLE_SIZE

KEYS = ("range", "units", "soft", "prompt", "image", "colors", "colours", "palette", "negative", "weight",
        "negative_weight", "opacity", "name")
UNITS = ("normalized", "normalised", "data")


class TargetError(ValueError):
    """A target that cannot work; one line naming the file (or option) and the problem."""


@dataclass
class EditTarget:
    """One part of an edit: a normalised value range and what it should look like."""

    low: float = 0.0
    high: float = 1.0
    softness: float = 0.0
    prompt: Optional[str] = None
    image: Optional[Path] = None
    colors: Optional[List[Any]] = None
    palette: Optional[Path] = None
    negative: List[str] = field(default_factory=list)
    weight: float = 1.0
    negative_weight: float = 0.5
    edit_opacity: Optional[bool] = None
    name: str = ""

    @property
    def kind(self) -> str:
        """"color" (colours or a palette, no CLIP) or "clip" (a prompt or an image)."""
        return "color" if self.colors is not None or self.palette is not None else "clip"

    @property
    def needs_clip(self) -> bool:
        return self.kind == "clip" or bool(self.negative)

    @property
    def changes_opacity(self) -> bool:
        return self.edit_opacity if self.edit_opacity is not None else self.kind == "clip"

    @property
    def label(self) -> str:
        """A short description for logs, the viewer and exported presets."""
        if self.name:
            return self.name
        if self.prompt is not None and self.image is None and self.kind == "clip":
            return self.prompt
        if self.image is not None and self.kind == "clip":
            return f"image {Path(self.image).name}"
        if self.palette is not None:
            return f"palette {Path(self.palette).name}"
        return "colours " + " ".join(str(color) for color in (self.colors or []))

    def to_json(self) -> dict:
        """The target as a JSON-able dict (paths as strings), e.g. for the viewer and checkpoints."""
        data = asdict(self)
        for key in ("image", "palette"):
            data[key] = None if data[key] is None else str(data[key])
        return data


def load_targets_file(path: Path, value_min: float = 0.0, value_max: float = 1.0) -> List[EditTarget]:
    """The targets of a JSON file (see the module docstring); TargetError names the file and the problem."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise TargetError(f"{path}: targets file not found (--pipeline.model.targets)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise TargetError(f"{path}: cannot read the targets file ({error})") from None
    except json.JSONDecodeError as error:
        raise TargetError(f"{path}: not JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    entries = document.get("targets") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TargetError(f'{path}: expected {{"targets": [{{"range": [low, high], "prompt": ...}}, ...]}} '
                          "with at least one target")
    return [parse_target(entry, f"{path}: targets[{index}]", path.parent, value_min, value_max)
            for index, entry in enumerate(entries)]


def parse_target(entry: Any, where: str, base_dir: Path, value_min: float, value_max: float) -> EditTarget:
    """One target of a targets file (`where` prefixes errors; paths are relative to `base_dir`)."""
    if not isinstance(entry, dict):
        raise TargetError(f"{where}: expected an object, got {entry!r}")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise TargetError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(KEYS)})")
    units = entry.get("units", "normalized")
    if units not in UNITS:
        raise TargetError(f"{where}: units must be 'normalized' or 'data', got {units!r}")
    data_units = units == "data"
    if "range" not in entry:
        raise TargetError(f"{where}: needs a 'range': [low, high]")
    low, high = normalized_range(entry["range"], data_units, value_min, value_max, where)
    colors = entry.get("colors", entry.get("colours"))
    given = [key for key in ("prompt", "image", "palette") if entry.get(key) is not None] + (["colors"] if colors is not None else [])
    if len(given) != 1:
        raise TargetError(f"{where}: needs exactly one of prompt, image, colors, palette (got {', '.join(given) or 'none'})")
    soft = _number(entry.get("soft", 0.0), f"{where}: soft", minimum=0.0)
    if data_units and value_max > value_min:
        soft = soft / (value_max - value_min)
    negative = entry.get("negative", [])
    if isinstance(negative, str):
        negative = [negative]
    if not isinstance(negative, list) or not all(isinstance(text, str) and text.strip() for text in negative):
        raise TargetError(f"{where}: negative must be a list of texts, got {negative!r}")
    prompt = entry.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise TargetError(f"{where}: prompt must be a non-empty text, got {prompt!r}")
    opacity = entry.get("opacity")
    if opacity is not None and not isinstance(opacity, bool):
        raise TargetError(f"{where}: opacity must be true or false, got {opacity!r}")
    target = EditTarget(
        low=low, high=high, softness=soft, prompt=prompt,
        image=_file(entry.get("image"), base_dir, f"{where}: image"),
        colors=colors, palette=_file(entry.get("palette"), base_dir, f"{where}: palette", palette=True),
        negative=list(negative), weight=_number(entry.get("weight", 1.0), f"{where}: weight", minimum=0.0),
        negative_weight=_number(entry.get("negative_weight", 0.5), f"{where}: negative_weight", minimum=0.0),
        edit_opacity=opacity, name=str(entry.get("name", "")),
    )
    check_target(target, where)
    return target


def normalized_range(values: Any, data_units: bool, value_min: float, value_max: float, where: str):
    """(low, high) in normalised values from [low, high] in normalised or data units (clipped to the data)."""
    if not (isinstance(values, (list, tuple)) and len(values) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise TargetError(f"{where}: range must be [low, high], got {values!r}")
    low, high = (float(v) for v in values)
    if data_units:
        span = value_max - value_min
        if not span > 0:
            raise TargetError(f"{where}: the volume's value range is empty; give the range in normalized units")
        low, high = (low - value_min) / span, (high - value_min) / span
    if not low < high:
        raise TargetError(f"{where}: range must have low < high, got {list(values)}")
    if high <= 0.0 or low >= 1.0:
        what = f"data range [{value_min:g}, {value_max:g}]" if data_units else "normalized range [0, 1]"
        raise TargetError(f"{where}: range {list(values)} lies outside the {what}")
    low, high = max(low, 0.0), min(high, 1.0)
    if (high - low) * (TABLE_SIZE - 1) < 3.0:
        raise TargetError(f"{where}: range {list(values)} is narrower than three steps of the "
                          f"{TABLE_SIZE}-entry transfer table")
    return low, high


def check_target(target: EditTarget, where: str) -> None:
    """Colours parse and files exist (images and palettes are read when training starts)."""
    from gridinr_nerfstudio.stages.edit.color_loss import ColorTargetError, parse_colors

    if target.colors is not None:
        try:
            parse_colors(target.colors, where=f"{where}: colors")
        except ColorTargetError as error:
            raise TargetError(str(error)) from None
    for label, file in (("image", target.image), ("palette", target.palette)):
        if file is not None and not Path(file).is_file():
            raise TargetError(f"{where}: {label} {file} not found")


def cli_target(config, value_min: float, value_max: float) -> Optional[EditTarget]:
    """The one target of the command-line options of an `EditModelConfig`, or None (no colour target and no
    CLIP term)."""
    where = "--pipeline.model.target-range"
    colors = list(config.target_colors) if config.target_colors else None
    palette = config.target_palette
    if colors is None and palette is None and config.lam_clip <= 0:
        return None
    low, high = normalized_range(list(config.target_range), config.target_units == "data", value_min, value_max, where)
    softness = float(config.target_softness)
    if config.target_units == "data" and value_max > value_min:
        softness /= value_max - value_min
    target = EditTarget(low=low, high=high, softness=max(softness, 0.0), weight=1.0,
                        negative=[text for text in config.negative_prompts if text.strip()],
                        negative_weight=float(config.negative_weight))
    if palette is not None:
        from gridinr_nerfstudio.stages.edit.color_loss import resolve_palette

        target.palette = resolve_palette(palette)
        check_target(target, "--pipeline.model.target-palette")
    elif colors is not None:
        target.colors = colors
        check_target(target, "--pipeline.model.target-colors")
    elif config.target_image is not None:
        target.image = Path(config.target_image)
        check_target(target, "--pipeline.model.target-image")
    else:
        target.prompt = config.prompt or ""
    return target


def model_targets(config, value_min: float = 0.0, value_max: float = 1.0) -> List[EditTarget]:
    """The targets an `EditModelConfig` asks for: its targets file, else its one command-line target (if any)."""
    if config.targets is not None:
        targets = load_targets_file(Path(config.targets), value_min, value_max)
    else:
        target = cli_target(config, value_min, value_max)
        targets = [] if target is None else [target]
    if len(targets) > config.max_targets:
        raise TargetError(f"{config.targets}: {len(targets)} targets, at most {config.max_targets} "
                          "(raise --pipeline.model.max-targets)")
    return targets


def needs_clip(targets: Sequence[EditTarget]) -> bool:
    return any(target.needs_clip for target in targets)


def _number(value: Any, where: str, minimum: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= minimum:
        raise TargetError(f"{where} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _file(value: Any, base_dir: Path, where: str, palette: bool = False) -> Optional[Path]:
    """A file named in a targets file (relative to it); a palette may also name a shipped palette ("ocean")."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise TargetError(f"{where} must be a file name, got {value!r}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if palette and not path.exists():
        from gridinr_nerfstudio.stages.edit.color_loss import resolve_palette

        shipped = resolve_palette(value)
        return shipped if shipped.is_file() else path
    return path
