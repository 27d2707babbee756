"""Stage 2 model `gridinr-edit`: a frozen stage-1 field and a learnable transfer function, trained through DVR.

The field is frozen (no gradients, eval mode) and, by default, decoded once onto a grid (the field cache)
so a sample costs one trilinear lookup. The transfer function is the warm-start transfer MLP (fitted to the
baseline look) plus one residual per edit target, each zero outside its target's value range
(`transfer/parts.py`): with targets, only the residuals train, so values outside every target's range keep their
colour and opacity exactly. Each target is scored on renders that show its part alone (`part_scoring.py`: CLIP
for prompts and images, negative prompts included; sliced Wasserstein for colour targets), plus `lam_pix` x MSE of
the whole image against the reference renderings of the raw volume. Without targets (`--pipeline.model.lam-clip
0` and no colour target) the transfer MLP itself trains with the pixel term.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import ViewerNumber

from gridinr_nerfstudio.data.volume_io import voxel_size_world
from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings
from gridinr_nerfstudio.rendering.fused_march import GridSamples
from gridinr_nerfstudio.rendering.images import render_camera
from gridinr_nerfstudio.stages.base_model import ColorFn, StageModel, StageModelConfig
from gridinr_nerfstudio.stages.edit.clip_loss import LoadedClip
from gridinr_nerfstudio.stages.edit.part_scoring import ScoredTarget, build_scored_target, score_targets, target_metrics
from gridinr_nerfstudio.stages.edit.target_controls import FOLDER as TARGET_FOLDER, target_controls
from gridinr_nerfstudio.stages.edit.targets import EditTarget, TargetError, model_targets
from gridinr_nerfstudio.transfer.parts import DEFAULT_MAX_PARTS, PartTransfer
from gridinr_nerfstudio.transfer.transfer_mlp import TransferMLP, TransferTable, fit_to_transfer_function


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
    targets: Optional[Path] = None
    """JSON file of targets by part (stages/edit/targets.py: value range, prompt / image / colors / palette,
    negative prompts, weight); replaces the one target of the options below."""
    prompt: Optional[str] = "a glowing orange molecule"
    """CLIP text target (ignored when target_image, target_colors or target_palette is given)."""
    target_image: Optional[Path] = None
    """CLIP image target."""
    target_colors: List[str] = dataclasses.field(default_factory=list)  # `field` is a setting above
    """Colour target without CLIP: colours ('#1f77b4', 'teal') the part's rendered colours should take."""
    target_palette: Optional[Path] = None
    """Colour target without CLIP: an image whose colours the part's rendered colours should take."""
    target_range: Tuple[float, float] = (0.0, 1.0)
    """Value range [low, high] of the command-line target (normalised unless target_units is data)."""
    target_units: Literal["normalized", "data"] = "normalized"
    """Units of target_range and target_softness."""
    target_softness: float = 0.0
    """Width of the target range's soft edges (inside the range), in target_units."""
    negative_prompts: List[str] = dataclasses.field(default_factory=list)
    """Texts the command-line target's renders are pushed away from (need CLIP weights)."""
    negative_weight: float = 0.5
    """Weight of the negative prompts' mean cosine."""
    lam_clip: float = 1.0
    """Weight of the CLIP terms (0: no prompt target from the command line, no CLIP weights needed)."""
    lam_color: float = 1.0
    """Weight of the colour targets' distance (sliced Wasserstein in RGB; needs no CLIP)."""
    lam_pix: float = 0.1
    """Weight of the pixel MSE against the reference renderings."""
    max_targets: int = DEFAULT_MAX_PARTS
    """Target slots (the viewer can add targets up to this many)."""
    part_hidden_dim: int = 64
    """Width of each target's residual MLP."""
    part_num_layers: int = 2
    """Hidden layers of each target's residual MLP."""
    color_directions: int = 64
    """Random projections per step of the sliced Wasserstein colour distance."""
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
    """Stage 2: the transfer function (warm start + per-target residuals) trained through the differentiable
    renderer."""

    config: EditModelConfig

    def populate_modules(self):
        super().populate_modules()
        config = self.config
        self.field = VolumeField(self.scene_box.aabb.float(), config.field, num_times=len(self.volumes))
        if config.stage1_checkpoint is not None:
            self.field.load_state_dict(load_stage1_field_state(config.stage1_checkpoint))
        self.field.requires_grad_(False).eval()
        baseline = self.render_settings.transfer_function(voxel_size_world(self.volume))
        max_sigma = float(baseline(torch.linspace(0, 1, 1024))[1].max().clamp(min=1.0))
        with torch.random.fork_rng(devices=[]):  # the warm start must not depend on what drew random numbers before
            torch.manual_seed(0)
            self.transfer_mlp = TransferMLP(config.hidden_dim, config.num_layers, sigma_scale=max_sigma)
        if config.warm_start:
            error = fit_to_transfer_function(self.transfer_mlp, baseline)
            CONSOLE.print(f"Transfer MLP warm-started from the baseline transfer function (error {error:.2e})")
        self.part_transfer = PartTransfer(config.max_targets, config.part_hidden_dim, config.part_num_layers)
        self.targets: List[Optional[EditTarget]] = [None] * config.max_targets
        self.scored: Dict[int, ScoredTarget] = {}  # slot -> its losses (CLIP ones hold CLIP: not a module here)
        self.target_notes: Dict[int, str] = {}  # slot -> why it is not scored (a file gone missing)
        # Helpers, not submodules: CLIP's weights stay out of checkpoints, optimizer groups and DDP.
        self.helpers.clip, self.helpers.clip_loader, self.helpers.optimizers = None, None, None
        self.targets_error: Optional[str] = None  # the pipeline stops training on it; evaluation reads checkpoints
        try:
            for slot, target in enumerate(model_targets(config, self.volume.value_min, self.volume.value_max)):
                self.set_target(slot, target)
        except TargetError as error:
            self.targets_error = str(error)
        self.viewer_lam_pix = ViewerNumber(
            "lam_pix", config.lam_pix, cb_hook=lambda element: setattr(self.config, "lam_pix", float(element.value))
        )
        self.__dict__[TARGET_FOLDER] = target_controls(self)  # the viewer finds it among the attributes

    # --- targets ------------------------------------------------------------------------------------------

    def set_target(self, slot: int, target: EditTarget) -> None:
        """Put `target` in `slot` (a new part starts from a zero residual; retargeting keeps the current edit)."""
        fresh = not bool(self.part_transfer.active[slot])
        self.part_transfer.set_part(slot, target.low, target.high, target.softness, target.changes_opacity,
                                    target.label)
        self.targets[slot] = target
        self._score(slot)
        if fresh:
            self._forget_optimizer_state(slot)
        self._freeze_base_with_parts()

    def remove_target(self, slot: int) -> None:
        """Remove the target in `slot`: its part goes back to the warm start."""
        self.part_transfer.clear_part(slot)
        self.targets[slot] = None
        self.scored.pop(slot, None)
        self.target_notes.pop(slot, None)
        self._forget_optimizer_state(slot)
        self._freeze_base_with_parts()

    def active_targets(self) -> Dict[int, EditTarget]:
        return {slot: target for slot, target in enumerate(self.targets) if target is not None}

    def needs_clip(self) -> bool:
        return any(target.needs_clip for target in self.active_targets().values())

    @property
    def clip(self) -> Optional[LoadedClip]:
        """The CLIP model scoring prompt and image targets (None until a target needs it, or without weights)."""
        return self.helpers.clip

    @property
    def clip_loader(self):
        """A function that loads CLIP (set by the pipeline), for targets added in the viewer."""
        return self.helpers.clip_loader

    @property
    def optimizers(self):
        """The trainer's optimizers (known once training sets up its callbacks)."""
        return self.helpers.optimizers

    def set_clip(self, clip: Optional[LoadedClip]) -> None:
        """Use `clip` to score prompt and image targets (loaded by the pipeline, like LERF's CLIP encoder)."""
        self.helpers.clip = clip
        for slot in self.active_targets():
            self._score(slot)

    def request_clip(self) -> Optional[str]:
        """Load CLIP on demand (a prompt target added in the viewer); returns why it is unavailable, or None."""
        if self.clip is None and self.clip_loader is not None:
            try:
                self.set_clip(self.clip_loader())
            except (RuntimeError, ValueError, OSError) as error:
                return " ".join(str(error).split())
        return None if self.clip is not None else "CLIP is not loaded"

    def _score(self, slot: int, colors: Optional[torch.Tensor] = None) -> None:
        target = self.targets[slot]
        try:
            self.scored[slot] = build_scored_target(target, self.clip, self.config, colors=colors)
            self.target_notes.pop(slot, None)
        except (ValueError, OSError) as error:  # an image or palette that went missing since training
            self.scored.pop(slot, None)
            self.target_notes[slot] = " ".join(str(error).split())

    def _freeze_base_with_parts(self) -> None:
        """With targets only their residuals train (everything outside their ranges stays as it is)."""
        self.transfer_mlp.requires_grad_(not bool(self.part_transfer.active.any()))

    def _forget_optimizer_state(self, slot: int) -> None:
        """A new target in a slot starts with fresh Adam moments."""
        if self.optimizers is None:
            return
        for parameter in self.part_transfer.residuals[slot].parameters():
            for optimizer in self.optimizers.optimizers.values():
                optimizer.state.pop(parameter, None)

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        self.helpers.optimizers = training_callback_attributes.optimizers  # see _forget_optimizer_state
        return super().get_training_callbacks(training_callback_attributes)

    def get_extra_state(self) -> Any:
        """The targets (what each part is scored against), so a checkpoint carries viewer edits and needs no
        targets file; colour targets keep their colours."""
        colors = {str(slot): item.color_loss.colors for slot, item in self.scored.items() if item.color_loss is not None}
        return {"targets": {str(slot): target.to_json() for slot, target in self.active_targets().items()},
                "colors": colors}

    def set_extra_state(self, state: Any) -> None:
        if not state or "targets" not in state:
            return
        self.targets = [None] * self.config.max_targets
        self.scored.clear()
        for slot_text, spec in state["targets"].items():
            slot = int(slot_text)
            if slot >= len(self.targets):
                continue
            spec = dict(spec)
            for key in ("image", "palette"):
                spec[key] = None if spec.get(key) is None else Path(spec[key])
            self.targets[slot] = EditTarget(**spec)
            self._score(slot, colors=state.get("colors", {}).get(slot_text))
        self.targets_error = None
        if TARGET_FOLDER in self.__dict__:
            self.__dict__[TARGET_FOLDER].refresh()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        state_dict.setdefault("_extra_state", None)  # checkpoints from before targets by part
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._freeze_base_with_parts()
        return result

    # --- rendering ----------------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        self.field.eval()  # frozen: stays in eval mode while the transfer function trains
        return self

    @property
    def invisible_sigma(self) -> float:
        """sigma below this counts as transparent for empty-space skipping (1e-3 opacity per voxel)."""
        return 1e-3 / voxel_size_world(self.volume)

    def transfer_table(self) -> torch.Tensor:
        """(L, 4) the edited transfer-function table: warm start plus every target's residual."""
        return self.part_transfer.edited_table(self.transfer_mlp)

    def color_fn(self) -> ColorFn:
        """The transfer function as a table: one MLP pass per render, samples interpolate the table."""
        return TransferTable(self.transfer_table(), self.invisible_sigma)

    def get_param_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        """The warm-start MLP (trains only without targets) and every target slot's residual."""
        return {"transfer_mlp": list(self.transfer_mlp.parameters()),
                "transfer_parts": list(self.part_transfer.parameters())}

    def render_views(self, cameras: Cameras) -> torch.Tensor:
        """Differentiable whole-image renderings (K, H, W, 3) of `cameras` (see `render_view_outputs`)."""
        return self.render_view_outputs(cameras, self.color_fn())["rgb"]

    def render_view_outputs(self, cameras: Cameras, color: ColorFn, skip_empty: bool = False) -> Dict[str, torch.Tensor]:
        """`rgb` (K, H, W, 3) and `accumulation` (K, H, W, 1) of `cameras` through the colour function `color`
        (a `TransferTable`), jittered while training; a sequence's cameras each show the field at their own time.

        Rays stop once their transmittance is below `train_early_stop_eps` (what follows changes their colour,
        and the gradient through it, by less than that); renders without autograd (intermediate and evaluation
        renders) also skip empty macrocells when `accelerate` is on, and so do training renders with `skip_empty`
        (part renders: their table marks every entry of the part visible, and is exactly transparent elsewhere)."""
        with_grad = torch.is_grad_enabled()
        outputs: Dict[str, List[torch.Tensor]] = {"rgb": [], "accumulation": []}
        for index in range(len(cameras)):
            if cameras.times is not None:
                self.set_render_time(float(cameras.times[index].reshape(-1)[0]))
            kwargs = self.render_kwargs()
            if self.config.accelerate and (not with_grad or skip_empty):
                kwargs["occupancy_grid"] = self.occupancy(color)
            kwargs["early_stop_eps"] = self.config.train_early_stop_eps if with_grad else 0.0
            if self.config.accelerate and not with_grad:
                del kwargs["early_stop_eps"]  # the renderer's default, as every accelerated render
            out = render_camera(cameras, index, self.sample_fn_of(color), self.aabb,
                                chunk_rays=self.render_chunk_rays(), stratified=self.training, **kwargs)
            for key in outputs:
                outputs[key].append(out[key])
        return {key: torch.stack(values) for key, values in outputs.items()}

    def sample_fn_of(self, color: ColorFn):
        """World points -> (rgb, sigma) through `color`; over the field cache a `GridSamples`, so training, part and
        evaluation renders take the fused ray marcher (differentiable w.r.t. the table) where it applies."""
        cache = self.cached_field()
        if cache is not None:
            return GridSamples(cache, color)
        values_at = self.value_fn()
        return lambda points: color(values_at(points))

    def render_parts(self, cameras: Cameras, table: torch.Tensor, slots,
                     whole: Optional[Dict[str, torch.Tensor]] = None) -> Dict[int, Dict[str, torch.Tensor]]:
        """slot -> renders of `cameras` showing that target's part alone (`table` masked to its range); a part
        spanning all values is the whole render (`whole`, rendered here when not given)."""
        parts = {}
        for slot in slots:
            if self.part_transfer.covers_everything(slot):
                if whole is None:
                    whole = self.render_view_outputs(cameras, TransferTable(table, self.invisible_sigma))
                parts[slot] = whole
            else:
                part_table = self.part_transfer.part_table(table, slot)
                support = self.part_transfer.weights(slot, table.shape[0]) > 0
                parts[slot] = self.render_view_outputs(
                    cameras, TransferTable(part_table, self.invisible_sigma, visible=support), skip_empty=True)
        return parts

    def get_view_outputs(self, cameras: Cameras) -> Dict[str, Any]:
        """Stage 2 trains on whole views (CLIP needs images): `rgb` (K, H, W, 3) and `accumulation` of `cameras`,
        and `parts` (slot -> renders of that target's part) for every scored target."""
        table = self.transfer_table()
        whole = self.render_view_outputs(cameras, TransferTable(table, self.invisible_sigma))
        outputs: Dict[str, Any] = dict(whole)
        if self.scored:
            outputs["parts"] = self.render_parts(cameras, table, self.scored, whole)
            directional = [slot for slot, item in self.scored.items()
                           if item.clip_loss is not None and item.clip_loss.directional]
            if directional:  # unedited part renders of the same views (a whole-range part uses the references)
                with torch.no_grad():
                    warm = self.transfer_mlp.table()
                    outputs["part_references"] = {
                        slot: None if self.part_transfer.covers_everything(slot) else self.render_view_outputs(
                            cameras, TransferTable(self.part_transfer.part_table(warm, slot), self.invisible_sigma))["rgb"]
                        for slot in directional}
        return outputs

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
        """`lam_pix` x pixel MSE of the whole views against the references, and per target
        `target<n>_<clip|color>_loss`: its weighted score on the renders of its part."""
        rendered, references = outputs["rgb"], batch["image"]
        loss_dict: Dict[str, torch.Tensor] = {}
        if self.config.lam_pix > 0:
            loss_dict["pixel_loss"] = self.config.lam_pix * (rendered - references).square().mean()
        if "parts" in outputs:
            part_references = {slot: references if images is None else images
                               for slot, images in outputs.get("part_references", {}).items()}
            background = torch.tensor(self.render_settings.background, dtype=rendered.dtype, device=rendered.device)
            losses = score_targets(self.scored, outputs["parts"], part_references, background,
                                   self.config.lam_clip, self.config.lam_color)
            for slot, loss in sorted(losses.items()):
                loss_dict[f"target{slot + 1}_{self.scored[slot].name}_loss"] = loss
        return loss_dict

    @torch.no_grad()
    def target_eval_metrics(self, cameras: Cameras, clips: List[Tuple[str, Optional[LoadedClip]]]) -> Dict[str, float]:
        """Each target on the part renders of `cameras`: colour distance, and CLIP cosine under each of `clips`
        (suffix, model), plus their means (`clip_cosine<suffix>`)."""
        if not self.scored:
            return {}
        was_training = self.training
        self.eval()
        parts = self.render_parts(cameras, self.transfer_table(), self.scored)
        self.train(was_training)
        background = torch.tensor(self.render_settings.background, dtype=torch.float32, device=self.aabb.device)
        metrics: Dict[str, float] = {}
        for suffix, clip in clips or [("", None)]:
            metrics.update(target_metrics(self.scored, parts, background, clip, suffix))
        return metrics


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
