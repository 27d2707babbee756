"""DataManager of stage 2: whole training views (camera + reference rendering) per step.

CLIP needs whole images, so a training batch is `views_per_step` random orbit views with their reference
renderings, instead of nerfstudio's random rays. With several ranks each rank renders its `views_per_step` views of
one global draw (`world_size x views_per_step` views from one generator, the same on every rank), as stage 1 splits
its point batches. Evaluation losses render a random evaluation view, drawn from a generator of their own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, Literal, Tuple, Type, Union

import torch
import torch.nn.functional as F
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.datasets.base_dataset import InputDataset

from gridinr_nerfstudio import distributed
from gridinr_nerfstudio.data.dataparser import VolumeDataParserConfig

EVAL_SEED_OFFSET = 1 << 32
"""The evaluation views' generator is seeded with the seed plus this (never the training seed)."""


@dataclass
class EditDataManagerConfig(VanillaDataManagerConfig):
    """Random whole training views with their reference renderings."""

    _target: Type = field(default_factory=lambda: EditDataManager)
    dataparser: VolumeDataParserConfig = field(default_factory=VolumeDataParserConfig)
    views_per_step: int = 1
    """Training views rendered per step."""
    seed: int = 0
    """Seed of the view sampler (the same on every rank: the ranks split one draw)."""
    train_image_scale: float = 1.0
    """Render training views at this fraction of the reference resolution (e.g. 0.5: 128x128 for 256x256
    references); the references are area-averaged to match. Fewer rays per step for the fast profile."""


class EditDataManager(VanillaDataManager[InputDataset]):
    """Holds the training reference images in memory and hands out random views."""

    config: EditDataManagerConfig

    def __init__(
        self,
        config: EditDataManagerConfig,
        device: Union[torch.device, str] = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ):
        self.generator = torch.Generator().manual_seed(config.seed)
        self.eval_generator = torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET)
        super().__init__(config, device=device, test_mode=test_mode, world_size=world_size, local_rank=local_rank)

    def setup_train(self):
        """Load every training reference rendering once (a few MB at 256x256), at the training resolution."""
        dataset = self.train_dataset
        images = torch.stack([dataset.get_image_float32(i)[..., :3] for i in range(len(dataset))])
        self.train_cameras = dataset.cameras
        scale = self.config.train_image_scale
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"train_image_scale must be in (0, 1], got {scale}")
        if scale < 1.0:
            self.train_cameras = copy.deepcopy(dataset.cameras)
            self.train_cameras.rescale_output_resolution(scale)
            size = (int(self.train_cameras.height[0]), int(self.train_cameras.width[0]))
            images = F.interpolate(images.permute(0, 3, 1, 2), size=size, mode="area").permute(0, 2, 3, 1).contiguous()
        self.train_images = images

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        """This rank's `views_per_step` random training cameras and their reference images (K, H, W, 3)."""
        self.train_count += 1
        count, ranks, rank = self.config.views_per_step, distributed.world_size(), distributed.rank()
        views = len(self.train_dataset)
        # One shuffle of the views per `views` drawn (one alone when they suffice, as in a single process).
        rounds = -(-ranks * count // views)
        order = torch.cat([torch.randperm(views, generator=self.generator) for _ in range(rounds)])
        indices = order[rank * count : (rank + 1) * count]
        cameras = self.train_cameras[indices].to(self.device)
        return cameras, {"image": self.train_images[indices].to(self.device), "indices": indices}

    def next_eval(self, step: int) -> Tuple[Cameras, Dict]:
        """A random evaluation camera and its reference image (1, H, W, 3), for the evaluation loss."""
        self.eval_count += 1
        dataset = self.eval_dataset
        index = int(torch.randint(len(dataset), (1,), generator=self.eval_generator))
        cameras = dataset.cameras[torch.tensor([index])].to(self.device)
        image = dataset.get_image_float32(index)[..., :3]
        return cameras, {"image": image[None].to(self.device), "indices": torch.tensor([index])}

    def get_sampler_state(self) -> Dict[str, torch.Tensor]:
        """Saved with checkpoints by GridINRTrainer, so a resumed run picks the views it would have picked."""
        return {"generator": self.generator.get_state()}

    def set_sampler_state(self, state: Dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def get_train_rays_per_batch(self) -> int:
        camera = self.train_cameras[0]
        return int(camera.width) * int(camera.height) * self.config.views_per_step
