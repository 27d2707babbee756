"""Scoring each edit target on renders that show its part: CLIP targets in one batched CLIP pass, colour targets
by sliced Wasserstein distance.

A target's loss is `weight` x (`lam_clip` x its CLIP loss, negative prompts included, or `lam_color` x its colour
distance). The crops of every CLIP target of a step go through CLIP as one batch (and, with the directional loss,
the crops of their unedited part renders as a second batch without autograd), so k targets cost k part renders
and k x `clip_crops` crops, not k CLIP calls of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from gridinr_nerfstudio.stages.edit.clip_loss import ClipLoss, LoadedClip, clip_cosine
from gridinr_nerfstudio.stages.edit.color_loss import ColorLoss, palette_colors, parse_colors
from gridinr_nerfstudio.stages.edit.targets import EditTarget

PartRenders = Mapping[int, Dict[str, torch.Tensor]]
"""slot -> {"rgb": (K, H, W, 3), "accumulation": (K, H, W, 1)} of the part renders of a step's views."""


@dataclass
class ScoredTarget:
    """A target with what scores it: a CLIP loss (prompt, image and/or negatives) and/or a colour loss."""

    target: EditTarget
    clip_loss: Optional[ClipLoss] = None
    color_loss: Optional[ColorLoss] = None

    @property
    def name(self) -> str:
        return "color" if self.target.kind == "color" else "clip"


def target_colors(target: EditTarget) -> torch.Tensor:
    """(N, 3) target colours of a colour target (its list, or its palette image's pixels)."""
    if target.palette is not None:
        return palette_colors(Path(target.palette))
    return parse_colors(target.colors or [])


def build_scored_target(target: EditTarget, clip: Optional[LoadedClip], config,
                        colors: Optional[torch.Tensor] = None) -> ScoredTarget:
    """The losses of `target` under the model config (`clip_crops`, `directional`, `source_prompt`,
    `color_directions`); CLIP parts need `clip` (None: they are left unscored). `colors` overrides the target's
    colours (those a checkpoint kept)."""
    scored = ScoredTarget(target)
    if target.kind == "color":
        scored.color_loss = ColorLoss(target_colors(target) if colors is None else colors,
                                      num_directions=config.color_directions)
    if clip is not None and target.needs_clip:
        is_clip = target.kind == "clip"
        scored.clip_loss = ClipLoss(
            clip,
            target_text=target.prompt if is_clip and target.image is None else None,
            target_image=target.image if is_clip else None,
            directional=config.directional and is_clip,
            source_text=config.source_prompt,
            crops_per_image=config.clip_crops,
            negative_texts=target.negative,
            negative_weight=target.negative_weight,
        )
    return scored


def score_targets(scored: Mapping[int, ScoredTarget], renders: PartRenders,
                  references: Mapping[int, Optional[torch.Tensor]], background: torch.Tensor,
                  lam_clip: float, lam_color: float) -> Dict[int, torch.Tensor]:
    """slot -> weighted loss of each scored target on its part renders (`references`: the unedited part renders
    of the same views, for directional CLIP losses)."""
    losses: Dict[int, torch.Tensor] = {}
    clip_slots = [slot for slot, item in scored.items() if item.clip_loss is not None and lam_clip > 0]
    if clip_slots:
        edit_crops, reference_crops, counts = [], [], []
        for slot in clip_slots:
            edits, refs = scored[slot].clip_loss.crops(renders[slot]["rgb"], references.get(slot))
            edit_crops.append(edits)
            counts.append(edits.shape[0])
            if refs is not None:
                reference_crops.append((slot, refs))
        clip = scored[clip_slots[0]].clip_loss.clip
        embeddings = clip.encode_images(torch.cat(edit_crops)).split(counts)
        reference_embeddings: Dict[int, torch.Tensor] = {}
        if reference_crops:
            with torch.no_grad():
                encoded = clip.encode_images(torch.cat([refs for _, refs in reference_crops]))
            split = encoded.split([refs.shape[0] for _, refs in reference_crops])
            reference_embeddings = {slot: part for (slot, _), part in zip(reference_crops, split)}
        for slot, embedding in zip(clip_slots, embeddings):
            item = scored[slot]
            loss = item.clip_loss.loss_from_embeddings(embedding, reference_embeddings.get(slot))
            losses[slot] = item.target.weight * lam_clip * loss.to(background.device)
    for slot, item in scored.items():
        if item.color_loss is not None and lam_color > 0:
            part = renders[slot]
            loss = item.target.weight * lam_color * item.color_loss(part["rgb"], part["accumulation"], background)
            losses[slot] = losses[slot] + loss if slot in losses else loss
    return losses


@torch.no_grad()
def target_metrics(scored: Mapping[int, ScoredTarget], renders: PartRenders, background: torch.Tensor,
                   clip: Optional[LoadedClip], suffix: str = "") -> Dict[str, float]:
    """Per target: `target<n>_clip_cosine<suffix>` (cosine of its part renders to its prompt or image under
    `clip`) and `target<n>_color_distance` (sliced W2 to its colours); `clip_cosine<suffix>`: the mean over
    CLIP targets."""
    metrics: Dict[str, float] = {}
    cosines = []
    for slot, item in sorted(scored.items()):
        part = renders[slot]
        target = item.target
        if target.kind == "clip" and clip is not None:
            embedding = (clip.encode_image_file(target.image) if target.image is not None
                         else clip.encode_text(target.prompt or ""))[0]
            cosine = float(clip_cosine(clip, part["rgb"].clamp(0, 1), embedding).mean())
            metrics[f"target{slot + 1}_clip_cosine{suffix}"] = cosine
            cosines.append(cosine)
        if item.color_loss is not None and not suffix:
            distance = item.color_loss.distance(part["rgb"], part["accumulation"], background)
            if distance is not None:
                metrics[f"target{slot + 1}_color_distance"] = distance
    if cosines:
        metrics[f"clip_cosine{suffix}"] = sum(cosines) / len(cosines)
    return metrics
