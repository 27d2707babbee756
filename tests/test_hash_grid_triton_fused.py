"""The fused Triton field kernel (encoding + ReLU MLP per block of points) against the torch backend + torch MLP.

Runs on CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA); the sm_90
compile of the kernel is tests/triton_compile_check.py's (run by test_hash_grid_triton.py). Sizes are tiny: the
interpreter runs every program in numpy. The reference is independent of the kernel: ``HashGridEncoding`` on the
torch backend, then the decoder's own ``nn.Linear`` layers with ``torch.relu`` between them.
"""

from __future__ import annotations

import pytest
import torch
from checks import boundary_points, torch_and_triton_pair
from torch import nn

from gridinr_nerfstudio.fields.hash_grid import _backend
from gridinr_nerfstudio.fields.hash_grid.encoding import FUSED_TRITON_ENV, HashGridEncoding
from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings

pytest.importorskip("triton")
if not (_backend.triton_available() and _backend.triton_fused_module()):
    pytest.skip("our triton kernels do not import", allow_module_level=True)
if not _backend.triton_module().INTERPRETED:
    pytest.skip("triton kernels compiled for a GPU: run with TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)

FUSED = _backend.triton_fused_module()


_pair = torch_and_triton_pair


def _decoder(inputs: int, widths: tuple[int, ...], dtype=torch.float32, bias: tuple[bool, ...] | None = None,
             seed: int = 0) -> list[nn.Linear]:
    """Linear layers inputs -> widths... -> 1 with random weights (and biases, unless ``bias[k]`` is False)."""
    torch.manual_seed(seed)
    sizes = [inputs, *widths, 1]
    bias = bias or (True,) * (len(sizes) - 1)
    layers = [nn.Linear(a, b, bias=has_bias).to(dtype) for a, b, has_bias in zip(sizes, sizes[1:], bias)]
    with torch.no_grad():
        for layer in layers:
            if layer.bias is not None:
                layer.bias.normal_(std=0.5)  # nonzero everywhere: a missed bias shows
    return layers


def _reference(encoding: HashGridEncoding, layers: list[nn.Linear], points: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = encoding(points)
        for k, layer in enumerate(layers):
            x = layer(x)
            if k + 1 < len(layers):
                x = torch.relu(x)
        return x.squeeze(-1)


def _points(encoding: HashGridEncoding, outside: bool = False) -> torch.Tensor:
    return boundary_points(encoding, inside=40, outside=10 if outside else 0)


def _check(reference, triton_encoding, layers, points, rtol=1e-5, atol=1e-5) -> None:
    assert points.shape[0] > FUSED.BLOCK and points.shape[0] % FUSED.BLOCK  # several programs, a partial block
    fused = triton_encoding.fused_decode(points, layers)
    assert fused is not None, "the fused Triton path did not apply"
    assert fused.shape == (points.shape[0],) and fused.dtype == points.dtype
    torch.testing.assert_close(fused, _reference(reference, layers, points), rtol=rtol, atol=atol)


def test_linear_decoder_of_the_compact_cpu_field() -> None:
    """8 levels x 1 feature and no hidden layer: the encoding times one weight row plus a bias."""
    reference, triton_encoding = _pair(1, num_levels=8, max_resolution=64)
    assert True in reference.geometry.dense and False in reference.geometry.dense
    _check(reference, triton_encoding, _decoder(8, ()), _points(reference, outside=True))


@pytest.mark.parametrize("widths", [(16,), (32,), (64,), (23,), (16, 16), (64, 64), (32, 23)])
def test_hidden_layers_of_each_width(widths: tuple[int, ...]) -> None:
    """1 and 2 hidden layers, widths 16/32/64 and odd ones (zero-padded to a power of two inside the kernel)."""
    reference, triton_encoding = _pair(2)
    _check(reference, triton_encoding, _decoder(8, widths, seed=len(widths) * 100 + widths[-1]), _points(reference))


@pytest.mark.parametrize("features", [1, 4, 8])
def test_other_feature_counts(features: int) -> None:
    """Input tiles narrower than tl.dot's 16 columns are padded with masked levels (1 x 4 levels -> 16)."""
    reference, triton_encoding = _pair(features)
    _check(reference, triton_encoding, _decoder(4 * features, (16,), seed=features), _points(reference, outside=True))


def test_layers_without_bias() -> None:
    """A last layer without bias (and a hidden one): the kernel adds zeros there, no stale or missing bias."""
    reference, triton_encoding = _pair(2)
    points = _points(reference)
    _check(reference, triton_encoding, _decoder(8, (16,), bias=(True, False)), points)
    _check(reference, triton_encoding, _decoder(8, (16, 32), bias=(False, True, False), seed=3), points)
    _check(reference, triton_encoding, _decoder(8, (), bias=(False,)), points)


def test_nerfstudio_convention_in_float64() -> None:
    reference, triton_encoding = _pair(2, convention="nerfstudio", dtype=torch.float64)
    assert reference.geometry.shift == 0.0 and not any(reference.geometry.dense)
    points = _points(reference)
    _check(reference, triton_encoding, _decoder(8, (32, 32), dtype=torch.float64), points, rtol=1e-10, atol=1e-10)
    _check(reference, triton_encoding, _decoder(8, (), dtype=torch.float64), points, rtol=1e-10, atol=1e-10)


def test_tcnn_convention_with_a_wrapping_level() -> None:
    """One level of resolution 5 in a 2^4-entry table (hashed, every cell collides), points outside the box."""
    reference, triton_encoding = _pair(2, num_levels=1, log2_hashmap_size=4, base_resolution=5)
    assert reference.geometry.dense == (False,)
    _check(reference, triton_encoding, _decoder(2, (16,)), _points(reference, outside=True))


def test_where_the_fused_kernel_does_not_apply(monkeypatch) -> None:
    """None (the caller then encodes and runs the torch MLP) for decoders, dtypes and shapes it does not take, and
    when switched off; an empty batch gives an empty result."""
    reference, triton_encoding = _pair(2)
    points = torch.rand(5, 3, generator=torch.Generator().manual_seed(1))
    assert triton_encoding.fused_decode(points, _decoder(8, (200,))) is None  # wider than the kernel's tiles
    assert triton_encoding.fused_decode(points, _decoder(8, (16,), dtype=torch.float64)) is None  # other dtype
    two_outputs = [nn.Linear(8, 16), nn.Linear(16, 2)]
    assert triton_encoding.fused_decode(points, two_outputs) is None
    assert triton_encoding.fused_decode(points, [nn.Linear(9, 16), nn.Linear(16, 1)]) is None  # not the encoding's width
    assert triton_encoding.fused_decode(points, [nn.Linear(8, 16), nn.Linear(12, 1)]) is None  # broken chain
    assert triton_encoding.fused_decode(points, []) is None
    assert triton_encoding.fused_decode(points.reshape(5, 1, 3), _decoder(8, (16,))) is None
    assert reference.fused_decode(points, _decoder(8, (16,))) is None  # torch backend: nothing fused
    assert triton_encoding.fused_decode(points[:0], _decoder(8, (16,))).shape == (0,)
    triton_encoding.fused_triton = False
    assert triton_encoding.fused_decode(points, _decoder(8, (16,))) is None
    triton_encoding.fused_triton = True
    monkeypatch.setenv(FUSED_TRITON_ENV, "0")
    assert triton_encoding.fused_decode(points, _decoder(8, (16,))) is None
    monkeypatch.setenv(FUSED_TRITON_ENV, "1")
    torch.testing.assert_close(triton_encoding.fused_decode(points, _decoder(8, (16,))),
                               _reference(reference, _decoder(8, (16,)), points), rtol=1e-5, atol=1e-5)


def test_volume_field_uses_the_fused_kernel_only_without_gradients(monkeypatch) -> None:
    """forward_unit: fused under no_grad, with the autograd path's values; autograd (not fused) when a gradient
    could be wanted, and then the values still match the torch backend's field."""
    settings = VolumeFieldSettings(num_levels=4, features_per_level=2, log2_hashmap_size=9, base_resolution=3,
                                   max_resolution=40, hidden_dim=32, num_hidden_layers=2, backend="triton")
    field = VolumeField(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]), settings)
    with torch.no_grad():
        field.encoding.params.normal_(generator=torch.Generator().manual_seed(5))
    reference = VolumeField(field.aabb.clone(), VolumeFieldSettings(**{**settings.__dict__, "backend": "torch"}))
    reference.load_state_dict(field.state_dict())
    calls = []
    original = FUSED.fused_field_forward
    monkeypatch.setattr(FUSED, "fused_field_forward", lambda *args: calls.append(1) or original(*args))
    points = _points(field.encoding)

    with_grad = field.forward_unit(points)
    assert calls == [] and with_grad.requires_grad  # parameters require grad: autograd path
    with_grad.sum().backward()
    assert field.encoding.params.grad is not None and field.encoding.params.grad.abs().sum() > 0
    with torch.no_grad():
        fused = field.forward_unit(points)
        expected = reference.forward_unit(points)
    assert calls == [1] and not fused.requires_grad
    torch.testing.assert_close(fused, with_grad.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)

    field.requires_grad_(False)  # a frozen field (stage 2): fused even with grad mode on ...
    field.forward_unit(points)
    assert calls == [1, 1]
    field.forward_unit(points.clone().requires_grad_(True))  # ... but not when the points want a gradient
    assert calls == [1, 1]
    field.encoding.fused_triton = False
    with torch.no_grad():
        torch.testing.assert_close(field.forward_unit(points), expected, rtol=1e-5, atol=1e-5)
    assert calls == [1, 1]


def test_encoding_benchmark_decode_contenders_under_the_interpreter() -> None:
    """gridinr-bench encoding's field-inference section (run on CUDA only) on a tiny interpreted case: every
    contender timed, fused and unfused values agree."""
    from gridinr_nerfstudio.scripts.bench.encoding import decode_benchmark, decoder_layers
    from gridinr_nerfstudio.scripts.bench.timing import Clock

    reference, triton_encoding = _pair(2)
    layers = decoder_layers(reference.get_out_dim(), "1x16", torch.device("cpu"))
    assert [layer.out_features for layer in layers] == [16, 1]
    result = decode_benchmark({"ours_torch": reference, "ours_triton": triton_encoding}, layers, [70], 1,
                              Clock(torch.device("cpu")))
    row = result["70"]
    assert set(row) == {"ours_torch_mlp", "ours_triton_mlp", "ours_triton_fused", "max_abs_diff_fused_vs_unfused"}
    assert all(row[name] > 0 for name in ("ours_torch_mlp", "ours_triton_mlp", "ours_triton_fused"))
    assert row["max_abs_diff_fused_vs_unfused"] < 1e-5


def test_encoding_benchmark_prints_the_decode_section_with_triton(monkeypatch, tmp_path, capsys) -> None:
    """The whole `gridinr-bench encoding` run with triton among the backends (as on CUDA), interpreted on a CPU."""
    import json

    from gridinr_nerfstudio.scripts.bench import encoding as encoding_bench
    from gridinr_nerfstudio.scripts.bench.cli import main as bench_main

    monkeypatch.setattr(encoding_bench, "available_backends", lambda device: ["triton", "torch"])
    output = tmp_path / "encoding.json"
    bench_main(["encoding", "--batch", "70", "--levels", "2", "--log2-table", "6", "--max-resolution", "16",
                "--repeats", "1", "--threads", "1", "--device", "cpu", "--no-nerfstudio", "--backends", "triton,torch",
                "--decoder", "1x16", "--decode-batches", "70", "--json", str(output)])
    results = json.loads(output.read_text())
    assert results["decode"]["decoder"] == "1x16"
    assert set(results["decode"]["70"]) >= {"ours_triton_mlp", "ours_torch_mlp", "ours_triton_fused"}
    assert results["decode"]["70"]["max_abs_diff_fused_vs_unfused"] < 1e-5
    assert "field inference" in capsys.readouterr().out


def test_dot_precision_follows_torch_tf32_setting() -> None:
    """IEEE float32 products unless torch lets its own matmuls use TF32; float64 always IEEE."""
    assert FUSED.dot_precision(torch.float64) == "ieee"
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: no fp32_precision setting")
    saved = matmul.fp32_precision
    try:
        for setting in ("tf32", "ieee"):
            matmul.fp32_precision = setting
            assert FUSED.dot_precision(torch.float32) == setting
            assert FUSED.dot_precision(torch.float64) == "ieee"
    finally:
        matmul.fp32_precision = saved
    assert matmul.fp32_precision == saved
