"""open_clip loading without network, target embeddings and CLIP losses for editing renderings.

Weights never download here: a pretrained tag is resolved to a file already in the Hugging Face hub cache
(or open_clip's URL cache), or ``pretrained`` is a path to a local weights file. When no file is found,
``ClipWeightsUnavailable`` says where we looked and how to provide the weights.

Two losses (``ClipLoss``):

- global: ``1 - cos(E_img(render), target)``, pulls every rendering towards the text/image target.
- directional (StyleGAN-NADA, Gal et al. 2022): ``1 - cos(E_img(render) - E_img(reference), target - source)``,
  where ``reference`` is the unedited rendering of the same view and ``source`` is the embedding of a
  description of the unedited volume (``source_text``) or, without one, of the reference rendering itself.
  It changes only what the target asks for and keeps the rest of the look, and is less prone to adversarial
  textures than the global loss. Render and reference get the same random crop so their difference is
  due to the edit alone.

Negative prompts ("grey", "noisy") add ``negative_weight`` x the mean cosine of the renders to each negative
text, in either mode: the renders are pushed away from them. Several targets (edits by parts) batch the crops of
all their renders through CLIP at once: ``crops`` and ``loss_from_embeddings`` are the two halves of ``forward``.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2.functional import resized_crop

# open_clip and huggingface_hub are imported where used: the method entry points import this module, and
# nerfstudio imports every entry point at the start of any ns-* command.

DEFAULT_CLIP_MODEL = "ViT-B-16"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b88k"


class ClipWeightsUnavailable(RuntimeError):
    """CLIP weights are not on this machine; the message says where we looked and how to provide them."""


class ClipWeightsError(ValueError):
    """A CLIP weights file exists but cannot be used: unreadable, or the weights of another model (one line)."""


@contextmanager
def clip_weights_errors(model_name: str, weights_path: Path):
    """Turn what torch/open_clip raise on a bad weights file into one ClipWeightsError line naming the file.

    torch's own message for a non-checkpoint suggests turning weights-only loading off (running the file's
    code): we never do that.
    """
    try:
        yield
    except (pickle.UnpicklingError, EOFError) as error:
        raise ClipWeightsError(f"{weights_path}: not a readable weights file (truncated, or not a PyTorch/"
                               f"safetensors state dict: {type(error).__name__})") from None
    except (RuntimeError, AssertionError, KeyError, ValueError, StopIteration, AttributeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])
        detail = " ".join(line.strip() for line in first[:2])[:240]
        raise ClipWeightsError(f"{weights_path}: not weights of open_clip model {model_name} ({detail}); "
                               "pass the matching --pipeline.model.clip-model") from None


def check_clip_weights(model_name: str, pretrained: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The weights file load_clip would use, checked against the model without building it (meta tensors).

    Raises ClipWeightsUnavailable, ClipWeightsError or ValueError (unknown model), each one line.
    """
    import open_clip

    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown open_clip model '{model_name}' (see open_clip.list_models())")
    weights_path = resolve_clip_weights(model_name, pretrained, cache_dir)
    with warnings.catch_warnings():  # copying into meta tensors is a (warned) no-op: only names and shapes count
        warnings.simplefilter("ignore")
        model = open_clip.create_model(model_name, pretrained=None, device="meta", pretrained_hf=False)
        with clip_weights_errors(model_name, weights_path):
            open_clip.load_checkpoint(model, str(weights_path), weights_only=True)
    return weights_path


@dataclass
class LoadedClip:
    """A frozen open_clip model with its tokenizer and image normalisation."""

    model: nn.Module
    tokenizer: Callable[[list[str]], Tensor]
    mean: Tensor  # (3,) on device
    std: Tensor  # (3,) on device
    image_size: tuple[int, int]
    device: torch.device
    model_name: str
    weights_path: Path

    @torch.no_grad()
    def encode_text(self, prompts: str | list[str]) -> Tensor:
        """Unit-norm text embeddings, shape (N, D)."""
        tokens = self.tokenizer([prompts] if isinstance(prompts, str) else prompts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def encode_images(self, images: Tensor) -> Tensor:
        """Unit-norm embeddings (B, D) of images (B, H, W, 3) in [0, 1]; differentiable w.r.t. the images.

        The images are resized (squashed) to the CLIP input size and normalised with the CLIP mean/std.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape (B, H, W, 3), got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32).permute(0, 3, 1, 2)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_image_file(self, path: str | Path) -> Tensor:
        """Unit-norm embedding (1, D) of an image file, centre-cropped to a square like CLIP's preprocessing."""
        image = read_rgb_image(path)
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = image[top : top + side, left : left + side]
        return self.encode_images(torch.from_numpy(square)[None])


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Image file -> float32 (H, W, 3) in [0, 1]; grey is repeated, alpha dropped."""
    path = Path(path)
    try:
        image = iio.imread(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read image ({error})") from error
    if not np.issubdtype(image.dtype, np.integer):
        raise ValueError(f"{path}: expected an 8/16-bit image, got dtype {image.dtype}")
    image = image.astype(np.float32) / np.iinfo(image.dtype).max
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{path}: expected a grey, RGB or RGBA image, got shape {image.shape}")
    colour = image[..., :1] if image.shape[-1] <= 2 else image[..., :3]
    return np.broadcast_to(colour, (*image.shape[:2], 3)).copy()


def _how_to_provide(model_name: str, tag: str) -> str:
    return (
        "Provide them either by running once on a machine with internet, which fills the cache: "
        f"python -c \"import open_clip; open_clip.create_model_and_transforms('{model_name}', pretrained='{tag}')\" "
        "(copy ~/.cache/huggingface to this machine if needed), or download open_clip_pytorch_model.bin "
        "(or open_clip_model.safetensors) of that model and pass it with "
        "--pipeline.model.clip-weights /path/to/open_clip_pytorch_model.bin"
    )


def resolve_clip_weights(model_name: str, pretrained: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Local weights file for an open_clip pretrained tag or path; never touches the network.

    Looks where open_clip would download to: the Hugging Face hub cache (``cache_dir`` or HF_HUB_CACHE /
    HF_HOME) for tags hosted on the hub, else ``cache_dir`` or ``~/.cache/clip`` for tags with a plain URL.
    """
    import open_clip
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    path = Path(pretrained).expanduser()
    if path.is_file():
        return path.resolve()
    cfg = open_clip.get_pretrained_cfg(model_name, str(pretrained))
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        example_tag = DEFAULT_CLIP_PRETRAINED if DEFAULT_CLIP_PRETRAINED in known else (known or ["TAG"])[0]
        raise ClipWeightsUnavailable(
            f"CLIP weights '{pretrained}' for model {model_name}: no such file, and not an open_clip pretrained tag "
            f"of this model (known tags: {known}). {_how_to_provide(model_name, example_tag)}"
        )
    looked: list[str] = []
    if cfg.get("file"):
        looked.append(cfg["file"])
        if Path(cfg["file"]).is_file():
            return Path(cfg["file"])
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])  # 'org/repo/' means the default file name
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        hub_cache = Path(cache_dir) if cache_dir is not None else Path(hf_constants.HF_HUB_CACHE)
        for name in candidates:
            cached = try_to_load_from_cache(repo_id, name, cache_dir=hub_cache)
            if isinstance(cached, str):
                return Path(cached)
        looked.append(f"Hugging Face cache {hub_cache} (repo {repo_id}, files {candidates})")
    if cfg.get("url"):
        url_file = Path(cache_dir or Path("~/.cache/clip").expanduser()) / os.path.basename(cfg["url"])
        if url_file.is_file():
            return url_file
        looked.append(str(url_file))
    raise ClipWeightsUnavailable(
        f"CLIP weights for model {model_name}, pretrained tag '{pretrained}', are not on this machine "
        f"(looked in: {'; '.join(looked)}); they are never downloaded during training or evaluation. "
        + _how_to_provide(model_name, str(pretrained))
    )


def load_clip(
    model_name: str = DEFAULT_CLIP_MODEL,
    pretrained: str | Path = DEFAULT_CLIP_PRETRAINED,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> LoadedClip:
    """Frozen open_clip model from a pretrained tag (found in the local cache) or a local weights file.

    A tag brings its normalisation and activation (QuickGELU for OpenAI weights); a local file gets the
    model config's (OpenAI mean/std; use e.g. ``ViT-B-16-quickgelu`` for OpenAI's own weights).
    Raises ``ClipWeightsUnavailable`` before building the model when the weights are not on this machine.
    """
    import open_clip

    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip model '{model_name}' (see open_clip.list_models())")
    text_cfg = config.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name") or "siglip" in model_name.lower():
        raise ValueError(
            f"open_clip model '{model_name}' needs a Hugging Face text model or tokenizer, which open_clip "
            "fetches from the network; use a model with the built-in CLIP tokenizer (e.g. ViT-B-16)"
        )
    weights_path = resolve_clip_weights(model_name, pretrained, cache_dir)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, str(pretrained))
    norm_cfg = {key: tag_cfg[key] for key in ("mean", "std") if key in tag_cfg}
    device = torch.device(device)
    with clip_weights_errors(model_name, weights_path):
        model = open_clip.create_model(
            model_name,
            pretrained=str(weights_path),  # an absolute path: open_clip loads it and downloads nothing
            device=device,
            pretrained_hf=False,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),  # open_clip only warns about a mismatch
            force_preprocess_cfg=norm_cfg,
        )
    model.eval().requires_grad_(False)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess["size"]
    return LoadedClip(
        model=model,
        tokenizer=open_clip.get_tokenizer(model_name),
        mean=torch.tensor(preprocess["mean"], dtype=torch.float32, device=device),
        std=torch.tensor(preprocess["std"], dtype=torch.float32, device=device),
        image_size=(size, size) if isinstance(size, int) else (int(size[0]), int(size[1])),
        device=device,
        model_name=model_name,
        weights_path=weights_path,
    )


def clip_cosine(clip: LoadedClip, images: Tensor, target: Tensor) -> Tensor:
    """Cosine similarity (B,) between images (B, H, W, 3) in [0, 1] and a unit target embedding (D,) or (1, D).

    Deterministic (no augmentation): the evaluation metric.
    """
    with torch.no_grad():
        return clip.encode_images(images) @ target.reshape(-1).to(clip.device)


class ClipLoss(nn.Module):
    """CLIP loss of renderings against a text or image target, global or directional (see module docstring).

    The CLIP model is held by reference, not as a submodule: it stays out of checkpoints and keeps the
    device it was loaded on; images move there and the loss comes back on the images' device.
    """

    def __init__(
        self,
        clip: LoadedClip,
        target_text: str | None = None,
        target_image: str | Path | None = None,
        directional: bool = False,
        source_text: str | None = None,
        crops_per_image: int = 1,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        augment: bool = True,
        negative_texts: tuple[str, ...] | list[str] = (),
        negative_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if target_text is not None and target_image is not None:
            raise ValueError("ClipLoss takes one of target_text or target_image, not both")
        if target_text is None and target_image is None and (directional or not any(negative_texts)):
            raise ValueError("ClipLoss needs target_text or target_image (or, global, negative texts alone)")
        if crops_per_image < 1:
            raise ValueError(f"crops_per_image must be >= 1, got {crops_per_image}")
        self.clip = clip
        self.directional = directional
        self.crops_per_image = crops_per_image
        self.crop_scale = crop_scale
        self.augment = augment
        self.negative_weight = negative_weight
        self.target_embedding: Tensor | None = None  # None: negative prompts alone (a colour target's)
        self.source_embedding: Tensor | None = None
        self.negative_embeddings: Tensor | None = None
        if target_text is not None:
            self.set_target_text(target_text)
        elif target_image is not None:
            self.set_target_image(target_image)
        self.set_source_text(source_text)
        self.set_negative_texts(negative_texts)

    def set_target_text(self, prompt: str) -> None:
        """Re-encode the target from a text prompt (e.g. from the viewer) without rebuilding anything."""
        self.target_embedding = self.clip.encode_text(prompt)[0]

    def set_target_image(self, path: str | Path) -> None:
        """Re-encode the target from a reference image file."""
        self.target_embedding = self.clip.encode_image_file(path)[0]

    def set_source_text(self, prompt: str | None) -> None:
        """Description of the unedited volume for the directional loss; None uses the reference renderings."""
        self.source_embedding = None if prompt is None else self.clip.encode_text(prompt)[0]

    def set_negative_texts(self, prompts: tuple[str, ...] | list[str]) -> None:
        """Texts the renders are pushed away from (none: no negative term)."""
        prompts = [prompt for prompt in prompts if prompt.strip()]
        self.negative_embeddings = self.clip.encode_text(prompts) if prompts else None

    def _crops(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B * crops_per_image, C, h, w) at CLIP input size; random resized crops if augment."""
        if not self.augment:
            return images.repeat_interleave(self.crops_per_image, dim=0)
        crops = []
        for image in images:
            for _ in range(self.crops_per_image):
                top, left, height, width = RandomResizedCrop.get_params(
                    image, scale=list(self.crop_scale), ratio=[3 / 4, 4 / 3]
                )
                crops.append(resized_crop(image, top, left, height, width, list(self.clip.image_size), antialias=True))
        return torch.stack(crops)

    def crops(self, images: Tensor, reference_images: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """CLIP-size crops (B * crops, h, w, 3) of images (B, H, W, 3) in [0, 1], and with the directional loss
        the same crops of ``reference_images`` (detached); what ``encode_images`` takes."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape (B, H, W, 3), got {tuple(images.shape)}")
        x = images.to(self.clip.device, torch.float32).permute(0, 3, 1, 2)
        if not self.directional:
            return self._crops(x).permute(0, 2, 3, 1), None
        if reference_images is None or reference_images.shape != images.shape:
            raise ValueError("the directional CLIP loss needs reference_images of the same shape as images")
        reference = reference_images.detach().to(self.clip.device, torch.float32).permute(0, 3, 1, 2)
        crops = self._crops(torch.cat([x, reference], dim=1)).permute(0, 2, 3, 1)  # same crop for both
        return crops[..., :3], crops[..., 3:]

    def loss_from_embeddings(self, edit_embeddings: Tensor, reference_embeddings: Tensor | None = None) -> Tensor:
        """The loss of unit embeddings (N, D) of the crops (and, directional, of their reference crops)."""
        if self.target_embedding is None:
            loss = edit_embeddings.new_zeros(())
        elif not self.directional:
            loss = (1.0 - edit_embeddings @ self.target_embedding).mean()
        else:
            if reference_embeddings is None:
                raise ValueError("the directional CLIP loss needs the reference crops' embeddings")
            source = reference_embeddings if self.source_embedding is None else self.source_embedding[None]
            target_direction = F.normalize(self.target_embedding[None] - source, dim=-1)
            image_direction = F.normalize(edit_embeddings - reference_embeddings, dim=-1)
            loss = (1.0 - (image_direction * target_direction).sum(-1)).mean()
        if self.negative_embeddings is not None and self.negative_weight > 0:
            loss = loss + self.negative_weight * (edit_embeddings @ self.negative_embeddings.t()).mean()
        return loss

    def forward(self, images: Tensor, reference_images: Tensor | None = None) -> Tensor:
        """Mean loss over images (B, H, W, 3) in [0, 1]; ``reference_images`` (same shape, the unedited
        renderings of the same views) are required by the directional loss."""
        edit_crops, reference_crops = self.crops(images, reference_images)
        edit_embeddings = self.clip.encode_images(edit_crops)
        reference_embeddings = None
        if reference_crops is not None:
            with torch.no_grad():
                reference_embeddings = self.clip.encode_images(reference_crops)
        return self.loss_from_embeddings(edit_embeddings, reference_embeddings).to(images.device)
