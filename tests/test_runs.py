"""Runs that survive what users do to them: loggers on, kills during saves, resumes, hostile run files, copies.

Every run here trains through nerfstudio's own `ns-train` main (tests/tiny_runs.py), in seconds.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import Killed, killed_at_step, train_tiny_edit, train_tiny_fit

from gridinr_nerfstudio.runs import load_run_pipeline


def checkpoints(run_config: Path) -> list[Path]:
    return sorted((run_config.parent / "nerfstudio_models").iterdir())


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


# 1. In-training evaluation with a logger and no LPIPS weights.

def test_in_training_evaluations_reach_tensorboard_without_lpips_weights(tmp_path, tiny_fit_run, capsys):
    """nerfstudio's writers call float() on every metric: an unavailable one is left out and explained once."""

    def evaluate_often(config):
        config.steps_per_eval_all_images = config.steps_per_eval_image = config.steps_per_eval_batch = 2
        config.final_evaluation = True  # the last step (4) is evaluated in the loop: not again at the end
        if hasattr(config.pipeline.model, "lpips_weights"):
            config.pipeline.model.lpips_weights = tmp_path / "absent-alexnet.pth"

    fit = train_tiny_fit(tmp_path / "fit", iterations=5, configure=evaluate_often)
    rows = csv_rows(fit.parent / "metrics.csv")
    assert [row["step"] for row in rows] == ["2", "4"]
    assert all(float(row["psnr"]) > 0 for row in rows) and "lpips" not in rows[0]
    assert list(fit.parent.rglob("events.out.tfevents.*"))
    edit = train_tiny_edit(tmp_path / "edit", tiny_fit_run, iterations=5, configure=evaluate_often)  # no CLIP weights
    assert [row["step"] for row in csv_rows(edit.parent / "metrics.csv")] == ["2", "4"]
    output = capsys.readouterr().out
    assert output.count("lpips is not reported") == 2  # once per run, not once per evaluation
    # lam_clip 0: no target needs CLIP, so nothing is said about it (test_edit: a CLIP target without weights at eval)
    assert "clip_cosine" not in output


# 2. Checkpoints: atomic saves, readers take the newest that loads.

def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save, calls, at_kill = torch.save, [], []
    folder = tmp_path / "builtin-default" / "gridinr-fit" / "tiny" / "nerfstudio_models"

    def killed_mid_save(obj, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:  # the save of step 4: a few bytes reach the disk, then the process dies
            if isinstance(target, (str, Path)):
                Path(target).write_bytes(b"PK\x03\x04" + b"\0" * 3423)
            else:
                target.write(b"PK\x03\x04" + b"\0" * 3423)
                target.flush()
            at_kill.extend(sorted(path.name for path in folder.iterdir()))  # what ns-eval would list now
            raise Killed()
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_mid_save)
    with pytest.raises(Killed):
        train_tiny_fit(tmp_path, iterations=6, configure=lambda config: setattr(config, "steps_per_save", 2))
    monkeypatch.setattr(torch, "save", real_save)
    assert [path.name for path in folder.iterdir()] == ["step-000000002.ckpt"]  # nothing partial, step 2 kept
    assert at_kill == ["step-000000002.ckpt"]  # the partial bytes were never among the checkpoints either
    assert torch.load(folder / "step-000000002.ckpt", weights_only=True)["step"] == 2


class RunsCommand:
    """Pickles to a shell command: what a hostile checkpoint or config would run if it were loaded as code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_readers_take_the_newest_checkpoint_that_loads(tiny_fit_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_fit_run.parent, run)
    (good,) = checkpoints(run / "config.yml")
    good_step = torch.load(good, weights_only=True)["step"]
    models = run / "nerfstudio_models"
    (models / f"step-{good_step + 100:09d}.ckpt").write_bytes(good.read_bytes()[:3427])  # killed mid-save (old trainer)
    marker = tmp_path / "pwned"
    torch.save({"step": good_step + 200, "pipeline": RunsCommand(marker)}, models / f"step-{good_step + 200:09d}.ckpt")
    (models / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (models / "notes.txt").write_text("a stray file")

    _, pipeline, checkpoint, step = load_run_pipeline(run / "config.yml")
    assert (checkpoint, step) == (good, good_step)
    from gridinr_nerfstudio.runs import read_newest_checkpoint
    from gridinr_nerfstudio.stages.edit.pipeline import latest_checkpoint

    assert read_newest_checkpoint(models)[:2] == (good, good_step)
    assert latest_checkpoint(run) == good  # the edit stage's stage-1 lookup
    assert not marker.exists()  # weights_only: the hostile checkpoint was refused, not run

    # Resume (`--load-dir`) from that folder continues from the good checkpoint.
    def resume(config):
        config.load_dir = models
        config.steps_per_eval_all_images = config.steps_per_eval_image = config.steps_per_eval_batch = 10**6

    resumed = train_tiny_fit(tmp_path / "resumed", iterations=good_step + 3, configure=resume)
    assert [path.name for path in checkpoints(resumed)] == [f"step-{good_step + 2:09d}.ckpt"]
    assert not marker.exists()


# 3. Resume continues the same run to the same end with the same schedule.

def kill_and_resume(train, tmp_path: Path, monkeypatch, iterations: int, kill_at: int, save_every: int):
    """(config.yml of a run trained to `iterations`, of the same run killed at step `kill_at` and resumed)."""

    def plain(config):
        config.steps_per_save = save_every
        config.steps_per_eval_all_images = config.steps_per_eval_image = config.steps_per_eval_batch = 10**6

    whole = train(tmp_path / "whole", iterations, plain)
    with killed_at_step(monkeypatch, kill_at):
        train(tmp_path / "killed", iterations, plain)
    (killed_models,) = (tmp_path / "killed").rglob("nerfstudio_models")
    saved = kill_at - 1 - (kill_at - 1) % save_every
    assert [path.name for path in killed_models.iterdir()] == [f"step-{saved:09d}.ckpt"]

    def resume(config):  # the same command plus --load-dir, as a user would type it
        plain(config)
        config.load_dir = killed_models

    return whole, train(tmp_path / "resumed", iterations, resume)


def assert_same_run(whole: Path, resumed: Path, iterations: int) -> None:
    (whole_ckpt,), (resumed_ckpt,) = checkpoints(whole), checkpoints(resumed)
    assert resumed_ckpt.name == whole_ckpt.name == f"step-{iterations - 1:09d}.ckpt"  # same end, not N more steps
    whole_state, resumed_state = (torch.load(path, weights_only=True) for path in (whole_ckpt, resumed_ckpt))
    for key, value in whole_state["pipeline"].items():
        if torch.is_tensor(value):
            assert torch.allclose(value.float(), resumed_state["pipeline"][key].float(), atol=1e-6), key
        else:  # extra state (an edit's targets): plain data
            assert value == resumed_state["pipeline"][key], key
    for group, scheduler in whole_state["schedulers"].items():  # same learning-rate schedule, same point on it
        assert resumed_state["schedulers"][group]["_last_lr"] == pytest.approx(scheduler["_last_lr"], rel=1e-9)
        assert resumed_state["schedulers"][group]["last_epoch"] == scheduler["last_epoch"]


# "on": batches made one step ahead (stages/fit/prefetch.py); error-weighted batches depend on the errors reported
@pytest.mark.parametrize("overrides", [{"prefetch": "auto"}, {"prefetch": "on"}, {"error_weighted_fraction": 0.25}])
def test_a_killed_and_resumed_fit_equals_an_uninterrupted_one(tmp_path, monkeypatch, overrides):
    def train(output, iterations, configure):
        return train_tiny_fit(output, iterations=iterations, configure=configure, datamanager_overrides=overrides)

    whole, resumed = kill_and_resume(train, tmp_path, monkeypatch, iterations=12, kill_at=6, save_every=4)
    assert_same_run(whole, resumed, 12)
    psnr_whole = load_run_pipeline(whole)[1].model.volume_psnr()
    psnr_resumed = load_run_pipeline(resumed)[1].model.volume_psnr()
    assert psnr_resumed == pytest.approx(psnr_whole, abs=1e-4)


def test_a_killed_and_resumed_edit_equals_an_uninterrupted_one(tiny_fit_run, tmp_path, monkeypatch):
    """Stage 2 draws views from its own generator and jitters samples with torch's: both resume where they were."""

    def train(output, iterations, configure):
        return train_tiny_edit(output, tiny_fit_run, iterations=iterations, configure=configure)

    whole, resumed = kill_and_resume(train, tmp_path, monkeypatch, iterations=6, kill_at=4, save_every=2)
    assert_same_run(whole, resumed, 6)


# 4. Run files never execute code.

def hostile_config(tiny_fit_run: Path, folder: Path, marker: Path) -> Path:
    """The tiny run's config.yml plus one key whose value runs `touch marker` under yaml.Loader."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_fit_run.parent / "nerfstudio_models", folder / "nerfstudio_models")
    path = folder / "config.yml"
    path.write_text(tiny_fit_run.read_text() + f'x: !!python/object/apply:os.system ["touch {marker}"]\n')
    return path


def test_a_hostile_stage1_config_fails_in_one_line_and_runs_nothing(tiny_fit_run, tmp_path):
    from nerfstudio.scripts.train import main as ns_train_main

    from gridinr_nerfstudio.gridinr_config import edit_trainer_config

    marker = tmp_path / "pwned"
    config_path = hostile_config(tiny_fit_run, tmp_path / "stage1", marker)
    config = edit_trainer_config()
    config.output_dir, config.vis = tmp_path / "outputs", "tensorboard"
    config.pipeline.stage1_config = config_path
    with pytest.raises(SystemExit) as error:  # the input check before training reads the config safely
        ns_train_main(config)  # gridinr-edit --pipeline.stage1-config HOSTILE
    message = str(error.value.code)
    assert "\n" not in message and str(config_path) in message and "os.system" in message
    assert not marker.exists() and not (tmp_path / "outputs").exists()


def test_gridinr_render_refuses_a_hostile_config_in_one_line(tiny_fit_run, tmp_path):
    marker = tmp_path / "pwned"
    config_path = hostile_config(tiny_fit_run, tmp_path / "run", marker)
    result = subprocess.run(
        [sys.executable, "-m", "gridinr_nerfstudio.scripts.render", "orbit", "--load-config", str(config_path),
         "--output", str(tmp_path / "orbit.gif"), "--frames", "2", "--image-size", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("gridinr-render: error:")]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]  # (torch's import-time FutureWarnings aside)
    assert len(errors) == 1 and str(config_path) in errors[0] and "os.system" in errors[0], result.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "orbit.gif").exists()


# 5. Run folders are self-contained.

def test_a_copied_run_evaluates_its_own_checkpoint_into_its_own_csv(tiny_fit_run, tmp_path):
    original_csv = tiny_fit_run.parent / "metrics.csv"
    before = original_csv.read_bytes() if original_csv.exists() else None
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(tiny_fit_run.parent, copy)
    _, pipeline, checkpoint, step = load_run_pipeline(copy / "config.yml", test_mode="test")
    assert checkpoint.parent == copy / "nerfstudio_models"
    metrics = pipeline.get_average_eval_image_metrics(step=step)
    rows = csv_rows(copy / "metrics.csv")
    assert rows[-1]["step"] == str(step) and float(rows[-1]["psnr"]) == pytest.approx(metrics["psnr"])
    assert (original_csv.read_bytes() if original_csv.exists() else None) == before


def test_an_edit_run_keeps_the_field_it_was_trained_on(tmp_path):
    def named(config):
        config.experiment_name = "my-volume"

    stage1 = train_tiny_fit(tmp_path / "outputs", iterations=20, configure=named)
    edit = train_tiny_edit(tmp_path / "outputs", stage1, iterations=2)
    assert edit.parent.parent.parent.name == "my-volume"  # filed beside its stage-1 run, not under builtin-default
    assert (edit.parent / "stage1_field.ckpt").is_file()
    before = load_run_pipeline(edit, test_mode="test")[1].render_eval_views(2)

    def train_further(config):  # same folder, 40 more steps: its checkpoint now holds another field
        named(config)
        config.load_dir = stage1.parent / "nerfstudio_models"

    train_tiny_fit(tmp_path / "outputs", iterations=60, configure=train_further)
    from gridinr_nerfstudio.runs import read_newest_checkpoint

    further = read_newest_checkpoint(stage1.parent / "nerfstudio_models")[2]["pipeline"]
    kept = torch.load(edit.parent / "stage1_field.ckpt", weights_only=True)["pipeline"]
    assert any(not torch.equal(kept[key], further[key]) for key in kept)
    after_training = load_run_pipeline(edit, test_mode="test")[1].render_eval_views(2)
    assert torch.equal(before, after_training)

    shutil.move(stage1.parent, tmp_path / "moved-away")  # the stage-1 run is gone from where the edit saw it
    moved_edit = tmp_path / "copied-edit"
    shutil.copytree(edit.parent, moved_edit)
    assert torch.equal(before, load_run_pipeline(moved_edit / "config.yml", test_mode="test")[1].render_eval_views(2))
