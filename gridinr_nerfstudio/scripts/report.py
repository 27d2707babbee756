"""``gridinr-report RUN_DIR``: plots of the evaluation CSV and a reference-vs-edit figure.

Conventions (what training writes, see ``eval_log.py``):

- ``RUN_DIR/*.csv``: metrics CSVs with columns ``run, stage, step, <metric>...`` (usually ``metrics.csv``).
  Every CSV directly in RUN_DIR is read (but ``train_log.csv``); one that lacks those columns is an error.
- ``RUN_DIR/renders/reference_<view>.png`` and ``RUN_DIR/renders/edit_<view>.png``: renderings of the same
  view before and after the edit, paired by ``<view>`` (e.g. ``reference_000.png`` / ``edit_000.png``).

Outputs, in ``RUN_DIR/report/`` (gridinr-report's own folder in the run: a new report replaces the figures of
the previous one, each renamed into place when complete):

- ``metrics.png``: a few panels: the training curves per step from ``RUN_DIR/train_log.csv`` (each loss term,
  each edit target's loss in a panel of its own, PSNR, the CLIP term; see ``eval/train_log.py``), and the last evaluation's metrics as bars with their spread
  (``<metric>_std``) as error bars, PSNR apart from the [0, 1] similarities; unavailable metrics are named.
- ``side_by_side.png``: reference (top row) vs edit (bottom row) for up to ``MAX_PAIRS`` views; skipped with
  a note when no pairs are found.

The last value of every metric per (run, stage) is printed, and the metrics without any value.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import imageio.v3 as iio
from matplotlib.figure import Figure

from gridinr_nerfstudio.eval.eval_log import read_metrics_csv
from gridinr_nerfstudio.safe_write import OutputError, atomic_output

TRAIN_LOG_NAME = "train_log.csv"  # eval/train_log.py (imported lazily: it imports nerfstudio's writer)

MAX_PAIRS = 8


class ReportError(ValueError):
    """The run directory cannot be reported on; the message names the file and the problem."""


def read_metrics(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Metric names (first-seen order) and all rows of the CSVs directly in ``run_dir``."""
    csv_paths = sorted(path for path in run_dir.glob("*.csv") if path.name != TRAIN_LOG_NAME)
    if not csv_paths:
        raise ReportError(f"{run_dir}: no metrics CSV (*.csv) found; training writes {run_dir / 'metrics.csv'}")
    metric_names: list[str] = []
    rows: list[dict[str, str]] = []
    for csv_path in csv_paths:
        try:
            columns, csv_rows = read_metrics_csv(csv_path)
        except ValueError as error:
            raise ReportError(str(error)) from None
        metric_names += [name for name in columns[3:] if name not in metric_names]
        rows += csv_rows
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


def _short(name: str) -> str:
    """'Train Loss Dict/pixel_loss' -> 'pixel_loss'; 'Eval Images Metrics/psnr' -> 'eval psnr'."""
    group, _, key = name.rpartition("/")
    if not group:
        return name.lower()
    return key if group.startswith("Train") else f"eval {key}"


def _train_panels(train_log: dict[str, tuple[list[int], list[float]]]) -> dict[str, list[str]]:
    """Panel title -> names of the training-log series drawn in it (empty panels are left out)."""
    targets = [name for name in train_log if name.startswith("Train Loss Dict/target")]
    losses = [name for name in train_log
              if (name == "Train Loss" or name.startswith("Train Loss Dict/")) and name not in targets]
    clip = [name for name in train_log if "clip" in name.lower() and name not in losses + targets]
    psnr = [name for name in train_log if "psnr" in name.lower() and name not in clip]
    panels = {"training loss (each term)": losses, "each target's loss (edits by part)": targets,
              "PSNR (dB) over steps": psnr, "CLIP over steps": clip}
    return {title: names for title, names in panels.items() if names}


def _eval_groups(metric_names: list[str], rows: list[dict[str, str]]) -> dict[str, list[str]]:
    """Evaluation panels: metrics in dB, metrics in [0, 1]-ish units; speed figures and spreads are not panels."""
    quality = [name for name in metric_names if not name.endswith("_std") and not name.startswith(
        ("fps", "ms_per_frame", "rays_per_s", "num_rays", "eval_seconds", "params", "compression", "volume_bytes",
         "model_bytes"))]
    decibels = [name for name in quality if "psnr" in name]
    unit = [name for name in quality if name not in decibels]
    return {title: names for title, names in (("evaluation: PSNR (dB), last evaluation +- std", decibels),
                                              ("evaluation: similarity, last evaluation +- std", unit)) if names}


def _last_row(rows: list[dict[str, str]], group: tuple[str, str], metric: str) -> dict[str, str] | None:
    candidates = [row for row in rows if (row["run"], row["stage"]) == group and row.get(metric)]
    return max(candidates, key=lambda row: int(row["step"])) if candidates else None


def plot_metrics(metric_names: list[str], rows: list[dict[str, str]], out_path: Path,
                 train_log: dict[str, tuple[list[int], list[float]]] | None = None) -> Path:
    """A few readable panels: training curves per step (loss terms, PSNR, CLIP) from the training log, and
    the last evaluation's metrics as bars with their spread (`<metric>_std`) as error bars."""
    train_panels = _train_panels(train_log or {})
    eval_panels = _eval_groups(metric_names, rows)
    titles = list(train_panels) + list(eval_panels)
    if not titles:
        titles = ["no metrics"]
    ncols = min(2, len(titles))
    nrows = math.ceil(len(titles) / ncols)
    figure = Figure(figsize=(6.0 * ncols, 3.6 * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for axis, title in zip(axes, titles):
        axis.set_title(title)
        if title in train_panels:
            names = train_panels[title]
            for name in names:
                steps, values = train_log[name]
                axis.plot(steps, values, marker="." if len(steps) < 50 else None, label=_short(name))
            if title.startswith("PSNR"):
                _eval_points(axis, [name for name in metric_names if "psnr" in name and not name.endswith("_std")],
                             rows)
            axis.set_xlabel("step")
            if title.startswith(("training loss", "each target")) and all(v > 0 for n in names for v in train_log[n][1]):
                axis.set_yscale("log")
            axis.legend(fontsize="small")
        elif title in eval_panels:
            _eval_bars(axis, eval_panels[title], rows)
        else:
            axis.text(0.5, 0.5, "no training log and no metrics", ha="center", va="center", transform=axis.transAxes)
    for axis in axes[len(titles):]:
        axis.set_visible(False)
    return save_figure(figure, out_path)


def _eval_points(axis, metrics: list[str], rows: list[dict[str, str]]) -> None:
    """Evaluations over steps as markers with their spread, next to the training curves."""
    for metric in metrics:
        spreads = _series(rows, f"{metric}_std")
        for group, (steps, values) in _series(rows, metric).items():
            spread = dict(zip(*spreads.get(group, ([], []))))
            axis.errorbar(steps, values, yerr=[spread.get(step, 0.0) for step in steps], fmt="s", capsize=4,
                          label=f"eval {metric}" + (f" ({group[0]})" if len(spreads) > 1 else ""))


def _eval_bars(axis, metrics: list[str], rows: list[dict[str, str]]) -> None:
    """One bar per metric and (run, stage), error bar = `<metric>_std` when measured; unavailable ones are named."""
    groups = sorted({(row["run"], row["stage"]) for row in rows})
    width = 0.8 / max(len(groups), 1)
    unavailable = []
    for index, group in enumerate(groups):
        xs, heights, errors = [], [], []
        for position, metric in enumerate(metrics):
            row = _last_row(rows, group, metric)
            if row is None:
                continue
            spread = row.get(f"{metric}_std") or ""
            xs.append(position + (index - (len(groups) - 1) / 2) * width)
            heights.append(float(row[metric]))
            errors.append(float(spread) if spread else 0.0)
        if xs:
            axis.bar(xs, heights, width=width * 0.9, yerr=errors, capsize=4, label=f"{group[0]} / {group[1]}")
    for metric in metrics:
        if all(_last_row(rows, group, metric) is None for group in groups):
            unavailable.append(metric)
    axis.set_xticks(range(len(metrics)), metrics, rotation=20, fontsize="small")
    if len(groups) > 1:
        axis.legend(fontsize="small")
    if unavailable:
        axis.text(0.99, 0.97, "unavailable: " + ", ".join(unavailable), ha="right", va="top", fontsize="small",
                  transform=axis.transAxes)


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
    return save_figure(figure, out_path)


def save_figure(figure: Figure, out_path: Path) -> Path:
    """A figure of the report, renamed into place when complete (safe_write.py). RUN_DIR/report/ is
    gridinr-report's own folder: each report replaces the figures of the previous one (no --overwrite needed)."""
    with atomic_output(out_path, overwrite=True) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
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
    from gridinr_nerfstudio.eval.train_log import read_train_log

    train_log = read_train_log(run_dir / TRAIN_LOG_NAME)
    if not train_log:
        print(f"no training log {run_dir / TRAIN_LOG_NAME} (runs before it existed): evaluation panels only")
    written = [plot_metrics(metric_names, rows, run_dir / "report" / "metrics.png", train_log)]
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
    except (ReportError, OutputError) as error:
        sys.exit(f"gridinr-report: {error}")


if __name__ == "__main__":
    main()
