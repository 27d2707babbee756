"""Stage 1 pipeline: point batches for training; image metrics, volume PSNR and speed for evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Type

import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from gridinr_nerfstudio.eval_log import append_metrics_row
from gridinr_nerfstudio.fit_model import GridINRFitModelConfig
from gridinr_nerfstudio.volume_datamanager import VolumeDataManagerConfig


@dataclass
class VolumePipelineConfig(VanillaPipelineConfig):
    """Shared by both stages: evaluation adds speed figures and a CSV row next to the run."""

    _target: Type = field(default_factory=lambda: VolumePipeline)
    run_dir: Optional[Path] = None
    """The run's output folder (filled in when training starts); evaluations append to run_dir/metrics.csv."""
    stage: str = "fit"
    """Stage name written to the metrics CSV."""


class VolumePipeline(VanillaPipeline):
    """Evaluation common to both stages: nerfstudio's image metrics plus ms/frame, rays/s and a CSV row."""

    config: VolumePipelineConfig
    loaded_step: Optional[int] = None

    def load_pipeline(self, loaded_state, step: int) -> None:
        """Remember the checkpoint's step so ns-eval's CSV row says which step it measured."""
        super().load_pipeline(loaded_state, step)
        self.loaded_step = step

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
        if not model.image_metrics.lpips_available:
            metrics["lpips"] = None
            metrics["lpips_unavailable"] = model.image_metrics.lpips_unavailable_reason
        metrics.update(self.extra_eval_metrics())
        metrics["eval_seconds"] = time.perf_counter() - started
        if self.config.run_dir is not None:
            append_metrics_row(
                Path(self.config.run_dir) / "metrics.csv",
                run=Path(self.config.run_dir).name,
                stage=self.config.stage,
                step=step if step is not None else (self.loaded_step if self.loaded_step is not None else -1),
                metrics={key: value for key, value in metrics.items() if not isinstance(value, str)},  # reasons stay in JSON
            )
        return metrics


@dataclass
class GridINRFitPipelineConfig(VolumePipelineConfig):
    """Stage 1: fit a hash-grid INR to voxel values."""

    _target: Type = field(default_factory=lambda: GridINRFitPipeline)
    datamanager: VolumeDataManagerConfig = field(default_factory=VolumeDataManagerConfig)
    model: GridINRFitModelConfig = field(default_factory=GridINRFitModelConfig)


class GridINRFitPipeline(VolumePipeline):
    """Trains the field on point batches instead of rays."""

    config: GridINRFitPipelineConfig

    def get_train_loss_dict(self, step: int):
        points, batch = self.datamanager.next_train(step)
        loss_dict = self.model.point_loss(points, batch["values"])
        metrics_dict = {"value_psnr": -10.0 * torch.log10(loss_dict["value_loss"].detach().clamp(min=1e-20))}
        if self.model.config.loss == "l1":
            metrics_dict.pop("value_psnr")
        return {}, loss_dict, metrics_dict

    @torch.no_grad()
    def get_eval_loss_dict(self, step: int):
        points, batch = self.datamanager.next_train(step)
        loss_dict = self.model.point_loss(points, batch["values"])
        return {}, loss_dict, {}

    def extra_eval_metrics(self) -> dict:
        model = self.model
        return {
            "volume_psnr": model.volume_psnr(),
            "params": model.count_parameters(),
            "compression_ratio": model.compression_ratio(),
        }
