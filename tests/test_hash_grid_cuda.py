"""GPU backends against the torch backend on the same parameters (skipped without CUDA; tcnn ones without tinycudann).

Run on a lent GPU machine by scripts/gpu_check.sh. tiny-cuda-nn's own HashGrid kernels are checked first alone
(``test_tcnn_encoding_alone``), then through our parameter sharing, so a crash points at one or the other.
"""

from __future__ import annotations

import io

import pytest
import torch
from checks import compare_encodings

from gridinr_nerfstudio.fields.hash_grid import _backend
from gridinr_nerfstudio.fields.hash_grid.encoding import HashGridEncoding
from gridinr_nerfstudio.fields.hash_grid.optim import HashGridAdam

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
requires_tcnn = pytest.mark.skipif(
    not (torch.cuda.is_available() and _backend.tcnn_available()), reason="needs tinycudann"
)
requires_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and _backend.triton_available() and not _backend.triton_module().INTERPRETED),
    reason="needs triton compiled for the GPU (not TRITON_INTERPRET=1)",
)
GEOMETRY = dict(num_levels=8, log2_hashmap_size=14, base_resolution=4, max_resolution=256)  # dense and hashed levels


def _pair(backend: str, features: int = 2) -> tuple[HashGridEncoding, HashGridEncoding]:
    reference = HashGridEncoding(features_per_level=features, backend="torch", **GEOMETRY).cuda()
    with torch.no_grad():
        reference.params.normal_(generator=torch.Generator(device="cuda").manual_seed(features))
    other = HashGridEncoding(features_per_level=features, backend=backend, **GEOMETRY).cuda()
    other.load_state_dict(reference.state_dict())
    return reference, other


def _points(n: int = 5000) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(0)
    random = torch.rand(n, 3, device="cuda", generator=generator)
    corners = torch.cartesian_prod(*[torch.tensor([0.0, 0.5, 1.0], device="cuda")] * 3)
    return torch.cat([random, corners])


def _compare(reference, other, points, rtol=1e-4, atol=1e-4) -> None:
    compare_encodings(reference, other, points, rtol=rtol, atol=atol)


@requires_triton
@pytest.mark.parametrize("features", [1, 2, 4, 8])
def test_triton_matches_torch_on_cuda(features: int) -> None:
    reference, triton_encoding = _pair("triton", features)
    _compare(reference, triton_encoding, _points())


@requires_triton
def test_auto_picks_a_gpu_kernel_on_cuda() -> None:
    encoding = HashGridEncoding(backend="auto", **GEOMETRY).cuda()
    expected = "tcnn" if _backend.tcnn_available() else "triton"
    assert encoding.backend_for(torch.device("cuda")) == expected


@requires_tcnn
def test_tcnn_encoding_alone() -> None:
    """tinycudann.Encoding by itself, with its own parameters: if this crashes, the build is at fault, not us."""
    encoding = _backend.tcnn_module().Encoding(3, HashGridEncoding(**GEOMETRY).tcnn_config(), dtype=torch.float32)
    points = _points().requires_grad_(True)
    out = encoding(points)
    out.sum().backward()
    torch.cuda.synchronize()
    assert out.shape == (points.shape[0], 16) and torch.isfinite(out).all()
    assert encoding.params.grad is not None and points.grad is not None


@requires_tcnn
@pytest.mark.parametrize("features", [1, 2, 4, 8])
def test_tcnn_matches_torch_on_shared_params(features: int) -> None:
    reference, tcnn_encoding = _pair("tcnn", features)
    _compare(reference, tcnn_encoding, _points())
    assert tcnn_encoding(torch.zeros(0, 3, device="cuda")).shape == (0, reference.get_out_dim())


@requires_tcnn
def test_tcnn_trains_our_params_and_checkpoints_stay_portable() -> None:
    """Optimizer steps through tcnn move *our* params; the state dict then loads into the torch backend on CPU."""
    reference, tcnn_encoding = _pair("tcnn")
    before = tcnn_encoding.params.detach().clone()
    optimizer = HashGridAdam([tcnn_encoding.params], lr=1e-2)
    points = _points(1000)
    for _ in range(3):
        tcnn_encoding(points).square().mean().backward()
        optimizer.step()
    assert not torch.equal(tcnn_encoding.params.detach(), before)
    buffer = io.BytesIO()
    torch.save(tcnn_encoding.state_dict(), buffer)
    buffer.seek(0)
    cpu = HashGridEncoding(backend="torch", **GEOMETRY)
    cpu.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(cpu(points.cpu()), tcnn_encoding(points).cpu(), rtol=1e-4, atol=1e-4)


@requires_triton
def test_hash_grid_adam_on_cuda_matches_the_cpu_step() -> None:
    """On CUDA HashGridAdam runs the Triton lazy-Adam pass; it must move params exactly like the CPU pass."""
    generator = torch.Generator().manual_seed(0)
    initial = torch.randn(100_000, generator=generator)
    grads = [torch.randn(100_000, generator=generator) * (torch.rand(100_000, generator=generator) < 0.2)
             for _ in range(3)]
    results = []
    for device in ("cpu", "cuda"):
        param = torch.nn.Parameter(initial.clone().to(device))
        optimizer = HashGridAdam([param], lr=1e-2)
        for grad in grads:
            param.grad = grad.clone().to(device)
            optimizer.step()
        results.append(param.detach().cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@requires_triton
@pytest.mark.parametrize("features,widths", [(1, ()), (2, (64, 64)), (2, (23,)), (4, (32,))])
def test_fused_triton_field_matches_encoding_and_torch_mlp_on_cuda(features: int, widths: tuple) -> None:
    """The compiled fused kernel (encoding + decoder) vs the torch backend then torch's Linear/ReLU, IEEE float32."""
    reference, triton_encoding = _pair("triton", features)
    sizes = [reference.get_out_dim(), *widths, 1]
    torch.manual_seed(0)
    layers = [torch.nn.Linear(a, b).cuda() for a, b in zip(sizes, sizes[1:])]
    points = _points(5003)  # not a multiple of the kernel's block
    with torch.no_grad():
        fused = triton_encoding.fused_decode(points, layers)
        x = reference(points)
        for k, layer in enumerate(layers):
            x = layer(x) if k + 1 == len(layers) else torch.relu(layer(x))
    assert fused is not None
    torch.testing.assert_close(fused, x.squeeze(-1), rtol=1e-4, atol=1e-4)
