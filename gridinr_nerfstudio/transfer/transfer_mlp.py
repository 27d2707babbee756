"""The learnable transfer function of stage 2: normalised value -> (rgb, density), a small MLP.

Because its input is one scalar, the MLP is evaluated on a lookup table of `lut_size` values per call and
samples read the table by linear interpolation (still differentiable w.r.t. the MLP weights). Millions of
samples per frame then cost a gather, not a 128-wide MLP each: the trick that makes CLIP editing
tractable on a CPU. The table is exact at its nodes; 1024 nodes resolve far finer than 8-bit data.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from gridinr_nerfstudio.transfer.transfer_function import count_before, visible_in_range


class TransferMLP(nn.Module):
    """value in [0, 1] -> (rgb in [0, 1], sigma >= 0 per world unit)."""

    def __init__(self, hidden_dim: int = 128, num_layers: int = 3, num_frequencies: int = 6, sigma_scale: float = 1.0, lut_size: int = 1024):
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
        scaled = values[:, None] * (torch.pi * 2.0 ** torch.arange(self.num_frequencies, device=values.device))
        return torch.cat([values[:, None], torch.sin(scaled), torch.cos(scaled)], dim=-1)

    def evaluate(self, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the MLP directly on values (N,)."""
        raw = self.mlp(self.encode(values))
        rgb = torch.sigmoid(raw[:, :3])
        sigma = nn.functional.softplus(raw[:, 3] - 2.0) * self.sigma_scale
        return rgb, sigma

    def table(self) -> torch.Tensor:
        """(lut_size, 4) rgb + sigma at evenly spaced values in [0, 1]."""
        nodes = torch.linspace(0.0, 1.0, self.lut_size, device=self.sigma_scale.device)
        rgb, sigma = self.evaluate(nodes)
        return torch.cat([rgb, sigma[:, None]], dim=-1)

    def lookup(self, table: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Linear interpolation of `table` at values (N,)."""
        position = values.clamp(0.0, 1.0) * (self.lut_size - 1)
        lower = position.floor().long().clamp(max=self.lut_size - 2)
        weight = (position - lower)[:, None]
        # index_select, not table[lower]: its backward is an index_add, far cheaper on CPU than index_put.
        entries = torch.lerp(table.index_select(0, lower), table.index_select(0, lower + 1), weight)
        return entries[:, :3], entries[:, 3]

    def forward(self, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.lookup(self.table(), values)

    def tabulated(self, invisible_sigma: float) -> "TransferTable":
        """The MLP evaluated once into a table, usable as a transfer function (also for empty-space skipping)."""
        return TransferTable(self, self.table(), invisible_sigma)


class TransferTable:
    """A transfer MLP's table: maps values to (rgb, sigma), and tells which value ranges are visible.

    sigma below `invisible_sigma` counts as transparent for empty-space skipping (a softplus is never exactly 0).
    """

    def __init__(self, mlp: TransferMLP, table: torch.Tensor, invisible_sigma: float):
        self.mlp = mlp
        self.table = table
        self.visible_count = count_before(table[:, 3].detach() > invisible_sigma)

    def __call__(self, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.mlp.lookup(self.table, values)

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
