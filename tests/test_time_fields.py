"""Time-varying fields (fields/time_hash_grid.py, fields/time_features.py): the 4-D hash grid against the torch
reference and its own definition, step fidelity and in-between times of a trained sequence, fractional export times."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from gridinr_nerfstudio.data.timesteps import share_value_range, step_times
from gridinr_nerfstudio.data.volume_io import open_volume, scene_aabb, write_dataset
from gridinr_nerfstudio.fields.hash_grid._torch_impl import torch_encode
from gridinr_nerfstudio.fields.time_features import TIME_FIELDS
from gridinr_nerfstudio.fields.time_hash_grid import TimeHashGrid
from gridinr_nerfstudio.fields.volume_field import VolumeField, VolumeFieldSettings
from gridinr_nerfstudio.stages.fit.model import volume_psnr

AABB = torch.tensor([[-1.0] * 3, [1.0] * 3])


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_time_hash_grid_matches_torch_reference_and_blends_nodes():
    """C++ path == the torch reference (values and table gradient); at node k's time the grid is node k's 3-D
    encoding (torch_encode on that node's geometry); between two nodes the linear blend of both."""
    torch.manual_seed(0)
    grid = TimeHashGrid(4, 6, 2, 12, 4, 64, backend="cpp", init_scale=1.0)
    reference = TimeHashGrid(4, 6, 2, 12, 4, 64, backend="torch")
    reference.params = grid.params
    unit = torch.rand(500, 3)
    times = torch.rand(500)
    times[:100] = torch.randint(0, 4, (100,)).float() / 3
    ours = grid(unit, times)
    assert torch.allclose(ours, reference(unit, times), atol=1e-5)
    ours.square().sum().backward()
    grad = grid.params.grad.clone()
    grid.params.grad = None
    reference(unit, times).square().sum().backward()
    assert torch.allclose(grad, grid.params.grad, atol=1e-4)
    geometries = [view.geometry for view in grid._views.encodings]
    with torch.no_grad():
        nodes = [torch_encode(unit, grid.params, geometry, 2) for geometry in geometries]
        assert torch.allclose(grid(unit, 2 / 3), nodes[2], atol=1e-5)
        assert torch.allclose(grid(unit, 0.5), 0.5 * nodes[1] + 0.5 * nodes[2], atol=1e-5)
    # Hashed levels: every node reads the same table, in its own placement (the nodes' features differ).
    hashed = [level for level in range(6) if not geometries[0].dense[level]]
    assert hashed and all(geometries[0].table_offsets[level] <= geometries[3].table_offsets[level]
                          < geometries[0].table_offsets[level] + geometries[0].table_sizes[level] for level in hashed)
    assert not torch.allclose(nodes[0], nodes[3])


def test_parameters_grow_sub_linearly_with_steps():
    """From 4 to 100 steps (25x) both time fields grow less than 3x: step grids shrink as steps are added, the 4-D
    grid shares its table (only its small dense levels grow)."""
    def count(field):
        return sum(p.numel() for p in field.parameters())

    for name in TIME_FIELDS:
        settings = VolumeFieldSettings(num_levels=8, log2_hashmap_size=16, max_resolution=128, hidden_dim=16,
                                       time_field=name)
        one, four, hundred = (count(VolumeField(AABB, settings, steps)) for steps in (1, 4, 100))
        assert four < 2 * one and hundred < 3 * four, (name, one, four, hundred)
    default = VolumeFieldSettings(num_levels=4, log2_hashmap_size=12, max_resolution=32)
    assert default.time_field == "auto"
    assert [VolumeField(AABB, default, steps).time_field for steps in (1, 2, 4, 5, 100)] == [
        None, "step_grids", "step_grids", "hash4d", "hash4d"]


def test_points_at_a_step_time_read_that_step_alone():
    """Float rounding (2/3 * 3 = 1.9999999) must not hand a step's points, and their gradient, to its neighbour."""
    torch.manual_seed(0)
    for name in ("hash4d", "step_grids"):
        settings = VolumeFieldSettings(num_levels=4, log2_hashmap_size=16, max_resolution=32, hidden_dim=16,
                                       time_field=name)
        field = VolumeField(AABB, settings, num_times=4)
        times = step_times(4)
        field.forward_unit(torch.rand(50, 3), torch.full((50,), float(times[2]))).sum().backward()
        grids = field.step_encodings if name == "step_grids" else None
        if grids is not None:
            touched = [bool((grid.params.grad is not None) and grid.params.grad.abs().sum() > 0) for grid in grids]
            assert touched == [False, False, True, False]
        else:
            views = field.time_grid._views.encodings
            grad = field.time_grid.params.grad
            dense = [level for level in range(4) if views[0].geometry.dense[level]]
            for node in range(4):
                start, size = views[node].geometry.table_offsets[dense[0]], views[node].geometry.table_sizes[dense[0]]
                assert bool(grad[start * 2 : (start + size) * 2].abs().sum() > 0) == (node == 2)


def moving_frames(size: int = 20, steps: int = 3) -> list[np.ndarray]:
    """uint8 frames (Z, Y, X): a ball moving along x."""
    axis = np.linspace(-1.0, 1.0, size)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    return [(250 * np.clip(1 - np.sqrt((x + 0.5 - step * 0.5) ** 2 + y**2 + z**2) / 0.45, 0, 1)).astype(np.uint8)
            for step in range(steps)]


@pytest.fixture(scope="module")
def trained_sequences(tmp_path_factory):
    """Each time field trained briefly on a 3-step moving ball: {name: (field, volumes)}."""
    from gridinr_nerfstudio.scripts.bench.sequence import train
    from gridinr_nerfstudio.stages.fit.point_sampler import VolumePointSampler
    from gridinr_nerfstudio.stages.fit.sequence import SequencePointSampler

    torch.set_num_threads(1)
    data = write_dataset(tmp_path_factory.mktemp("moving") / "ball", "ball", {"v": moving_frames()})
    volumes = [open_volume(data, timestep=step) for step in (1, 2, 3)]
    share_value_range(volumes)
    aabb = scene_aabb(volumes[0])
    trained = {}
    for name in TIME_FIELDS:
        torch.manual_seed(0)
        settings = VolumeFieldSettings(num_levels=6, log2_hashmap_size=14, max_resolution=64, hidden_dim=16,
                                       num_hidden_layers=1, time_field=name)
        field = VolumeField(aabb, settings, num_times=3)
        samplers = SequencePointSampler([VolumePointSampler(v, aabb, seed=i) for i, v in enumerate(volumes)])
        train(field, samplers, aabb, 150, 1 << 13)
        trained[name] = field
    return trained, volumes


@pytest.mark.parametrize("name", TIME_FIELDS)
def test_field_at_a_step_time_reproduces_that_step(trained_sequences, name):
    """At step k's time the field fits step k (PSNR 5 dB or more above what any other step's volume gives)."""
    trained, volumes = trained_sequences
    field = trained[name]
    with torch.no_grad():
        for index, time in enumerate(step_times(3).tolist()):
            own = volume_psnr(lambda unit: field.forward_unit(unit, time), volumes[index])
            others = [volume_psnr(lambda unit: field.forward_unit(unit, time), volumes[j]) for j in range(3) if j != index]
            assert own > 25.0 and own > max(others) + 5.0, (name, index, own, others)


def test_time_between_steps_is_plausible(trained_sequences):
    """Halfway between two steps each field's values lie between the two steps' values (within a small
    margin) almost everywhere, and the in-between volume is closer to either neighbour than the far step is."""
    trained, volumes = trained_sequences
    size = volumes[0].info.dims[0]
    axes = torch.linspace(0, 1, size)
    zz, yy, xx = torch.meshgrid(axes, axes, axes, indexing="ij")
    unit = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    first, second, third = (torch.from_numpy(v.normalized_array()).float().reshape(-1) for v in volumes)
    low, high = torch.minimum(first, second), torch.maximum(first, second)
    for name, field in trained.items():
        with torch.no_grad():
            middle = field.forward_unit(unit, 0.25).clamp(0, 1)
        inside = ((middle >= low - 0.1) & (middle <= high + 0.1)).float().mean()
        assert inside > 0.9, (name, inside)
        to_neighbours = min((middle - first).abs().mean(), (middle - second).abs().mean())
        assert to_neighbours < (middle - third).abs().mean(), name


def test_every_time_field_trains_and_is_an_option():
    """Each option builds, runs forward and backward at per-point times, and gives every parameter to an optimizer
    group exactly once."""
    for name in TIME_FIELDS:
        settings = VolumeFieldSettings(num_levels=4, log2_hashmap_size=12, max_resolution=32, hidden_dim=16,
                                       time_field=name)
        field = VolumeField(AABB, settings, num_times=3)
        groups = field.param_groups()
        listed = [id(p) for params in groups.values() for p in params]
        assert sorted(listed) == sorted(id(p) for p in field.parameters())
        values = field.forward_unit(torch.rand(64, 3), torch.rand(64))
        values.sum().backward()
        assert values.shape == (64,) and torch.isfinite(values).all()



def test_step_grid_checkpoints_load_where_the_settings_say_auto():
    """A 5-step field saved with step grids (before `time_field`; its config now reads as `auto`, i.e. hash4d at 5
    steps) loads and gives the same values."""
    import dataclasses

    torch.manual_seed(0)
    settings = VolumeFieldSettings(num_levels=4, log2_hashmap_size=12, max_resolution=32, hidden_dim=16)
    old = VolumeField(AABB, dataclasses.replace(settings, time_field="step_grids"), num_times=5)
    for grid in old.step_encodings:
        torch.nn.init.uniform_(grid.params, -1, 1)
    loaded = VolumeField(AABB, settings, num_times=5)
    assert loaded.time_field == "hash4d"
    loaded.load_state_dict(old.state_dict())
    unit = torch.rand(100, 3)
    with torch.no_grad():
        assert loaded.time_field == "step_grids"
        assert torch.equal(loaded.forward_unit(unit, 0.3), old.forward_unit(unit, 0.3))
