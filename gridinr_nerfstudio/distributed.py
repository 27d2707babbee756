"""The process group of a data-parallel run, and the few collectives the project uses, all no-ops in one process.

Why one module: the sampler, the pipelines, the trainer and `gridinr-train` all ask "which rank am I, of how many"
and exchange a few small things (evaluation shares, block errors, random states). They ask torch.distributed
directly, whichever launcher started the processes (nerfstudio's `--machine.num-devices`, torchrun), so a rank
is its global rank on every machine. Outside a process group every function answers as rank 0 of 1 and
communicates nothing, so single-process code paths stay as they were.

NCCL moves CUDA tensors only: CPU tensors handed to a collective on NCCL take a round trip through the rank's GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = timedelta(minutes=30)
"""How long a rank waits for the others in a collective (nerfstudio's launcher uses the same)."""


def initialized() -> bool:
    """Whether this process is part of a process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 alone)."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """Number of processes of the run (1 alone)."""
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that writes a run's files (checkpoints, metrics.csv, train_log.csv, renders)."""
    return rank() == 0


def share(count: int, part: Optional[int] = None, parts: Optional[int] = None) -> range:
    """This rank's contiguous share of `count` items (evaluation views, slabs): sizes differ by at most one."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    base, extra = divmod(count, parts)
    start = part * base + min(part, extra)
    return range(start, start + base + (part < extra))


def _collective_device(tensor: torch.Tensor) -> torch.device:
    if initialized() and dist.get_backend() == dist.Backend.NCCL and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (returned for convenience); unchanged alone."""
    if world_size() == 1:
        return tensor
    device = _collective_device(tensor)
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_gather_objects(value: Any) -> List[Any]:
    """[value of rank 0, value of rank 1, ...] on every rank (picklable values); [value] alone."""
    if world_size() == 1:
        return [value]
    gathered: List[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank `source`'s `value` on every rank (the others' `value` is ignored)."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def barrier() -> None:
    """Wait until every rank arrives here."""
    if world_size() > 1:
        dist.barrier()


class MainRankFirst:
    """Context: rank 0 runs the block alone, then the others (e.g. rank 0 renders and caches the reference images
    the others then read instead of rendering them again)."""

    def __enter__(self):
        if world_size() > 1 and not is_main():
            dist.barrier()
        return self

    def __exit__(self, kind, error, traceback):
        if world_size() > 1 and is_main() and kind is None:
            dist.barrier()
        return False


def local_world_size() -> int:
    """Processes of the run on this machine: torchrun's LOCAL_WORLD_SIZE, else nerfstudio's per-machine group."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    if not initialized():
        return 1
    from nerfstudio.utils import comms

    return comms.get_local_size() if comms.LOCAL_PROCESS_GROUP is not None else 1


def threads_per_rank() -> int:
    """The CPU cores this process may use, shared evenly by the ranks on this machine (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size())


@dataclass(frozen=True)
class TorchrunRank:
    """Where torchrun (or any launcher that sets its variables) put this process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_rank() -> Optional[TorchrunRank]:
    """This process's place from RANK, WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE), or None outside torchrun."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(name in os.environ for name in names):
        return None
    world = int(os.environ["WORLD_SIZE"])
    return TorchrunRank(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ["LOCAL_RANK"]),
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def start(place: TorchrunRank, device_type: str, timeout: timedelta = DEFAULT_TIMEOUT) -> str:
    """Join torchrun's process group (MASTER_ADDR/MASTER_PORT from the environment): NCCL on CUDA, gloo on a CPU.

    Sets this rank's GPU (CUDA) and its share of the cores; returns the backend's name."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(place.local_rank)
    dist.init_process_group(backend=backend, init_method="env://", world_size=place.world_size, rank=place.rank,
                            timeout=timeout)
    torch.set_num_threads(threads_per_rank())
    return backend


def stop() -> None:
    """Leave the process group (after a last barrier, so no rank quits while another still sends)."""
    if initialized():
        barrier()
        dist.destroy_process_group()
