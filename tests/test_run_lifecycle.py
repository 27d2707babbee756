"""A run from its first step to its last evaluation, and across a kill and a resume, in one folder.

- Every run ends with its full evaluation and its last checkpoint, once each, whatever the step settings and
  `--vis` (the methods' defaults, max-num-iterations == steps-per-eval-all-images, never evaluated before).
- `--load-dir RUN/nerfstudio_models` (or `--load-checkpoint`) continues RUN itself, with RUN's settings.

Every run trains through nerfstudio's own `ns-train` main (tests/tiny_runs.py).
"""

from __future__ import annotations

import copy
import csv
import shutil
import socket
from pathlib import Path

import pytest
import torch
from tiny_models import register_tiny_clip, save_tiny_clip_weights
from tiny_runs import killed_at_step, run_ns_train, shrink_dataparser, train_tiny_fit

from gridinr_nerfstudio.gridinr_config import gridinr_edit, gridinr_edit_fast, gridinr_fit

METHODS = {"gridinr-fit": gridinr_fit, "gridinr-edit": gridinr_edit, "gridinr-edit-fast": gridinr_edit_fast}


def csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings(config_yml: Path) -> dict:
    """A run config's options, the resume's own (--load-dir ...) aside."""
    from gridinr_nerfstudio.runs import load_run_config
    from gridinr_nerfstudio.stages.options import iter_options

    return {option.path: repr(option.value) for option in iter_options(load_run_config(config_yml))
            if not option.path.startswith("load_")}


def only_run(output: Path, method: str) -> Path:
    (run,) = [path for path in output.glob(f"*/{method}/*") if path.is_dir()]
    return run


# 1. Every run ends with its full evaluation.

@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_methods_defaults_end_with_a_full_evaluation(method, tmp_path, tiny_fit_run):
    """The registered configs as they are (viewer on, max-num-iterations == steps-per-eval-all-images), fewer steps:
    one metrics.csv row at the last step, the last checkpoint, and for the edits the reference/edit pairs, which
    gridinr-report then plots."""
    config = copy.deepcopy(METHODS[method].config)
    assert config.max_num_iterations == config.steps_per_eval_all_images and config.vis == "viewer"
    config.max_num_iterations = config.steps_per_eval_all_images = 4
    config.output_dir = tmp_path / "outputs"
    config.viewer.websocket_port, config.viewer.quit_on_train_completion = free_port(), True
    if method == "gridinr-fit":
        shrink_dataparser(config.pipeline.datamanager.dataparser, tmp_path / "references")
    else:
        config.pipeline.stage1_config = tiny_fit_run
        config.pipeline.model.clip_model = register_tiny_clip(tmp_path / "clip")  # the CLIP term stays on
        config.pipeline.model.clip_weights = save_tiny_clip_weights(config.pipeline.model.clip_model, tmp_path / "clip.bin")
    run_ns_train(config)
    run = only_run(tmp_path / "outputs", method)
    rows = csv_rows(run / "metrics.csv")
    assert [row["step"] for row in rows] == ["3"] and float(rows[0]["psnr"]) > 0
    assert [path.name for path in (run / "nerfstudio_models").iterdir()] == ["step-000000003.ckpt"]
    if method != "gridinr-fit":
        assert float(rows[0]["clip_cosine"]) != 0
        assert (run / "renders" / "reference_000.png").is_file() and (run / "renders" / "edit_000.png").is_file()
        from gridinr_nerfstudio.scripts.report import make_report

        assert sorted(path.name for path in make_report(run)) == ["metrics.png", "side_by_side.png"]
    else:
        assert float(rows[0]["volume_psnr"]) > 0


@pytest.mark.parametrize("eval_every, save_every, rows_expected", [(3, 3, ["3"]), (2, 10, ["2", "3"]), (0, 0, ["3"])])
def test_the_final_evaluation_and_checkpoint_happen_once(tmp_path, monkeypatch, eval_every, save_every, rows_expected,
                                                        small_npy):
    """When the step settings line up with the last step (evaluated and saved in the loop) nothing is repeated;
    when they do not (or are 0: never during training) the end adds exactly one of each."""
    from gridinr_nerfstudio import trainer as trainer_module

    saves: list[str] = []
    real_save = trainer_module.save_checkpoint_atomically
    monkeypatch.setattr(trainer_module, "save_checkpoint_atomically",
                        lambda state, path, scratch_dir: (saves.append(Path(path).name), real_save(state, path, scratch_dir)))

    def settings(config):
        config.final_evaluation = True
        config.steps_per_eval_all_images, config.steps_per_save = eval_every, save_every

    run = train_tiny_fit(tmp_path, small_npy, iterations=4, configure=settings).parent
    assert [row["step"] for row in csv_rows(run / "metrics.csv")] == rows_expected
    assert saves.count("step-000000003.ckpt") == 1


# 2. Resume in place.

def train_killed(tmp_path: Path, monkeypatch, iterations: int, kill_at: int, configure, data: Path) -> Path:
    with killed_at_step(monkeypatch, kill_at):
        train_tiny_fit(tmp_path, data, iterations=iterations, configure=configure)
    return only_run(tmp_path, "gridinr-fit")


def evaluated_every_2(config):
    config.final_evaluation = True
    config.steps_per_eval_all_images, config.steps_per_save, config.logging.steps_per_log = 2, 4, 1
    config.timestamp = "{timestamp}"  # as a user's command: a new run gets a new folder


@pytest.fixture(scope="module")
def small_npy(tmp_path_factory) -> Path:
    """A 12^3 random volume: its evaluations take milliseconds (the built-in 96^3 one's, seconds)."""
    import numpy as np

    path = tmp_path_factory.mktemp("volume") / "small.npy"
    np.save(path, np.random.default_rng(0).uniform(size=(12, 12, 12)).astype(np.float32))
    return path


def test_a_resumed_run_continues_in_its_own_folder(tmp_path, monkeypatch, capsys, small_npy):
    """Killed at step 7 (checkpoint at 4, evaluations at 2, 4, 6), resumed with the same command plus --load-dir:
    one folder, one history (step 6's row, lost with the kill, comes again once), the same rows as a run never
    stopped, the same config.yml."""
    whole = train_tiny_fit(tmp_path / "whole", small_npy, iterations=8, configure=evaluated_every_2).parent
    run = train_killed(tmp_path / "outputs", monkeypatch, 8, 7, evaluated_every_2, small_npy)
    config_before = settings(run / "config.yml")
    assert [row["step"] for row in csv_rows(run / "metrics.csv")] == ["2", "4", "6"]
    capsys.readouterr()

    def resume(config):
        evaluated_every_2(config)
        config.load_dir = run / "nerfstudio_models"

    resumed = train_tiny_fit(tmp_path / "outputs", small_npy, iterations=8, configure=resume).parent
    assert resumed == run and only_run(tmp_path / "outputs", "gridinr-fit") == run
    output = " ".join(capsys.readouterr().out.split())
    assert f"Resuming {run} in place from step-000000004.ckpt (step 4)" in output
    steps = [row["step"] for row in csv_rows(run / "metrics.csv")]
    assert steps == [row["step"] for row in csv_rows(whole / "metrics.csv")] == ["2", "4", "6", "7"]
    log = csv_rows(run / "train_log.csv")
    loss_steps = [int(row["step"]) for row in log if row["name"] == "Train Loss"]
    assert loss_steps == list(range(8))  # steps 5 and 6 logged once, not twice
    seconds = [float(row["seconds"]) for row in log]
    assert seconds == sorted(seconds)  # the clock goes on
    assert settings(run / "config.yml") == config_before and not list(run.glob("config.until-*"))
    assert [path.name for path in (run / "nerfstudio_models").iterdir()] == ["step-000000007.ckpt"]


def test_resume_with_changed_options(tmp_path, monkeypatch, capsys, small_npy):
    """How the run goes on may change (said, the earlier config kept); what it learns may not (refused, nothing
    written); an option left out takes the run's value."""
    def trained_with(config):
        evaluated_every_2(config)
        config.pipeline.datamanager.continuous_fraction = 0.5  # not the default: the resume command leaves it out

    run = train_killed(tmp_path / "outputs", monkeypatch, 8, 6, trained_with, small_npy)
    files_before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}

    def resume(**changes):
        def configure(config):
            evaluated_every_2(config)
            config.load_dir = run / "nerfstudio_models"
            for name, value in changes.items():
                target = config.pipeline.model.field if name == "num_levels" else config
                setattr(target, name, value)
        return configure

    with pytest.raises(SystemExit) as refused:
        train_tiny_fit(tmp_path / "outputs", small_npy, iterations=8, configure=resume(num_levels=4))
    message = str(refused.value.code)
    assert "\n" not in message and "--pipeline.model.field.num-levels 4 (the run has 8)" in message
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == files_before
    assert [only_run(tmp_path / "outputs", "gridinr-fit")] == [run]

    capsys.readouterr()
    train_tiny_fit(tmp_path / "outputs", small_npy, iterations=10, configure=resume(max_num_iterations=10))
    output = " ".join(capsys.readouterr().out.split())
    assert "; changed: " in output and "--max-num-iterations 8 -> 10" in output
    assert "its earlier config.yml kept as config.until-step-4.yml" in output
    from gridinr_nerfstudio.runs import load_run_config

    earlier, now = load_run_config(run / "config.until-step-4.yml"), load_run_config(run / "config.yml")
    assert (earlier.max_num_iterations, now.max_num_iterations) == (8, 10)
    assert now.pipeline.datamanager.continuous_fraction == 0.5  # left out: the run's own value
    assert [row["step"] for row in csv_rows(run / "metrics.csv")] == ["2", "4", "6", "8", "9"]


def test_resuming_a_completed_run(tmp_path, capsys, small_npy):
    """Nothing left to train: no new checkpoint; the final evaluation runs only if the run lacks it (runs made
    before every run ended with one)."""
    def evaluated(config):
        config.final_evaluation = True

    run = train_tiny_fit(tmp_path / "outputs", small_npy, iterations=4, configure=evaluated).parent
    (checkpoint,) = (run / "nerfstudio_models").iterdir()
    saved = checkpoint.stat().st_mtime_ns

    def resume(config):
        evaluated(config)
        config.load_dir = run / "nerfstudio_models"

    train_tiny_fit(tmp_path / "outputs", small_npy, iterations=4, configure=resume)
    assert "already completed all 4 steps" in capsys.readouterr().out
    assert [row["step"] for row in csv_rows(run / "metrics.csv")] == ["3"]  # not evaluated twice
    assert checkpoint.stat().st_mtime_ns == saved and list((run / "nerfstudio_models").iterdir()) == [checkpoint]
    (run / "metrics.csv").unlink()  # a run from before: never evaluated
    train_tiny_fit(tmp_path / "outputs", small_npy, iterations=4, configure=resume)
    assert [row["step"] for row in csv_rows(run / "metrics.csv")] == ["3"]


def test_load_checkpoint_also_resumes_in_place_and_never_rewinds(tmp_path, capsys):
    def keep_all(config):
        config.steps_per_save, config.save_only_latest_checkpoint = 2, False

    run = train_tiny_fit(tmp_path / "outputs", iterations=5, configure=keep_all).parent
    older, newest = run / "nerfstudio_models" / "step-000000002.ckpt", run / "nerfstudio_models" / "step-000000004.ckpt"
    assert older.is_file() and newest.is_file()

    def load(path: Path, iterations_done: int = 5):
        def configure(config):
            keep_all(config)
            config.load_checkpoint = path
        return configure

    with pytest.raises(SystemExit) as refused:  # from step 2 in place would overwrite steps 3..4's history
        train_tiny_fit(tmp_path / "outputs", iterations=5, configure=load(older))
    assert "has a newer checkpoint (step-000000004.ckpt)" in str(refused.value.code)
    capsys.readouterr()
    resumed = train_tiny_fit(tmp_path / "outputs", iterations=7, configure=load(newest)).parent
    assert resumed == run and (run / "nerfstudio_models" / "step-000000006.ckpt").is_file()
    assert "in place" in capsys.readouterr().out


def test_a_run_folder_elsewhere_continues_in_a_new_folder_and_says_so(tiny_fit_run, tmp_path, capsys):
    copy_dir = tmp_path / "copied-run"
    shutil.copytree(tiny_fit_run.parent, copy_dir)

    def resume(config):
        config.load_dir = copy_dir / "nerfstudio_models"

    capsys.readouterr()
    resumed = train_tiny_fit(tmp_path / "outputs", iterations=302, configure=resume).parent
    output = " ".join(capsys.readouterr().out.split())
    assert resumed != copy_dir and f"in a new run folder {resumed}" in output
    assert f"{copy_dir} is not laid out as OUTPUT/EXPERIMENT/gridinr-fit/TIMESTAMP" in output
    assert torch.load(resumed / "nerfstudio_models" / "step-000000301.ckpt", weights_only=True)["step"] == 301
