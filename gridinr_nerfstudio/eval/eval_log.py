"""Evaluation log: one CSV row per (run, stage, step) with its metrics, and PNG grids of intermediate renderings.

CSV layout: columns ``run, stage, step`` then one column per metric in order of first appearance. When a row
brings a new metric, the file is rewritten with the column appended (earlier rows get an empty cell).
An empty cell means "not measured or unavailable" (e.g. LPIPS without weights); the reason goes to the log.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from gridinr_nerfstudio.rendering.images import to_uint8

KEY_COLUMNS = ("run", "stage", "step")


def _format_value(name: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    try:
        return repr(float(value))  # type: ignore[arg-type]  # full precision; 'inf' / 'nan' read back with float()
    except (TypeError, ValueError) as error:
        raise ValueError(f"metric '{name}' must be a number or None, got {value!r}") from error


def read_metrics_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of a metrics CSV; ValueError naming the file when its header is not ours."""
    with Path(csv_path).open(newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or tuple(reader.fieldnames[:3]) != KEY_COLUMNS:
            raise ValueError(f"{csv_path}: not a metrics CSV (header must start with {', '.join(KEY_COLUMNS)})")
        return list(reader.fieldnames), list(reader)


def append_metrics_row(csv_path: Path, run: str, stage: str, step: int, metrics: Mapping[str, object]) -> None:
    """Append one row; metrics are numbers (float, int, 0-d tensor) or None for unavailable."""
    csv_path = Path(csv_path)
    clash = set(metrics) & set(KEY_COLUMNS)
    if clash:
        raise ValueError(f"metric names {sorted(clash)} clash with the CSV key columns {KEY_COLUMNS}")
    rows: list[dict[str, str]] = []
    columns = list(KEY_COLUMNS)
    if csv_path.is_file() and csv_path.stat().st_size > 0:
        columns, rows = read_metrics_csv(csv_path)
    new_columns = [name for name in metrics if name not in columns]
    row = {"run": run, "stage": stage, "step": str(int(step))}
    row.update({name: _format_value(name, value) for name, value in metrics.items()})
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    if rows and not new_columns:
        with csv_path.open("a", newline="") as file:
            csv.DictWriter(file, fieldnames=columns, restval="").writerow(row)
        return
    columns += new_columns
    temporary = csv_path.with_name(csv_path.name + ".tmp")
    with temporary.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow(row)
    os.replace(temporary, csv_path)  # a reader never sees a half-written file


def has_row_for_step(csv_path: Path, step: int) -> bool:
    """Whether the metrics CSV holds a row for `step` (the final evaluation runs once per step, not again)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file() or csv_path.stat().st_size == 0:
        return False
    return any(row.get("step") == str(int(step)) for row in read_metrics_csv(csv_path)[1])


def drop_rows_after(csv_path: Path, step: int) -> int:
    """Remove the rows of steps after `step` (a resumed run redoes them); returns how many were removed."""
    csv_path = Path(csv_path)
    if not csv_path.is_file() or csv_path.stat().st_size == 0:
        return 0
    columns, rows = read_metrics_csv(csv_path)
    kept = [row for row in rows if not _step_after(row.get("step"), step)]
    if len(kept) < len(rows):
        temporary = csv_path.with_name(csv_path.name + ".tmp")
        with temporary.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(temporary, csv_path)
    return len(rows) - len(kept)


def _step_after(text: str | None, step: int) -> bool:
    try:
        return int(text) > step  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _as_rgb_uint8(image: torch.Tensor | np.ndarray, index: int) -> np.ndarray:
    array = (
        image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float32)
    )
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"image {index}: expected shape (H, W), (H, W, 1) or (H, W, 3), got {array.shape}")
    array = np.broadcast_to(array, (*array.shape[:2], 3))
    return to_uint8(array)


def save_render_grid(images: Sequence[torch.Tensor | np.ndarray], path: Path, ncols: int, padding: int = 2) -> Path:
    """Write images in [0, 1] (all the same size) as one PNG grid, row by row, white between tiles."""
    if not images:
        raise ValueError(f"{path}: no images to put in the grid")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    tiles = [_as_rgb_uint8(image, index) for index, image in enumerate(images)]
    height, width = tiles[0].shape[:2]
    if any(tile.shape[:2] != (height, width) for tile in tiles):
        raise ValueError(f"{path}: grid images differ in size: {sorted({tile.shape[:2] for tile in tiles})}")
    ncols = min(ncols, len(tiles))
    nrows = math.ceil(len(tiles) / ncols)
    grid = np.full((nrows * (height + padding) - padding, ncols * (width + padding) - padding, 3), 255, np.uint8)
    for index, tile in enumerate(tiles):
        top, left = (index // ncols) * (height + padding), (index % ncols) * (width + padding)
        grid[top : top + height, left : left + width] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, grid, extension=".png")
    return path
