"""What an export reads: the fitted field, the metadata of the volume it was fitted to, and (from a run folder)
the raw voxels and the run's model.

Two origins: a run folder (`from_run`, the config.yml of a gridinr-fit or gridinr-edit run; an edit run's field is
its frozen stage-1 field) or a field file written by `gridinr-export model` (`export/model.py`), which needs no run.
Geometry follows DESIGN.md: the field's unit cube spans the voxel centres, so voxel index i of an axis with n voxels
sits at unit coordinate i / (n - 1) and at physical position i * spacing (origin at the first voxel centre).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field as dataclass_field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from gridinr_nerfstudio.safe_write import ProtectedFiles


class ExportError(Exception):
    """Bad export input (a missing file, an isovalue outside the data range, ...): one line naming the problem."""


@dataclass
class VolumeMeta:
    """The volume a field was fitted to: enough to decode it in the data's own units, dtype and geometry."""

    name: str
    variable: str
    timestep: int
    dims: tuple[int, int, int]  # (X, Y, Z)
    spacing: tuple[float, float, float]
    dtype: str
    value_min: float
    value_max: float

    @property
    def extent(self) -> np.ndarray:
        """Physical size (x, y, z) between the first and last voxel centres."""
        return (np.asarray(self.dims, dtype=np.float64) - 1) * np.asarray(self.spacing, dtype=np.float64)

    @property
    def volume_bytes(self) -> int:
        """Bytes of the raw volume in its own dtype (what compression ratios are measured against)."""
        return int(np.prod(self.dims)) * np.dtype(self.dtype).itemsize

    def to_data_units(self, normalized: np.ndarray) -> np.ndarray:
        """Normalised values -> original units (float64)."""
        return np.asarray(normalized, dtype=np.float64) * (self.value_max - self.value_min) + self.value_min

    def to_normalized(self, value: float) -> float:
        """A value in original units -> normalised units."""
        span = self.value_max - self.value_min
        return (value - self.value_min) / span if span > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "VolumeMeta":
        return cls(
            name=str(data["name"]), variable=str(data["variable"]), timestep=int(data["timestep"]),
            dims=tuple(int(n) for n in data["dims"]), spacing=tuple(float(s) for s in data["spacing"]),
            dtype=str(data["dtype"]), value_min=float(data["value_min"]), value_max=float(data["value_max"]),
        )

    @classmethod
    def from_volume(cls, volume) -> "VolumeMeta":
        info = volume.info
        return cls(name=info.name, variable=volume.variable, timestep=int(volume.timestep),
                   dims=tuple(int(n) for n in info.dims), spacing=tuple(float(s) for s in info.spacing),
                   dtype=info.dtype, value_min=float(volume.value_min), value_max=float(volume.value_max))


@dataclass
class ExportSource:
    """A field to export with its volume metadata; `volume` (raw voxels) and `model` only when read from a run."""

    field: Any  # VolumeField
    meta: VolumeMeta
    origin: str  # "gridinr-fit run PATH", "gridinr-edit run PATH" or "model file PATH"
    volume: Optional[Any] = None  # data.volume_io.Volume
    model: Optional[Any] = None  # stages.base_model.StageModel
    timesteps: tuple[int, ...] = ()  # a sequence field's steps (file numbering); () for a one-step field
    inputs: ProtectedFiles = dataclass_field(default_factory=ProtectedFiles)  # files read: never written over

    def at_timestep(self, timestep: Optional[float]) -> "ExportSource":
        """The field at one time step (1-based, as in the file names): any step of a sequence field, a fraction
        between two of its steps (the field's blend in between; no reference volume there), or the one step a
        single-step field was fitted to. None: the single step, or a sequence's first step."""
        steps = self.timesteps or (self.meta.timestep,)
        if timestep is None:
            timestep = steps[0]
        whole = float(timestep).is_integer()
        between = len(steps) > 1 and not whole and steps[0] < timestep < steps[-1]
        if not between and (not whole or int(timestep) not in steps):
            raise ExportError(f"{self.origin}: the field was fitted to time step(s) {', '.join(map(str, steps))}, "
                              f"got --timestep {timestep:g}")
        if len(steps) == 1:
            return self
        from gridinr_nerfstudio.data.timesteps import step_times

        if between:  # steps of a sequence are consecutive (A:B), so time is linear in the step number
            time, volume, label = (timestep - steps[0]) / (steps[-1] - steps[0]), None, float(timestep)
        else:
            index = steps.index(int(timestep))
            time = float(step_times(len(steps))[index])
            volume = self.model.volumes[index] if self.model is not None else None
            label = int(timestep)
        return replace(self, field=FieldAtTime(self.field, float(time)), meta=replace(self.meta, timestep=label),
                       volume=volume, timesteps=())


class FieldAtTime(nn.Module):
    """A sequence field seen at one time, with the interface the exporters decode (`forward_unit`, `aabb`)."""

    def __init__(self, field: nn.Module, time: float):
        super().__init__()
        self.field, self.time = field, time

    @property
    def aabb(self) -> torch.Tensor:
        return self.field.aabb

    def forward_unit(self, unit_points: torch.Tensor) -> torch.Tensor:
        return self.field.forward_unit(unit_points, self.time)


def from_run(config_path: Path) -> ExportSource:
    """The field, volume and model of a gridinr run folder (config.yml read without running code)."""
    from gridinr_nerfstudio.runs import RunConfigError, load_run_pipeline
    from gridinr_nerfstudio.stages.base_model import StageModel

    config_path = Path(config_path)
    if not config_path.is_file():
        raise ExportError(f"{config_path}: no such config file (give a run's config.yml)")
    try:
        config, pipeline, checkpoint, _ = load_run_pipeline(config_path, test_mode="inference")
    except (RunConfigError, FileNotFoundError, ValueError) as error:
        raise ExportError(" ".join(str(error).split())) from None
    model = pipeline.model
    if not isinstance(model, StageModel):
        raise ExportError(f"{config_path}: not a gridinr run (model {type(model).__name__})")
    model.field.eval()
    timesteps = tuple(int(step) for step in model.timesteps) if len(model.timesteps) > 1 else ()
    return ExportSource(field=model.field, meta=VolumeMeta.from_volume(model.volume),
                        origin=f"{config.method_name} run {config_path}", volume=model.volume, model=model,
                        timesteps=timesteps, inputs=run_inputs(config_path, checkpoint, model))


def run_inputs(config_path: Path, checkpoint: Path, model) -> ProtectedFiles:
    """Every file a run's export reads (config, checkpoint, stage-1 field, each step's volume files): exports never
    write over them, not even with --overwrite (the reference-renderings cache is not among them)."""
    inputs = ProtectedFiles([(config_path, "the run's config"), (checkpoint, "the run's checkpoint")])
    stage1 = getattr(model.config, "stage1_checkpoint", None)
    if stage1 is not None:
        inputs.add(Path(stage1), "the edit run's stage-1 field")
    for volume in model.volumes:
        for path, what in volume_input_files(volume):
            inputs.add(path, what)
    return inputs


def volume_input_files(volume) -> list[tuple[Path, str]]:
    """(path, description) of the files a volume is read from: its voxels, and its dataset.json or header file."""
    files = []
    if volume.source_file is not None:
        files.append((Path(volume.source_file), "the run's volume file (what it was trained on)"))
    info_path = Path(volume.info.path)
    if info_path.is_dir():
        files.append((info_path / "dataset.json", "the dataset.json of the run's volume"))
    elif info_path.exists() and info_path != volume.source_file:
        files.append((info_path, "the header file of the run's volume"))
    return files
