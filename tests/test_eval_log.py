"""Metrics CSV with changing columns, render grids, and the gridinr-report figures."""

from __future__ import annotations

import csv
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from gridinr_nerfstudio.eval.eval_log import append_metrics_row, save_render_grid
from gridinr_nerfstudio.scripts.report import main as report_main


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def test_rows_with_new_metrics_extend_the_header(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    append_metrics_row(path, "fit", "train", 0, {"psnr": 20.5, "loss": torch.tensor(0.25)})
    append_metrics_row(path, "fit", "train", 100, {"psnr": 25.0, "loss": 0.125})
    append_metrics_row(path, "edit", "eval", 200, {"lpips": None, "clip_cosine": 0.3, "psnr": float("inf")})
    header, rows = read_csv(path)
    assert header == ["run", "stage", "step", "psnr", "loss", "lpips", "clip_cosine"]
    assert rows[0] == {
        "run": "fit",
        "stage": "train",
        "step": "0",
        "psnr": "20.5",
        "loss": "0.25",
        "lpips": "",
        "clip_cosine": "",
    }
    assert rows[1]["step"] == "100" and float(rows[1]["loss"]) == 0.125
    assert rows[2] == {
        "run": "edit",
        "stage": "eval",
        "step": "200",
        "psnr": "inf",
        "loss": "",
        "lpips": "",
        "clip_cosine": "0.3",
    }


def test_full_precision_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    append_metrics_row(path, "fit", "eval", 1, {"ssim": 0.123456789012345, "count": 7})
    _, rows = read_csv(path)
    assert float(rows[0]["ssim"]) == 0.123456789012345 and rows[0]["count"] == "7"


def test_bad_rows_and_files_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    with pytest.raises(ValueError, match="clash"):
        append_metrics_row(path, "fit", "eval", 0, {"step": 1.0})
    with pytest.raises(ValueError, match="must be a number"):
        append_metrics_row(path, "fit", "eval", 0, {"psnr": "high"})
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a metrics CSV"):
        append_metrics_row(path, "fit", "eval", 0, {"psnr": 1.0})


def test_render_grid_places_tiles_row_by_row(tmp_path: Path) -> None:
    tiles = [np.full((4, 5, 3), value, np.float32) for value in (0.0, 0.5, 1.0)]
    tiles[1] = torch.from_numpy(tiles[1])  # tensors and arrays mix
    tiles.append(np.full((4, 5), 0.2, np.float32))  # grey is repeated to RGB
    path = save_render_grid(tiles, tmp_path / "grid" / "step_000100.png", ncols=3, padding=1)
    grid = iio.imread(path)
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 2, 3)
    assert (grid[:4, :5] == 0).all() and (grid[:4, 6:11] == 128).all() and (grid[:4, 12:] == 255).all()
    assert (grid[5:, :5] == 51).all()
    assert (grid[4] == 255).all() and (grid[5:, 6:] == 255).all()  # padding and the empty slot stay white


def test_render_grid_rejects_mixed_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="differ in size"):
        save_render_grid([np.zeros((4, 4, 3)), np.zeros((5, 4, 3))], tmp_path / "g.png", ncols=2)


def test_report_writes_metric_plot_and_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for step in range(0, 300, 100):
        append_metrics_row(tmp_path / "metrics.csv", "fit", "eval", step, {"psnr": 20 + step / 100, "lpips": None})
    append_metrics_row(tmp_path / "metrics.csv", "edit", "eval", 300, {"clip_cosine": 0.31})
    renders = tmp_path / "renders"
    renders.mkdir()
    for view in ("000", "001"):
        iio.imwrite(renders / f"reference_{view}.png", np.zeros((16, 16, 3), np.uint8))
        iio.imwrite(renders / f"edit_{view}.png", np.full((16, 16, 3), 200, np.uint8))
    iio.imwrite(renders / "reference_002.png", np.zeros((16, 16, 3), np.uint8))  # no edit: not paired
    report_main([str(tmp_path)])
    output = capsys.readouterr().out
    for name in ("metrics.png", "side_by_side.png"):
        image = iio.imread(tmp_path / "report" / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    assert "fit / eval @ step 200: psnr=22\n" in output and "edit / eval @ step 300: clip_cosine=0.31\n" in output
    assert "no values (unavailable): lpips" in output


def test_report_without_csv_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no metrics CSV"):
        report_main([str(tmp_path)])
