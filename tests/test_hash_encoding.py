"""Hash-grid encoding: nerfstudio equivalence, tiny-cuda-nn math against a per-point reference, gradients, optimizer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from nerfstudio.field_components.encodings import HashEncoding

from gridinr_nerfstudio.fields.hash_grid._backend import cpp_extension_available, tcnn_available
from gridinr_nerfstudio.fields.hash_grid.encoding import HashGridEncoding
from gridinr_nerfstudio.fields.hash_grid.optim import HashGridAdam

requires_cpp = pytest.mark.skipif(
    not cpp_extension_available(),
    reason="C++ extension gridinr_nerfstudio.fields.hash_grid._hash_grid_cpp not built (pip install --no-build-isolation -e .)",
)
BACKENDS = [pytest.param("cpp", marks=requires_cpp), "torch"]
PRIMES = (1, 2654435761, 805459861)


def _nerfstudio_encoder(seed: int = 0) -> HashEncoding:
    torch.manual_seed(seed)
    encoder = HashEncoding(
        num_levels=5, min_res=4, max_res=40, log2_hashmap_size=10, features_per_level=2, implementation="torch"
    )
    with torch.no_grad():
        encoder.hash_table.normal_()  # O(1) values make every mismatch visible
    return encoder


def _test_points(scales: list[float], seed: int = 0) -> torch.Tensor:
    """Random points plus points on the box faces, corners and exact cell boundaries of every level."""
    generator = torch.Generator().manual_seed(seed)
    random = torch.rand(200, 3, generator=generator)
    faces = torch.tensor(list(itertools.product([0.0, 0.25, 0.5, 0.75, 1.0], repeat=3)))  # on cell boundaries too
    boundaries = [
        torch.tensor([[k / s, (k + 1) / s, 0.25] for k in range(0, int(s), max(1, int(s) // 5))])
        for s in scales
        if s > 0
    ]
    return torch.cat([random, faces, *boundaries]).clamp(0, 1).to(torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_nerfstudio_outputs_and_table_gradients(backend: str) -> None:
    nerfstudio = _nerfstudio_encoder()
    ours = HashGridEncoding.from_nerfstudio(nerfstudio, backend=backend)
    assert ours.geometry.scales == tuple(nerfstudio.scalings.tolist())
    points = _test_points(nerfstudio.scalings.tolist())
    upstream = torch.randn(points.shape[0], ours.get_out_dim(), generator=torch.Generator().manual_seed(1))

    expected = nerfstudio(points)
    (expected * upstream).sum().backward()
    encoded = ours(points)
    (encoded * upstream).sum().backward()

    torch.testing.assert_close(encoded, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.params.grad.view(-1, 2), nerfstudio.hash_table.grad, rtol=1e-5, atol=1e-5)


def test_nerfstudio_table_layout_round_trip() -> None:
    nerfstudio = _nerfstudio_encoder(seed=3)
    ours = HashGridEncoding.from_nerfstudio(nerfstudio, backend="torch")
    assert ours.params.numel() == nerfstudio.hash_table.numel()
    assert torch.equal(ours.nerfstudio_hash_table(), nerfstudio.hash_table.detach())
    with pytest.raises(ValueError, match="nerfstudio"):
        HashGridEncoding(num_levels=2, log2_hashmap_size=8).nerfstudio_hash_table()


# ---------------------------------------------------------------- tiny-cuda-nn convention vs a per-point reference


def _reference_levels(
    num_levels: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float
) -> list[dict]:
    """tiny-cuda-nn GridEncodingTemplated, transcribed: float32 scale, vertex resolution, padded level sizes."""
    levels, offset = [], 0
    log2_scale = np.float32(np.log2(np.float32(per_level_scale)))
    for level in range(num_levels):
        scale = np.float32(
            np.float32(np.exp2(np.float32(level) * log2_scale)) * np.float32(base_resolution) - np.float32(1)
        )
        resolution = int(np.ceil(scale)) + 1
        size = min((resolution**3 + 7) // 8 * 8, 2**log2_hashmap_size)
        levels.append(
            {"scale": scale, "resolution": resolution, "size": size, "offset": offset, "dense": resolution**3 <= size}
        )
        offset += size
    return levels


def _reference_corners(point: np.ndarray, levels: list[dict]):
    """Yield (level, table entry, weight) of the 8 cell corners of every level: literal instant-ngp math, uint32
    index arithmetic through Python ints."""
    for l, level in enumerate(levels):
        pos = [np.float32(np.float32(np.float32(x) * level["scale"]) + np.float32(0.5)) for x in point]
        lower = [int(np.floor(p)) for p in pos]
        frac = [float(p - np.floor(p)) for p in pos]
        for dz, dy, dx in itertools.product((0, 1), repeat=3):
            x, y, z = lower[0] + dx, lower[1] + dy, lower[2] + dz
            if level["dense"]:
                r = level["resolution"]
                raw = x + y * r + z * r * r
            else:
                raw = (x * PRIMES[0]) ^ (y * PRIMES[1]) ^ (z * PRIMES[2])
            weight = (
                (frac[0] if dx else 1 - frac[0]) * (frac[1] if dy else 1 - frac[1]) * (frac[2] if dz else 1 - frac[2])
            )
            yield l, level["offset"] + (raw & 0xFFFFFFFF) % level["size"], weight


def _reference_encode(points: np.ndarray, table: np.ndarray, levels: list[dict]) -> np.ndarray:
    features = table.shape[1]
    out = np.zeros((len(points), len(levels) * features))
    for i, point in enumerate(points):
        for l, entry, weight in _reference_corners(point, levels):
            out[i, l * features : (l + 1) * features] += weight * table[entry]
    return out


def _reference_table_gradient(points: np.ndarray, upstream: np.ndarray, levels: list[dict], shape: tuple) -> np.ndarray:
    features = shape[1]
    grad = np.zeros(shape)
    for i, point in enumerate(points):
        for l, entry, weight in _reference_corners(point, levels):
            grad[entry] += weight * upstream[i, l * features : (l + 1) * features]
    return grad


def test_tcnn_level_layout_matches_the_hand_computed_one() -> None:
    # tcnn defaults (base 16, per-level scale 2): 16^3 and 32^3 and 64^3 dense vertices, then 2^19-entry hashes.
    encoder = HashGridEncoding(num_levels=5, log2_hashmap_size=19, base_resolution=16, per_level_scale=2.0)
    geometry = encoder.geometry
    assert geometry.resolutions == (16, 32, 64, 128, 256)
    assert geometry.dense == (True, True, True, False, False)
    assert geometry.table_sizes == (4096, 32768, 262144, 2**19, 2**19)
    assert geometry.table_offsets == (0, 4096, 36864, 299008, 823296)
    assert encoder.params.numel() == (299008 + 2 * 2**19) * 2
    assert encoder.tcnn_config() == {
        "otype": "HashGrid",
        "n_levels": 5,
        "n_features_per_level": 2,
        "log2_hashmap_size": 19,
        "base_resolution": 16,
        "per_level_scale": 2.0,
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("features", [1, 2, 4])
def test_tcnn_convention_matches_per_point_reference(backend: str, features: int) -> None:
    # Levels 0-2 dense (one with padded size, one wrapping at the upper face), 3-4 hashed.
    encoder = HashGridEncoding(
        num_levels=5,
        features_per_level=features,
        log2_hashmap_size=11,
        base_resolution=3,
        per_level_scale=1.9,
        backend=backend,
    )
    with torch.no_grad():
        encoder.params.normal_(generator=torch.Generator().manual_seed(0))
    levels = _reference_levels(5, 11, 3, 1.9)
    assert [lv["dense"] for lv in levels] == list(encoder.geometry.dense) == [True, True, True, False, False]
    assert encoder.params.numel() == (levels[-1]["offset"] + levels[-1]["size"]) * features
    points = _test_points([float(lv["scale"]) for lv in levels])
    table = encoder.params.detach().double().view(-1, features).numpy()

    expected = _reference_encode(points.numpy(), table, levels)
    torch.testing.assert_close(encoder(points).double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tcnn_convention_table_gradient_matches_reference(backend: str) -> None:
    encoder = HashGridEncoding(
        num_levels=5,
        features_per_level=2,
        log2_hashmap_size=11,
        base_resolution=3,
        per_level_scale=1.9,
        backend=backend,
    )
    levels = _reference_levels(5, 11, 3, 1.9)
    points = _test_points([float(lv["scale"]) for lv in levels])
    upstream = torch.randn(points.shape[0], encoder.get_out_dim(), generator=torch.Generator().manual_seed(2))
    (encoder(points) * upstream).sum().backward()
    expected = _reference_table_gradient(
        points.numpy(), upstream.double().numpy(), levels, (encoder.params.numel() // 2, 2)
    )
    torch.testing.assert_close(
        encoder.params.grad.double().view(-1, 2), torch.from_numpy(expected), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", ["tcnn", "nerfstudio"])
def test_gradcheck_float64(backend: str, convention: str) -> None:
    encoder = HashGridEncoding(
        num_levels=3,
        features_per_level=2,
        log2_hashmap_size=6,
        base_resolution=3,
        max_resolution=9,
        convention=convention,
        backend=backend,
    ).double()
    params = torch.randn(encoder.params.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    points = 0.05 + 0.9 * torch.rand(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def encode(positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(encoder, {"params": table}, (positions,))

    assert torch.autograd.gradcheck(encode, (points.requires_grad_(), params.requires_grad_()), eps=1e-6, atol=1e-5)


@requires_cpp
@pytest.mark.parametrize("convention", ["tcnn", "nerfstudio"])
@pytest.mark.parametrize("features", [1, 2, 4, 8])
def test_torch_fallback_equals_cpp(convention: str, features: int) -> None:
    grid = dict(num_levels=6, features_per_level=features, log2_hashmap_size=12, base_resolution=4,
                max_resolution=64, convention=convention)
    cpp = HashGridEncoding(**grid, backend="cpp")
    fallback = HashGridEncoding(**grid, backend="torch")
    with torch.no_grad():
        cpp.params.normal_(generator=torch.Generator().manual_seed(0))
    fallback.load_state_dict(cpp.state_dict())
    # Inside the box, on its faces and outside it (tcnn's uint32 wrap-around must agree there too).
    points = torch.cat([_test_points(list(cpp.geometry.scales)), torch.tensor([[-0.3, 1.2, 0.5], [1.5, -0.01, 2.0]])])
    upstream = torch.randn(points.shape[0], cpp.get_out_dim(), generator=torch.Generator().manual_seed(1))
    results = []
    for encoder in (cpp, fallback):
        positions = points.clone().requires_grad_()
        encoded = encoder(positions)
        (encoded * upstream).sum().backward()
        results.append((encoded, encoder.params.grad, positions.grad))
    (encoded, table_grad, position_grad), (encoded_ref, table_grad_ref, position_grad_ref) = results
    torch.testing.assert_close(encoded, encoded_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(table_grad, table_grad_ref, rtol=1e-5, atol=1e-5)
    # Position gradients are scale * differences of O(1) features summed over levels: float32 cancellation.
    torch.testing.assert_close(
        position_grad, position_grad_ref, rtol=1e-4, atol=1e-4 * position_grad_ref.abs().max().item()
    )


def test_batch_shape_and_input_errors() -> None:
    encoder = HashGridEncoding(num_levels=2, log2_hashmap_size=8, backend="torch")
    assert encoder(torch.rand(4, 5, 3)).shape == (4, 5, 4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        encoder(torch.rand(4, 2))
    with pytest.raises(ValueError, match="features_per_level"):
        HashGridEncoding(features_per_level=3)
    if not tcnn_available():
        with pytest.raises(RuntimeError, match="tinycudann"):
            HashGridEncoding(num_levels=2, log2_hashmap_size=8, backend="tcnn")(torch.rand(4, 3))
    if not cpp_extension_available():
        with pytest.raises(RuntimeError, match="extension"):
            HashGridEncoding(num_levels=2, log2_hashmap_size=8, backend="cpp")(torch.rand(4, 3))


# ---------------------------------------------------------------------------------------------- HashGridAdam


@pytest.mark.parametrize("implementation", [pytest.param("cpp", marks=requires_cpp), "torch"])
def test_hash_grid_adam_follows_sparse_adam(implementation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if implementation == "torch":
        monkeypatch.setattr("gridinr_nerfstudio.fields.hash_grid._backend.cpp", None)
    generator = torch.Generator().manual_seed(0)
    initial = torch.randn(1000, generator=generator)
    ours = torch.nn.Parameter(initial.clone())
    reference = torch.nn.Parameter(initial.clone())
    optimizer = HashGridAdam([ours], lr=0.05, betas=(0.8, 0.95), eps=1e-8)
    sparse_adam = torch.optim.SparseAdam([reference], lr=0.05, betas=(0.8, 0.95), eps=1e-8)
    for _ in range(5):
        grad = torch.randn(1000, generator=generator) * (torch.rand(1000, generator=generator) < 0.3)
        ours.grad = grad.clone()
        reference.grad = grad.to_sparse()
        optimizer.step()
        sparse_adam.step()
        assert ours.grad is None
        torch.testing.assert_close(ours.detach(), reference.detach(), rtol=1e-6, atol=1e-6)
    untouched = optimizer.state[ours]["exp_avg"] == 0
    assert untouched.any()  # some entries never had a gradient and were never moved
    assert torch.equal(ours.detach()[untouched], initial[untouched])


@requires_cpp
def test_backward_reuses_the_buffer_handed_back_by_hash_grid_adam() -> None:
    encoder = HashGridEncoding(num_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=32, backend="cpp")
    optimizer = HashGridAdam(encoder.parameters(), lr=1e-2)
    points = torch.rand(256, 3, generator=torch.Generator().manual_seed(0))
    encoder(points).sum().backward()
    first_buffer = encoder.params.grad.data_ptr()
    optimizer.step()
    assert encoder.params.grad is None

    encoder(points).sum().backward()
    assert encoder.params.grad.data_ptr() == first_buffer  # recycled, zeroed by the step
    recycled = encoder.params.grad.clone()
    encoder.params.grad = None
    encoder(points).sum().backward()  # no spare buffer now: freshly zeroed allocation
    torch.testing.assert_close(recycled, encoder.params.grad)


# ---------------------------------------------------------------------------------------------- fused inference


@requires_cpp
@pytest.mark.parametrize(
    ("features", "hidden", "dtype"),
    [(2, [64, 64], torch.float32), (1, [32], torch.float32), (4, [], torch.float32), (2, [24, 16], torch.float32),
     (2, [64], torch.float64)],
)
def test_fused_decode_equals_encoding_then_mlp(features: int, hidden: list[int], dtype: torch.dtype) -> None:
    """The fused C++ inference (vector tiles for widths 16..128, a per-point path for others and float64) against
    torch's Linear/ReLU stack on the same encoding, for a batch that ends in a partial block and a partial tile."""
    encoder = HashGridEncoding(num_levels=8, features_per_level=features, log2_hashmap_size=12, base_resolution=4,
                               max_resolution=64, backend="cpp").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        encoder.params.normal_(generator=generator)
    widths = [encoder.get_out_dim(), *hidden, 1]
    torch.manual_seed(1)
    layers = [torch.nn.Linear(a, b, bias=index != 1).to(dtype) for index, (a, b) in enumerate(zip(widths, widths[1:]))]
    stack = []
    for layer in layers:
        stack += [layer, torch.nn.ReLU()]
    mlp = torch.nn.Sequential(*stack[:-1])
    points = torch.rand(1031, 3, generator=generator, dtype=dtype)  # 4 blocks of 256 + 7 points
    with torch.no_grad():
        expected = mlp(encoder(points)).squeeze(-1)
        fused = encoder.fused_decode(points, layers)
    assert fused is not None and fused.shape == (1031,) and fused.dtype == dtype
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert encoder.fused_decode(points, [torch.nn.Linear(encoder.get_out_dim(), 2).to(dtype)]) is None  # 2 outputs
    assert HashGridEncoding(num_levels=2, log2_hashmap_size=8, backend="torch").fused_decode(points, layers) is None


@requires_cpp
def test_volume_field_takes_the_fused_path_only_without_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from gridinr_nerfstudio.fields.hash_grid import _backend
    from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings

    settings = VolumeFieldSettings(num_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=32,
                                   hidden_dim=16, num_hidden_layers=1, backend="cpp")
    field = VolumeField(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]), settings)
    with torch.no_grad():
        field.encoding.params.normal_(generator=torch.Generator().manual_seed(0))
    calls = []
    original = _backend.cpp.field_forward
    monkeypatch.setattr(_backend.cpp, "field_forward", lambda *args: calls.append(1) or original(*args))
    points = torch.rand(300, 3, generator=torch.Generator().manual_seed(1)) * 2.4 - 1.2  # some outside the box
    trained = field(points)  # parameters require grad: autograd path
    assert not calls and trained.requires_grad
    trained.sum().backward()
    assert field.encoding.params.grad is not None
    with torch.no_grad():
        inferred = field(points)
    assert calls and not inferred.requires_grad
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-5, atol=1e-6)
    assert bool((inferred[(points.abs() > 1).any(dim=-1)] == 0).all())  # outside the box: 0


def test_pickling_drops_native_and_device_side_state() -> None:
    """deepcopy / pickling of the module keep params only: no tcnn native module, no cached device tables."""
    import copy
    import pickle

    encoder = HashGridEncoding(num_levels=2, log2_hashmap_size=8, backend="torch")
    encoder.__dict__["_tcnn_encoding"] = object()  # stands for a native tcnn module, which cannot be pickled
    encoder._triton_tables["key"] = (torch.zeros(1), torch.zeros(1))
    loaded = pickle.loads(pickle.dumps(copy.deepcopy(encoder)))  # our own object: what torch.save would pickle
    assert loaded._tcnn_encoding is None and loaded._triton_tables == {}
    points = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(points), encoder(points))
    with pytest.raises(RuntimeError, match="params on"):
        encoder(torch.rand(2, 3, device="meta"))


class _FakeTcnnEncoding(torch.nn.Module):
    """Stands in for ``tinycudann.Encoding`` on a CPU: its own params at construction, and a forward that reads
    whatever ``self.params`` holds at call time (what tcnn's ``Module.forward`` does), computed by the torch path."""

    created = 0

    def __init__(self, n_input_dims, config, dtype=None, seed=1337):
        super().__init__()
        type(self).created += 1
        self.reference = HashGridEncoding(
            num_levels=config["n_levels"], features_per_level=config["n_features_per_level"],
            log2_hashmap_size=config["log2_hashmap_size"], base_resolution=config["base_resolution"],
            per_level_scale=config["per_level_scale"], backend="torch",
        )
        self.params = torch.nn.Parameter(torch.zeros(self.reference.params.numel()))

    def forward(self, x):
        assert x.shape[0] > 0 and x.dtype == torch.float32 and x.is_contiguous()
        from gridinr_nerfstudio.fields.hash_grid._torch_impl import torch_encode

        geometry, features = self.reference.geometry, self.reference.features_per_level
        return torch_encode(x, self.params.to(torch.float32).contiguous(), geometry, features)


def test_tcnn_wrapper_shares_our_params(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our side of the tcnn design, on a CPU with a stand-in module: one state (our params, which train and are
    checkpointed), no empty batches handed over, the native module made once per device and never pickled."""
    import contextlib
    import types

    from gridinr_nerfstudio.fields.hash_grid import _backend as backend_module

    monkeypatch.setattr(backend_module, "tcnn_module", lambda: types.SimpleNamespace(Encoding=_FakeTcnnEncoding))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    ours = HashGridEncoding(num_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=32, backend="tcnn")
    monkeypatch.setattr(ours, "backend_for", lambda device: "tcnn")  # as on a CUDA device with tcnn installed
    with torch.no_grad():
        ours.params.normal_(generator=torch.Generator().manual_seed(0))
    reference = HashGridEncoding(num_levels=4, log2_hashmap_size=10, base_resolution=4, max_resolution=32,
                                 backend="torch")
    reference.load_state_dict(ours.state_dict())
    points = torch.rand(100, 3, generator=torch.Generator().manual_seed(1))
    _FakeTcnnEncoding.created = 0
    torch.testing.assert_close(ours(points), reference(points))
    assert ours(torch.zeros(0, 3)).shape == (0, 8)
    optimizer = HashGridAdam([ours.params], lr=1e-2)
    before = ours.params.detach().clone()
    ours(points).square().sum().backward()
    optimizer.step()
    assert not torch.equal(ours.params.detach(), before)  # the gradient reached our params through "tcnn"
    assert _FakeTcnnEncoding.created == 1 and list(ours.state_dict()) == ["params"]
    assert ours.__getstate__()["_tcnn_encoding"] is None
