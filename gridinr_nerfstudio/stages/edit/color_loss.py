"""Colour targets without CLIP: the rendered colours of a part matched to a palette by sliced Wasserstein distance.

A part's render (the transfer function masked to its range, `transfer/parts.py`) gives per pixel a colour
`rgb` composited over the background and an accumulation `a`. The part's colour at that pixel is the
un-premultiplied `(rgb - (1 - a) * background) / a`, weighted by `a` (how much of the part the pixel shows).
The target is a set of colours, equally weighted: a list (`"#1f77b4"`, `"teal"`, `[0.1, 0.5, 0.9]`) or the
pixels of a palette image ("colour it like this photograph").

The distance is the sliced 2-Wasserstein distance in RGB (Rabin et al. 2011, Bonneel et al. 2015): both weighted
point sets projected on random unit directions, and the 1-D 2-Wasserstein distance of each projection computed
exactly from the two quantile functions (both piecewise constant: the integral runs over the union of their
steps). Differentiable w.r.t. the rendered colours; the weights are held fixed (detached) and a colour is the
part's un-premultiplied one, so the loss recolours what is shown and cannot win by hiding or fading pixels. Our own 30 lines rather than POT (`ot.sliced_wasserstein_distance`),
a large dependency for one function; `tests/test_color_loss.py` checks ours against scipy's 1-D Wasserstein
distance and against sorted samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

ColorSpec = Union[str, Sequence[float]]

PALETTE_FOLDER = Path(__file__).resolve().parents[2] / "transfer" / "palettes"
"""Palette images shipped with the package ("ocean": navy to sea foam, what the demo uses); a target's
`palette` may name one instead of giving a file."""

MAX_PALETTE_COLORS = 4096
"""Palette images are subsampled to at most this many pixels (evenly strided): distances change by little."""


class ColorTargetError(ValueError):
    """A colour or palette that cannot be read; one line naming it."""


def parse_colors(colors: Sequence[ColorSpec], where: str = "colors") -> torch.Tensor:
    """(N, 3) float RGB in [0, 1] of matplotlib colour specs or RGB triples (floats in [0, 1] or ints 0-255)."""
    from matplotlib.colors import to_rgb  # here: entry points must not import matplotlib

    if isinstance(colors, str) or not len(colors):
        raise ColorTargetError(f"{where}: expected a non-empty list of colours, got {colors!r}")
    rows = []
    for color in colors:
        if isinstance(color, str):
            try:
                rows.append(to_rgb(color))
            except ValueError:
                raise ColorTargetError(f"{where}: {color!r} is not a colour (use '#rrggbb', a name or [r, g, b])") from None
        else:
            triple = np.asarray(color, dtype=np.float64) if _is_triple(color) else None
            if triple is None:
                raise ColorTargetError(f"{where}: {color!r} is not a colour (use '#rrggbb', a name or [r, g, b])")
            if triple.max() > 1.0:
                triple = triple / 255.0
            if triple.min() < 0.0 or triple.max() > 1.0:
                raise ColorTargetError(f"{where}: {list(color)!r} is outside [0, 1] (or 0-255)")
            rows.append(tuple(triple))
    return torch.tensor(rows, dtype=torch.float32)


def _is_triple(color) -> bool:
    try:
        return len(color) == 3 and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in color)
    except TypeError:
        return False


def shipped_palettes() -> list[str]:
    """Names of the palettes in PALETTE_FOLDER."""
    return sorted(path.stem for path in PALETTE_FOLDER.glob("*.png"))


def resolve_palette(value: Union[str, Path]) -> Path:
    """A palette file, or the shipped palette of that name when no such file exists."""
    path = Path(value)
    shipped = PALETTE_FOLDER / f"{path.name}.png"
    if not path.exists() and path.parent == Path(".") and shipped.is_file():
        return shipped
    return path


def palette_colors(path: Union[str, Path], max_colors: int = MAX_PALETTE_COLORS) -> torch.Tensor:
    """(N, 3) colours of a palette image's pixels (alpha dropped), evenly strided down to `max_colors`."""
    from gridinr_nerfstudio.stages.edit.clip_loss import read_rgb_image

    try:
        pixels = read_rgb_image(path).reshape(-1, 3)
    except ValueError as error:
        raise ColorTargetError(str(error)) from None
    if pixels.shape[0] > max_colors:
        pixels = pixels[np.linspace(0, pixels.shape[0] - 1, max_colors).round().astype(np.int64)]
    return torch.from_numpy(np.ascontiguousarray(pixels))


def part_pixel_colors(rgb: torch.Tensor, accumulation: torch.Tensor, background: torch.Tensor,
                      min_accumulation: float = 1e-2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Colours (M, 3) and weights (M,) of the pixels of part renders rgb (..., 3) and accumulation (..., 1)
    where the accumulation exceeds `min_accumulation`; the weights are the (detached) accumulations.

    A colour is the part's own (un-premultiplied) colour, premultiplied / accumulation with the accumulation not
    detached: scaling the part's opacity leaves it as it is, so a target that may change opacity cannot move its
    colours by fading the part out (dividing by a detached accumulation would let it darken them that way)."""
    rgb = rgb.reshape(-1, 3)
    alpha = accumulation.reshape(-1, 1)
    shown = (alpha.detach()[:, 0] > min_accumulation).nonzero().squeeze(-1)
    alpha = alpha.index_select(0, shown)
    premultiplied = rgb.index_select(0, shown) - (1.0 - alpha) * background.to(rgb).reshape(1, 3)
    return premultiplied / alpha, alpha.detach()[:, 0]


def random_directions(count: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """(count, 3) unit vectors, uniform on the sphere."""
    directions = torch.randn(count, 3, generator=generator)
    return torch.nn.functional.normalize(directions, dim=-1).to(device)


def wasserstein_1d(x: torch.Tensor, x_weights: torch.Tensor, y: torch.Tensor, y_weights: torch.Tensor,
                   p: float = 2.0) -> torch.Tensor:
    """Exact p-Wasserstein distance to the power p between weighted 1-D point sets, batched: x (B, M), y (B, N),
    weights (M,) and (N,) (any positive scale); returns (B,). Differentiable w.r.t. x and y."""
    x_sorted, x_order = torch.sort(x, dim=-1)
    y_sorted, y_order = torch.sort(y, dim=-1)
    x_cumulative = torch.cumsum(x_weights[x_order] / x_weights.sum(), dim=-1)
    y_cumulative = torch.cumsum(y_weights[y_order] / y_weights.sum(), dim=-1)
    # The quantile functions are constant between the union of their steps: integrate over those intervals.
    levels, _ = torch.sort(torch.cat([x_cumulative, y_cumulative], dim=-1), dim=-1)
    levels = levels.clamp(max=1.0)
    widths = torch.diff(levels, dim=-1, prepend=torch.zeros_like(levels[..., :1]))
    middles = (levels - 0.5 * widths).contiguous()
    x_index = torch.searchsorted(x_cumulative.contiguous(), middles).clamp(max=x.shape[-1] - 1)
    y_index = torch.searchsorted(y_cumulative.contiguous(), middles).clamp(max=y.shape[-1] - 1)
    gap = (torch.gather(x_sorted, -1, x_index) - torch.gather(y_sorted, -1, y_index)).abs()
    return (gap.pow(p) * widths).sum(dim=-1)


def sliced_wasserstein(x: torch.Tensor, x_weights: torch.Tensor, y: torch.Tensor, y_weights: Optional[torch.Tensor],
                       directions: torch.Tensor) -> torch.Tensor:
    """Squared sliced 2-Wasserstein distance between weighted point sets x (M, 3) and y (N, 3) (uniform weights
    for y when None) over unit `directions` (D, 3): the mean over directions of the 1-D W2 squared."""
    if y_weights is None:
        y_weights = torch.ones(y.shape[0], device=y.device, dtype=y.dtype)
    directions = directions.to(x)
    return wasserstein_1d(directions @ x.t(), x_weights.to(x), directions @ y.to(x).t(), y_weights.to(x)).mean()


class ColorLoss:
    """A colour target: the squared sliced W2 (fresh random directions each call while training) between the
    rendered colours of a part and the target colours; `distance` (fixed directions, square root) is the metric."""

    def __init__(self, colors: torch.Tensor, num_directions: int = 64, max_pixels: int = 8192,
                 eval_directions: int = 256, seed: int = 0):
        if colors.ndim != 2 or colors.shape[1] != 3 or colors.shape[0] < 1:
            raise ColorTargetError(f"expected target colours of shape (N, 3), got {tuple(colors.shape)}")
        self.colors = colors.float()
        self.num_directions = num_directions
        self.max_pixels = max_pixels
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_directions = random_directions(eval_directions, torch.Generator().manual_seed(12345))

    def _subsample(self, colors: torch.Tensor, weights: torch.Tensor, generator: Optional[torch.Generator]):
        if colors.shape[0] <= self.max_pixels:
            return colors, weights
        if generator is None:
            keep = torch.linspace(0, colors.shape[0] - 1, self.max_pixels).round().long()
        else:
            keep = torch.randperm(colors.shape[0], generator=generator)[: self.max_pixels]
        keep = keep.to(colors.device)
        return colors.index_select(0, keep), weights.index_select(0, keep)

    def __call__(self, rgb: torch.Tensor, accumulation: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """Training loss of part renders rgb (K, H, W, 3), accumulation (K, H, W, 1); 0 when nothing shows."""
        colors, weights = part_pixel_colors(rgb, accumulation, background)
        if colors.shape[0] == 0:
            return rgb.sum() * 0.0
        colors, weights = self._subsample(colors, weights, self.generator)
        directions = random_directions(self.num_directions, self.generator)
        return sliced_wasserstein(colors, weights, self.colors.to(colors.device), None, directions)

    @torch.no_grad()
    def distance(self, rgb: torch.Tensor, accumulation: torch.Tensor, background: torch.Tensor) -> Optional[float]:
        """Sliced W2 (fixed directions, shown pixels evenly strided down to `max_pixels`): the evaluation metric;
        None when nothing shows."""
        colors, weights = part_pixel_colors(rgb, accumulation, background)
        if colors.shape[0] == 0:
            return None
        colors, weights = self._subsample(colors, weights, None)
        return float(sliced_wasserstein(colors, weights, self.colors.to(colors.device), None,
                                        self.eval_directions).sqrt())
