"""The field's mixed-precision decoder (VolumeFieldSettings.mixed_precision), on the CPU: bfloat16 autocast, and the
float16 path with its loss scale under CPU autocast."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gridinr_nerfstudio.fields import volume_field
from gridinr_nerfstudio.fields.volume_field import LOSS_SCALE, VolumeField, VolumeFieldSettings, mixed_precision_decode

AABB = torch.tensor([[-1.0, -0.5, -0.25], [1.0, 0.5, 0.25]])
SETTINGS = VolumeFieldSettings(num_levels=6, features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                               max_resolution=32, hidden_dim=32, num_hidden_layers=2, backend="torch")


def _fields(settings: VolumeFieldSettings = SETTINGS):
    """(float32 field, mixed-precision field) with the same parameters."""
    torch.manual_seed(0)
    plain = VolumeField(AABB, settings)
    with torch.no_grad():  # tables away from their tiny initial values, so the features matter
        plain.encoding.params.uniform_(-0.5, 0.5)
    mixed = VolumeField(AABB, dataclasses.replace(settings, mixed_precision=True))
    mixed.load_state_dict(plain.state_dict())
    return plain, mixed


def _points(count: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, generator=torch.Generator().manual_seed(seed))


def _grads(field: VolumeField, unit: torch.Tensor, target: torch.Tensor):
    field.zero_grad(set_to_none=True)
    values = field.forward_unit(unit)
    (values - target).square().mean().backward()
    return values.detach(), {name: p.grad.clone() for name, p in field.named_parameters()}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_off_is_the_float32_mlp_bit_for_bit():
    assert VolumeFieldSettings().mixed_precision is False
    plain, _ = _fields()
    unit, target = _points(), torch.rand(512)
    values, grads = _grads(plain, unit, target)
    plain.zero_grad(set_to_none=True)
    expected = plain.mlp(plain.encoding(unit)).squeeze(-1)  # what forward_unit computed before the option
    (expected - target).square().mean().backward()
    assert torch.equal(values, expected.detach())
    for name, param in plain.named_parameters():
        assert torch.equal(grads[name], param.grad), name


@pytest.mark.parametrize("hidden_layers", [2, 0])  # the 2x64-style MLP and the compact field's linear decoder
def test_bfloat16_autocast_is_close_to_float32_and_keeps_float32_parameters(hidden_layers):
    plain, mixed = _fields(dataclasses.replace(SETTINGS, num_hidden_layers=hidden_layers))
    unit, target = _points(), torch.rand(512)
    expected, expected_grads = _grads(plain, unit, target)
    values, grads = _grads(mixed, unit, target)
    assert values.dtype == torch.float32
    assert not torch.equal(values, expected)  # the decoder did run in bfloat16
    torch.testing.assert_close(values, expected, rtol=0, atol=3e-2)  # bfloat16: 8 bits of mantissa
    for name, param in mixed.named_parameters():
        assert param.dtype == torch.float32 and grads[name].dtype == torch.float32, name
        assert float(grads[name].abs().max()) > 0, name  # gradients reach tables and every layer
        assert _cosine(grads[name], expected_grads[name]) > 0.98, name
    # Inference (renders, volume PSNR) stays float32.
    with torch.no_grad():
        torch.testing.assert_close(mixed.forward_unit(unit), plain.forward_unit(unit), rtol=0, atol=0)


def test_sequence_fields_use_it_too():
    torch.manual_seed(0)
    plain = VolumeField(AABB, SETTINGS, num_times=3)
    mixed = VolumeField(AABB, dataclasses.replace(SETTINGS, mixed_precision=True), num_times=3)
    mixed.load_state_dict(plain.state_dict())
    unit, times = _points(256), torch.rand(256)
    expected = plain.forward_unit(unit, times)
    values = mixed.forward_unit(unit, times)
    assert values.dtype == torch.float32 and not torch.equal(values, expected)
    torch.testing.assert_close(values, expected, rtol=0, atol=3e-2)
    values.square().mean().backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in mixed.time_parameters())


def test_float16_loss_scale_keeps_small_gradients(monkeypatch):
    """float16 (CUDA's dtype, here under CPU autocast): a mean loss over 2^16 points has per-point gradients
    ~1e-7, under float16's normal range; the loss scale keeps the decoder's gradients accurate."""
    plain, mixed = _fields()
    count = 1 << 16
    unit = _points(count)
    with torch.no_grad():
        target = plain.forward_unit(unit) + 0.01 * torch.randn(count, generator=torch.Generator().manual_seed(2))
    _, expected = _grads(plain, unit, target)
    monkeypatch.setattr(volume_field, "autocast_dtype", lambda device_type: torch.float16)
    _, scaled = _grads(mixed, unit, target)
    layers = mixed.decoder_layers()

    def unscaled_grads():
        mixed.zero_grad(set_to_none=True)
        features = mixed.encoding(unit)
        (mixed_precision_decode(layers, features, torch.float16, 1.0) - target).square().mean().backward()
        return {name: p.grad.clone() for name, p in mixed.named_parameters()}

    unscaled = unscaled_grads()
    first_layer = "mlp.layers.0.weight"
    scaled_error = float((scaled[first_layer] - expected[first_layer]).norm() / expected[first_layer].norm())
    unscaled_error = float((unscaled[first_layer] - expected[first_layer]).norm() / expected[first_layer].norm())
    assert scaled_error < 0.05 and unscaled_error > 2 * scaled_error, (scaled_error, unscaled_error)
    for name in expected:
        assert _cosine(scaled[name], expected[name]) > 0.99, name
        assert scaled[name].dtype == torch.float32
    assert LOSS_SCALE > 1


def test_a_short_training_run_lowers_the_loss():
    _, field = _fields()
    optimizer = torch.optim.Adam(field.parameters(), lr=1e-2)
    unit = _points(4096)
    target = torch.sin(6 * unit[:, 0]) * torch.cos(4 * unit[:, 1]) * 0.5 + 0.5
    losses = []
    for _ in range(60):
        optimizer.zero_grad(set_to_none=True)
        loss = (field.forward_unit(unit) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert field.encoding.params.dtype == torch.float32
