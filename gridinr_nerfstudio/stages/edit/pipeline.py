"""Stage 2 pipeline: load the stage-1 run, train the transfer function with its targets' losses, evaluate.

`--pipeline.stage1-config outputs/.../gridinr-fit/<timestamp>/config.yml` is all stage 2 needs: the volume,
cameras and reference render settings, the field sizes and its checkpoint all come from that run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Tuple, Type

import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.utils.rich_utils import CONSOLE

from gridinr_nerfstudio import distributed
from gridinr_nerfstudio.eval.eval_log import save_render_grid
from gridinr_nerfstudio.runs import load_run_config, read_newest_checkpoint, save_checkpoint_atomically
from gridinr_nerfstudio.stages.base_pipeline import StagePipeline, StagePipelineConfig
from gridinr_nerfstudio.stages.edit.clip_loss import ClipWeightsError, ClipWeightsUnavailable, LoadedClip, load_clip
from gridinr_nerfstudio.stages.edit.datamanager import EditDataManagerConfig
from gridinr_nerfstudio.stages.edit.model import EditModelConfig
from gridinr_nerfstudio.stages.edit.targets import TargetError


@dataclass
class EditPipelineConfig(StagePipelineConfig):
    """Stage 2: edit the look of a fitted volume."""

    _target: Type = field(default_factory=lambda: EditPipeline)
    datamanager: EditDataManagerConfig = field(default_factory=EditDataManagerConfig)
    model: EditModelConfig = field(default_factory=EditModelConfig)
    stage1_config: Optional[Path] = None
    """config.yml of the gridinr-fit run to edit (required for training)."""
    steps_per_render: int = 20
    """Save a grid of intermediate renderings (eval views) every this many steps."""
    stage: str = "edit"

    def prepare_run(self, trainer_config) -> None:
        """ns-train, before config.yml is written: adopt the stage-1 run and keep its field inside the edit run.

        The edit run is filed under the stage-1 run's experiment name, and the newest stage-1 field is copied to
        RUN/stage1_field.ckpt, which the saved config names (relative to the run): later loads of the edit run
        (ns-eval, ns-viewer, gridinr-render) read that copy, so moving or training the stage-1 run further
        changes nothing, and a copied edit run is complete.
        """
        if self.stage1_config is None or self.model.stage1_checkpoint is not None:
            super().prepare_run(trainer_config)
            return
        stage1 = adopt_stage1_run(self)
        if trainer_config.experiment_name is None:
            stage1_dir = Path(self.stage1_config).resolve().parent  # OUTPUT/EXPERIMENT/gridinr-fit/TIMESTAMP
            trainer_config.experiment_name = stage1.experiment_name or stage1_dir.parent.parent.name
        run_dir = trainer_config.get_base_dir()
        source, step, state = read_newest_checkpoint(Path(self.stage1_config).parent / "nerfstudio_models")
        field_state = {key: value for key, value in state["pipeline"].items() if key.startswith("_model.field.")}
        if not field_state:
            raise ValueError(f"{source}: no '_model.field.*' weights: not a gridinr-fit checkpoint")
        save_checkpoint_atomically({"step": step, "pipeline": field_state, "source": str(source)},
                                   run_dir / STAGE1_FIELD_FILE, scratch_dir=run_dir)
        self.model.stage1_checkpoint = Path(STAGE1_FIELD_FILE)
        super().prepare_run(trainer_config)  # the run folder, now under the stage-1 run's experiment name


STAGE1_FIELD_FILE = "stage1_field.ckpt"
"""The frozen stage-1 field, copied into the edit run folder when training starts (see `prepare_run`)."""


def latest_checkpoint(run_dir: Path) -> Path:
    """Newest step-*.ckpt of a nerfstudio run folder that loads (stray and truncated files are skipped)."""
    folder = Path(run_dir) / "nerfstudio_models"
    try:
        return read_newest_checkpoint(folder)[0]
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error} in the stage-1 run") from None


def adopt_stage1_run(config: EditPipelineConfig):
    """Copy the volume, cameras, render settings and field sizes of the stage-1 run into `config`; returns
    the stage-1 TrainerConfig."""
    path = Path(config.stage1_config)
    if not path.exists():
        raise FileNotFoundError(f"{path}: stage-1 config not found (pass the config.yml of a gridinr-fit run)")
    stage1 = load_run_config(path)
    if getattr(stage1, "method_name", None) != "gridinr-fit":
        raise ValueError(f"{path}: not a gridinr-fit run (method {getattr(stage1, 'method_name', None)!r})")
    config.datamanager.dataparser = stage1.pipeline.datamanager.dataparser
    config.datamanager.data = stage1.pipeline.datamanager.data
    config.model.field = stage1.pipeline.model.field
    return stage1


class EditPipeline(StagePipeline):
    """Trains the transfer MLP on whole rendered views."""

    config: EditPipelineConfig

    def __init__(self, config: EditPipelineConfig, device: str, test_mode: Literal["test", "val", "inference"] = "val", **kwargs):
        checkpoint = config.model.stage1_checkpoint
        if config.stage1_config is not None and checkpoint is None:  # not prepared by ns-train (or an older run)
            adopt_stage1_run(config)
            config.model.stage1_checkpoint = latest_checkpoint(Path(config.stage1_config).parent)
        elif checkpoint is not None and not Path(checkpoint).is_absolute() and config.run_dir is not None:
            config.model.stage1_checkpoint = Path(config.run_dir) / checkpoint  # the copy inside the edit run
        if config.model.stage1_checkpoint is None and test_mode == "val":
            raise ValueError("gridinr-edit needs --pipeline.stage1-config PATH/config.yml of a gridinr-fit run")
        super().__init__(config, device=device, test_mode=test_mode, **kwargs)
        model = self.model
        self.clip: Optional[LoadedClip] = None
        self.clip_unavailable_reason: Optional[str] = None
        training = test_mode == "val"
        if training and model.targets_error is not None:
            raise TargetError(model.targets_error)
        model.helpers.clip_loader = self.load_clip  # a prompt target added in the viewer loads CLIP then
        # CLIP only when a target needs it (prompts, images, negative prompts): a run of colour targets needs no
        # CLIP weights and says nothing about them.
        if model.needs_clip():
            try:
                self.clip = self.load_clip()
            except (ClipWeightsUnavailable, ClipWeightsError) as error:
                if training:
                    raise  # training with a CLIP term needs the weights: stop at once with the explanation
                self.clip_unavailable_reason = str(error)
        model.set_clip(self.clip)
        self.second_clip = self._load_second_clip() if not training else None

    def load_clip(self) -> LoadedClip:
        """The edit's CLIP model from the local cache or weights file (never downloaded)."""
        model_config = self.model.config
        return load_clip(model_config.clip_model, model_config.clip_weights or model_config.clip_pretrained,
                         device=self.device)

    def _load_second_clip(self) -> Optional[LoadedClip]:
        """A CLIP model the edit was not trained on, for an independent score; None when unavailable."""
        name = self.model.config.second_clip_model
        if name is None:
            return None
        try:
            return load_clip(name, self.model.config.second_clip_pretrained, device=self.device)
        except (ClipWeightsUnavailable, ValueError) as error:
            CONSOLE.print(f"Second CLIP model unavailable: {error}")
            return None

    def get_train_loss_dict(self, step: int):
        """nerfstudio's contract with whole views for rays: outputs, then `get_metrics_dict` and `get_loss_dict`.

        The views go through `self._model`, the DDP wrapper when distributed, so gradients are averaged."""
        cameras, batch = self.datamanager.next_train(step)
        outputs = self._model(cameras)
        metrics = self.model.get_metrics_dict(outputs, batch)
        loss_dict = self.model.get_loss_dict(outputs, batch, metrics)
        return {"rgb": outputs["rgb"].detach()}, loss_dict, metrics

    @torch.no_grad()
    def get_eval_loss_dict(self, step: int):
        """Losses on a random evaluation view (its own generator: training views do not depend on evaluation)."""
        self.eval()
        cameras, batch = self.datamanager.next_eval(step)
        outputs = self.model.get_view_outputs(cameras)
        metrics = self.model.get_metrics_dict(outputs, batch)
        loss_dict = self.model.get_loss_dict(outputs, batch, metrics)
        self.train()
        return {}, loss_dict, metrics

    @torch.no_grad()
    def extra_eval_metrics(self) -> dict:
        """Each target on its part renders of the eval views: CLIP cosine to its prompt or image (also under a second
        CLIP model when available; `clip_cosine`: their mean) and colour distance; saves reference/edit pairs of the
        first eval views for `gridinr-report`.

        Several ranks: each scores its share of the views, the metrics are their means weighted by view counts;
        rank 0 saves the pairs."""
        if distributed.is_main():
            self.save_before_after(self.render_eval_views(4))
        model = self.model
        clips: List[Tuple[str, Optional[LoadedClip]]] = []
        if model.needs_clip() and self.clip is None and self.clip_unavailable_reason is None:
            try:  # the checkpoint brought targets the config did not name (added in the viewer)
                self.clip = self.load_clip()
                model.set_clip(self.clip)
            except (ClipWeightsUnavailable, ClipWeightsError) as error:
                self.clip_unavailable_reason = str(error)
        if model.needs_clip():
            if self.clip is None:  # left out (writers need numbers); said once
                self.metric_unavailable("clip_cosine", self.clip_unavailable_reason or "CLIP weights not available")
            else:
                clips.append(("", self.clip))
            if model.config.second_clip_model is not None:
                name = f"clip_cosine_{model.config.second_clip_model}"
                if self.second_clip is None:
                    self.metric_unavailable(name, "its CLIP weights are not available")
                else:
                    clips.append((f"_{model.config.second_clip_model}", self.second_clip))
        cameras = self.datamanager.eval_dataset.cameras
        views = list(distributed.share(len(cameras)))
        metrics = model.target_eval_metrics(cameras[torch.tensor(views)].to(self.device), clips) if views else {}
        gathered = [(part, count) for part, count in distributed.all_gather_objects((metrics, len(views))) if count]
        names = {name for part, _ in gathered for name in part}
        return {name: sum(part[name] * count for part, count in gathered if name in part)
                / sum(count for part, count in gathered if name in part) for name in sorted(names)}

    def save_before_after(self, edits: torch.Tensor) -> None:
        """renders/reference_<view>.png and renders/edit_<view>.png (the layout gridinr-report reads)."""
        if self.config.run_dir is None:
            return
        folder = Path(self.config.run_dir) / "renders"
        folder.mkdir(parents=True, exist_ok=True)
        for index, edit in enumerate(edits):
            reference = self.datamanager.eval_dataset.get_image_float32(index)[..., :3]
            save_render_grid([reference], folder / f"reference_{index:03d}.png", ncols=1, padding=0)
            save_render_grid([edit.cpu()], folder / f"edit_{index:03d}.png", ncols=1, padding=0)

    @torch.no_grad()
    def render_eval_views(self, count: Optional[int] = None) -> torch.Tensor:
        """Renderings (K, H, W, 3) of the first `count` eval views (all by default)."""
        views = len(self.datamanager.eval_dataset.cameras)
        return self.render_views_at(range(views if count is None else min(count, views)))

    @torch.no_grad()
    def render_views_at(self, views) -> torch.Tensor:
        """Renderings (K, H, W, 3) of the eval views numbered `views` (K may be 0)."""
        views = list(views)
        cameras = self.datamanager.eval_dataset.cameras
        if not views:
            return torch.zeros(0, int(cameras.height[0]), int(cameras.width[0]), 3)
        self.model.eval()
        images = self.model.render_views(cameras[torch.tensor(views)].to(self.device))
        self.model.train(self.training)
        return images.clamp(0, 1)

    def save_intermediate_renders(self, step: int) -> None:
        """Grid of the first eval views (reference row above the edit row) in run_dir/renders/ (rank 0)."""
        if self.config.run_dir is None or not distributed.is_main():
            return
        folder = Path(self.config.run_dir) / "renders"
        edits = self.render_eval_views(4)
        references = torch.stack([self.datamanager.eval_dataset.get_image_float32(i)[..., :3] for i in range(edits.shape[0])])
        save_render_grid(list(references) + list(edits.cpu()), folder / f"step_{step:06d}.png", ncols=edits.shape[0])

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        callbacks.append(
            TrainingCallback(
                [TrainingCallbackLocation.AFTER_TRAIN_ITERATION],
                self.save_intermediate_renders,
                update_every_num_iters=self.config.steps_per_render,
                args=[],
            )
        )
        return callbacks
