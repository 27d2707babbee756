"""Image quality metrics: PSNR and SSIM (torchmetrics), LPIPS with local weights or "unavailable" with the reason.

nerfstudio's models build torchmetrics' LPIPS eagerly, which downloads AlexNet. Here LPIPS is built lazily,
on first use, from files already on this machine: the torchvision backbone from the torch hub cache
(``~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth`` for ``alex``) or a user-given file, and the
LPIPS linear layers shipped inside the ``lpips`` package. A missing file makes LPIPS unavailable (reported
as None with ``lpips_unavailable_reason``), never a made-up number.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchvision
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

if TYPE_CHECKING:
    import lpips

LOGGER = logging.getLogger(__name__)

LPIPS_BACKBONE_WEIGHTS = {
    "alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
    "vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
    "squeeze": torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
}


def default_lpips_backbone_path(net: str) -> Path:
    """Where torchvision caches the backbone weights: ``$TORCH_HOME/hub/checkpoints/<file of the URL>``."""
    url = LPIPS_BACKBONE_WEIGHTS[net].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def load_lpips(net: str, backbone_path: Path) -> "lpips.LPIPS":
    """LPIPS (v0.1) with its packaged linear layers and the backbone's ``features.*`` tensors from a file.

    The file may be torchvision's full checkpoint or hold only the ``features.*`` tensors. Raises
    FileNotFoundError / RuntimeError / KeyError naming the file when it cannot be used.
    """
    import lpips  # here, not at module level: it imports torchvision models and is needed only for LPIPS

    linear_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not linear_path.is_file():
        raise FileNotFoundError(f"the lpips package lacks its linear-layer weights {linear_path}")
    if not backbone_path.is_file():
        url = LPIPS_BACKBONE_WEIGHTS[net].url
        raise FileNotFoundError(
            f"LPIPS backbone weights not found at {backbone_path} (they are never downloaded here); "
            f"fetch {url} on a machine with internet and put it there, or pass its path as lpips_weights"
        )
    with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(
            pretrained=True, net=net, version="0.1", pnet_rand=True, verbose=False, model_path=str(linear_path)
        )
    state = torch.load(backbone_path, map_location="cpu", weights_only=True)
    features = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
    # lpips splits torchvision's `features` into slices whose children keep their index names.
    backbone_state = {}
    for slice_name, feature_slice in model.net.named_children():
        for index, layer in feature_slice.named_children():
            for param_name in layer.state_dict():
                key = f"{index}.{param_name}"
                if key not in features:
                    raise KeyError(f"{backbone_path}: no tensor features.{key} for the LPIPS {net} backbone")
                backbone_state[f"{slice_name}.{key}"] = features[key]
    model.net.load_state_dict(backbone_state, strict=True)
    return model.eval().requires_grad_(False)


def drop_nonfinite(metrics: dict) -> tuple[dict, list[str]]:
    """(metrics without NaN/inf numbers, names left out).

    A non-finite value is no measurement (PSNR of two identical images is +inf, the spread of infinities NaN)
    and not valid JSON (ns-eval would write `"psnr": NaN`); callers say which were left out.
    """
    kept, dropped = {}, []
    for name, value in metrics.items():
        number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if isinstance(number, (float, np.floating)) and not np.isfinite(number):
            dropped.append(name)
        else:
            kept[name] = value
    return kept, dropped


class ImageMetrics:
    """PSNR, SSIM and LPIPS of one rendered image against its reference, both (H, W, 3) in [0, 1]."""

    def __init__(
        self, lpips_net: str = "alex", lpips_weights: Path | None = None, device: str | torch.device = "cpu"
    ) -> None:
        if lpips_net not in LPIPS_BACKBONE_WEIGHTS:
            raise ValueError(f"lpips_net must be one of {sorted(LPIPS_BACKBONE_WEIGHTS)}, got '{lpips_net}'")
        self.lpips_net = lpips_net
        self.lpips_weights = (
            Path(lpips_weights) if lpips_weights is not None else default_lpips_backbone_path(lpips_net)
        )
        self.device = torch.device(device)
        self._lpips = None  # lpips.LPIPS once loaded
        self._lpips_reason: str | None = None
        self._lpips_tried = False

    def _ensure_lpips(self) -> None:
        if self._lpips_tried:
            return
        self._lpips_tried = True
        try:
            self._lpips = load_lpips(self.lpips_net, self.lpips_weights).to(self.device)
        except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as error:
            self._lpips_reason = f"LPIPS ({self.lpips_net}) unavailable: {error}"
            LOGGER.warning(self._lpips_reason)

    @property
    def lpips_available(self) -> bool:
        self._ensure_lpips()
        return self._lpips is not None

    @property
    def lpips_unavailable_reason(self) -> str | None:
        self._ensure_lpips()
        return self._lpips_reason

    @torch.no_grad()
    def __call__(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> dict[str, float | None]:
        """``psnr``, ``ssim`` (data range 1) and ``lpips`` (None when unavailable)."""
        pred_t = torch.as_tensor(pred, dtype=torch.float32, device=self.device)
        target_t = torch.as_tensor(target, dtype=torch.float32, device=self.device)
        if pred_t.shape != target_t.shape or pred_t.ndim != 3 or pred_t.shape[-1] != 3:
            raise ValueError(f"expected two (H, W, 3) images, got {tuple(pred_t.shape)} and {tuple(target_t.shape)}")
        pred_b = pred_t.permute(2, 0, 1)[None]
        target_b = target_t.permute(2, 0, 1)[None]
        self._ensure_lpips()
        lpips_value = None
        if self._lpips is not None:
            lpips_value = float(self._lpips(pred_b, target_b, normalize=True).item())  # normalize: [0,1] -> [-1,1]
        return {
            "psnr": float(peak_signal_noise_ratio(pred_b, target_b, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(pred_b, target_b, data_range=1.0)),
            "lpips": lpips_value,
        }
