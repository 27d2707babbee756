"""What both stages' pipelines share: evaluation with speed figures and a metrics CSV row next to the run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Set, Type

import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE

from gridinr_nerfstudio.eval.eval_log import append_metrics_row
from gridinr_nerfstudio.eval.metrics import drop_nonfinite


@dataclass
class StagePipelineConfig(VanillaPipelineConfig):
    """Shared by both stages: evaluation adds speed figures and a CSV row next to the run."""

    _target: Type = field(default_factory=lambda: StagePipeline)
    run_dir: Optional[Path] = None
    """The run's output folder (filled in when training starts); evaluations append to run_dir/metrics.csv."""
    stage: str = ""
    """Stage name written to the metrics CSV (each stage's config sets its own)."""

    def setup(self, **kwargs):
        """ns-eval, ns-viewer and ns-render set the pipeline up just before nerfstudio picks a checkpoint: a run
        folder it cannot pick one from ends here in one line naming the folder, not in its traceback."""
        if kwargs.get("test_mode", "val") != "val" and self.run_dir is not None:
            from gridinr_nerfstudio.runs import exit_unless_nerfstudio_finds_a_checkpoint

            exit_unless_nerfstudio_finds_a_checkpoint(Path(self.run_dir) / "nerfstudio_models")
        return super().setup(**kwargs)


class StagePipeline(VanillaPipeline):
    """Evaluation common to both stages: nerfstudio's image metrics plus ms/frame, rays/s and a CSV row."""

    config: StagePipelineConfig
    loaded_step: Optional[int] = None
    announced_unavailable: Optional[Set[str]] = None

    def metric_unavailable(self, name: str, reason: str) -> None:
        """Say once per pipeline why metric `name` is left out of evaluations.

        Evaluations leave an unavailable metric out instead of reporting None: nerfstudio's writers (tensorboard,
        wandb, comet) call float() on every value, so a None or a reason string stops training at its first
        evaluation. metrics.csv shows the metric as an empty cell.
        """
        if self.announced_unavailable is None:
            self.announced_unavailable = set()
        if name not in self.announced_unavailable:
            self.announced_unavailable.add(name)
            CONSOLE.print(f"[yellow]{name} is not reported: {reason}[/yellow]")

    def load_pipeline(self, loaded_state, step: int) -> None:
        """Remember the checkpoint's step so ns-eval's CSV row says which step it measured."""
        super().load_pipeline(loaded_state, step)
        self.loaded_step = step

    def get_training_callbacks(self, training_callback_attributes):
        """Training only (never ns-eval): the per-step training log run_dir/train_log.csv (eval/train_log.py)."""
        if self.config.run_dir is not None:
            from gridinr_nerfstudio.eval.train_log import install_train_log

            install_train_log(Path(self.config.run_dir) / "train_log.csv")
        return super().get_training_callbacks(training_callback_attributes)

    def extra_eval_metrics(self) -> dict:
        """Stage-specific metrics added to every full evaluation."""
        return {}

    @torch.no_grad()
    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ):
        started = time.perf_counter()
        metrics = super().get_average_eval_image_metrics(step=step, output_path=output_path, get_std=get_std)
        model = self.model
        metrics["ms_per_frame"] = 1000.0 / metrics["fps"]
        metrics["rays_per_s"] = metrics["num_rays_per_sec"]
        if not model.image_metrics.lpips_available:  # per-view metrics leave it out; say why
            self.metric_unavailable("lpips", model.image_metrics.lpips_unavailable_reason or "LPIPS weights not available")
        metrics.update(self.extra_eval_metrics())
        metrics = {key: value for key, value in metrics.items() if value is not None and not isinstance(value, str)}
        metrics["eval_seconds"] = time.perf_counter() - started
        metrics, dropped = drop_nonfinite(metrics)
        if dropped:
            CONSOLE.print(f"[bold yellow]Warning: {', '.join(dropped)} not finite (renders identical to their "
                          "references, or blank): left out of the metrics")
        if self.config.run_dir is not None:
            append_metrics_row(
                Path(self.config.run_dir) / "metrics.csv",
                run=Path(self.config.run_dir).name,
                stage=self.config.stage,
                step=step if step is not None else (self.loaded_step if self.loaded_step is not None else -1),
                metrics=metrics,
            )
        return metrics
