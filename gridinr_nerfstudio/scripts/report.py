"""``gridinr-report RUN_DIR``: plots of the evaluation CSV and a reference-vs-edit figure.

Conventions (what training writes, see ``eval_log.py``):

- ``RUN_DIR/*.csv``: metrics CSVs with columns ``run, stage, step, <metric>...`` (usually ``metrics.csv``).
  Every CSV directly in RUN_DIR is read; one that lacks those columns is an error.
- ``RUN_DIR/renders/reference_<view>.png`` and ``RUN_DIR/renders/edit_<view>.png``: renderings of the same
  view before and after the edit, paired by ``<view>`` (e.g. ``reference_000.png`` / ``edit_000.png``).

Outputs, in ``RUN_DIR/report/``:

- ``metrics.png``: one panel per metric over steps, one line per (run, stage); a metric without any value
  (e.g. LPIPS without weights) gets a panel saying so.
- ``side_by_side.png``: reference (top row) vs edit (bottom row) for up to ``MAX_PAIRS`` views; skipped with
  a note when no pairs are found.

The last value of every metric per (run, stage) is printed, and the metrics without any value.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

import imageio.v3 as iio
from matplotlib.figure import Figure

from gridinr_nerfstudio.eval.eval_log import KEY_COLUMNS

MAX_PAIRS = 8


class ReportError(ValueError):
    """The run directory cannot be reported on; the message names the file and the problem."""


def read_metrics(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Metric names (first-seen order) and all rows of the CSVs directly in ``run_dir``."""
    csv_paths = sorted(run_dir.glob("*.csv"))
    if not csv_paths:
        raise ReportError(f"{run_dir}: no metrics CSV (*.csv) found; training writes {run_dir / 'metrics.csv'}")
    metric_names: list[str] = []
    rows: list[dict[str, str]] = []
    for csv_path in csv_paths:
        with csv_path.open(newline="") as file:
            reader = csv.DictReader(file)
            if reader.fieldnames is None or tuple(reader.fieldnames[:3]) != KEY_COLUMNS:
                raise ReportError(f"{csv_path}: not a metrics CSV (header must start with {', '.join(KEY_COLUMNS)})")
            metric_names += [name for name in reader.fieldnames[3:] if name not in metric_names]
            rows += list(reader)
    if not metric_names:
        raise ReportError(f"{run_dir}: the metrics CSVs have no metric columns")
    return metric_names, rows


def _series(rows: list[dict[str, str]], metric: str) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """(run, stage) -> (steps, values) of one metric, sorted by step, empty cells left out."""
    points: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row.get(metric):
            try:
                points[(row["run"], row["stage"])].append((int(row["step"]), float(row[metric])))
            except ValueError as error:
                raise ReportError(f"metric '{metric}' at step {row['step']}: not a number ({error})") from error
    series = {}
    for group, group_points in points.items():
        group_points.sort()
        series[group] = ([step for step, _ in group_points], [value for _, value in group_points])
    return series


def plot_metrics(metric_names: list[str], rows: list[dict[str, str]], out_path: Path) -> Path:
    """One panel per metric over steps, one line per (run, stage)."""
    ncols = min(3, len(metric_names))
    nrows = math.ceil(len(metric_names) / ncols)
    figure = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    several_groups = len({(row["run"], row["stage"]) for row in rows}) > 1
    for axis, metric in zip(axes[: len(metric_names)], metric_names, strict=True):
        series = _series(rows, metric)
        axis.set_title(metric)
        axis.set_xlabel("step")
        if not series:
            axis.text(0.5, 0.5, "no values (unavailable)", ha="center", va="center", transform=axis.transAxes)
            axis.set_xticks([])
            axis.set_yticks([])
            continue
        for (run, stage), (steps, values) in series.items():
            axis.plot(steps, values, marker="o", markersize=3, label=f"{run} / {stage}")
        if several_groups:
            axis.legend(fontsize="small")
    for axis in axes[len(metric_names) :]:
        axis.set_visible(False)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    return out_path


def find_render_pairs(renders_dir: Path) -> list[tuple[str, Path, Path]]:
    """(view, reference, edit) for every ``reference_<view>.png`` with a matching ``edit_<view>.png``."""
    pairs = []
    for reference in sorted(renders_dir.glob("reference_*.png")):
        view = reference.stem.removeprefix("reference_")
        edit = renders_dir / f"edit_{view}.png"
        if edit.is_file():
            pairs.append((view, reference, edit))
    return pairs


def plot_side_by_side(pairs: list[tuple[str, Path, Path]], out_path: Path) -> Path:
    """Reference renderings on the top row, edits below, one column per view."""
    pairs = pairs[:MAX_PAIRS]
    figure = Figure(figsize=(2.6 * len(pairs), 5.4), layout="constrained")
    axes = figure.subplots(2, len(pairs), squeeze=False)
    for column, (view, reference, edit) in enumerate(pairs):
        for row, (label, path) in enumerate((("reference", reference), ("edit", edit))):
            try:
                image = iio.imread(path)
            except (OSError, ValueError) as error:
                raise ReportError(f"{path}: cannot read image ({error})") from error
            axes[row, column].imshow(image)
            axes[row, column].set_title(f"{label} {view}", fontsize="small")
            axes[row, column].axis("off")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    return out_path


def last_values(metric_names: list[str], rows: list[dict[str, str]]) -> list[str]:
    """Lines 'run / stage @ step N: metric=value ...' with the last value of each metric the group has,
    then the metrics without any value (e.g. LPIPS without weights)."""
    all_series = {metric: _series(rows, metric) for metric in metric_names}
    lines = []
    for group in sorted({(row["run"], row["stage"]) for row in rows}):
        last_step = max(int(row["step"]) for row in rows if (row["run"], row["stage"]) == group)
        parts = [f"{metric}={series[group][1][-1]:.4g}" for metric, series in all_series.items() if group in series]
        lines.append(f"{group[0]} / {group[1]} @ step {last_step}: " + " ".join(parts))
    empty = [metric for metric, series in all_series.items() if not series]
    if empty:
        lines.append("no values (unavailable): " + ", ".join(empty))
    return lines


def make_report(run_dir: Path) -> list[Path]:
    """Write the report figures of ``run_dir``; returns the files written."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    metric_names, rows = read_metrics(run_dir)
    written = [plot_metrics(metric_names, rows, run_dir / "report" / "metrics.png")]
    pairs = find_render_pairs(run_dir / "renders")
    if pairs:
        written.append(plot_side_by_side(pairs, run_dir / "report" / "side_by_side.png"))
    else:
        print(f"no reference_<view>.png / edit_<view>.png pairs in {run_dir / 'renders'}; side_by_side.png skipped")
    for line in last_values(metric_names, rows):
        print(line)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gridinr-report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory holding metrics.csv and renders/")
    args = parser.parse_args(argv)
    try:
        for path in make_report(args.run_dir):
            print(f"wrote {path}")
    except ReportError as error:
        sys.exit(f"gridinr-report: {error}")


if __name__ == "__main__":
    main()
