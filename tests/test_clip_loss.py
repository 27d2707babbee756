"""CLIP loading (offline), target embeddings and losses, with a tiny random open_clip model."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from tiny_models import register_tiny_clip, save_tiny_clip_weights

from gridinr_nerfstudio.stages.edit.clip_loss import (
    ClipLoss,
    ClipWeightsUnavailable,
    LoadedClip,
    clip_cosine,
    load_clip,
    resolve_clip_weights,
)


pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("tiny_clip")
    name = register_tiny_clip(root / "configs")
    return name, save_tiny_clip_weights(name, root / "open_clip_pytorch_model.bin")


@pytest.fixture(scope="module")
def clip(tiny_weights: tuple[str, Path]) -> LoadedClip:
    name, weights = tiny_weights
    return load_clip(name, pretrained=weights, device="cpu")


def test_load_from_file_gives_frozen_model_with_saved_weights(clip: LoadedClip, tiny_weights: tuple[str, Path]) -> None:
    saved = torch.load(tiny_weights[1], map_location="cpu", weights_only=True)
    loaded = clip.model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in saved.items())
    assert not any(parameter.requires_grad for parameter in clip.model.parameters())
    assert not clip.model.training
    assert clip.image_size == (32, 32)
    assert torch.allclose(clip.mean, torch.tensor([0.48145466, 0.4578275, 0.40821073]))


def test_missing_tag_weights_raise_helpful_error_without_network(tmp_path: Path) -> None:
    with pytest.raises(ClipWeightsUnavailable) as error:
        load_clip("ViT-B-16", "laion2b_s34b_b88k", cache_dir=tmp_path)
    message = str(error.value)
    assert "ViT-B-16" in message and "laion2b_s34b_b88k" in message
    assert str(tmp_path) in message and "laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in message
    assert "create_model_and_transforms" in message and "--pipeline.model.clip-weights" in message


def test_missing_file_and_unknown_tag_raise(tmp_path: Path) -> None:
    with pytest.raises(ClipWeightsUnavailable, match="no such file"):
        load_clip("ViT-B-16", tmp_path / "absent.bin")
    with pytest.raises(ClipWeightsUnavailable, match="known tags"):
        load_clip("ViT-B-16", "not_a_tag")


def test_tag_resolves_to_file_in_hugging_face_cache(tmp_path: Path) -> None:
    """A tag hosted on the hub is found in the standard cache layout (as hf_hub_download leaves it)."""
    repo = tmp_path / "models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    found = resolve_clip_weights("ViT-B-16", "laion2b_s34b_b88k", cache_dir=tmp_path)
    assert found == snapshot / "open_clip_pytorch_model.bin"
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")  # preferred, as open_clip does
    assert (
        resolve_clip_weights("ViT-B-16", "laion2b_s34b_b88k", cache_dir=tmp_path).name == "open_clip_model.safetensors"
    )


def test_gradients_reach_the_input_images(clip: LoadedClip) -> None:
    images = torch.rand(2, 40, 40, 3, requires_grad=True)
    for loss in (
        ClipLoss(clip, target_text="a red cube", crops_per_image=2),
        ClipLoss(clip, target_text="x", directional=True),
    ):
        images.grad = None
        value = loss(images, reference_images=torch.rand(2, 40, 40, 3))
        value.backward()
        assert value.ndim == 0 and torch.isfinite(value)
        assert images.grad is not None and images.grad.abs().sum() > 0


def test_global_loss_equals_one_minus_cosine_without_augmentation(clip: LoadedClip) -> None:
    images = torch.rand(3, 32, 32, 3)
    loss = ClipLoss(clip, target_text="a volume rendering", augment=False)
    expected = 1.0 - clip_cosine(clip, images, clip.encode_text("a volume rendering")[0]).mean()
    assert torch.allclose(loss(images), expected, atol=1e-6)


def _optimise(loss: ClipLoss, steps: int, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Adam on image logits; returns the learned image."""
    torch.manual_seed(0)
    logits = torch.zeros(1, 48, 48, 3) if reference is None else torch.logit(reference.clamp(0.02, 0.98))
    logits.requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        optimiser.zero_grad()
        loss(torch.sigmoid(logits), reference_images=reference).backward()
        optimiser.step()
    return torch.sigmoid(logits).detach()


@pytest.mark.parametrize("target", ["text", "image"])
def test_minimising_the_loss_moves_the_image_towards_the_target(clip: LoadedClip, tmp_path: Path, target: str) -> None:
    if target == "text":
        loss = ClipLoss(clip, target_text="a glowing orange jellyfish")
    else:
        rng = np.random.default_rng(1)
        image_path = tmp_path / "target.png"
        iio.imwrite(image_path, (rng.random((50, 70, 3)) * 255).astype(np.uint8))
        loss = ClipLoss(clip, target_image=image_path)
    start = torch.full((1, 48, 48, 3), 0.5)  # the optimisation's starting image
    distance_before = 1.0 - clip_cosine(clip, start, loss.target_embedding).item()
    distance_after = 1.0 - clip_cosine(clip, _optimise(loss, 40), loss.target_embedding).item()
    assert distance_after < 0.6 * distance_before


def test_directional_loss_aligns_the_change_with_the_text_direction(clip: LoadedClip) -> None:
    torch.manual_seed(2)
    reference = torch.rand(1, 48, 48, 3)
    loss = ClipLoss(clip, target_text="a red skull", source_text="a grey skull", directional=True, augment=False)
    direction = torch.nn.functional.normalize(loss.target_embedding - loss.source_embedding, dim=0)

    def alignment(image: torch.Tensor) -> float:
        change = clip.encode_images(image) - clip.encode_images(reference)
        return torch.nn.functional.cosine_similarity(change, direction[None]).item()

    nudged = (reference + 0.05 * torch.randn_like(reference)).clamp(0, 1)  # a change in no chosen direction
    optimised = alignment(_optimise(loss, 40, reference))
    assert optimised > 0.4 and optimised > alignment(nudged) + 0.2


def test_retargeting_changes_the_target_embedding(clip: LoadedClip, tmp_path: Path) -> None:
    loss = ClipLoss(clip, target_text="a blue volume")
    assert not loss.state_dict() and not list(loss.parameters())  # CLIP stays out of checkpoints and optimisers
    assert torch.allclose(loss.target_embedding, clip.encode_text("a blue volume")[0])
    loss.set_target_text("a red volume")
    assert torch.allclose(loss.target_embedding, clip.encode_text("a red volume")[0])
    image = (np.random.default_rng(3).random((32, 32, 3)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "ref.png", image)
    loss.set_target_image(tmp_path / "ref.png")
    expected = clip.encode_images(torch.from_numpy(image.astype(np.float32) / 255)[None])[0]
    assert torch.allclose(loss.target_embedding, expected, atol=1e-6)


def test_bad_arguments_are_rejected(clip: LoadedClip, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs target_text or target_image"):
        ClipLoss(clip)
    with pytest.raises(ValueError, match="not both"):
        ClipLoss(clip, target_text="x", target_image=tmp_path / "ref.png")
    with pytest.raises(ValueError, match="needs target_text or target_image"):
        ClipLoss(clip, negative_texts=["grey"], directional=True)  # a direction needs a target
    with pytest.raises(ValueError, match="reference_images"):
        ClipLoss(clip, target_text="x", directional=True)(torch.rand(1, 32, 32, 3))
    with pytest.raises(ValueError, match="cannot read image"):
        ClipLoss(clip, target_image=tmp_path / "missing.png")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip("no-such-model", tmp_path / "w.bin")


def test_negative_prompts_add_their_weighted_mean_cosine(clip: LoadedClip) -> None:
    """Without augmentation the loss is 1 - cos(target) + w * mean cos(negatives), computed here by hand; negative
    texts alone (a colour target's) leave only their term."""
    torch.manual_seed(0)
    images = torch.rand(2, 48, 48, 3)
    embeddings = clip.encode_images(images)
    target, negatives = clip.encode_text("a red molecule")[0], clip.encode_text(["grey", "noisy"])
    loss = ClipLoss(clip, target_text="a red molecule", augment=False, negative_texts=["grey", "noisy"],
                    negative_weight=0.7)
    expected = (1 - embeddings @ target).mean() + 0.7 * (embeddings @ negatives.t()).mean()
    assert float(loss(images)) == pytest.approx(float(expected), abs=1e-5)
    alone = ClipLoss(clip, augment=False, negative_texts=["grey", "noisy"], negative_weight=0.7)
    assert float(alone(images)) == pytest.approx(float(0.7 * (embeddings @ negatives.t()).mean()), abs=1e-5)
    # Its gradient lowers the cosine to the negatives.
    pixels = images.clone().requires_grad_(True)
    alone(pixels).backward()
    with torch.no_grad():
        stepped = (pixels - 0.5 * pixels.grad / pixels.grad.abs().max()).clamp(0, 1)
    assert (clip.encode_images(stepped) @ negatives.t()).mean() < (embeddings @ negatives.t()).mean()
