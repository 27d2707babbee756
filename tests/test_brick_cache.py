"""The field cache decoded brick by brick (fields/brick_cache.py) and the dense-chunk path of the ray marcher.

References: the same analytic field evaluated on the whole lattice at once (DenseGridField), the marcher with
compaction forced on every chunk, and a model rendering with the field cache decoded whole.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_rendering import blob_volume, orbit_rays, tensor

from gridinr_nerfstudio.fields.brick_cache import BrickFieldCache
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid
from gridinr_nerfstudio.rendering.raymarch import RenderStats, render_rays
from gridinr_nerfstudio.transfer.transfer_function import TransferFunction

DIMS_XYZ = (13, 10, 7)  # cells 12 x 9 x 6: bricks of 4 cells -> 3 x 3 x 2, the last ones partial
HALF = torch.tensor([1.0, 0.75, 0.5])


def analytic_unit(unit: torch.Tensor) -> torch.Tensor:
    """A smooth field on the unit cube with values in (0, 1), not trilinear (so lattice spacing matters)."""
    x, y, z = unit.unbind(-1)
    return 0.5 + 0.4 * torch.sin(3.0 * x + 1.0) * torch.cos(2.0 * y - 0.5) * torch.sin(4.0 * z + 0.3)


def whole_lattice() -> DenseGridField:
    """The reference: the analytic field evaluated at every lattice point at once (numpy grid)."""
    axes = [np.linspace(0.0, 1.0, n) for n in DIMS_XYZ]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    unit = torch.tensor(np.stack([x, y, z], -1).reshape(-1, 3), dtype=torch.float32)
    return DenseGridField(analytic_unit(unit).reshape(DIMS_XYZ[::-1]), HALF)


def points_in_box(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(count, 3, generator=generator) * 2.0 - 1.0) * HALF


def test_bricks_give_the_values_of_the_whole_lattice_and_decode_only_where_asked():
    calls = []

    def decode(unit):
        calls.append(unit.shape[0])
        return analytic_unit(unit)

    cache = BrickFieldCache(decode, DIMS_XYZ, HALF, brick_size=4)
    reference = whole_lattice()
    assert cache.decoded.shape == (2, 3, 3) and cache.decoded_fraction() == 0.0

    # Points in the brick at the low corner only: one brick of 5^3 lattice points decoded.
    corner = -HALF + 0.3 * (2 * HALF / torch.tensor([12.0, 9.0, 6.0]))
    near_corner = corner + torch.rand(50, 3, generator=torch.Generator().manual_seed(0)) * (2 * HALF / 12.0)
    torch.testing.assert_close(cache(near_corner), reference(near_corner), atol=1e-6, rtol=0)
    assert int(cache.decoded.sum()) == 1 and cache.decoded_points == 5**3

    points = points_in_box(4000, seed=1)
    torch.testing.assert_close(cache(points), reference(points), atol=1e-6, rtol=0)
    assert cache.decoded_fraction() == 1.0
    decoded = cache.decoded_points
    cache(points_in_box(500, seed=2))  # everything decoded: no more work
    assert cache.decoded_points == decoded

    # Lattice points themselves (weights 0 on some corners), box faces and points outside (0, nothing decoded).
    cache.clear()
    assert cache.decoded_fraction() == 0.0 and bool(cache.volume.isnan().all())
    faces = torch.stack([HALF, -HALF, torch.tensor([1.0, -0.75, 0.0]), torch.zeros(3)])
    torch.testing.assert_close(cache(faces), reference(faces), atol=1e-6, rtol=0)
    outside = torch.tensor([[1.5, 0.0, 0.0], [0.0, -0.9, 0.0]])
    before = cache.decoded_points
    assert cache(outside).tolist() == [0.0, 0.0] and cache.decoded_points == before


def test_a_render_through_bricks_equals_the_render_of_the_whole_lattice():
    reference = whole_lattice()
    cache = BrickFieldCache(analytic_unit, DIMS_XYZ, HALF, brick_size=3)
    tf = TransferFunction.ramp("viridis", 0.55, 0.8, 0.8, unit_distance=0.05)
    grid = OccupancyGrid.from_volume(reference.volume, HALF, resolution=6).update(tf)
    origins, directions = orbit_rays(400, seed=3)
    aabb = torch.stack([-HALF, HALF])
    options = {"num_samples": 64, "occupancy_grid": grid, "background": (1.0, 1.0, 1.0)}
    expected = render_rays(tensor(origins), tensor(directions), lambda p: tf(reference(p)), aabb, **options)
    got = render_rays(tensor(origins), tensor(directions), lambda p: tf(cache(p)), aabb, **options)
    for key in ("rgb", "accumulation", "depth"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)
    # Only bricks some occupied sample reached were decoded (the blob-free corners of this field stay empty).
    assert 0.0 < cache.decoded_fraction() <= 1.0


@pytest.mark.parametrize("dense", [True, False])
def test_dense_chunks_and_dense_grids_give_the_image_of_compacted_chunks(dense):
    """A dense volume (most cells occupied) and a sparse one: evaluating chunks whole, or not consulting the grid,
    gives the image of evaluating the occupied samples only."""
    volume = blob_volume() * 0.6 + (0.3 if dense else 0.0)
    volume[:5, :6, :7] = 0.0  # an empty pocket: a few transparent cells even in the dense volume
    threshold = 0.2
    half = np.array([1.0, 18 / 22, 14 / 22])
    # Sparse case: the field rendered is denser than the voxels the grid was built from (as an INR may differ
    # from its raw voxels), so samples in "empty" cells would add colour unless their sigma is forced to 0.
    field = DenseGridField(tensor(volume + (0.0 if dense else 0.25)), tensor(half))
    tf = TransferFunction.ramp("inferno", threshold, 0.9, 0.9, unit_distance=0.05)
    grid = OccupancyGrid.from_volume(tensor(volume), tensor(half), resolution=8).update(tf)
    origins, directions = orbit_rays(500, seed=4)
    aabb = tensor([-half, half])

    def render(share):
        stats = RenderStats()
        out = render_rays(tensor(origins), tensor(directions), lambda p: tf(field(p)), aabb, num_samples=80,
                          occupancy_grid=grid, chunk_samples=16, stats=stats, dense_chunk_share=share)
        return out, stats

    compacted, compacted_stats = render(2.0)  # a share above 1: every chunk compacted, the grid always consulted
    whole_chunks = False
    # The share is over a chunk of all rays: low ones (still above the sparse grid's 19% occupied cells, so that
    # the grid is consulted) take the whole-chunk path in the middle of the box.
    for share in (0.9, 0.5, 0.3, 0.2):
        out, stats = render(share)
        for key in ("rgb", "accumulation", "depth"):
            torch.testing.assert_close(out[key], compacted[key], atol=1e-6, rtol=0)
        assert stats.samples_evaluated >= compacted_stats.samples_evaluated
        whole_chunks |= stats.samples_evaluated > compacted_stats.samples_evaluated
    assert whole_chunks
    if not dense:  # sparse: compaction still skips the empty samples
        assert grid.occupied_fraction() < 0.2
        assert compacted_stats.samples_evaluated < 0.8 * compacted_stats.samples_total
        assert render(0.9)[1].samples_evaluated == compacted_stats.samples_evaluated
    else:
        assert 0.9 <= grid.occupied_fraction() < 1.0  # the dense case really is dense, with some empty cells
        assert render(0.9)[1].samples_evaluated > compacted_stats.samples_evaluated


def test_model_with_bricks_renders_the_image_of_the_whole_field_cache(tmp_path):
    from tiny_runs import train_tiny_fit

    from gridinr_nerfstudio.runs import load_run_pipeline

    config_path = train_tiny_fit(tmp_path, iterations=20)
    _, pipeline, _, _ = load_run_pipeline(config_path, test_mode="test")
    model = pipeline.model
    cameras = pipeline.datamanager.eval_dataset.cameras
    model.config.accelerate = False  # same samples for both: skipping differs (cache vs raw-voxel bounds)
    whole = model.get_outputs_for_camera_ray_bundle(cameras.generate_rays(camera_indices=0, keep_shape=True))["rgb"]
    model.config.field_cache_bricks = 4
    model.invalidate_field_cache()
    bricks = model.get_outputs_for_camera_ray_bundle(cameras.generate_rays(camera_indices=0, keep_shape=True))["rgb"]
    assert isinstance(model.field_cache, BrickFieldCache) and model.field_cache.decoded_fraction() > 0
    torch.testing.assert_close(bricks, whole, atol=1e-5, rtol=0)
    model.config.accelerate = True  # raw-voxel bounds for skipping: still the same picture
    model.invalidate_field_cache()
    accelerated = model.get_outputs_for_camera_ray_bundle(cameras.generate_rays(camera_indices=0, keep_shape=True))["rgb"]
    assert float((accelerated - whole).abs().max()) < 2e-2


def test_values_the_field_itself_makes_nan_stay_nan_without_looping():
    def decode(unit):
        values = analytic_unit(unit)
        return torch.where(unit[:, 0] > 0.5, torch.full_like(values, float("nan")), values)

    cache = BrickFieldCache(decode, DIMS_XYZ, HALF, brick_size=4)
    points = points_in_box(300, seed=5)
    values = cache(points)
    right = points[:, 0] > 0.2  # lattice x > 0.6: every corner NaN
    assert bool(values[right].isnan().all()) and not bool(values[points[:, 0] < -0.2].isnan().any())
