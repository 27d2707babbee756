"""Defaults that depend on the device a run trains and renders on, picked in one place.

Why: the CPU defaults (batches of 2^16 points, 2^15-ray render chunks, the lazy C++ Adam pass) were measured on a
2-core CPU and leave a GPU idle most of a step. Each option below takes 0 (or "auto") to mean "the default for the
device it runs on", resolved when the datamanager, model or optimizer is built on that device, so one config.yml
works on either; any other value overrides it (``--pipeline.datamanager.batch-size 65536``,
``--pipeline.model.render-chunk-rays 32768``, ``--optimizers.encoding.optimizer.mode dense``).

| option | CPU | CUDA |
| --- | --- | --- |
| points per stage-1 batch (``batch_size``) | 2^16 | 2^18 |
| rays per render chunk (``render_chunk_rays``) | 2^15 | 2^18 |
| hash-table optimizer (``mode``) | lazy (HashGridAdam, fused C++ pass) | lazy (one-pass Triton kernel), dense fused Adam without triton |

The CUDA values are estimates for large GPUs (an H200 moves 2^18-point batches in well under a millisecond of
encoding time, so smaller batches are dominated by launch overheads); they have not been tuned by measurement yet
(README, "GPU"). ``gridinr-bench fit --device cuda`` compares batch sizes and both optimizers side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Union

import torch

from gridinr_nerfstudio.fields.hash_grid import _backend

HashOptimizer = Literal["lazy", "dense"]


@dataclass(frozen=True)
class DeviceDefaults:
    batch_size: int
    """Points per stage-1 training batch."""
    render_chunk_rays: int
    """Rays rendered at once for whole images."""
    hash_optimizer: HashOptimizer
    """"lazy": HashGridAdam (only touched table entries move, as in tiny-cuda-nn); "dense": torch's fused Adam."""


CPU_DEFAULTS = DeviceDefaults(batch_size=1 << 16, render_chunk_rays=1 << 15, hash_optimizer="lazy")
CUDA_DEFAULTS = DeviceDefaults(batch_size=1 << 18, render_chunk_rays=1 << 18, hash_optimizer="lazy")


def device_defaults(device: Union[torch.device, str]) -> DeviceDefaults:
    """The defaults for ``device`` (a CUDA GPU or anything else, treated as a CPU)."""
    if torch.device(device).type == "cuda":
        # Without triton the lazy pass on CUDA is several masked torch ops over the whole table: use dense Adam.
        return CUDA_DEFAULTS if _backend.triton_available() else replace(CUDA_DEFAULTS, hash_optimizer="dense")
    return CPU_DEFAULTS


def resolve(value: int, name: str, device: Union[torch.device, str]) -> int:
    """``value``, or the device's default for option ``name`` when ``value`` is 0 (or negative)."""
    return value if value > 0 else getattr(device_defaults(device), name)
