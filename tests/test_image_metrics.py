"""PSNR/SSIM against scikit-image, LPIPS from local (random) weight files or unavailable with a reason."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tiny_models import save_random_lpips_backbone

from gridinr_nerfstudio.eval.metrics import ImageMetrics, default_lpips_backbone_path


pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py


@pytest.fixture(scope="module")
def image_pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:60, 0:72] / 60.0
    target = np.stack([np.sin(6 * x) * 0.5 + 0.5, y, x * y], axis=-1).astype(np.float32)
    pred = np.clip(target + 0.08 * rng.standard_normal(target.shape), 0, 1).astype(np.float32)
    return pred, target


@pytest.fixture(scope="module")
def alex_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_lpips_backbone("alex", tmp_path_factory.mktemp("lpips") / "alexnet_features.pth")


def test_psnr_and_ssim_match_scikit_image(image_pair: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    pred, target = image_pair
    metrics = ImageMetrics(lpips_weights=tmp_path / "absent.pth")(torch.from_numpy(pred), torch.from_numpy(target))
    assert metrics["psnr"] == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=1.0), abs=1e-4)

    # torchmetrics (as nerfstudio reports it) averages SSIM over every pixel, with the image reflect-padded
    # by the Gaussian window's radius (5); skimage averages over windows inside its input. Pad, then compare.
    def pad(image: np.ndarray) -> np.ndarray:
        return np.pad(image.astype(np.float64), ((5, 5), (5, 5), (0, 0)), mode="reflect")

    reference_ssim = structural_similarity(
        pad(target),
        pad(pred),
        channel_axis=2,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert metrics["ssim"] == pytest.approx(reference_ssim, abs=1e-5)


def test_lpips_from_weight_files_is_finite_and_zero_for_identical_images(
    image_pair: tuple[np.ndarray, np.ndarray], alex_weights: Path
) -> None:
    pred, target = image_pair
    metrics = ImageMetrics("alex", lpips_weights=alex_weights)
    assert metrics.lpips_available and metrics.lpips_unavailable_reason is None
    different = metrics(pred, target)["lpips"]
    same = metrics(target, target)["lpips"]
    assert different is not None and np.isfinite(different) and different > 1e-4
    assert same == pytest.approx(0.0, abs=1e-7)


def test_lpips_backbone_holds_the_file_weights_and_packaged_linear_layers(alex_weights: Path) -> None:
    import lpips

    metrics = ImageMetrics("alex", lpips_weights=alex_weights)
    assert metrics.lpips_available
    saved = torch.load(alex_weights, map_location="cpu", weights_only=True)
    model = metrics._lpips
    assert torch.equal(getattr(model.net.slice1, "0").weight, saved["features.0.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").bias, saved["features.10.bias"])
    packaged = torch.load(
        Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu", weights_only=True
    )
    assert torch.equal(model.lin0.model[1].weight, packaged["lin0.model.1.weight"])


def test_missing_lpips_weights_are_reported_unavailable(
    image_pair: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    pred, target = image_pair
    missing = tmp_path / "alexnet-owt-7be5be79.pth"
    metrics = ImageMetrics("alex", lpips_weights=missing)
    result = metrics(pred, target)
    assert result["lpips"] is None and result["psnr"] > 0
    assert not metrics.lpips_available
    assert (
        str(missing) in metrics.lpips_unavailable_reason and "download.pytorch.org" in metrics.lpips_unavailable_reason
    )


def test_wrong_weight_file_is_reported_unavailable(tmp_path: Path) -> None:
    squeeze = save_random_lpips_backbone("squeeze", tmp_path / "squeeze.pth")
    metrics = ImageMetrics("alex", lpips_weights=squeeze)  # squeezenet tensors where AlexNet's are expected
    assert not metrics.lpips_available and str(squeeze) in metrics.lpips_unavailable_reason


def test_default_backbone_path_is_the_torch_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert default_lpips_backbone_path("alex") == tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert ImageMetrics().lpips_weights == tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"


def test_mismatched_images_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected two"):
        ImageMetrics(lpips_weights=tmp_path / "absent.pth")(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
