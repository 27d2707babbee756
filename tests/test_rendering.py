"""Ray marching against a per-ray numpy reference, analytic cases, acceleration equivalence and gradients."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid
from gridinr_nerfstudio.rendering.raymarch import (
    RenderStats,
    estimate_normals,
    intersect_aabb,
    render_rays,
    sample_along_rays,
    shade,
)
from gridinr_nerfstudio.transfer.transfer_function import TransferFunction

UNIT = 0.1


# ---------------------------------------------------------------- independent numpy reference


def numpy_box_interval(origin: np.ndarray, direction: np.ndarray, low: np.ndarray, high: np.ndarray):
    """Scalar slab test, one axis at a time."""
    t_enter, t_exit = 0.0, np.inf
    for axis in range(3):
        if direction[axis] == 0.0:
            if not low[axis] <= origin[axis] <= high[axis]:
                return None
            continue
        t1, t2 = (low[axis] - origin[axis]) / direction[axis], (high[axis] - origin[axis]) / direction[axis]
        t_enter, t_exit = max(t_enter, min(t1, t2)), min(t_exit, max(t1, t2))
    return (t_enter, t_exit) if t_exit > t_enter else None


def numpy_trilinear(volume_zyx: np.ndarray, half: np.ndarray, point: np.ndarray) -> float:
    """Value at a world point from the DESIGN.md mapping: u_i = (p_i + h_i) / (2 h_i) * (dims_i - 1)."""
    dims = np.array(volume_zyx.shape[::-1])
    if np.any(np.abs(point) > half):
        return 0.0
    u = (point + half) / (2 * half) * (dims - 1)
    base = np.minimum(np.floor(u).astype(int), dims - 2)
    frac = u - base
    value = 0.0
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                weight = (
                    (frac[0] if dx else 1 - frac[0])
                    * (frac[1] if dy else 1 - frac[1])
                    * (frac[2] if dz else 1 - frac[2])
                )
                value += weight * volume_zyx[base[2] + dz, base[1] + dy, base[0] + dx]
    return value


def numpy_render(origins, directions, volume_zyx, half, colormap, opacity_points, num_samples, background):
    """Per-ray, per-sample loop: midpoint samples, alpha = 1 - exp(-sigma dt), front-to-back compositing."""
    cmap_nodes = np.linspace(0, 1, 256)
    cmap_colors = matplotlib.colormaps[colormap](cmap_nodes)[:, :3]
    rgbs, accumulations, depths = [], [], []
    for origin, direction in zip(origins, directions):
        interval = numpy_box_interval(origin, direction, -half, half)
        color, transmittance, depth_sum = np.zeros(3), 1.0, 0.0
        if interval is not None:
            dt = (interval[1] - interval[0]) / num_samples
            for index in range(num_samples):
                t = interval[0] + (index + 0.5) * dt
                value = numpy_trilinear(volume_zyx, half, origin + t * direction)
                rgb = np.array([np.interp(value, cmap_nodes, cmap_colors[:, c]) for c in range(3)])
                opacity = np.interp(value, *zip(*opacity_points))
                sigma = -np.log(1.0 - opacity) / UNIT
                alpha = 1.0 - np.exp(-sigma * dt * np.linalg.norm(direction))
                color += transmittance * alpha * rgb
                depth_sum += transmittance * alpha * t
                transmittance *= 1.0 - alpha
        accumulation = 1.0 - transmittance
        rgbs.append(color + transmittance * np.asarray(background))
        accumulations.append(accumulation)
        depths.append(depth_sum / accumulation if accumulation > 0 else 0.0)
    return np.array(rgbs), np.array(accumulations)[:, None], np.array(depths)[:, None]


def orbit_rays(count: int, seed: int, radius: float = 2.5, spread: float = 0.9):
    """Rays from a sphere of `radius` towards random points in [-spread, spread]^3."""
    rng = np.random.default_rng(seed)
    origins = rng.normal(size=(count, 3))
    origins = origins / np.linalg.norm(origins, axis=1, keepdims=True) * radius
    targets = rng.uniform(-spread, spread, size=(count, 3))
    directions = targets - origins
    return origins, directions / np.linalg.norm(directions, axis=1, keepdims=True)


def blob_volume(shape_zyx=(14, 18, 22), seed=0) -> np.ndarray:
    """A few Gaussian blobs in empty space, normalised to [0, 1] (lots of empty cells, like c60)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    volume = np.zeros(shape_zyx)
    for _ in range(5):
        centre = rng.uniform(-0.6, 0.6, 3)
        volume += np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / 0.02)
    return (volume / volume.max()).astype(np.float32)


def tensor(array) -> torch.Tensor:
    return torch.tensor(np.asarray(array), dtype=torch.float32)


# ---------------------------------------------------------------- ray / box and sampling


def test_intersect_aabb_cases():
    aabb = torch.tensor([[-1.0, -0.5, -0.25], [1.0, 0.5, 0.25]])
    origins = tensor([[-3, 0, 0], [-3, 2, 0], [0, 0, 0], [-3, 0.2, 0.1], [-3, 0.7, 0], [3, 0, 0], [0.5, 0.5, 0]])
    directions = tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0, -1, 0]])
    t_near, t_far, hit = intersect_aabb(origins, directions, aabb)
    assert hit.tolist() == [True, False, True, True, False, False, True]
    # axis-parallel through the box; inside the box starts at 0; box behind the ray misses; on a face enters at 0
    np.testing.assert_allclose(t_near[[0, 2, 3, 6]].numpy(), [2.0, 0.0, 2.0, 0.0])
    np.testing.assert_allclose(t_far[[0, 2, 3, 6]].numpy(), [4.0, 0.5, 4.0, 1.0])
    assert t_near[~hit].eq(0).all() and t_far[~hit].eq(0).all()
    # Oblique rays agree with the scalar reference.
    origins_np, directions_np = orbit_rays(64, seed=3, spread=1.5)
    t_near, t_far, hit = intersect_aabb(tensor(origins_np), tensor(directions_np), aabb)
    for index, (origin, direction) in enumerate(zip(origins_np, directions_np)):
        interval = numpy_box_interval(origin, direction, aabb[0].numpy(), aabb[1].numpy())
        assert bool(hit[index]) == (interval is not None)
        if interval is not None:
            np.testing.assert_allclose([t_near[index], t_far[index]], interval, atol=1e-5)


def test_sample_along_rays_midpoints_and_stratified_bins():
    t_near, t_far = tensor([1.0, 0.0]), tensor([3.0, 4.0])
    t, dt = sample_along_rays(t_near, t_far, 4)
    np.testing.assert_allclose(t.numpy(), [[1.25, 1.75, 2.25, 2.75], [0.5, 1.5, 2.5, 3.5]])
    np.testing.assert_allclose(dt.numpy(), [[0.5], [1.0]])
    jittered, _ = sample_along_rays(t_near, t_far, 4, stratified=True, generator=torch.Generator().manual_seed(0))
    again, _ = sample_along_rays(t_near, t_far, 4, stratified=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(jittered, again)
    bins = ((jittered - t_near[:, None]) / dt).floor()
    assert torch.equal(bins, torch.arange(4.0).expand(2, 4))


# ---------------------------------------------------------------- the reference field


def test_dense_grid_field_at_voxel_centres_of_an_anisotropic_volume():
    dims_xyz, spacing = np.array([5, 4, 3]), np.array([1.0, 2.0, 3.5])
    volume = np.random.default_rng(0).random(dims_xyz[::-1]).astype(np.float32)  # (Z, Y, X)
    extent = (dims_xyz - 1) * spacing
    half = extent / extent.max()
    field = DenseGridField(tensor(volume), tensor(half))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in dims_xyz], indexing="ij"), -1).reshape(-1, 3)  # (x, y, z)
    points = -half + 2 * half * index / (dims_xyz - 1)
    expected = volume[index[:, 2], index[:, 1], index[:, 0]]
    np.testing.assert_allclose(field(tensor(points)).numpy(), expected, atol=1e-6)
    # Halfway between voxels (1, 2, 1) and (2, 2, 1) along x; zero outside the box.
    midway = -half + 2 * half * np.array([1.5, 2, 1]) / (dims_xyz - 1)
    assert float(field(tensor([midway]))) == pytest.approx(0.5 * (volume[1, 2, 1] + volume[1, 2, 2]), abs=1e-6)
    outside = tensor([[half[0] * 1.01, 0, 0], [0, -half[1] * 1.2, 0], [0, 0, 3.0]])
    assert field(outside).eq(0).all()
    rng_points = np.random.default_rng(1).uniform(-1, 1, (50, 3)) * half
    reference = [numpy_trilinear(volume, half, p) for p in rng_points]
    np.testing.assert_allclose(field(tensor(rng_points)).numpy(), reference, atol=1e-5)


# ---------------------------------------------------------------- compositing


@pytest.mark.parametrize("accelerated", [False, True])
def test_render_matches_per_ray_numpy_loop(accelerated):
    volume = np.random.default_rng(4).random((5, 6, 7)).astype(np.float32)
    half = np.array([1.0, 0.8, 0.6])
    opacity_points = [(0.0, 0.0), (0.3, 0.05), (0.8, 0.6), (1.0, 0.2)]
    tf = TransferFunction.from_colormap("plasma", opacity_points, unit_distance=UNIT)
    field = DenseGridField(tensor(volume), tensor(half))
    origins, directions = orbit_rays(40, seed=5, spread=1.2)
    background = (0.2, 0.3, 0.4)
    options = (
        {"occupancy_grid": OccupancyGrid.from_volume(tensor(volume), tensor(half)).update(tf), "chunk_samples": 8}
        if accelerated
        else {"early_stop_eps": 0.0}
    )
    out = render_rays(
        tensor(origins),
        tensor(directions),
        lambda p: tf(field(p)),
        tensor([-half, half]),
        num_samples=24,
        background=background,
        **options,
    )
    rgb, accumulation, depth = numpy_render(origins, directions, volume, half, "plasma", opacity_points, 24, background)
    assert out["rgb"].shape == (40, 3) and out["accumulation"].shape == (40, 1) and out["depth"].shape == (40, 1)
    np.testing.assert_allclose(out["rgb"].numpy(), rgb, atol=3e-4)
    np.testing.assert_allclose(out["accumulation"].numpy(), accumulation, atol=3e-4)
    np.testing.assert_allclose(out["depth"].numpy(), depth, atol=3e-4)


def test_constant_density_box_transmits_exp_minus_sigma_times_thickness():
    aabb = torch.tensor([[-1.0, -0.5, -0.8], [1.0, 0.5, 0.8]])
    sigma, colour = 1.7, torch.tensor([0.9, 0.5, 0.1])

    def sample_fn(points):
        return colour.expand(points.shape[0], 3), torch.full((points.shape[0],), sigma)

    origins, directions = orbit_rays(32, seed=6, spread=0.45)
    thickness = np.array(
        [np.subtract(*numpy_box_interval(o, d, *aabb.numpy())[::-1]) for o, d in zip(origins, directions)]
    )
    for num_samples, scale in [(5, 1.0), (128, 2.0)]:  # independent of the sample count and of |direction|
        out = render_rays(
            tensor(origins),
            tensor(directions) * scale,
            sample_fn,
            aabb,
            num_samples=num_samples,
            background=(0.0, 0.0, 1.0),
        )
        transmittance = np.exp(-sigma * thickness)
        np.testing.assert_allclose(out["accumulation"].numpy()[:, 0], 1 - transmittance, atol=1e-5)
        expected_rgb = (1 - transmittance)[:, None] * colour.numpy() + transmittance[:, None] * np.array(
            [0.0, 0.0, 1.0]
        )
        np.testing.assert_allclose(out["rgb"].numpy(), expected_rgb, atol=1e-5)


def test_empty_volume_shows_the_background():
    field = DenseGridField(torch.zeros(4, 5, 6), tensor([1.0, 1.0, 1.0]))
    tf = TransferFunction.ramp("viridis", 0.1, 0.5, 0.8, unit_distance=UNIT)
    origins, directions = orbit_rays(20, seed=7, spread=2.0)
    background = torch.rand(20, 3)
    out = render_rays(
        tensor(origins),
        tensor(directions),
        lambda p: tf(field(p)),
        torch.tensor([[-1.0] * 3, [1.0] * 3]),
        background=background,
    )
    assert torch.equal(out["rgb"], background)
    assert out["accumulation"].eq(0).all() and out["depth"].eq(0).all()


def test_depth_of_a_thin_opaque_wall_is_its_distance():
    wall_x, thickness = 0.3, 0.04

    def sample_fn(points):
        in_wall = (points[:, 0] - wall_x).abs() < thickness / 2
        return torch.ones(points.shape[0], 3), torch.where(in_wall, 1e4, 0.0)

    origins = tensor([[-3.0, 0.1, 0.2], [-3.0, -0.5, 0.0], [wall_x, -3.0, 0.3]])
    directions = tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = render_rays(origins, directions, sample_fn, torch.tensor([[-1.0] * 3, [1.0] * 3]), num_samples=512)
    step = 2.0 / 512
    np.testing.assert_allclose(out["depth"][:2, 0].numpy(), wall_x - thickness / 2 + 3.0, atol=step)
    np.testing.assert_allclose(out["accumulation"][:2, 0].numpy(), 1.0, atol=1e-5)
    assert float(out["depth"][2, 0]) == pytest.approx(
        2.0, abs=step
    )  # the third ray runs inside the wall from the box face


# ---------------------------------------------------------------- accelerations


def test_early_termination_and_occupancy_give_the_plain_image():
    volume = blob_volume()
    half = np.array([1.0, 18 / 22, 14 / 22])
    field = DenseGridField(tensor(volume), tensor(half))
    tf = TransferFunction.ramp("inferno", 0.3, 0.7, 0.9, unit_distance=0.02)
    grid = OccupancyGrid.from_volume(tensor(volume), tensor(half), resolution=8).update(tf)
    assert 0.0 < grid.occupied_fraction() < 0.5
    origins, directions = orbit_rays(600, seed=8)
    aabb = tensor([-half, half])

    def render(stratified: bool, **options):
        stats = RenderStats()
        generator = torch.Generator().manual_seed(11)
        out = render_rays(
            tensor(origins),
            tensor(directions),
            lambda p: tf(field(p)),
            aabb,
            num_samples=96,
            stratified=stratified,
            generator=generator,
            background=(1.0, 1.0, 1.0),
            normal_fn=lambda p: estimate_normals(field, p, 0.01),
            shading=True,
            stats=stats,
            **options,
        )
        return out, stats

    for stratified in (False, True):
        plain, plain_stats = render(stratified, early_stop_eps=0.0, chunk_samples=96)
        fast, fast_stats = render(stratified, occupancy_grid=grid, chunk_samples=16)
        assert plain["accumulation"].max() > 0.99  # some rays terminate early
        for key in ("rgb", "accumulation", "normals"):
            assert (plain[key] - fast[key]).abs().max() < 2e-4, key
        assert (plain["depth"] - fast["depth"]).abs().max() < 2e-3
        assert plain_stats.samples_evaluated == plain_stats.samples_total == plain_stats.rays_hit * 96
        assert fast_stats.samples_evaluated < 0.5 * plain_stats.samples_evaluated


def test_occupancy_grid_is_conservative():
    volume = blob_volume(seed=2)
    half = np.array([1.0, 18 / 22, 14 / 22])
    field = DenseGridField(tensor(volume), tensor(half))
    tf = TransferFunction.ramp("inferno", 0.5, 0.9, 0.5, unit_distance=0.02)
    grid = OccupancyGrid.from_volume(tensor(volume), tensor(half), resolution=6).update(tf)
    points = tensor(np.random.default_rng(9).uniform(-1.05, 1.05, (200_000, 3)) * half)
    visible = tf(field(points))[1] > 0
    assert visible.any()
    assert grid.is_occupied(points)[visible].all()
    assert not grid.is_occupied(points).all()
    outside = tensor([[1.5, 0, 0], [0, 0, -0.9]])
    assert grid.is_occupied(outside).all()


def test_occupancy_from_field_bounds_a_linear_field_per_cell():
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    grid = OccupancyGrid.from_field(
        lambda p: 0.5 + 0.25 * p[:, 0] - 0.1 * p[:, 2], aabb, resolution=4, samples_per_cell=3
    )
    edges = np.linspace(-1, 1, 5)
    # cell (z, y, x): min at x low / z high, max at x high / z low
    expected_min = 0.5 + 0.25 * edges[None, None, :-1] - 0.1 * edges[1:, None, None]
    expected_max = 0.5 + 0.25 * edges[None, None, 1:] - 0.1 * edges[:-1, None, None]
    np.testing.assert_allclose(grid.min_values.numpy(), np.broadcast_to(expected_min, (4, 4, 4)), atol=1e-6)
    np.testing.assert_allclose(grid.max_values.numpy(), np.broadcast_to(expected_max, (4, 4, 4)), atol=1e-6)


# ---------------------------------------------------------------- gradients


def test_gradients_reach_sigma_scale_and_volume_and_match_finite_differences():
    volume = torch.tensor(blob_volume((4, 5, 6), seed=3), dtype=torch.float64)
    half = torch.tensor([1.0, 0.8, 0.6], dtype=torch.float64)
    tf = TransferFunction.ramp("viridis", 0.05, 0.6, 0.7, unit_distance=0.2).double()
    field = DenseGridField(volume, half).double()
    grid = OccupancyGrid.from_volume(volume, half).update(tf)
    origins, directions = orbit_rays(6, seed=10, spread=0.5)
    origins, directions = torch.tensor(origins), torch.tensor(directions)
    aabb = torch.stack([-half, half])

    def loss_terms(voxels, sigma_scale):
        field.volume = voxels

        def sample_fn(points):
            rgb, sigma = tf(field(points))
            return rgb, sigma * sigma_scale

        out = render_rays(
            origins,
            directions,
            sample_fn,
            aabb,
            num_samples=20,
            stratified=True,
            generator=torch.Generator().manual_seed(0),
            occupancy_grid=grid,
            chunk_samples=8,
            background=(0.1, 0.2, 0.3),
        )
        return torch.cat([out["rgb"].reshape(-1), out["accumulation"].reshape(-1), out["depth"].reshape(-1)])

    voxels = volume.clone().requires_grad_()
    sigma_scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    loss_terms(voxels, sigma_scale).sum().backward()
    assert sigma_scale.grad.abs() > 0 and voxels.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(loss_terms, (voxels, sigma_scale), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------- normals and shading


def test_normals_of_a_linear_field_point_down_its_gradient():
    gradient = torch.tensor([0.3, -0.4, 1.2])

    def value_fn(points):
        return 0.5 + points @ gradient

    points = torch.rand(100, 3) * 2 - 1
    expected = -gradient / gradient.norm()
    normals = estimate_normals(value_fn, points, eps=0.01)
    torch.testing.assert_close(normals, expected.expand(100, 3), atol=1e-4, rtol=0)

    def sample_fn(points):
        return torch.ones(points.shape[0], 3), torch.full((points.shape[0],), 0.5)

    origins, directions = orbit_rays(10, seed=12)
    out = render_rays(
        tensor(origins),
        tensor(directions),
        sample_fn,
        torch.tensor([[-1.0] * 3, [1.0] * 3]),
        normal_fn=lambda p: estimate_normals(value_fn, p, 0.01),
    )
    torch.testing.assert_close(out["normals"], expected.expand(10, 3), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="shading needs normal_fn"):
        render_rays(tensor(origins), tensor(directions), sample_fn, torch.tensor([[-1.0] * 3, [1.0] * 3]), shading=True)


def test_headlight_shading():
    rgb = torch.tensor([[0.5, 0.5, 0.5]] * 3)
    view = torch.tensor([[0.0, 0.0, -1.0]] * 3)
    normals = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    shaded = shade(rgb, normals, view, ambient=0.3, diffuse=0.7, specular=0.2, shininess=8.0)
    torch.testing.assert_close(shaded[0], torch.full((3,), 0.5 * 1.0 + 0.2))  # facing the light (two-sided)
    torch.testing.assert_close(shaded[1], torch.full((3,), 0.5 * 0.3))  # grazing: ambient only
    torch.testing.assert_close(shaded[2], torch.full((3,), 0.5 * 0.3))  # no normal: ambient only
