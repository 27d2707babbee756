"""Stage 2 model `gridinr-edit`: a frozen stage-1 field and a learnable transfer MLP, trained through DVR.

The field is frozen (no gradients, eval mode) and, by default, decoded once onto a grid (the field cache)
so a sample costs one trilinear lookup. Only the transfer MLP trains: CLIP cosine to a text or image
target plus `lam_pix` x MSE against the reference renderings of the raw volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import ViewerNumber, ViewerText

from gridinr_nerfstudio.data.volume_io import voxel_size_world
from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings
from gridinr_nerfstudio.rendering.images import render_camera
from gridinr_nerfstudio.stages.base_model import StageModel, StageModelConfig
from gridinr_nerfstudio.stages.edit.clip_loss import ClipLoss
from gridinr_nerfstudio.transfer.transfer_mlp import TransferMLP, fit_to_transfer_function


@dataclass
class EditModelConfig(StageModelConfig):
    """Learnable transfer function over a frozen hash-grid INR."""

    _target: Type = field(default_factory=lambda: EditModel)
    field: VolumeFieldSettings = field(default_factory=VolumeFieldSettings)
    """Field sizes (copied from the stage-1 config by the pipeline)."""
    stage1_checkpoint: Optional[Path] = None
    """Stage-1 checkpoint whose field is frozen (found from --pipeline.stage1-config by the pipeline)."""
    hidden_dim: int = 128
    """Width of the transfer MLP."""
    num_layers: int = 3
    """Hidden layers of the transfer MLP."""
    warm_start: bool = True
    """Start the transfer MLP from the baseline transfer function (so step 0 already matches the references)."""
    prompt: Optional[str] = "a glowing orange molecule"
    """CLIP text target (ignored when target_image is given)."""
    target_image: Optional[Path] = None
    """CLIP image target."""
    lam_clip: float = 1.0
    """Weight of the CLIP term (0: pixel loss only, no CLIP weights needed)."""
    lam_pix: float = 0.1
    """Weight of the pixel MSE against the reference renderings."""
    directional: bool = False
    """Directional CLIP loss relative to the reference rendering (StyleGAN-NADA) instead of the global cosine."""
    source_prompt: Optional[str] = None
    """Description of the unedited volume for the directional loss (default: the reference render's embedding)."""
    clip_model: str = "ViT-B-16"
    """open_clip model name."""
    clip_pretrained: str = "laion2b_s34b_b88k"
    """open_clip pretrained tag (resolved in the local cache, never downloaded)."""
    clip_weights: Optional[Path] = None
    """Local open_clip weights file (overrides clip_pretrained)."""
    clip_crops: int = 4
    """Random resized crops per rendered view fed to CLIP (all crops of a step go through CLIP as one batch)."""
    train_early_stop_eps: float = 1e-4
    """Training renders drop a ray once its transmittance falls below this (0: march every sample)."""
    second_clip_model: Optional[str] = None
    """A second CLIP model (name) for evaluation only, e.g. ViT-B-32; used when its weights are available."""
    second_clip_pretrained: str = "laion2b_s34b_b79k"
    """Pretrained tag or local file of the second CLIP model."""


class EditModel(StageModel):
    """Stage 2: transfer MLP trained through the differentiable renderer."""

    config: EditModelConfig

    def populate_modules(self):
        super().populate_modules()
        self.field = VolumeField(self.scene_box.aabb.float(), self.config.field, num_times=len(self.volumes))
        if self.config.stage1_checkpoint is not None:
            self.field.load_state_dict(load_stage1_field_state(self.config.stage1_checkpoint))
        self.field.requires_grad_(False).eval()
        baseline = self.render_settings.transfer_function(voxel_size_world(self.volume))
        max_sigma = float(baseline(torch.linspace(0, 1, 1024))[1].max().clamp(min=1.0))
        with torch.random.fork_rng(devices=[]):  # the warm start must not depend on what drew random numbers before
            torch.manual_seed(0)
            self.transfer_mlp = TransferMLP(self.config.hidden_dim, self.config.num_layers, sigma_scale=max_sigma)
        if self.config.warm_start:
            error = fit_to_transfer_function(self.transfer_mlp, baseline)
            CONSOLE.print(f"Transfer MLP warm-started from the baseline transfer function (error {error:.2e})")
        self.set_clip_loss(None)  # the pipeline hands one over when it loaded CLIP (needs the weights)
        # Viewer controls: a new prompt re-encodes the CLIP target, lam_pix applies from the next step.
        self.viewer_prompt = ViewerText("CLIP prompt", self.config.prompt or "", cb_hook=self.set_prompt)
        self.viewer_lam_pix = ViewerNumber(
            "lam_pix", self.config.lam_pix, cb_hook=lambda element: setattr(self.config, "lam_pix", float(element.value))
        )

    def set_prompt(self, element: ViewerText) -> None:
        """Switch the edit target to the text in the viewer's prompt box (no restart)."""
        self.config.prompt, self.config.target_image = element.value, None
        if self.clip_loss is not None:
            self.clip_loss.set_target_text(element.value)

    def train(self, mode: bool = True):
        super().train(mode)
        self.field.eval()  # frozen: stays in eval mode while the transfer MLP trains
        return self

    def color_fn(self):
        """The transfer MLP as a table: one MLP pass per render, samples interpolate the table."""
        return self.transfer_mlp.tabulated(invisible_sigma=1e-3 / voxel_size_world(self.volume))

    def get_param_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        return {"transfer_mlp": list(self.transfer_mlp.parameters())}

    def set_clip_loss(self, clip_loss: Optional[ClipLoss]) -> None:
        """Use `clip_loss` for the CLIP term (built by the pipeline, like LERF's CLIP encoder)."""
        # A helper, not a submodule: CLIP's weights stay out of checkpoints, optimizer groups and DDP.
        self.helpers.clip_loss = clip_loss

    @property
    def clip_loss(self) -> Optional[ClipLoss]:
        """The CLIP term's loss (None without CLIP weights or with lam_clip 0)."""
        return self.helpers.clip_loss

    def render_views(self, cameras: Cameras) -> torch.Tensor:
        """Differentiable whole-image renderings (K, H, W, 3) of `cameras`, jittered while training; a sequence's
        cameras each show the field at their own time.

        Rays stop once their transmittance is below `train_early_stop_eps` (what follows changes their colour,
        and the gradient through it, by less than that); renders without autograd (intermediate and evaluation
        renders) also skip empty macrocells when `accelerate` is on."""
        with_grad = torch.is_grad_enabled()
        images = []
        for index in range(len(cameras)):
            if cameras.times is not None:
                self.set_render_time(float(cameras.times[index].reshape(-1)[0]))
            sample_fn = self.sample_fn()
            kwargs = self.render_kwargs(accelerate=self.config.accelerate and not with_grad)
            if with_grad:
                kwargs["early_stop_eps"] = self.config.train_early_stop_eps
            images.append(render_camera(cameras, index, sample_fn, self.aabb, chunk_rays=self.render_chunk_rays(),
                                        stratified=self.training, **kwargs)["rgb"])
        return torch.stack(images)

    def get_view_outputs(self, cameras: Cameras) -> Dict[str, torch.Tensor]:
        """Stage 2 trains on whole views (CLIP needs images): rendered `rgb` (K, H, W, 3) of `cameras`."""
        return {"rgb": self.render_views(cameras)}

    def get_batch_outputs(self, cameras: Cameras) -> Dict[str, torch.Tensor]:
        """A training batch's outputs (what the pipeline's DDP-wrapped model call reaches): `get_view_outputs`."""
        return self.get_view_outputs(cameras)

    def get_metrics_dict(self, outputs, batch) -> Dict[str, torch.Tensor]:
        """PSNR of the rendered views against their reference renderings."""
        if "rgb" not in outputs or outputs["rgb"].dim() != 4:
            return {}
        mse = (outputs["rgb"].detach() - batch["image"]).square().mean()
        return {"psnr": -10.0 * torch.log10(mse.clamp(min=1e-12))}

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        """`lam_pix` x pixel MSE against the references plus `lam_clip` x the CLIP loss (when CLIP is loaded)."""
        rendered, references = outputs["rgb"], batch["image"]
        loss_dict: Dict[str, torch.Tensor] = {}
        if self.config.lam_pix > 0:
            loss_dict["pixel_loss"] = self.config.lam_pix * (rendered - references).square().mean()
        if self.clip_loss is not None and self.config.lam_clip > 0:
            loss_dict["clip_loss"] = self.config.lam_clip * self.clip_loss(rendered, reference_images=references)
        return loss_dict


def load_stage1_field_state(checkpoint: Path) -> Dict[str, torch.Tensor]:
    """The field's weights from a stage-1 nerfstudio checkpoint (loaded with weights_only=True)."""
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"{checkpoint}: stage-1 checkpoint not found")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    prefix = "_model.field."
    field_state = {key[len(prefix):]: value for key, value in state["pipeline"].items() if key.startswith(prefix)}
    if not field_state:
        raise ValueError(f"{checkpoint}: no '{prefix}*' weights: not a gridinr-fit checkpoint")
    return field_state
