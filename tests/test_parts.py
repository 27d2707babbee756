"""Edits by parts of the transfer table (transfer/parts.py): each part changes only its own range, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gridinr_nerfstudio.transfer.parts import PartTransfer, part_weights
from gridinr_nerfstudio.transfer.transfer_mlp import TransferMLP, TransferTable, interpolate_table


def base_mlp() -> TransferMLP:
    torch.manual_seed(0)
    mlp = TransferMLP(hidden_dim=32, num_layers=2, sigma_scale=50.0)
    return mlp.requires_grad_(False)


def scramble(module: torch.nn.Module, seed: int = 1) -> None:
    """Give every residual non-zero weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def values_around(edges, count: int = 2000) -> torch.Tensor:
    """Dense values in [0, 1] plus the float32 neighbours of every edge (where rounding could leak)."""
    values = [torch.linspace(0.0, 1.0, count)]
    for edge in edges:
        edge32 = torch.tensor(edge, dtype=torch.float32)
        below, above = edge32.clone(), edge32.clone()
        steps = []
        for _ in range(4):
            below = torch.nextafter(below, torch.tensor(-1.0))
            above = torch.nextafter(above, torch.tensor(2.0))
            steps += [below.clone(), above.clone()]
        values.append(torch.stack(steps + [edge32]))
    return torch.cat(values).clamp(0.0, 1.0)


def test_interpolate_table_is_linear_interpolation_like_numpy():
    table = torch.rand(17, 4)
    values = torch.rand(1000)
    rgb, sigma = interpolate_table(table, values)
    nodes = np.linspace(0.0, 1.0, 17)
    expected = np.stack([np.interp(values.numpy(), nodes, table[:, c].numpy()) for c in range(4)], axis=1)
    np.testing.assert_allclose(torch.cat([rgb, sigma[:, None]], 1).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("low, high, softness", [(0.6, 1.0, 0.0), (0.2, 0.5, 0.05), (0.0, 0.2, 0.0), (0.3337, 0.71, 0.0)])
def test_values_outside_a_part_keep_the_warm_start_bit_for_bit(low, high, softness):
    base = base_mlp()
    parts = PartTransfer(max_parts=3, hidden_dim=16)
    parts.set_part(1, low, high, softness)
    scramble(parts.residuals)
    warm, edited = base.table(), parts.edited_table(base)
    values = values_around([low, high])
    outside = (values < low) | (values > high)
    assert outside.sum() > 100
    warm_rgb, warm_sigma = interpolate_table(warm, values[outside])
    rgb, sigma = interpolate_table(edited, values[outside])
    assert torch.equal(rgb, warm_rgb) and torch.equal(sigma, warm_sigma)
    # Inside, the residual does change the look (away from the edges, where its weight is full).
    inside = (values > low + 0.02 + softness) & (values < high - 0.02 - softness)
    assert (interpolate_table(edited, values[inside])[0] - interpolate_table(warm, values[inside])[0]).abs().max() > 0.05


def test_parts_add_up_and_colour_only_parts_keep_opacity():
    base = base_mlp()
    parts = PartTransfer(max_parts=4, hidden_dim=16)
    parts.set_part(0, 0.1, 0.3, edit_opacity=False)
    parts.set_part(2, 0.6, 0.9)
    scramble(parts.residuals)
    warm, edited = base.table(), parts.edited_table(base)
    nodes = torch.linspace(0.0, 1.0, warm.shape[0])
    first, second = parts.weights(0, warm.shape[0]) > 0, parts.weights(2, warm.shape[0]) > 0
    untouched = ~(first | second)
    assert torch.equal(edited[untouched], warm[untouched])
    assert torch.equal(edited[first, 3], warm[first, 3])  # colour only: sigma bit for bit
    assert (edited[first, :3] - warm[first, :3]).abs().max() > 0.05
    assert (edited[second, 3] - warm[second, 3]).abs().max() > 1.0
    # The edited table is the activated sum of the warm start's raw outputs and the weighted residuals.
    with torch.no_grad():
        raw = base.raw(nodes)
        change = parts.weights(2, len(nodes))[:, None] * parts.residuals[2](nodes)
        colour = parts.weights(0, len(nodes))[:, None] * parts.residuals[0](nodes) * torch.tensor([1.0, 1, 1, 0])
        expected = base.activate(raw + change + colour)
    torch.testing.assert_close(edited[second], expected[second])
    # A part render shows its part alone: no sigma outside it.
    part = parts.part_table(edited, 2)
    assert torch.all(part[~second, 3] == 0) and torch.equal(part[:, :3], edited[:, :3])


def test_a_new_part_changes_nothing_until_it_trains_and_removal_restores_the_warm_start():
    base = base_mlp()
    parts = PartTransfer(max_parts=2, hidden_dim=16)
    parts.set_part(0, 0.2, 0.8)
    assert torch.equal(parts.edited_table(base), base.table())
    scramble(parts.residuals)
    assert not torch.equal(parts.edited_table(base), base.table())
    parts.clear_part(0)
    assert parts.active_slots() == [] and torch.equal(parts.edited_table(base), base.table())
    parts.set_part(0, 0.2, 0.8)
    assert torch.equal(parts.edited_table(base), base.table())  # a cleared residual is zero again


def test_gradients_reach_only_the_residuals_and_only_inside_their_part():
    base = base_mlp()
    parts = PartTransfer(max_parts=2, hidden_dim=16)
    parts.set_part(0, 0.5, 1.0)
    colour = TransferTable(parts.edited_table(base), invisible_sigma=1e-3)
    outside = torch.linspace(0.0, 0.49, 200)
    rgb, sigma = colour(outside)
    (rgb.sum() + sigma.sum()).backward()
    assert all(p.grad is None or not p.grad.any() for p in parts.residuals[0].parameters())
    colour = TransferTable(parts.edited_table(base), invisible_sigma=1e-3)
    rgb, sigma = colour(torch.linspace(0.6, 1.0, 200))
    (rgb.sum() + sigma.sum()).backward()
    assert parts.residuals[0].mlp[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in parts.residuals[1].parameters())  # a free slot takes no part


def test_part_weights_ramp_over_softness_and_reject_nothing_at_the_ends():
    weights = part_weights(1001, 0.2, 0.6, softness=0.1)
    nodes = torch.linspace(0.0, 1.0, 1001)
    assert torch.all(weights[nodes <= 0.2 + 1e-3] == 0) and torch.all(weights[nodes >= 0.6 - 1e-6] == 0)
    assert torch.all(weights[(nodes > 0.31) & (nodes < 0.49)] == 1)
    ramp = weights[(nodes > 0.2) & (nodes < 0.3)]
    assert torch.all(ramp[1:] >= ramp[:-1]) and 0 < ramp[50] < 1
    assert torch.all(part_weights(11, 0.0, 1.0) == 1)  # no edge inside [0, 1]: every value belongs


def test_state_without_parts_loads_and_labels_travel_with_the_state():
    parts = PartTransfer(max_parts=3, hidden_dim=16)
    parts.set_part(1, 0.25, 0.75, label="glowing red bone")
    scramble(parts.residuals)
    state = parts.state_dict()
    other = PartTransfer(max_parts=3, hidden_dim=16)
    other.load_state_dict(state)
    assert other.labels[1] == "glowing red bone" and other.active_slots() == [1]
    base = base_mlp()
    assert torch.equal(other.edited_table(base), parts.edited_table(base))
    empty = PartTransfer(max_parts=3, hidden_dim=16)
    empty.load_state_dict({})  # a checkpoint written before edits by parts
    assert empty.active_slots() == []
