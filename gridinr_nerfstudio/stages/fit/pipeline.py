"""Stage 1 pipeline: point batches for training (through DDP when distributed); image metrics, volume PSNR and speed
for evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

import torch

from gridinr_nerfstudio.stages.base_pipeline import StagePipeline, StagePipelineConfig
from gridinr_nerfstudio.stages.fit.datamanager import FitDataManager, FitDataManagerConfig
from gridinr_nerfstudio.stages.fit.model import FitModelConfig


@dataclass
class FitPipelineConfig(StagePipelineConfig):
    """Stage 1: fit a hash-grid INR to voxel values."""

    _target: Type = field(default_factory=lambda: FitPipeline)
    datamanager: FitDataManagerConfig = field(default_factory=FitDataManagerConfig)
    model: FitModelConfig = field(default_factory=FitModelConfig)
    stage: str = "fit"


class FitPipeline(StagePipeline):
    """Trains the field on point batches instead of rays."""

    config: FitPipelineConfig
    datamanager: FitDataManager

    def get_train_loss_dict(self, step: int):
        """nerfstudio's contract with points for rays: outputs, then `get_metrics_dict` and `get_loss_dict`.

        The points go through `self._model`, the DDP wrapper when distributed, so gradients are averaged."""
        points, batch = self.datamanager.next_train(step)
        outputs = self._model(points, batch.get("times"))
        metrics_dict = self.model.get_metrics_dict(outputs, batch)
        if self.datamanager.learns_from_errors:  # error-weighted batches: where it is still wrong
            self.datamanager.report_errors(points, (outputs["value"].detach() - batch["values"]).square())
        return outputs, self.model.get_loss_dict(outputs, batch, metrics_dict), metrics_dict

    @torch.no_grad()
    def get_eval_loss_dict(self, step: int):
        """The loss on an evaluation batch (its own random stream: training batches do not depend on evaluation)."""
        points, batch = self.datamanager.next_eval(step)
        outputs = self.model.get_point_outputs(points, batch.get("times"))
        return {}, self.model.get_loss_dict(outputs, batch), self.model.get_metrics_dict(outputs, batch)

    def extra_eval_metrics(self) -> dict:
        """Volume PSNR and the sizes behind the compression ratio (raw volume in its dtype, field in fp32 / fp16)."""
        model = self.model
        params = model.count_parameters()
        per_step = model.volume_psnr_per_step(split=True)  # every rank measures its share of the slabs
        sequence = {f"volume_psnr_t{step}": psnr for step, psnr in per_step.items()} if len(per_step) > 1 else {}
        return {
            "volume_psnr": sum(per_step.values()) / len(per_step),
            **sequence,
            "params": params,
            "compression_ratio": model.compression_ratio(),
            "volume_bytes": model.volume_bytes(),
            "model_bytes_fp32": 4 * params,
            "model_bytes_fp16": 2 * params,
        }
