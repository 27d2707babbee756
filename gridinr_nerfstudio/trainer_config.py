"""TrainerConfig and optimizer config tweaks shared by our methods."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Type

import torch
from nerfstudio.configs.base_config import MachineConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig, OptimizerConfig
from nerfstudio.engine.schedulers import Scheduler, SchedulerConfig

from gridinr_nerfstudio.hash_encoding import HashGridAdam
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
        """Called by ns-train just before training: fill in what follows from the final CLI values."""
        if hasattr(self.pipeline, "run_dir"):
            self.pipeline.run_dir = self.get_base_dir()
        if hasattr(self.pipeline.datamanager, "max_iterations"):
            self.pipeline.datamanager.max_iterations = self.max_num_iterations
        for group in self.optimizers.values():
            if isinstance(group.get("scheduler"), LogLinearDecaySchedulerConfig):
                group["scheduler"].max_steps = self.max_num_iterations
        super().save_config()


@dataclass
class HashGridAdamOptimizerConfig(OptimizerConfig):
    """Lazy fused Adam for hash tables (only the entries a batch touched move; see hash_encoding.HashGridAdam)."""

    _target: Type = HashGridAdam


def default_machine() -> MachineConfig:
    """CUDA when present, else the CPU (nerfstudio's own default assumes CUDA)."""
    return MachineConfig(device_type="cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """Adam with torch's fused kernel (CPU and CUDA): one pass over the big hash table instead of several."""

    _target: Type = torch.optim.Adam
    fused: Optional[bool] = True


@dataclass
class LogLinearDecaySchedulerConfig(SchedulerConfig):
    """Learning rate decaying exponentially from the optimizer's lr to `lr_final` over `max_steps`."""

    _target: Type = field(default_factory=lambda: LogLinearDecayScheduler)
    lr_final: float = 1e-4
    max_steps: int = 3000


class LogLinearDecayScheduler(Scheduler):
    """nerfstudio's ExponentialDecayScheduler without warm-up, returning Python floats.

    nerfstudio's version returns numpy scalars, which end up in the checkpoint's scheduler state and make
    `torch.load(weights_only=True)` (torch's default, used by ns-eval and ns-viewer) refuse the file.
    """

    config: LogLinearDecaySchedulerConfig

    def get_scheduler(self, optimizer: torch.optim.Optimizer, lr_init: float) -> torch.optim.lr_scheduler.LRScheduler:
        ratio = self.config.lr_final / lr_init

        def multiplier(step: int) -> float:
            progress = min(max(step / self.config.max_steps, 0.0), 1.0)
            return float(math.exp(math.log(ratio) * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=multiplier)
