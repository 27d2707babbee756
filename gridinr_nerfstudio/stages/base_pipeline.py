"""What both stages' pipelines share: data-parallel training, evaluation with speed figures and a metrics CSV row.

Data parallelism (PyTorch DDP, both stages): the model is wrapped in DistributedDataParallel when the run has
several processes, and each stage's training batch goes through the wrapper's forward (`self._model(...)`), so
gradients are averaged over the ranks (calling the model's methods directly would bypass it: nerfstudio issue
1847). nerfstudio's own wrap passes `device_ids`, which a CPU process cannot take; this one does so on CUDA only.
Checkpoints keep the keys of a single-process run (`_model.*`, never `_model.module.*`), so stage 2, ns-eval,
gridinr-export and the viewer read a distributed run like any other. Rank 0 alone writes files (metrics.csv,
train_log.csv, renders, checkpoints); a full evaluation is split across the ranks, each rendering its share of the
views (and stage 1 its share of the volume PSNR's slabs), never repeated on every rank.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple, Type

import torch
from nerfstudio.data.utils.dataloaders import FixedIndicesEvalDataloader
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch.nn.parallel import DistributedDataParallel

from gridinr_nerfstudio import distributed
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

    def prepare_run(self, trainer_config) -> None:
        """Called by ns-train (once, before config.yml is written and any rank starts): fill in what follows from
        the final command-line values. Here: the run folder, for the metrics CSV; stages add their own."""
        self.run_dir = trainer_config.get_base_dir()


class StagePipeline(VanillaPipeline):
    """Training through DDP when distributed; evaluation common to both stages: nerfstudio's image metrics plus
    ms/frame, rays/s and a CSV row."""

    config: StagePipelineConfig
    loaded_step: Optional[int] = None
    announced_unavailable: Optional[Set[str]] = None

    def __init__(self, config: StagePipelineConfig, device: str, test_mode: str = "val", world_size: int = 1,
                 local_rank: int = 0, grad_scaler=None):
        if world_size > 1:
            torch.set_num_threads(distributed.threads_per_rank())
            if torch.device(device).type == "cuda":
                torch.cuda.set_device(torch.device(device))  # collectives of objects use the current device
        # Rank 0 first: it renders and caches the reference images, which the other ranks then read.
        with distributed.MainRankFirst():
            super().__init__(config, device=device, test_mode=test_mode, world_size=1, local_rank=local_rank,
                             grad_scaler=grad_scaler)  # world_size 1: nerfstudio's DDP wrap is CUDA-only
        self.world_size = world_size
        if world_size > 1:
            cuda = torch.device(device).type == "cuda"
            self._model = DistributedDataParallel(
                self._model,
                device_ids=[torch.device(device).index or 0] if cuda else None,
                find_unused_parameters=True,  # a batch may leave a parameter out (nerfstudio wraps the same way)
                broadcast_buffers=False,  # buffers (the box, masks) are equal on every rank and never trained
            )

    def state_dict(self, *args, **kwargs):
        """The keys of a single-process run: DDP's `module.` level is left out of `_model.module.*`."""
        state = super().state_dict(*args, **kwargs)
        if not isinstance(self._model, DistributedDataParallel):
            return state
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        wrapped = f"{prefix}_model.module."
        for key in [key for key in state if key.startswith(wrapped)]:
            state[f"{prefix}_model.{key[len(wrapped):]}"] = state.pop(key)
        return state

    def metric_unavailable(self, name: str, reason: str) -> None:
        """Say once per pipeline why metric `name` is left out of evaluations.

        Evaluations leave an unavailable metric out instead of reporting None: nerfstudio's writers (tensorboard,
        wandb, comet) call float() on every value, so a None or a reason string stops training at its first
        evaluation. metrics.csv shows the metric as an empty cell.
        """
        if self.announced_unavailable is None:
            self.announced_unavailable = set()
        if name not in self.announced_unavailable and distributed.is_main():
            self.announced_unavailable.add(name)
            CONSOLE.print(f"[yellow]{name} is not reported: {reason}[/yellow]")

    def load_pipeline(self, loaded_state, step: int) -> None:
        """Remember the checkpoint's step so ns-eval's CSV row says which step it measured."""
        super().load_pipeline(loaded_state, step)
        self.loaded_step = step

    def get_training_callbacks(self, training_callback_attributes):
        """Training only (never ns-eval): the per-step training log run_dir/train_log.csv (eval/train_log.py),
        written by rank 0."""
        if self.config.run_dir is not None and distributed.is_main():
            from gridinr_nerfstudio.eval.train_log import install_train_log

            install_train_log(Path(self.config.run_dir) / "train_log.csv")
        return super().get_training_callbacks(training_callback_attributes)

    def extra_eval_metrics(self) -> dict:
        """Stage-specific metrics added to every full evaluation (every rank calls this: split work there)."""
        return {}

    @torch.no_grad()
    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ):
        """Every eval view's metrics, averaged, plus speed, stage metrics and a metrics.csv row.

        With several ranks every rank calls this (a collective): each renders its share of the views, the
        per-rank averages are combined, and rank 0 writes the row; every rank returns the same numbers."""
        started = time.perf_counter()
        self.model.use_current_field()
        dataset = self.datamanager.eval_dataset
        views = list(distributed.share(len(dataset)))
        metrics: Dict[str, float] = {}
        if views:  # more ranks than views: some have none
            loader = FixedIndicesEvalDataloader(dataset, image_indices=tuple(views), device=self.device)
            metrics = self.get_average_image_metrics(loader, "eval", step, output_path, get_std)
        metrics = combine_rank_averages(distributed.all_gather_objects((len(views), metrics)), get_std)
        model = self.model
        metrics["ms_per_frame"] = 1000.0 / metrics["fps"]
        metrics["rays_per_s"] = metrics["num_rays_per_sec"]
        if not model.image_metrics.lpips_available:  # per-view metrics leave it out; say why
            self.metric_unavailable("lpips", model.image_metrics.lpips_unavailable_reason or "LPIPS weights not available")
        metrics.update(self.extra_eval_metrics())
        metrics = {key: value for key, value in metrics.items() if value is not None and not isinstance(value, str)}
        metrics["eval_seconds"] = time.perf_counter() - started
        metrics, dropped = drop_nonfinite(metrics)
        if dropped and distributed.is_main():
            CONSOLE.print(f"[bold yellow]Warning: {', '.join(dropped)} not finite (renders identical to their "
                          "references, or blank): left out of the metrics")
        if self.config.run_dir is not None and distributed.is_main():
            append_metrics_row(
                Path(self.config.run_dir) / "metrics.csv",
                run=Path(self.config.run_dir).name,
                stage=self.config.stage,
                step=step if step is not None else (self.loaded_step if self.loaded_step is not None else -1),
                metrics=metrics,
            )
        return metrics


def combine_rank_averages(parts: List[Tuple[int, Dict[str, float]]], with_std: bool = False) -> Dict[str, float]:
    """The average over all views of per-rank averages `(views, {metric: mean, [metric_std: std]})`.

    Means are weighted by the views behind them; standard deviations (unbiased, as torch.std_mean's) are pooled
    from the parts' means and deviations, so the result equals the statistics of all views at once."""
    parts = [(count, values) for count, values in parts if count > 0]
    if len(parts) == 1:
        return dict(parts[0][1])
    total = sum(count for count, _ in parts)
    names = [name for name in parts[0][1] if not (with_std and name.endswith("_std"))]
    combined: Dict[str, float] = {}
    for name in names:
        mean = sum(count * values[name] for count, values in parts) / total
        combined[name] = mean
        if with_std and f"{name}_std" in parts[0][1]:
            spread = sum(((count - 1) * values[f"{name}_std"] ** 2 if count > 1 else 0.0)  # one view: std is NaN
                         + count * (values[name] - mean) ** 2 for count, values in parts)
            combined[f"{name}_std"] = math.sqrt(spread / max(total - 1, 1))
    return combined
