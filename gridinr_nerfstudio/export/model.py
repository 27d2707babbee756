"""The field alone as a safetensors file: hash table, MLP and scene box, with the field's sizes and the volume's
metadata (dims, spacing, dtype, value range, variable, time step) in the file's metadata.

Such a file is all `gridinr-export volume --model FILE` needs (no nerfstudio run folder). `half=True` stores the
table and MLP as float16 (half the bytes; they are decoded in float32); the scene box stays float32.
Compression is reported against the raw volume in its own dtype, with the volume PSNR of what was stored.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from gridinr_nerfstudio.export.source import ExportError, ExportSource, VolumeMeta
from gridinr_nerfstudio.safe_write import ProtectedFiles, atomic_output

FORMAT = "gridinr-field"
FORMAT_VERSION = "1"


def field_parameter_count(field) -> int:
    return int(sum(p.numel() for p in field.parameters()))


def half_precision_copy(field):
    """A float32 copy of `field` whose table and MLP went through float16 (what a --half file decodes to)."""
    rounded = copy.deepcopy(field)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.half().float())
    return rounded


@dataclass
class ModelExport:
    path: Path
    params: int
    file_bytes: int
    fp32_bytes: int  # parameters only
    fp16_bytes: int
    volume_bytes: int
    half: bool
    psnr_fp32_db: Optional[float]  # volume PSNR (native resolution, normalised units), when the raw volume is known
    psnr_fp16_db: Optional[float]

    @property
    def compression_ratio(self) -> float:
        """Raw volume bytes over the file's bytes."""
        return self.volume_bytes / self.file_bytes


def save_model(source: ExportSource, output: Path, half: bool = False, measure_psnr: bool = True,
               overwrite: bool = False) -> ModelExport:
    """Write `source.field` (+ metadata) to `output` (.safetensors) through safe_write.py."""
    from safetensors.torch import save_file

    from gridinr_nerfstudio.export.volume import check_output

    output = Path(output)
    check_output(output, (".safetensors",), overwrite)
    field = source.field
    state = {key: value.detach().cpu().contiguous() for key, value in field.state_dict().items()}
    if half:
        state = {key: value if key == "aabb" else value.half() for key, value in state.items()}
    settings = asdict(field.settings)
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "field_settings": json.dumps(settings),
                "volume": json.dumps(source.meta.to_json()), "source": source.origin,
                "timesteps": json.dumps(list(source.timesteps))}
    try:
        with atomic_output(output, overwrite, source.inputs) as temporary:
            save_file(state, str(temporary), metadata=metadata)
    except OSError as error:
        raise ExportError(f"{output}: cannot write ({error.strerror or error})") from None
    params = field_parameter_count(field)
    psnr32 = psnr16 = None
    if measure_psnr and source.volume is not None:
        from gridinr_nerfstudio.stages.fit.model import volume_psnr

        device = field.aabb.device
        psnr32 = volume_psnr(field.forward_unit, source.volume, device)
        psnr16 = volume_psnr(half_precision_copy(field).forward_unit, source.volume, device)
    return ModelExport(output, params, output.stat().st_size, params * 4, params * 2, source.meta.volume_bytes,
                       half, psnr32, psnr16)


def load_model(path: Path) -> ExportSource:
    """The field and volume metadata of a file written by `save_model` (no run folder needed)."""
    from safetensors import SafetensorError, safe_open

    from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ExportError(f"{path}: not a safetensors file ({' '.join(str(error).split())})") from None
    if metadata.get("format") != FORMAT:
        raise ExportError(f"{path}: not a gridinr field file (no format={FORMAT!r} in its metadata)")
    try:
        settings = VolumeFieldSettings(**{**json.loads(metadata["field_settings"]), "backend": "auto"})
        meta = VolumeMeta.from_json(json.loads(metadata["volume"]))
        timesteps = tuple(int(step) for step in json.loads(metadata.get("timesteps", "[]")))
        field = VolumeField(state["aabb"].float(), settings, num_times=max(len(timesteps), 1))
        field.load_state_dict({key: value.float() for key, value in state.items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ExportError(f"{path}: malformed gridinr field file ({' '.join(str(error).split())[:300]})") from None
    field.requires_grad_(False).eval()
    return ExportSource(field=field, meta=meta, origin=f"model file {path}", timesteps=timesteps,
                        inputs=ProtectedFiles([(path, "the field file being exported")]))
