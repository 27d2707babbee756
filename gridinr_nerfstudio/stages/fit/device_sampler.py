"""Stage-1 point sampling resident on the training device: the volume uploaded once, every batch made there.

Why: on a GPU the CPU sampler (``VolumePointSampler``) draws voxel indices, shuffles epochs and builds positions
on the host and copies each batch over, which measured as a large share of a 14 ms H200 step. When the volume
fits in a quarter of the device's memory (``resident_fits``), ``DeviceVolumePointSampler`` holds it there and makes
epoch permutations, index sorts, voxel-centre positions, exact targets and continuous points with trilinear
targets on the device, from a device generator. Same sampling rules as the CPU sampler (every voxel once per
epoch, batches sorted by voxel index, the last ``continuous_fraction`` of a batch continuous, the strided coarse
phase), different random streams. Written device-agnostically, so it is tested on CPU tensors
(``resident="on"``) against the CPU sampler.
"""

from __future__ import annotations

from typing import Literal, Tuple, Union

import numpy as np
import torch

from gridinr_nerfstudio.data.volume_io import Volume
from gridinr_nerfstudio.stages.fit.datamanager import Sampling, VolumePointSampler

Resident = Literal["auto", "on", "off"]
RESIDENT_MEMORY_SHARE = 0.25  # a volume (float32) up to this share of the device's memory is uploaded


def resident_fits(num_voxels: int, device: Union[torch.device, str]) -> bool:
    """True on a CUDA device whose total memory is at least 4x the volume's float32 copy."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return num_voxels * 4 <= RESIDENT_MEMORY_SHARE * total


class DeviceVolumePointSampler(VolumePointSampler):
    """``VolumePointSampler`` with the volume and all batch making on ``device`` (see the module doc)."""

    def __init__(self, volume: Volume, aabb: torch.Tensor, device: Union[torch.device, str] = "cpu",
                 sampling: Sampling = "voxels", continuous_fraction: float = 0.0, subsample_factor: int = 4,
                 coarse_steps: int = 0, seed: int = 0):
        num_voxels = int(np.prod(volume.info.dims))
        # preload_max_bytes = the volume's size: always held in memory (then on the device), never memmapped.
        super().__init__(volume, aabb, device=device, sampling=sampling, continuous_fraction=continuous_fraction,
                         subsample_factor=subsample_factor, coarse_steps=coarse_steps,
                         preload_max_bytes=num_voxels * 4, seed=seed)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.aabb = self.aabb.to(self.device)
        self.dims = self.dims.to(self.device)
        self.dims_host = tuple(int(d) for d in volume.info.dims)
        self.index_dtype = torch.int32 if self.num_voxels < 2**31 else torch.int64

    def subgrid_indices(self, count: int) -> torch.Tensor:
        stride = self.subsample_factor
        cells = torch.div(self.dims - 1, stride, rounding_mode="floor") + 1
        unit = torch.rand(count, 3, generator=self.generator, device=self.device)
        voxel = torch.floor(unit * cells).long() * stride
        return (voxel[:, 0] + self.dims[0] * (voxel[:, 1] + self.dims[1] * voxel[:, 2])).sort().values

    def epoch_indices(self, count: int) -> torch.Tensor:
        chunks = []
        while count > 0:
            if self.epoch_order is None or self.epoch_position >= self.num_voxels:
                self.epoch_order = torch.randperm(self.num_voxels, generator=self.generator, device=self.device,
                                                  dtype=self.index_dtype)
                self.epoch_position = 0
            chunk = self.epoch_order[self.epoch_position : self.epoch_position + count]
            self.epoch_position += chunk.numel()
            count -= chunk.numel()
            chunks.append(chunk)
        return torch.cat(chunks).sort().values

    def voxel_batch(self, flat_index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        flat_index = flat_index.to(self.device, torch.int64)
        size_x, size_y, _ = self.dims_host
        voxel = torch.stack([flat_index % size_x, flat_index // size_x % size_y, flat_index // (size_x * size_y)], -1)
        unit = voxel.float() / (self.dims - 1).clamp(min=1).float()
        points = torch.addcmul(self.aabb[0], unit, self.aabb[1] - self.aabb[0])
        return points, self.dense.volume.view(-1)[flat_index]

    def values_at(self, points: torch.Tensor) -> torch.Tensor:
        return self.dense(points.to(self.device))

    def continuous_batch(self, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        unit = torch.rand(count, 3, generator=self.generator, device=self.device)
        points = self.aabb[0] + unit * (self.aabb[1] - self.aabb[0])
        return points, self.dense(points)


def resident_chosen(resident: Resident, num_voxels: int, device: Union[torch.device, str]) -> bool:
    """Whether ``make_point_sampler`` picks the device-resident sampler: ``resident`` "on", or "auto" and the volume
    fits (``resident_fits``)."""
    if resident not in ("auto", "on", "off"):
        raise ValueError(f"resident must be 'auto', 'on' or 'off', got {resident!r}")
    return resident == "on" or (resident == "auto" and resident_fits(num_voxels, device))


def make_point_sampler(volume: Volume, aabb: torch.Tensor, device: Union[torch.device, str] = "cpu",
                       resident: Resident = "auto", **kwargs) -> VolumePointSampler:
    """The device-resident sampler when ``resident`` is "on", or "auto" and the volume fits (``resident_fits``);
    else the CPU ``VolumePointSampler`` (memmap or in-memory volume, ``preload_max_bytes``)."""
    if resident_chosen(resident, int(np.prod(volume.info.dims)), device):
        kwargs.pop("preload_max_bytes", None)
        return DeviceVolumePointSampler(volume, aabb, device=device, **kwargs)
    return VolumePointSampler(volume, aabb, device=device, **kwargs)

