"""Colour targets without CLIP (stages/edit/color_loss.py): sliced Wasserstein against scipy and sorted samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from gridinr_nerfstudio.stages.edit.color_loss import (
    ColorLoss,
    ColorTargetError,
    palette_colors,
    parse_colors,
    part_pixel_colors,
    resolve_palette,
    shipped_palettes,
    sliced_wasserstein,
    wasserstein_1d,
)


def test_1d_distance_matches_scipy_for_weighted_sets():
    rng = np.random.default_rng(0)
    for size_x, size_y in ((7, 7), (13, 5), (1, 9)):
        x, y = rng.normal(size=size_x), rng.normal(1.0, 2.0, size=size_y)
        wx, wy = rng.uniform(0.1, 3.0, size_x), rng.uniform(0.1, 3.0, size_y)
        ours = wasserstein_1d(torch.tensor(x)[None], torch.tensor(wx), torch.tensor(y)[None], torch.tensor(wy), p=1.0)
        assert float(ours) == pytest.approx(wasserstein_distance(x, y, wx, wy), rel=1e-9, abs=1e-12)


def test_1d_w2_of_equal_uniform_sets_is_the_mean_squared_gap_of_sorted_samples():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=50), rng.uniform(-1, 3, size=50)
    ours = wasserstein_1d(torch.tensor(x)[None], torch.ones(50, dtype=torch.float64), torch.tensor(y)[None],
                          torch.ones(50, dtype=torch.float64))
    assert float(ours) == pytest.approx(np.mean((np.sort(x) - np.sort(y)) ** 2), rel=1e-9)
    # Integer weights are repeated samples.
    counts = rng.integers(1, 4, size=50)
    weighted = wasserstein_1d(torch.tensor(x)[None], torch.tensor(counts, dtype=torch.float64),
                              torch.tensor(y)[None], torch.ones(50, dtype=torch.float64))
    repeated = np.repeat(x, counts)
    reference = wasserstein_1d(torch.tensor(repeated)[None], torch.ones(len(repeated), dtype=torch.float64),
                               torch.tensor(y)[None], torch.ones(50, dtype=torch.float64))
    assert float(weighted) == pytest.approx(float(reference), rel=1e-9)


def test_sliced_distance_is_zero_for_the_same_colours_and_moves_colours_to_the_palette():
    generator = torch.Generator().manual_seed(0)
    palette = torch.rand(40, 3, generator=generator) * torch.tensor([0.2, 0.4, 1.0])  # blues
    directions = torch.nn.functional.normalize(torch.randn(32, 3, generator=generator), dim=-1)
    shuffled = palette[torch.randperm(40, generator=generator)]
    assert float(sliced_wasserstein(shuffled, torch.ones(40), palette, None, directions)) < 1e-12
    colours = (torch.rand(200, 3, generator=generator) * torch.tensor([1.0, 0.5, 0.1])).requires_grad_(True)  # reds
    loss = ColorLoss(palette, num_directions=32)
    rgb = colours[None, None]  # (1, 1, 200, 3) "pixels" fully covered by the part
    alpha = torch.ones(1, 1, 200, 1)
    background = torch.zeros(3)
    start = loss.distance(rgb.detach(), alpha, background)
    optimizer = torch.optim.Adam([colours], lr=0.02)
    for _ in range(100):
        optimizer.zero_grad()
        loss(colours[None, None], alpha, background).backward()
        optimizer.step()
    end = loss.distance(colours.detach()[None, None], alpha, background)
    assert end < 0.25 * start, (start, end)
    assert float(colours[:, 2].mean()) > float(colours[:, 0].mean())  # now bluer than red


def test_part_colours_are_unpremultiplied_and_weighted_by_accumulation():
    colour = torch.tensor([0.2, 0.6, 0.9])
    background = torch.tensor([1.0, 1.0, 1.0])
    alpha = torch.tensor([0.5, 0.25, 0.0, 0.005])[:, None]
    rgb = alpha * colour + (1 - alpha) * background
    colours, weights = part_pixel_colors(rgb, alpha, background)
    assert colours.shape == (2, 3)  # the transparent and nearly transparent pixels show no part
    torch.testing.assert_close(colours, colour.expand(2, 3))
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.25]))


def test_colour_lists_and_palettes_parse_or_fail_in_one_line():
    parsed = parse_colors(["#ff0000", "teal", [0, 0, 255], [0.5, 0.5, 0.5]])
    torch.testing.assert_close(parsed, torch.tensor([[1.0, 0, 0], [0, 128 / 255, 128 / 255], [0, 0, 1], [0.5, 0.5, 0.5]]))
    for bad, words in ((["#zzzzzz"], "is not a colour"), ([[1, 2]], "is not a colour"), ([[-1, 0, 0]], "outside"),
                       ("red", "non-empty list"), ([], "non-empty list")):
        with pytest.raises(ColorTargetError, match=words) as error:
            parse_colors(bad, where="edits.json: targets[2]: colors")
        assert str(error.value).startswith("edits.json: targets[2]: colors") and "\n" not in str(error.value)
    assert "ocean" in shipped_palettes()
    ocean = palette_colors(resolve_palette("ocean"))
    assert ocean.shape[1] == 3 and ocean.shape[0] > 16
    assert float(ocean[:, 2].mean()) > float(ocean[:, 0].mean())  # blue-green, not red


def test_palette_image_that_is_not_an_image_names_the_file(tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_text("not an image")
    with pytest.raises(ColorTargetError, match="photo.jpg: cannot read image"):
        palette_colors(bad)
