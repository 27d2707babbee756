"""Tiny real training runs through nerfstudio's own `ns-train` code path, for tests (seconds on a CPU)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import pytest
from nerfstudio.engine.callbacks import TrainingCallbackAttributes
from nerfstudio.scripts.train import main as ns_train_main

from gridinr_nerfstudio.data.default_volume import BUILTIN_DEFAULT
from gridinr_nerfstudio.gridinr_config import edit_trainer_config, fit_trainer_config


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it (nerfstudio's launcher catches only KeyboardInterrupt)."""


@contextlib.contextmanager
def killed_at_step(monkeypatch: pytest.MonkeyPatch, kill_at: int) -> Iterator[None]:
    """Inside the block nerfstudio's Trainer dies (`Killed`) on reaching step `kill_at`; the block must die so."""
    from nerfstudio.engine.trainer import Trainer

    train_iteration = Trainer.train_iteration

    def dies_at_kill_step(self, step):
        if step == kill_at:
            raise Killed()
        return train_iteration(self, step)

    monkeypatch.setattr(Trainer, "train_iteration", dies_at_kill_step)
    try:
        with pytest.raises(Killed):
            yield
    finally:
        monkeypatch.setattr(Trainer, "train_iteration", train_iteration)


def run_ns_train(config) -> None:
    """nerfstudio's ns-train main, then its event writers closed and forgotten.

    nerfstudio keeps writers in a module-level list that each run appends to: in one test process every later
    run would also write to every earlier run's tensorboard file (and fail once a test moved that folder).
    """
    from nerfstudio.utils import writer

    try:
        ns_train_main(config)
    finally:
        for event_writer in writer.EVENT_WRITERS:
            if hasattr(event_writer, "tb_writer"):
                event_writer.tb_writer.close()
        writer.EVENT_WRITERS.clear()
        writer.EVENT_STORAGE.clear()


def run_of(iterations: int) -> TrainingCallbackAttributes:
    """What a trainer hands the training callbacks of a run of `iterations` steps (only its config is read)."""
    trainer = SimpleNamespace(config=SimpleNamespace(max_num_iterations=iterations))
    return TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=None, trainer=trainer)


def shrink_dataparser(dataparser, cache_dir: Path, image_size: int = 32) -> None:
    """Few small views and short rays: references render in a blink."""
    dataparser.num_train_views = 4
    dataparser.num_eval_views = 2
    dataparser.image_size = image_size
    dataparser.render.num_samples = 64
    dataparser.cache_dir = cache_dir


def short_run(config, output_dir: Path, timestamp: str, iterations: int):
    """`iterations` steps, no viewer, no evaluation (during training or at the end: a test that wants the final
    evaluation sets `final_evaluation`), one checkpoint at the end."""
    config.output_dir = output_dir
    config.timestamp = timestamp
    config.vis = "tensorboard"
    config.max_num_iterations = iterations
    config.steps_per_eval_image = config.steps_per_eval_batch = config.steps_per_eval_all_images = iterations + 1
    config.steps_per_save = iterations
    config.final_evaluation = False
    return config


def train_tiny_fit(output_dir: Path, data: Path = BUILTIN_DEFAULT, iterations: int = 60, image_size: int = 32,
                   full_field: bool = False, preset: Optional[str] = None, configure: Optional[Callable] = None,
                   timestamp: str = "tiny", datamanager_overrides: Optional[dict] = None,
                   **dataparser_overrides) -> Path:
    """Train a small gridinr-fit run (tiny field unless `full_field`); returns its config.yml.

    `configure(config)` may change the trainer config last, just before ns-train runs it."""
    config = short_run(fit_trainer_config(), output_dir, timestamp, iterations)
    config.pipeline.datamanager.dataparser.data = data
    shrink_dataparser(config.pipeline.datamanager.dataparser, output_dir / "references", image_size)
    config.pipeline.datamanager.dataparser.render.preset = preset
    for key, value in dataparser_overrides.items():
        setattr(config.pipeline.datamanager.dataparser, key, value)
    config.pipeline.datamanager.batch_size = 1 << 14 if full_field else 1 << 12
    for key, value in (datamanager_overrides or {}).items():
        setattr(config.pipeline.datamanager, key, value)
    if not full_field:
        field = config.pipeline.model.field
        # Every size spelled out: the tiny field does not follow the machine's defaults (compact on a CPU).
        field.num_levels, field.log2_hashmap_size, field.max_resolution, field.hidden_dim = 8, 14, 64, 32
        field.features_per_level, field.num_hidden_layers = 2, 2
    if configure is not None:
        configure(config)
    run_ns_train(config)
    return config.get_base_dir() / "config.yml"


def train_tiny_edit(output_dir: Path, stage1_config: Path, iterations: int = 10, target_image: Optional[Path] = None,
                    clip_weights: Optional[Path] = None, clip_model: Optional[str] = None, lam_clip: float = 0.0,
                    configure: Optional[Callable] = None) -> Path:
    """Train a small gridinr-edit run on a tiny stage-1 run; returns its config.yml."""
    config = short_run(edit_trainer_config(), output_dir, "tiny-edit", iterations)
    pipeline = config.pipeline
    pipeline.stage1_config = stage1_config
    pipeline.steps_per_render = max(1, iterations // 2)
    model = pipeline.model
    model.lam_clip = lam_clip
    model.hidden_dim = 32
    model.target_image = target_image
    if clip_weights is not None:
        model.clip_weights = clip_weights
    if clip_model is not None:
        model.clip_model = clip_model
    if configure is not None:
        configure(config)
    run_ns_train(config)
    return config.get_base_dir() / "config.yml"


def relocated_run(config_path: Path, output_dir: Path, data: Optional[Path] = None, checkpoints: bool = True) -> Path:
    """A copy of a run under `output_dir` whose config.yml records the copy, as if it had been trained there (so
    nerfstudio's own ns-eval reads it in place), optionally on another volume and without its checkpoints."""
    import shutil

    import yaml

    from gridinr_nerfstudio.runs import load_run_config

    config = load_run_config(config_path)
    config.output_dir = Path(output_dir)
    if data is not None:
        config.pipeline.datamanager.dataparser.data = Path(data)
    base = config.get_base_dir()
    shutil.copytree(Path(config_path).parent, base, ignore=None if checkpoints else shutil.ignore_patterns("*.ckpt"))
    config.pipeline.run_dir = base
    (base / "config.yml").write_text(yaml.dump(config))
    return base / "config.yml"
