"""The learnable transfer function of stage 2: normalised value -> (rgb, density), a small MLP.

Because its input is one scalar, the MLP is evaluated on a lookup table of `lut_size` values per call and
samples read the table by linear interpolation (still differentiable w.r.t. the MLP weights). Millions of
samples per frame then cost a gather, not a 128-wide MLP each: the trick that makes CLIP editing
tractable on a CPU. The table is exact at its nodes; 1024 nodes resolve far finer than 8-bit data.

The renderer's input is the table itself (`TransferTable`: a tensor (L, 4) of rgb and sigma per world unit at L
evenly spaced values in [0, 1], read by linear interpolation), whatever built it: the MLP alone, or the MLP plus
per-part residuals (`transfer/parts.py`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from gridinr_nerfstudio.transfer.transfer_function import count_before, visible_in_range

LUT_SIZE = 1024
"""Entries of the learnable transfer function's table."""


class TransferMLP(nn.Module):
    """value in [0, 1] -> (rgb in [0, 1], sigma >= 0 per world unit)."""

    def __init__(self, hidden_dim: int = 128, num_layers: int = 3, num_frequencies: int = 6, sigma_scale: float = 1.0, lut_size: int = LUT_SIZE):
        super().__init__()
        self.num_frequencies = num_frequencies
        self.lut_size = lut_size
        self.register_buffer("sigma_scale", torch.tensor(float(sigma_scale)))
        in_dim = 1 + 2 * num_frequencies
        layers: list[nn.Module] = []
        for index in range(num_layers):
            layers += [nn.Linear(in_dim if index == 0 else hidden_dim, hidden_dim), nn.ReLU()]
        layers.append(nn.Linear(hidden_dim, 4))
        self.mlp = nn.Sequential(*layers)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Value plus sin/cos at octave frequencies, so a small MLP can draw sharp opacity edges."""
        return frequency_encoding(values, self.num_frequencies)

    def raw(self, values: torch.Tensor) -> torch.Tensor:
        """(N, 4) pre-activation outputs at values (N,): where per-part residuals are added (`transfer/parts.py`)."""
        return self.mlp(self.encode(values))

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        """(N, 4) table rows (rgb in [0, 1], sigma >= 0 per world unit) of raw outputs (N, 4)."""
        rgb = torch.sigmoid(raw[:, :3])
        sigma = nn.functional.softplus(raw[:, 3] - 2.0) * self.sigma_scale
        return torch.cat([rgb, sigma[:, None]], dim=-1)

    def evaluate(self, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the MLP directly on values (N,)."""
        rows = self.activate(self.raw(values))
        return rows[:, :3], rows[:, 3]

    def nodes(self) -> torch.Tensor:
        """The table's `lut_size` evenly spaced values in [0, 1]."""
        return torch.linspace(0.0, 1.0, self.lut_size, device=self.sigma_scale.device)

    def table(self) -> torch.Tensor:
        """(lut_size, 4) rgb + sigma at evenly spaced values in [0, 1]."""
        return self.activate(self.raw(self.nodes()))

    def lookup(self, table: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Linear interpolation of `table` at values (N,)."""
        return interpolate_table(table, values)

    def forward(self, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.lookup(self.table(), values)

    def tabulated(self, invisible_sigma: float) -> "TransferTable":
        """The MLP evaluated once into a table, usable as a transfer function (also for empty-space skipping)."""
        return TransferTable(self.table(), invisible_sigma)


def frequency_encoding(values: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """(N, 1 + 2F): the value plus sin/cos at F octave frequencies (NeRF's positional encoding of one scalar)."""
    scaled = values[:, None] * (torch.pi * 2.0 ** torch.arange(num_frequencies, device=values.device))
    return torch.cat([values[:, None], torch.sin(scaled), torch.cos(scaled)], dim=-1)


def interpolate_table(table: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rgb (N, 3), sigma (N,)): linear interpolation of a table (L, 4) over [0, 1] at values (N,)."""
    size = table.shape[0]
    position = values.clamp(0.0, 1.0) * (size - 1)
    lower = position.floor().long().clamp(max=size - 2)
    weight = (position - lower)[:, None]
    # index_select, not table[lower]: its backward is an index_add, far cheaper on CPU than index_put.
    entries = torch.lerp(table.index_select(0, lower), table.index_select(0, lower + 1), weight)
    return entries[:, :3], entries[:, 3]


class TransferTable:
    """A learnable transfer function's table as the renderer's colour function: values -> (rgb, sigma) by linear
    interpolation of `table` (L, 4), differentiable w.r.t. the table; and which value ranges are visible.

    sigma below `invisible_sigma` counts as transparent for empty-space skipping (a softplus is never exactly 0);
    `visible` (L,) bool overrides that per entry (a part's render while training: every entry its residual may
    change, so skipping stays exact for the gradient too).
    """

    def __init__(self, table: torch.Tensor, invisible_sigma: float, visible: Optional[torch.Tensor] = None):
        self.table = table
        self.visible_count = count_before(table[:, 3].detach() > invisible_sigma if visible is None else visible)

    def __call__(self, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return interpolate_table(self.table, values)

    def lookup_table(self) -> torch.Tensor:
        """The (lut_size, 4) table itself, with its autograd history (the fused ray marcher differentiates it)."""
        return self.table

    def visible_in_range(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """Whether any table entry bracketing [low, high] is visible."""
        return visible_in_range(self.visible_count, low, high)


def fit_to_transfer_function(mlp: TransferMLP, transfer_function: nn.Module, steps: int = 600, lr: float = 1e-2) -> float:
    """Warm start: regress the MLP onto a fixed transfer function, so editing starts from the baseline look.

    Returns the final relative error. Density is compared after the sigma scale, in log space, because
    opacity edges matter more than the size of large densities.
    """
    nodes = torch.linspace(0.0, 1.0, mlp.lut_size, device=mlp.sigma_scale.device)
    with torch.no_grad():
        target_rgb, target_sigma = transfer_function(nodes)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        rgb, sigma = mlp.evaluate(nodes)
        loss = (rgb - target_rgb).square().mean() + (torch.log1p(sigma) - torch.log1p(target_sigma)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())
