"""Stage 1 model `gridinr-fit`: a hash-grid INR regressed onto voxel values.

Training batches are points with target values (see volume_datamanager); camera rays render the field
through the default transfer function so the viewer shows the volume while it trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Tuple, Type

import numpy as np
import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

from gridinr_nerfstudio import distributed
from gridinr_nerfstudio.data.timesteps import step_times
from gridinr_nerfstudio.data.volume_io import Volume
from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings
from gridinr_nerfstudio.stages.base_model import StageModel, StageModelConfig


@dataclass
class FitModelConfig(StageModelConfig):
    """Hash-grid INR fitted to voxel values."""

    _target: Type = field(default_factory=lambda: FitModel)
    field: VolumeFieldSettings = field(default_factory=VolumeFieldSettings)
    """Encoding and MLP sizes."""
    loss: Literal["l2", "l1"] = "l2"
    """Loss on normalised values."""
    volume_psnr_chunk: int = 1 << 18
    """Voxels evaluated at once when computing the volume PSNR."""


class FitModel(StageModel):
    """Stage 1: fit the field; render it with the default transfer function."""

    config: FitModelConfig
    field_trains = True

    def populate_modules(self):
        super().populate_modules()
        self.field = VolumeField(self.scene_box.aabb.float(), self.config.field, num_times=len(self.volumes))

    def color_fn(self):
        return self.transfer_function()

    def get_training_callbacks(self, training_callback_attributes):
        """The coarse-to-fine schedule over the first `coarse_to_fine` of the run's steps (--max-num-iterations, the
        one place the run's length is set)."""
        callbacks = super().get_training_callbacks(training_callback_attributes)
        ramp = self.config.field.coarse_to_fine * training_callback_attributes.trainer.config.max_num_iterations
        if ramp > 0:  # set each step, so a resumed run continues the schedule where it was

            def advance_levels(step: int) -> None:
                self.field.level_progress = min(1.0, step / ramp)

            callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], advance_levels))
        return callbacks

    def get_param_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        return self.field.param_groups()

    def get_point_outputs(self, points: torch.Tensor, times: torch.Tensor | None = None) -> Dict[str, torch.Tensor]:
        """The field's values (N,) at world points (N, 3) inside the box (at `times` (N,) for a sequence):
        stage 1 trains on points, not rays."""
        return {"value": self.field.forward_unit(self.field.to_unit_cube(points), times)}

    def get_batch_outputs(self, points: torch.Tensor, times: torch.Tensor | None = None) -> Dict[str, torch.Tensor]:
        """A training batch's outputs (what the pipeline's DDP-wrapped model call reaches): `get_point_outputs`."""
        return self.get_point_outputs(points, times)

    def get_metrics_dict(self, outputs, batch) -> Dict[str, torch.Tensor]:
        """PSNR of the batch's values (L2 loss only)."""
        if "value" not in outputs or self.config.loss == "l1":
            return {}
        mse = (outputs["value"].detach() - batch["values"]).square().mean()
        return {"value_psnr": -10.0 * torch.log10(mse.clamp(min=1e-20))}

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        """L2 (or L1) of the field's values against the voxel targets of the batch."""
        error = outputs["value"] - batch["values"]
        return {"value_loss": error.abs().mean() if self.config.loss == "l1" else error.square().mean()}

    def volume_psnr(self) -> float:
        """PSNR (dB) of the field at every voxel centre of the volume (see `volume_psnr`); mean over the steps of a
        sequence."""
        per_step = self.volume_psnr_per_step()
        return float(np.mean(list(per_step.values())))

    def volume_psnr_per_step(self, split: bool = False) -> Dict[int, float]:
        """{time step (1-based, as in the file names): volume PSNR (dB)} for each step the field covers.

        `split`: every rank of a data-parallel run calls this and measures its share of the z-slabs (the squared
        errors are summed over the ranks); otherwise one process measures every voxel."""
        times = step_times(len(self.volumes)).tolist()
        part, parts = (distributed.rank(), distributed.world_size()) if split else (0, 1)
        result = {}
        for step, volume, time in zip(self.timesteps, self.volumes, times):
            def at_time(unit, t=time if len(self.volumes) > 1 else None):
                return self.field.forward_unit(unit, t)

            error = volume_squared_error(at_time, volume, self.aabb.device, self.config.volume_psnr_chunk, part, parts)
            if parts > 1:
                error = tuple(distributed.all_reduce_sum(torch.tensor(error, dtype=torch.float64)).tolist())
            result[step] = psnr_of(*error)
        return result

    def count_parameters(self) -> int:
        return int(sum(p.numel() for p in self.field.parameters()))

    def model_bytes(self) -> int:
        return int(sum(p.numel() * p.element_size() for p in self.field.parameters()))

    def volume_bytes(self) -> int:
        """Bytes of the raw volume in its own dtype (every step of a sequence)."""
        return int(np.prod(self.volume.info.dims)) * np.dtype(self.volume.info.dtype).itemsize * len(self.volumes)

    def compression_ratio(self) -> float:
        """Volume bytes (in its own dtype, all steps of a sequence) over model bytes."""
        return self.volume_bytes() / self.model_bytes()


@torch.no_grad()
def volume_psnr(value_at_unit: Callable[[torch.Tensor], torch.Tensor], volume: Volume, device: torch.device | str = "cpu",
                chunk: int = 1 << 18) -> float:
    """PSNR (dB, normalised units, data range 1) of a field at every voxel centre, at native resolution.

    `value_at_unit` maps points in the unit cube (N, 3) to values (N,); predictions are clamped to [0, 1].
    The volume is read in z-slabs through its memmap, so this works for volumes larger than memory.
    """
    return psnr_of(*volume_squared_error(value_at_unit, volume, device, chunk))


def psnr_of(squared_error: float, count: float) -> float:
    """PSNR (dB, data range 1) of a sum of squared errors over `count` values."""
    mse = squared_error / count
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


@torch.no_grad()
def volume_squared_error(value_at_unit: Callable[[torch.Tensor], torch.Tensor], volume: Volume,
                         device: torch.device | str = "cpu", chunk: int = 1 << 18, part: int = 0,
                         parts: int = 1) -> Tuple[float, int]:
    """(sum of squared errors, voxels) of a field over part `part` of `parts` of the volume's z-slabs (see
    `volume_psnr`; the parts of a data-parallel evaluation add up to the whole)."""
    size_x, size_y, size_z = volume.info.dims
    slab = max(1, chunk // (size_x * size_y))
    axes = [torch.linspace(0.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in (size_x, size_y)]
    grid_y, grid_x = torch.meshgrid(axes[1], axes[0], indexing="ij")
    squared_error, count = 0.0, 0
    for index in distributed.share(-(-size_z // slab), part, parts):
        z0 = index * slab
        z1 = min(size_z, z0 + slab)
        target = torch.from_numpy(volume.normalized_slab(z0, z1)).to(device).float()
        unit_z = torch.arange(z0, z1, device=device, dtype=torch.float32) / max(size_z - 1, 1)
        unit = torch.stack(
            [grid_x.expand(z1 - z0, -1, -1), grid_y.expand(z1 - z0, -1, -1), unit_z[:, None, None].expand(-1, size_y, size_x)],
            dim=-1,
        ).reshape(-1, 3)
        predicted = value_at_unit(unit).reshape(target.shape)
        squared_error += float((predicted.clamp(0, 1) - target).double().square().sum())
        count += target.numel()
    return squared_error, count
