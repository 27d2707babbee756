"""TrainerConfig and optimizer config tweaks shared by our methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Type

import torch
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.trainer import TrainerConfig


@dataclass
class GridINRTrainerConfig(TrainerConfig):
    """Records the run folder in the pipeline config, so evaluations (also ns-eval) write the CSV next to the run."""

    def set_experiment_name(self) -> None:
        if self.experiment_name is None and self.pipeline.datamanager.data is None:
            data = self.pipeline.datamanager.dataparser.data
            self.experiment_name = (data.parent if data.is_file() else data).stem or "volume"
        super().set_experiment_name()

    def save_config(self) -> None:
        if hasattr(self.pipeline, "run_dir"):
            self.pipeline.run_dir = self.get_base_dir()
        super().save_config()


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """Adam with torch's fused kernel (CPU and CUDA): one pass over the big hash table instead of several."""

    _target: Type = torch.optim.Adam
    fused: Optional[bool] = True
