"""The demo shows training progress on the terminal; the training log and gridinr-report's readable panels."""

from __future__ import annotations

import csv
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from gridinr_nerfstudio.scripts import demo, report


def test_demo_step_shows_step_eta_loss_and_psnr(tmp_path: Path, capsys) -> None:
    """A stand-in trainer writes a training log and chatters on stdout: the terminal gets the progress, the log
    file gets the chatter."""
    run_dir = tmp_path / "runs" / "vol" / "gridinr-fit" / "fit"
    script = textwrap.dedent(f"""
        import csv, time, pathlib
        run = pathlib.Path({str(run_dir)!r}); run.mkdir(parents=True)
        with open(run / "train_log.csv", "w", newline="") as f:
            w = csv.writer(f); w.writerow(["step", "seconds", "name", "value"]); f.flush()
            for step in range(0, 50, 10):
                print("nerfstudio chatter at step", step, flush=True)
                w.writerows([[step, 0, "Train Loss", 1 / (step + 1)], [step, 0, "ETA (s)", 40 - step],
                             [step, 0, "Train Loss Dict/value_loss", 1 / (step + 1)],
                             [step, 0, "Train Metrics Dict/value_psnr", 10 + step / 10]])
                f.flush(); time.sleep(0.4)
    """)
    log = tmp_path / "demo.log"
    progress = demo.training_progress("*/gridinr-fit/fit/train_log.csv", tmp_path / "runs", 40)
    demo.run([sys.executable, "-c", script], log, progress, every=0.05, print_every=0.1)
    terminal = capsys.readouterr().out
    assert "step 20/40 (50%), ETA 20 s, loss 0.04762, value_psnr 12 dB" in terminal
    assert "done in" in terminal and "(step 40/40 (100%), ETA 0 s" in terminal
    assert "chatter at step 40" not in terminal and "nerfstudio chatter at step 40" in log.read_text()


def test_demo_step_failure_stops_with_the_log_tail(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit, match="step failed"):
        demo.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "demo.log", every=0.05)
    assert "boom" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_edit_run(tmp_path_factory, tiny_fit_run: Path) -> Path:
    """A tiny edit with the CLIP term (tiny random CLIP), 30 steps, evaluated once like ns-eval does."""
    from tiny_models import register_tiny_clip, save_tiny_clip_weights
    from tiny_runs import train_tiny_edit

    from gridinr_nerfstudio.runs import load_run_pipeline

    folder = tmp_path_factory.mktemp("report-edit")
    model = register_tiny_clip(folder / "clip")
    weights = save_tiny_clip_weights(model, folder / "clip.bin")
    config = train_tiny_edit(folder / "runs", tiny_fit_run, iterations=30, clip_weights=weights, clip_model=model,
                             lam_clip=1.0)
    _, pipeline, _, _ = load_run_pipeline(config, test_mode="test")
    pipeline.get_average_eval_image_metrics(get_std=True)
    return config.parent


def test_training_log_matches_tensorboard(tiny_edit_run: Path) -> None:
    """train_log.csv holds what nerfstudio's tensorboard writer got, step by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gridinr_nerfstudio.eval.train_log import read_train_log

    events = EventAccumulator(str(tiny_edit_run), size_guidance={"scalars": 0}).Reload()
    log = read_train_log(tiny_edit_run / "train_log.csv")
    for name in ("Train Loss", "Train Loss Dict/target1_clip_loss", "Train Loss Dict/pixel_loss", "Train Metrics Dict/psnr"):
        scalars = events.Scalars(name)
        assert log[name][0] == [event.step for event in scalars] == [0, 10, 20]
        np.testing.assert_allclose(log[name][1], [event.value for event in scalars], rtol=1e-6)


def test_report_draws_curves_and_error_bars_in_a_few_panels(tiny_edit_run: Path, monkeypatch, capsys) -> None:
    figures: list[Figure] = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), original(self, *a, **k))[1])
    report.main([str(tiny_edit_run)])
    panels = {axis.get_title(): axis for axis in figures[0].axes if axis.get_visible()}
    assert len(panels) <= 6
    losses = panels["training loss (each term)"]
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in losses.get_lines()}
    assert set(curves) == {"train loss", "pixel_loss"}
    targets = panels["each target's loss (edits by part)"]  # the prompt is the run's one target
    curves.update({line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in targets.get_lines()})
    assert set(curves) == {"train loss", "pixel_loss", "target1_clip_loss"}
    assert all(steps == [0, 10, 20] for steps, _ in curves.values())  # curves per step, not one dot
    psnr_panel = panels["PSNR (dB) over steps"]
    assert [line.get_label() for line in psnr_panel.get_lines() if not line.get_label().startswith("_")] == ["psnr"]
    assert [container.get_label() for container in psnr_panel.containers] == ["eval psnr"]  # with its spread
    assert "CLIP over steps" in panels or "target1_clip_loss" in curves
    with (tiny_edit_run / "metrics.csv").open(newline="") as file:
        row = list(csv.DictReader(file))[-1]
    (bars,) = [c for c in panels["evaluation: PSNR (dB), last evaluation +- std"].containers if isinstance(c, BarContainer)]
    assert bars[0].get_height() == pytest.approx(float(row["psnr"]))
    (segment,) = bars.errorbar.lines[2][0].get_segments()
    assert segment[1][1] - segment[0][1] == pytest.approx(2 * float(row["psnr_std"]))  # the spread, both ways
    similarity = panels["evaluation: similarity, last evaluation +- std"]
    shown = [tick.get_text() for tick in similarity.get_xticklabels()]
    assert shown == [name for name in row if name in ("ssim", "lpips", "clip_cosine", "target1_clip_cosine")]
    assert "target1_clip_cosine" in shown  # each target's own score (its part renders; here all values)
    assert "wrote" in capsys.readouterr().out
