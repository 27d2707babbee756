"""The fused C++ ray marcher against the torch ray marcher: images, gradients (float64 gradcheck), every grid kind,
and the renderer's users taking the fused path."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from test_rendering import blob_volume, orbit_rays, tensor

from gridinr_nerfstudio.data.default_volume import default_volume_array
from gridinr_nerfstudio.data.volume_io import open_volume
from gridinr_nerfstudio.fields.brick_cache import BrickFieldCache
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.fields.memmap_grid import MemmapGridField
from gridinr_nerfstudio.rendering import fused_march
from gridinr_nerfstudio.rendering.fused_march import GridNormals, GridSamples
from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid
from gridinr_nerfstudio.rendering.raymarch import RenderStats, render_rays
from gridinr_nerfstudio.transfer.transfer_function import TransferFunction
from gridinr_nerfstudio.transfer.transfer_mlp import TransferTable

pytestmark = pytest.mark.skipif(not fused_march.kernel_available(), reason="fused ray-marching extension not built")

HALF = torch.tensor([1.0, 0.8, 0.7])
# Float32 rounding: both paths sum ~100 weighted samples in float32 in different orders (cumsum and exp there, a
# running product here): measured differences are ~1e-6; 2e-5 leaves room without hiding a wrong sample.
ROUNDING = 2e-5


def reference_volumes() -> dict[str, torch.Tensor]:
    """The test suite's reference volumes: sparse Gaussian blobs (mostly empty, like c60) and the built-in volume
    (Marschner-Lobb, dense) at a small size."""
    return {"blobs": torch.from_numpy(blob_volume((20, 24, 28))),
            "builtin": torch.from_numpy(default_volume_array(24)).float()}


def rays(count: int = 400, seed: int = 1):
    origins, directions = orbit_rays(count, seed)
    return tensor(origins), tensor(directions)


def compare(expected: dict, got: dict, tolerance: float) -> None:
    assert expected.keys() == got.keys()
    for key in ("rgb", "accumulation"):
        assert torch.allclose(got[key], expected[key], atol=tolerance, rtol=0), (key, (got[key] - expected[key]).abs().max())
    seen = expected["accumulation"][:, 0] > 0.1  # depth is divided by the accumulation
    depth_error = (got["depth"] - expected["depth"])[seen].abs().max()
    assert depth_error < 10 * tolerance / 0.1, depth_error
    if "normals" in expected:
        assert (got["normals"] - expected["normals"])[seen].abs().max() < 1e-3


@pytest.mark.parametrize("volume_name", ["blobs", "builtin"])
@pytest.mark.parametrize("options", [
    {"early_stop_eps": 0.0},
    {"early_stop_eps": 0.0, "occupancy": True},
    {"normals": True, "early_stop_eps": 0.0},
    {"normals": True, "shading": True, "early_stop_eps": 0.0, "background": (0.2, 0.4, 0.6)},
    {"stratified": True, "early_stop_eps": 0.0, "occupancy": True},
])
def test_fused_images_match_the_torch_path(volume_name, options):
    volume = reference_volumes()[volume_name]
    field = DenseGridField(volume, HALF)
    tf = TransferFunction.ramp("viridis", 0.2, 0.7, 0.6, unit_distance=0.05)
    origins, directions = rays()
    kwargs = {key: value for key, value in options.items() if key not in ("normals", "occupancy", "stratified")}
    if options.get("normals"):
        kwargs["normal_fn"] = GridNormals(field, 0.03)
    if options.get("occupancy"):
        kwargs["occupancy_grid"] = OccupancyGrid.from_volume(volume, HALF, 10).update(tf)
    outputs, stats = [], []
    for fused in (False, True):
        generator = torch.Generator().manual_seed(3)  # the same stratified positions on both paths
        stats.append(RenderStats())
        outputs.append(render_rays(origins, directions, GridSamples(field, tf), torch.stack([-HALF, HALF]),
                                   num_samples=48, stratified=options.get("stratified", False), generator=generator,
                                   stats=stats[-1], fused=fused, **kwargs))
    assert stats[0].fused_rays == 0 and stats[1].fused_rays == origins.shape[0]
    compare(outputs[0], outputs[1], ROUNDING)
    assert stats[1].rays_hit == stats[0].rays_hit and stats[1].samples_total == stats[0].samples_total
    if options.get("occupancy"):  # skipping is exact and skips the same samples (the torch path checks each one)
        assert stats[1].samples_evaluated <= stats[0].samples_evaluated
        assert stats[1].samples_evaluated < 0.8 * stats[1].samples_total or volume_name == "builtin"


def test_a_flat_region_has_no_normal_on_either_path():
    """Inside a plateau (0.3: not a float32 power of two) the gradient is 0. grid_sample's weighted sum of equal
    corners is off by an ulp at most points, which the torch path used to normalise into unit normals pointing
    anywhere (lit at random with shading: the dataset's fMRI BOLD frame 3/255 off, others up to 45/255); both paths
    now count differences within rounding as 0, so the plateau gets ambient light only and the images agree."""
    from gridinr_nerfstudio.rendering.raymarch import estimate_normals

    volume = torch.zeros(12, 12, 12)
    volume[2:10, 2:10, 2:10] = 0.3  # cells between lattice points 2 and 9 (|p| < 0.63) are flat
    field = DenseGridField(volume, torch.ones(3))
    points = (torch.rand(4096, 3, generator=torch.Generator().manual_seed(0)) - 0.5) * 1.0
    assert torch.equal(estimate_normals(field, points, 0.05), torch.zeros_like(points))
    edge = torch.tensor([[0.7, 0.0, 0.0], [0.0, -0.7, 0.0]])  # on the plateau's slopes the normals point out of it
    assert torch.allclose(estimate_normals(field, edge, 0.05), edge / 0.7)

    tf = TransferFunction.ramp("viridis", 0.1, 0.5, 0.2, unit_distance=0.05)
    origins, directions = rays()
    outputs = [render_rays(origins, directions, GridSamples(field, tf), torch.stack([-torch.ones(3), torch.ones(3)]),
                           num_samples=48, early_stop_eps=0.0, normal_fn=GridNormals(field, 0.05), shading=True,
                           background=(1.0, 1.0, 1.0), fused=fused) for fused in (False, True)]
    assert (outputs[0]["accumulation"] > 0.3).float().mean() > 0.2  # the plateau is in view
    compare(outputs[0], outputs[1], ROUNDING)


def test_early_termination_changes_colours_by_less_than_its_threshold():
    """The fused path stops a ray at the first sample after which its transmittance is <= eps, the torch path at
    the end of the chunk of 32 samples where that happens: what lies beyond adds at most eps to each channel."""
    volume = reference_volumes()["blobs"]
    field = DenseGridField(volume, HALF)
    tf = TransferFunction.ramp("magma", 0.05, 0.3, 1.0, unit_distance=0.01)  # opaque: rays end early
    origins, directions = rays()
    eps = 1e-3
    plain = render_rays(origins, directions, GridSamples(field, tf), torch.stack([-HALF, HALF]), num_samples=64,
                        early_stop_eps=0.0, fused=False)
    stats = RenderStats()
    early = render_rays(origins, directions, GridSamples(field, tf), torch.stack([-HALF, HALF]), num_samples=64,
                        early_stop_eps=eps, stats=stats)
    assert (plain["accumulation"] > 1 - eps).float().mean() > 0.1  # the case is exercised
    assert (early["rgb"] - plain["rgb"]).abs().max() <= eps + ROUNDING
    assert stats.samples_evaluated < stats.samples_total  # opaque rays stopped early


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_memmapped_voxels_are_read_in_their_own_dtype(write_raw_dataset, dtype):
    """Raw voxels through the memmap (no float32 copy): the kernel normalises them itself, with NaN replacement."""
    rng = np.random.default_rng(0)
    base = blob_volume((12, 14, 16))
    if dtype == "float32":
        data = (base * 50.0 - 7.0).astype(np.float32)
        data[3, 4, 5] = np.nan
        options = {"nan_policy": "replace", "replace_value": 10.0}
    else:
        top = 255 if dtype == "uint8" else 4000
        data = (base * (top - 20) + 10 + rng.integers(0, 5, base.shape)).astype(dtype)
        options = {}
    volume = open_volume(write_raw_dataset({"density": [data]}), **options)
    memmapped = MemmapGridField(volume)
    source = fused_march.grid_source(memmapped)
    assert source is not None and source.voxels.dtype == getattr(torch, dtype)
    tf = TransferFunction.ramp("inferno", 0.1, 0.8, 0.7, unit_distance=0.05)
    origins, directions = rays(300, 4)
    aabb = torch.stack([-memmapped.half_size, memmapped.half_size])
    expected = render_rays(origins, directions, GridSamples(DenseGridField.from_volume(volume), tf), aabb,
                           num_samples=40, early_stop_eps=0.0, fused=False)
    stats = RenderStats()
    got = render_rays(origins, directions, GridSamples(memmapped, tf), aabb, num_samples=40, early_stop_eps=0.0,
                      stats=stats)
    assert stats.fused_rays == 300
    compare(expected, got, ROUNDING)


def test_brick_cache_decodes_where_rays_go_and_renders_the_whole_lattice_image():
    """Rays stopped at undecoded bricks (NaN lattice values, also in normal lookups) resume once those are decoded:
    the image equals the one of the lattice decoded whole, and only bricks that samples reach are decoded."""
    lattice = reference_volumes()["blobs"].double()
    dims = lattice.shape[::-1]

    def decode(unit: torch.Tensor) -> torch.Tensor:  # exact lattice values at lattice points
        index = (unit * (torch.tensor(dims) - 1)).round().long()
        return lattice[index[:, 2], index[:, 1], index[:, 0]].float()

    bricks = BrickFieldCache(decode, dims, HALF, brick_size=4)
    whole = DenseGridField(lattice.float(), HALF)
    tf = TransferFunction.ramp("viridis", 0.2, 0.7, 0.6, unit_distance=0.05)
    occupancy = OccupancyGrid.from_volume(lattice.float(), HALF, 12).update(tf)
    origins, directions = rays(300, 2)
    aabb = torch.stack([-HALF, HALF])
    options = {"num_samples": 48, "early_stop_eps": 0.0, "occupancy_grid": occupancy}
    expected = render_rays(origins, directions, GridSamples(whole, tf), aabb, normal_fn=GridNormals(whole, 0.03),
                           shading=True, fused=False, **options)
    got = render_rays(origins, directions, GridSamples(bricks, tf), aabb, normal_fn=GridNormals(bricks, 0.03),
                      shading=True, **options)
    compare(expected, got, ROUNDING)
    assert 0.0 < bricks.decoded_fraction() < 0.9


def table_and_color(size: int = 24, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    table = torch.rand(size, 4, dtype=torch.float64, generator=generator)
    table[:, 3] *= 6.0
    table[: size // 4, 3] = 0.0  # transparent entries still get a gradient through sigma
    return table, lambda t: TransferTable(t, invisible_sigma=1e-3)


@pytest.mark.parametrize("options", [
    {"early_stop_eps": 0.0},
    {"early_stop_eps": 0.05, "occupancy": True},
    {"normals": True, "shading": True, "early_stop_eps": 0.0},
    {"stratified": True, "early_stop_eps": 0.0},
])
def test_table_gradient_passes_gradcheck_and_matches_autograd_through_the_torch_path(options):
    volume = reference_volumes()["blobs"][::2, ::2, ::2].contiguous()
    field = DenseGridField(volume, HALF).double()
    origins, directions = (x.double() for x in rays(60, 5))
    aabb = torch.stack([-HALF, HALF]).double()
    table, color_of = table_and_color()
    if options.get("normals"):  # normals exist only where sigma > 0: finite differences at sigma = 0 cross that kink
        table[:6, 3] = 0.01
    kwargs = {"early_stop_eps": options["early_stop_eps"], "background": torch.tensor([0.1, 0.2, 0.3]).double()}
    if options.get("normals"):
        kwargs.update(normal_fn=GridNormals(field, 0.05), shading=options.get("shading", False))
    if options.get("occupancy"):
        kwargs["occupancy_grid"] = OccupancyGrid.from_volume(volume, HALF, 6).update(color_of(table))
    weights = torch.rand(60, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # depth (= 0 where nothing is hit) and normals jump when a ray's accumulation leaves 0: not scored there
        hit = render_rays(origins, directions, GridSamples(field, color_of(table)), aabb, num_samples=20,
                          stratified=options.get("stratified", False), generator=torch.Generator().manual_seed(7),
                          fused=False, **kwargs)["accumulation"][:, 0] > 1e-3
    weights[~hit, 4:] = 0.0  # and normals (normalised sums of nothing)
    assert hit.any() and not hit.all()

    def loss(table: torch.Tensor, fused: bool = True) -> torch.Tensor:
        out = render_rays(origins, directions, GridSamples(field, color_of(table)), aabb, num_samples=20,
                          stratified=options.get("stratified", False), generator=torch.Generator().manual_seed(7),
                          fused=fused, **kwargs)
        columns = [out["rgb"], out["accumulation"], out["depth"], out.get("normals", torch.zeros_like(out["rgb"]))]
        return (torch.cat(columns, dim=-1) * weights).sum()

    table = table.requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (table,), eps=1e-6, atol=1e-6)
    if options["early_stop_eps"] == 0.0:  # the torch path stops per chunk of samples, the kernel per sample
        fused_grad, = torch.autograd.grad(loss(table), table)
        torch_grad, = torch.autograd.grad(loss(table, fused=False), table)
        # With normals the two paths' gradients differ by up to 3.4e-7 relative (measured; the fused one is the closer
        # to finite differences, 2e-7 absolute on 100): the shaded case gets that much room, the others none.
        rtol = 1e-6 if options.get("normals") else 1e-8
        assert torch.allclose(fused_grad, torch_grad, atol=1e-10, rtol=rtol)
        assert fused_grad[:6, 3].abs().sum() > 0  # transparent entries get a gradient


def test_table_gradient_is_deterministic_across_threads():
    volume = reference_volumes()["builtin"]
    field = DenseGridField(volume, HALF)
    table, color_of = table_and_color(64)
    table = table.float().requires_grad_(True)
    origins, directions = rays(2000, 6)
    grads = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            out = render_rays(origins, directions, GridSamples(field, color_of(table)), torch.stack([-HALF, HALF]),
                              num_samples=32)
            grads.append(torch.autograd.grad(out["rgb"].square().sum(), table)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])


def test_packet_size_changes_the_schedule_not_the_image():
    """`packet_rays` (the benchmarks' static split) hands out other work items; every ray's result is its own."""
    volume = reference_volumes()["builtin"]
    field = DenseGridField(volume, HALF)
    tf = TransferFunction.ramp("viridis", 0.2, 0.7, 0.6, unit_distance=0.05)
    origins, directions = rays(1000, 8)

    def render():
        return render_rays(origins, directions, GridSamples(field, tf), torch.stack([-HALF, HALF]), num_samples=32)

    expected = render()
    for size in (1, 7, 500, 5000):
        with fused_march.packet_rays(size):
            got = render()
        assert all(torch.equal(got[key], expected[key]) for key in expected), size
    with pytest.raises(RuntimeError, match="at least one ray"):
        fused_march.cpp.set_packet_rays(0)


def fused_image_and_gradient(kernel_threads: int, torch_threads: int = 1):
    """The fused marcher's image and table gradient with our kernels on `kernel_threads` threads (the count
    thread_policy passes to every C++ kernel) and torch's ops on `torch_threads`."""
    from gridinr_nerfstudio import thread_policy

    volume = reference_volumes()["builtin"]
    field = DenseGridField(volume, HALF)
    table, color_of = table_and_color(64)
    table = table.float().requires_grad_(True)
    origins, directions = rays(1000, 8)
    grid = OccupancyGrid.from_volume(volume, HALF, 8).update(color_of(table.detach()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(torch_threads)
        thread_policy.set_kernel_threads(kernel_threads)
        # torch as large as the kernels' count: the frame as before frames took torch's ops to one thread, so that
        # the kernel runs in torch's OpenMP team (work_sharing.h's other path)
        with fused_march.torch_ops_in_parallel() if torch_threads >= kernel_threads > 1 else nullcontext():
            out = render_rays(origins, directions, GridSamples(field, color_of(table)), torch.stack([-HALF, HALF]),
                              num_samples=32, occupancy_grid=grid, early_stop_eps=0.01)
        grad, = torch.autograd.grad(out["rgb"].square().sum(), table)
    finally:
        thread_policy.set_kernel_threads(0)
        torch.set_num_threads(before)
    return out["rgb"].detach(), out["accumulation"].detach(), grad


def test_marcher_gives_the_same_frame_and_gradient_for_any_kernel_thread_count():
    """The marcher runs on the explicit thread count of thread_policy (csrc/work_sharing.h: torch's OpenMP team when
    torch is as large, else the inter-op pool); packets and gradient groups make results independent of it."""
    expected = fused_image_and_gradient(1)
    for kernel_threads, torch_threads in ((2, 1), (3, 1), (7, 1), (2, 2)):
        got = fused_image_and_gradient(kernel_threads, torch_threads)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), (kernel_threads, torch_threads)


def test_marcher_never_waits_for_a_helper_that_cannot_start():
    """With every thread of torch's inter-op pool held busy, a march asked for 4 threads (torch's ops on one)
    still finishes, on its calling thread, with the one-thread frame: an OpenMP team would wait at its barrier for
    threads that a busy machine has not scheduled; our loops never wait for a thread that has not started."""
    import threading

    from gridinr_nerfstudio.fields.hash_grid import _backend

    if not _backend.cpp_extension_available():
        pytest.skip("C++ hash-grid extension (which holds the test hook) not built")
    expected = fused_image_and_gradient(1)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.setdefault("got", fused_image_and_gradient(4)), daemon=True)
    _backend.cpp._occupy_helpers(torch.get_num_interop_threads())
    try:
        worker.start()
        worker.join(timeout=120)  # a hang guard, not a speed limit
        finished = not worker.is_alive()
    finally:
        _backend.cpp._release_helpers()
    assert finished, "the marcher waited for helpers that could not start"
    assert all(torch.equal(a, b) for a, b in zip(result["got"], expected))
