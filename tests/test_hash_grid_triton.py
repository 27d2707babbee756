"""Triton hash-grid kernels against the torch backend, on CPU tensors under the Triton interpreter.

triton reads TRITON_INTERPRET when it is imported, and nerfstudio's imports pull it in early, so tests/conftest.py
sets TRITON_INTERPRET=1 at session start on machines without CUDA (CI). With CUDA, tests/test_hash_grid_cuda.py
checks the compiled kernels instead, and this module runs with ``TRITON_INTERPRET=1 pytest tests/test_hash_grid_triton.py``.
Sizes are tiny: the interpreter runs every program instance in numpy.
"""

from __future__ import annotations

import os

import pytest
import torch
from checks import boundary_points, compare_encodings, torch_and_triton_pair

from gridinr_nerfstudio.fields.hash_grid import _backend
from gridinr_nerfstudio.fields.hash_grid.encoding import HashGridEncoding
from gridinr_nerfstudio.fields.hash_grid.optim import HashGridAdam

pytest.importorskip("triton")
if not _backend.triton_available():
    pytest.skip("our triton kernels do not import", allow_module_level=True)
if not _backend.triton_module().INTERPRETED:
    pytest.skip(
        "triton kernels compiled for a GPU: run with TRITON_INTERPRET=1 set before triton is imported",
        allow_module_level=True,
    )


_pair = torch_and_triton_pair


def _points(encoding: HashGridEncoding, outside: bool = False) -> torch.Tensor:
    return boundary_points(encoding, inside=60, outside=20 if outside else 0)


def _compare(reference, other, points, rtol=1e-5, atol=1e-5) -> None:
    compare_encodings(reference, other, points, rtol=rtol, atol=atol)


@pytest.mark.parametrize("features", [1, 2, 4, 8])
def test_tcnn_convention_dense_and_hashed_levels(features: int) -> None:
    reference, triton_encoding = _pair(features)
    assert True in reference.geometry.dense and False in reference.geometry.dense  # both index kinds are exercised
    _compare(reference, triton_encoding, _points(reference, outside=True))


def test_nerfstudio_convention_and_float64() -> None:
    reference, triton_encoding = _pair(2, convention="nerfstudio", dtype=torch.float64)
    assert reference.geometry.shift == 0.0 and not any(reference.geometry.dense)
    _compare(reference, triton_encoding, _points(reference), rtol=1e-10, atol=1e-10)


def test_level_wider_than_table_wraps_like_torch() -> None:
    """A single-level grid of resolution 5 with a 2^4-entry table: hashed, every cell collides."""
    reference, triton_encoding = _pair(4, num_levels=1, log2_hashmap_size=4, base_resolution=5)
    assert reference.geometry.dense == (False,)
    _compare(reference, triton_encoding, _points(reference, outside=True))


def test_empty_batch_and_batch_shape() -> None:
    reference, triton_encoding = _pair(2)
    assert triton_encoding(torch.zeros(0, 3)).shape == (0, 8)
    points = torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(triton_encoding(points), reference(points), rtol=1e-5, atol=1e-6)


def test_training_steps_with_hash_grid_adam_match_torch() -> None:
    """Two optimizer steps: the table gradient lands in HashGridAdam's recycled buffer like the other backends."""
    reference, triton_encoding = _pair(2)
    points = torch.rand(64, 3, generator=torch.Generator().manual_seed(3))
    target = torch.randn(64, reference.get_out_dim(), generator=torch.Generator().manual_seed(4))
    for encoding in (reference, triton_encoding):
        optimizer = HashGridAdam([encoding.params], lr=1e-2)
        for _ in range(2):
            ((encoding(points) - target) ** 2).mean().backward()
            optimizer.step()
    torch.testing.assert_close(triton_encoding.params, reference.params, rtol=1e-5, atol=1e-6)


def test_auto_never_picks_triton_on_cpu() -> None:
    encoding = HashGridEncoding(num_levels=2, log2_hashmap_size=8, backend="auto")
    assert encoding.backend_for(torch.device("cpu")) in ("cpp", "torch")
    assert HashGridEncoding(num_levels=2, log2_hashmap_size=8, backend="triton").backend_for(torch.device("cpu")) == "triton"


def test_sparse_adam_kernel_matches_the_torch_step() -> None:
    """HashGridAdam's CUDA pass: touched entries follow Adam, untouched ones keep value and moments, grad zeroed."""
    from gridinr_nerfstudio.fields.hash_grid._torch_impl import torch_sparse_adam_step

    generator = torch.Generator().manual_seed(0)
    state = [torch.randn(3000, generator=generator) for _ in range(2)] + [torch.rand(3000, generator=generator)]
    grad = torch.randn(3000, generator=generator) * (torch.rand(3000, generator=generator) < 0.3)
    expected, ours = [t.clone() for t in state], [t.clone() for t in state]
    grads = [grad.clone(), grad.clone()]
    torch_sparse_adam_step(expected[0], grads[0], expected[1], expected[2], 0.05, 0.9, 0.99, 1e-8)
    _backend.triton_module().sparse_adam_step(ours[0], grads[1], ours[1], ours[2], 0.05, 0.9, 0.99, 1e-8)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not grads[1].any()
    assert torch.equal(ours[0][grad == 0], state[0][grad == 0]) and not torch.equal(ours[0], state[0])


def test_kernels_compile_for_a_hopper_gpu() -> None:
    """Compiled (not interpreted) in a fresh process: catches typing/lowering errors the interpreter cannot."""
    import subprocess
    import sys
    from pathlib import Path

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_compile_check.py")), "2,8", "fp32"],
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 3:
        pytest.skip(f"triton cannot compile for sm_90 here: {done.stdout.strip()[-300:]}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "all kernels compiled" in done.stdout
