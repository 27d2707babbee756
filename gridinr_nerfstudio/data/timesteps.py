"""Time steps of a sequence: the `--timesteps` selection, the volumes of its steps and their time coordinate.

A run fits one step or a range of steps (1-based, inclusive, numbered as in the file names). The steps of a
sequence share one value range (the joint min/max), so that one transfer function and one field cover them all.
Time as the model and the viewer see it is t in [0, 1]: the first selected step at 0, the last at 1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from gridinr_nerfstudio.data.volume_io import Volume, VolumeError

_RANGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def timesteps_problem(spec: Optional[str]) -> Optional[str]:
    """What is wrong with a `--timesteps` value as written ('all', 'N' or 'A:B', 1-based), or None.

    Whether the steps exist is a question for the volume (`parse_timesteps`)."""
    if spec is None or str(spec).strip() == "" or str(spec).strip().lower() == "all":
        return None
    text = str(spec).strip()
    match = _RANGE.match(text)
    numbers = [int(text)] if text.isdigit() else [int(match[1]), int(match[2])] if match else None
    if numbers is None:
        return "must be 'all', a step N or a range A:B (1-based, inclusive)"
    if min(numbers) < 1:
        return f"has step {min(numbers)} out of range (steps are numbered from 1)"
    if len(numbers) == 2 and numbers[0] > numbers[1]:
        return "is an empty range (A:B needs A <= B)"
    return None


def parse_timesteps(spec: Optional[str], default: int, total: int, where: Path | str) -> list[int]:
    """Steps selected by `spec`: None -> [default]; "all"; "N"; "A:B" (inclusive). Raises VolumeError naming `where`."""
    problem = timesteps_problem(spec)
    if problem is not None:
        raise VolumeError(f"{where}: timesteps {problem}, got {spec!r}")
    if spec is None or str(spec).strip() == "":
        steps = [int(default)]
    elif str(spec).strip().lower() == "all":
        steps = list(range(1, total + 1))
    elif str(spec).strip().isdigit():
        steps = [int(spec)]
    else:
        match = _RANGE.match(str(spec))
        steps = list(range(int(match[1]), int(match[2]) + 1))
    bad = [step for step in steps if not 1 <= step <= total]
    if bad:
        raise VolumeError(f"{where}: time step {bad[0]} out of range (valid: 1..{total})")
    return steps


def share_value_range(volumes: list[Volume]) -> None:
    """Give every step the joint min/max of all steps (one normalisation for the whole sequence)."""
    if len(volumes) < 2:
        return
    low, high = min(v.value_min for v in volumes), max(v.value_max for v in volumes)
    for volume in volumes:
        volume.value_min, volume.value_max = low, high


def step_times(count: int) -> torch.Tensor:
    """Time coordinate (count,) in [0, 1] of each selected step (0 for a single step)."""
    return torch.linspace(0.0, 1.0, count) if count > 1 else torch.zeros(1)


def cameras_over_time(cameras, times: torch.Tensor):
    """The cameras repeated once per time (step-major), each copy carrying its time: (len(times) * N) cameras."""
    from nerfstudio.cameras.cameras import Cameras

    count, steps = len(cameras), len(times)

    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat(steps, *([1] * (tensor.dim() - 1)))

    return Cameras(
        camera_to_worlds=repeat(cameras.camera_to_worlds), fx=repeat(cameras.fx), fy=repeat(cameras.fy),
        cx=repeat(cameras.cx), cy=repeat(cameras.cy), width=repeat(cameras.width), height=repeat(cameras.height),
        camera_type=repeat(cameras.camera_type), times=times.repeat_interleave(count)[:, None].float(),
    )
