"""Tiny randomly initialised CLIP and LPIPS weights for tests; they go through the real loading code."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
import torchvision

TINY_CLIP_NAME = "gridinr-tiny-clip"

# A 2-layer ViT and text transformer: same code paths as ViT-B-16, about 2 M parameters
# (mostly the 49408-token embedding the built-in tokenizer needs). Average pooling of the patch tokens:
# with random weights the class token barely depends on the image, the average does.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "pool_type": "avg"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_clip(config_dir: Path) -> str:
    """Write the tiny model's config as JSON and register it with open_clip; returns the model name."""
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config_dir)
    return TINY_CLIP_NAME


def save_tiny_clip_weights(model_name: str, path: Path, seed: int = 0) -> Path:
    """Random weights of a registered model, saved as a plain state dict like open_clip_pytorch_model.bin."""
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    torch.save(model.state_dict(), path)
    return path


def save_random_lpips_backbone(net: str, path: Path, seed: int = 0) -> Path:
    """Random torchvision backbone weights, only the ``features.*`` tensors LPIPS uses (keeps the file small)."""
    torch.manual_seed(seed)
    builders = {
        "alex": torchvision.models.alexnet,
        "vgg": torchvision.models.vgg16,
        "squeeze": torchvision.models.squeezenet1_1,
    }
    state = {
        key: value for key, value in builders[net](weights=None).state_dict().items() if key.startswith("features.")
    }
    torch.save(state, path)
    return path
