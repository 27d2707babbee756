"""Transfer functions against matplotlib, np.interp, ParaView's published colours and hand-written presets."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from gridinr_nerfstudio.transfer.paraview import (
    available_presets,
    load_preset,
    save_preset,
    transfer_function_from_preset,
    transfer_function_to_preset,
)
from gridinr_nerfstudio.transfer.transfer_function import TABLE_SIZE, TransferFunction

UNIT = 0.05


def paraview_sigma(opacity: np.ndarray, unit_distance: float = UNIT) -> np.ndarray:
    return -np.log(1.0 - np.minimum(opacity, 1.0 - 1e-6)) / unit_distance


def evaluate(tf: TransferFunction, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        rgb, sigma = tf(torch.tensor(values, dtype=torch.float32))
    return rgb.numpy(), sigma.numpy()


def write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content))
    return path


def test_colormap_colours_equal_matplotlib_at_its_lut_nodes():
    tf = TransferFunction.from_colormap("viridis", [(0.0, 0.5), (1.0, 0.5)], unit_distance=UNIT)
    nodes = np.arange(256) / 255.0
    rgb, _ = evaluate(tf, nodes)
    np.testing.assert_allclose(rgb, matplotlib.colormaps["viridis"](nodes)[:, :3], atol=1e-6)
    # Between nodes the colour is the linear blend of the neighbouring LUT colours.
    between, _ = evaluate(tf, np.array([(10 + 0.25) / 255.0]))
    lut = matplotlib.colormaps["viridis"](nodes)[:, :3]
    np.testing.assert_allclose(between[0], 0.75 * lut[10] + 0.25 * lut[11], atol=1e-5)


def test_opacity_curve_is_piecewise_linear_and_sigma_is_paraview_opacity_per_unit_distance():
    points = [(0.0, 0.0), (0.25, 0.0), (0.5, 0.8), (0.75, 0.2), (1.0, 0.2)]
    tf = TransferFunction.from_colormap("gray", points, unit_distance=UNIT)
    entries = np.linspace(0.0, 1.0, TABLE_SIZE)[::7]
    expected_at_entries = paraview_sigma(np.interp(entries, *zip(*points)))
    np.testing.assert_allclose(evaluate(tf, entries)[1], expected_at_entries, rtol=1e-5, atol=1e-4)
    # Anywhere (between entries too) sigma follows the opacity curve closely; outside [0, 1] it is constant.
    values = np.random.default_rng(0).uniform(0.0, 1.0, 500)
    np.testing.assert_allclose(
        evaluate(tf, values)[1], paraview_sigma(np.interp(values, *zip(*points))), rtol=2e-3, atol=1e-3
    )
    np.testing.assert_allclose(evaluate(tf, np.array([-0.5, 1.5]))[1], paraview_sigma(np.array([0.0, 0.2])), rtol=1e-5)
    # An opacity of 0.5 over one unit distance: a slab one unit thick lets half the light through.
    half = TransferFunction.from_colormap("gray", [(0.0, 0.5), (1.0, 0.5)], unit_distance=UNIT)
    assert np.exp(-evaluate(half, np.array([0.3]))[1][0] * UNIT) == pytest.approx(0.5, rel=1e-5)


def test_ramp_is_zero_below_low_and_scale_from_high():
    tf = TransferFunction.ramp("inferno", 0.1, 0.6, 0.25, unit_distance=UNIT)
    _, sigma = evaluate(tf, np.array([0.0, 0.05, 0.1, 0.35, 0.6, 0.9]))
    np.testing.assert_allclose(sigma, paraview_sigma(np.array([0.0, 0.0, 0.0, 0.125, 0.25, 0.25])), rtol=1e-5)
    with pytest.raises(ValueError, match="low <= high"):
        TransferFunction.ramp("inferno", 0.6, 0.1, 0.25)
    with pytest.raises(ValueError, match="unknown matplotlib colormap"):
        TransferFunction.ramp("no-such-map", 0.1, 0.6, 0.25)


def test_visible_in_range_matches_dense_evaluation():
    tf = TransferFunction.from_colormap(
        "gray", [(0.0, 0.0), (0.3, 0.0), (0.31, 0.4), (0.5, 0.0), (0.8, 0.0), (0.9, 0.1)], UNIT
    )
    rng = np.random.default_rng(1)
    low = rng.uniform(-0.1, 1.1, 400)
    high = np.minimum(low + rng.exponential(0.05, 400), 1.2)
    visible = tf.visible_in_range(
        torch.tensor(low, dtype=torch.float32), torch.tensor(high, dtype=torch.float32)
    ).numpy()
    for lo, hi, answer in zip(low, high, visible):
        dense = np.concatenate(
            [
                np.linspace(lo, hi, 2000),
                np.linspace(0, 1, TABLE_SIZE)[
                    (np.linspace(0, 1, TABLE_SIZE) >= lo) & (np.linspace(0, 1, TABLE_SIZE) <= hi)
                ],
            ]
        )
        assert answer == bool((evaluate(tf, dense)[1] > 0).any()), (lo, hi)


def test_transfer_function_is_differentiable_wrt_values():
    tf = TransferFunction.ramp("viridis", 0.2, 0.7, 0.6, unit_distance=UNIT).double()
    values = torch.tensor([0.13, 0.3, 0.45, 0.61, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v: torch.cat([tf(v)[0].reshape(-1), tf(v)[1]]), (values,), eps=1e-6, atol=1e-4
    )


def test_paraview_cool_to_warm_diverging_matches_morelands_table(tmp_path):
    # ParaView's "Cool to Warm" as ParaView exports it; reference colours from Moreland (2009), Table 1.
    preset = {
        "Name": "Cool to Warm",
        "ColorSpace": "Diverging",
        "NanColor": [1, 1, 0],
        "RGBPoints": [-3.0, 0.231373, 0.298039, 0.752941, 5.0, 0.705882, 0.015686, 0.14902],
    }
    tf = load_preset(write_json(tmp_path / "cool_to_warm.json", [preset]), unit_distance=UNIT)
    rgb, sigma = evaluate(tf, np.array([0.0, 0.03125, 0.5, 1.0]))
    expected = np.array([[59, 76, 192], [68, 90, 204], [221, 221, 221], [180, 4, 38]]) / 255.0
    np.testing.assert_allclose(rgb, expected, atol=1.6 / 255.0)
    np.testing.assert_allclose(sigma, paraview_sigma(np.ones(4)), rtol=1e-5)  # no "Points": fully opaque


def test_lab_and_hsv_colour_spaces_interpolate_in_those_spaces():
    black_white_lab = {"Name": "bw", "ColorSpace": "Lab", "RGBPoints": [0, 0, 0, 0, 1, 1, 1, 1]}
    grey, _ = evaluate(transfer_function_from_preset(black_white_lab), np.array([0.5]))
    np.testing.assert_allclose(grey[0], [0.4663] * 3, atol=5e-3)  # sRGB of L* = 50
    red_blue_hsv = {"Name": "rb", "ColorSpace": "HSV", "RGBPoints": [0, 1, 0, 0, 1, 0, 0, 1]}
    midway, _ = evaluate(transfer_function_from_preset(red_blue_hsv), np.array([0.5]))
    np.testing.assert_allclose(midway[0], [1.0, 0.0, 1.0], atol=1e-3)  # hue 0 -> 240 degrees the short way: magenta


def test_preset_data_range_is_rescaled_and_midpoints_follow_vtk():
    preset = {
        "Name": "ranged",
        "RGBPoints": [100, 0, 0, 0, 300, 1, 1, 1],
        "Points": [100, 0.0, 0.25, 0.0, 300, 1.0, 0.5, 0.0],
    }
    tf = transfer_function_from_preset(preset, unit_distance=UNIT)
    rgb, sigma = evaluate(tf, np.array([0.25, 0.5, 0.625]))
    np.testing.assert_allclose(rgb[:, 0], [0.25, 0.5, 0.625], atol=1e-5)
    # Midpoint 0.25: the opacity is halfway at a quarter of the segment, then linear to the end.
    np.testing.assert_allclose(sigma, paraview_sigma(np.array([0.5, 2.0 / 3.0, 0.75])), rtol=5e-3)


def test_preset_round_trip(tmp_path):
    tf = TransferFunction.from_colormap("magma", [(0.0, 0.0), (0.2, 0.0), (0.7, 0.9), (1.0, 0.3)], UNIT)
    path = tmp_path / "exported.json"
    save_preset(path, tf, "Exported")
    loaded = load_preset(path, unit_distance=UNIT)
    assert torch.equal(loaded.table, tf.table)
    assert json.loads(path.read_text())[0]["Name"] == "Exported"
    assert transfer_function_to_preset(loaded, "Exported") == transfer_function_to_preset(tf, "Exported")


def test_multi_preset_file_picks_by_name(tmp_path):
    presets = [
        {"Name": "first", "RGBPoints": [0, 0, 0, 0, 1, 1, 0, 0]},
        {"Name": "second", "RGBPoints": [0, 0, 0, 0, 1, 0, 1, 0]},
    ]
    path = write_json(tmp_path / "two.json", presets)
    np.testing.assert_allclose(evaluate(load_preset(path, name="second"), np.array([1.0]))[0], [[0, 1, 0]])
    np.testing.assert_allclose(evaluate(load_preset(path), np.array([1.0]))[0], [[1, 0, 0]])
    with pytest.raises(ValueError, match="no preset named 'third'"):
        load_preset(path, name="third")


def test_shipped_presets_load_by_name_and_file_stem():
    names = available_presets()
    assert {"Cool Warm Volume", "C60 Glow", "fMRI BOLD"} <= set(names)
    for name in names:
        tf = load_preset(name, unit_distance=UNIT)
        assert tf.table.shape == (1, 4, 1, TABLE_SIZE)
        assert float(tf.table[0, 3].max()) > 0.0
    assert torch.equal(load_preset("c60_glow").table, load_preset("c60 glow").table)
    with pytest.raises(ValueError, match="neither a ParaView preset file nor a shipped preset"):
        load_preset("no such preset")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "non-empty list of objects"),
        ('[{"RGBPoints": [0, 0, 0, 0, 1, 1, 1, 1]}]', 'no string "Name"'),
        ('[{"Name": "a", "IndexedColors": [1, 0, 0]}]', 'no "RGBPoints"'),
        ('[{"Name": "a", "RGBPoints": [0, 0, 0, 0, 1, 1, 1]}]', "multiple of 4"),
        ('[{"Name": "a", "RGBPoints": [0, 0, 0, 0, "x", 1, 1, 1]}]', "numbers only"),
        ('[{"Name": "a", "RGBPoints": [1, 0, 0, 0, 0, 1, 1, 1]}]', "non-decreasing"),
        ('[{"Name": "a", "RGBPoints": [0, 0, 0, 0, 1, 2, 1, 1]}]', r"colours must lie in \[0, 1\]"),
        ('[{"Name": "a", "RGBPoints": [0, 0, 0, 0, 0, 1, 1, 1]}]', "data range .* is empty"),
        (
            '[{"Name": "a", "RGBPoints": [0, 0, 0, 0, 1, 1, 1, 1], "Points": [0, 0, 0.5, 0, 1, 1.5, 0.5, 0]}]',
            "opacities must lie",
        ),
        (
            '[{"Name": "a", "RGBPoints": [0, 0, 0, 0, 1, 1, 1, 1], "ColorSpace": "Step"}]',
            "unsupported \"ColorSpace\" 'Step'",
        ),
    ],
)
def test_bad_preset_files_name_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "bad_preset.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as error:
        load_preset(path)
    assert str(path) in str(error.value)


def test_missing_preset_file_is_reported():
    with pytest.raises(ValueError, match="no such preset file"):
        load_preset("/nonexistent/folder/preset.json")
