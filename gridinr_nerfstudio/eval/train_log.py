"""Training log: the loss terms, training metrics and in-training evaluations of a run, per step, as a CSV.

`RUN_DIR/train_log.csv` has rows ``step, seconds, name, value`` (seconds since training started). It is written
whatever `--vis` is (a viewer-only run has no tensorboard events), appended as training goes (the demo shows
progress from it) and read by `gridinr-report` for the training curves. Names are nerfstudio's writer names:
``Train Loss``, ``Train Loss Dict/<term>``, ``Train Metrics Dict/<metric>``, ``Eval ...``, and ``ETA (s)``.

It is a nerfstudio event writer, installed by the pipeline when training sets up; nerfstudio hands every
writer every event at the end of each step (`writer.write_out_storage`).
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from nerfstudio.configs import base_config  # noqa: F401  (first: nerfstudio's writer imports cleanly only after it)
from nerfstudio.utils import writer as ns_writer

COLUMNS = ("step", "seconds", "name", "value")
_KEPT_PREFIXES = ("Train Loss", "Train Metrics Dict/", "Eval ")
ETA_NAME = "ETA (s)"


class TrainLogWriter(ns_writer.Writer):
    """Appends the scalar events worth plotting to a CSV; the latest ETA goes with each logged training loss."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file() or self.path.stat().st_size == 0:
            self.path.write_text(",".join(COLUMNS) + "\n")
        # A resumed run appends to its own log: its clock goes on from the last row instead of restarting at 0.
        self.started = time.perf_counter() - last_seconds(self.path)
        self.eta: float | None = None

    def write_scalar(self, name: Any, scalar: Any, step: int) -> None:
        name = getattr(name, "value", name)
        value = _number(scalar)
        if value is None:
            return
        if name == ns_writer.EventName.ETA.value:
            self.eta = value
            return
        if not name.startswith(_KEPT_PREFIXES):
            return
        rows = [(name, value)]
        if name == "Train Loss" and self.eta is not None:
            rows.append((ETA_NAME, self.eta))
        seconds = f"{time.perf_counter() - self.started:.3f}"
        with self.path.open("a", newline="") as file:
            csv.writer(file).writerows([str(int(step)), seconds, row_name, repr(row_value)] for row_name, row_value in rows)

    def write_scalar_dict(self, name: str, scalar_dict: dict, step: int) -> None:
        for key, scalar in scalar_dict.items():
            self.write_scalar(f"{name}/{key}", scalar, step)

    def write_image(self, name: str, image: torch.Tensor, step: int) -> None:
        """Images are not logged here."""

    def write_config(self, name: str, config_dict: dict, step: int) -> None:
        """The config is in config.yml."""


def _number(scalar: Any) -> float | None:
    """A finite float, or None (unavailable metrics, tensors of several values, NaN)."""
    if isinstance(scalar, torch.Tensor):
        if scalar.numel() != 1:
            return None
        scalar = scalar.detach().item()
    try:
        value = float(scalar)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _rows(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as file:
        return list(csv.DictReader(file))


def last_seconds(path: Path) -> float:
    """The `seconds` of the log's last readable row (0 for a new or empty log)."""
    if not Path(path).is_file():
        return 0.0
    for row in reversed(_rows(path)):
        try:
            return float(row["seconds"])
        except (KeyError, TypeError, ValueError):
            continue
    return 0.0


def drop_rows_after(path: Path, step: int) -> int:
    """Remove the rows of steps after `step` (a resumed run redoes them); returns how many were removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    rows = _rows(path)
    kept = [row for row in rows if not _after(row.get("step"), step)]
    if len(kept) < len(rows):
        temporary = path.with_name(path.name + ".tmp")
        with temporary.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(temporary, path)
    return len(rows) - len(kept)


def _after(text: str | None, step: int) -> bool:
    try:
        return int(text) > step  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def install_train_log(path: Path) -> TrainLogWriter:
    """Register a TrainLogWriter for `path` with nerfstudio's writers, replacing one left by an earlier run."""
    ns_writer.EVENT_WRITERS[:] = [w for w in ns_writer.EVENT_WRITERS if not isinstance(w, TrainLogWriter)]
    log_writer = TrainLogWriter(path)
    ns_writer.EVENT_WRITERS.append(log_writer)
    return log_writer


def read_train_log(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values) in file order; a missing file gives {}; unreadable rows are skipped
    (the file may be read while a run appends to it)."""
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    if not Path(path).is_file():
        return {}
    with Path(path).open(newline="") as file:
        for row in csv.DictReader(file):
            try:
                step, value = int(row["step"]), float(row["value"])
            except (KeyError, TypeError, ValueError):
                continue
            steps, values = series[row["name"]]
            steps.append(step)
            values.append(value)
    return dict(series)
