"""Edits by parts of a learnable transfer function: the warm-start table plus one residual per value range.

A part is a range [low, high] of normalised values. Its residual (`PartResidual`, a small MLP of the value whose
last layer starts at zero) is added to the warm start's raw outputs (`TransferMLP.raw`, before the sigmoid and
softplus) with a weight that is 0 outside the range and ramps to 1 inside it; where no part has weight the
edited table keeps the warm start's entries bit for bit (`torch.where`, not a sum of zeros). The renderer reads
tables by linear interpolation, so a value just outside a range reads a table entry one step inside it: the
weight is also 0 on that entry (`part_weights`), which is what makes "values outside every part keep their colour
and opacity exactly" hold for every value, not only for the table's nodes.

A part that may not change opacity (a colour target) has its sigma residual masked out: its opacity, hence every
accumulation map, stays exactly the warm start's.

The tables built here are what the renderer takes (`TransferTable` in `transfer_mlp.py`): the edited table for the
whole image, and per part the edited table with sigma times the part's weight, which shows that part alone
(NLI4VolVis renders and scores each component this way). The parts live in a fixed pool of slots, so that a part
added or removed while training (the viewer) needs no new parameters, and so that checkpoints keep their keys.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn

from gridinr_nerfstudio.transfer.transfer_mlp import TransferMLP, frequency_encoding

DEFAULT_MAX_PARTS = 8


def part_weights(size: int, low: float, high: float, softness: float = 0.0,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(size,) weights in [0, 1] of the part [low, high] at the `size` nodes of a table over [0, 1].

    Zero at every node that a value outside [low, high] interpolates from (the edge's node and the next one in),
    rising to 1 over `softness` (normalised units, at least one table step). Edges at 0 or 1 have no outside:
    values are clamped to [0, 1] before the lookup. Index arithmetic is done in float32 exactly as the lookup does
    (`interpolate_table`), so the zero nodes are right for every float32 value, not only up to rounding.
    """
    last = size - 1
    index = torch.arange(size, device=device, dtype=torch.float32)
    ramp = max(float(softness) * last, 1.0)
    weights = torch.ones(size, device=device)
    if low > 0.0:
        lower_zero = torch.floor(torch.tensor(low, dtype=torch.float32) * last) + 1.0  # last node with weight 0
        weights = weights * ((index - lower_zero.to(device)) / ramp).clamp(0.0, 1.0)
    if high < 1.0:
        upper_zero = torch.floor(torch.tensor(high, dtype=torch.float32) * last)  # first node with weight 0
        weights = weights * ((upper_zero.to(device) - index) / ramp).clamp(0.0, 1.0)
    return weights


class PartResidual(nn.Module):
    """Normalised value -> change (4,) of the raw transfer-function outputs; zero until it trains."""

    def __init__(self, hidden_dim: int = 64, num_layers: int = 2, num_frequencies: int = 6, seed: int = 0):
        super().__init__()
        self.num_frequencies = num_frequencies
        self.seed = seed
        layers: List[nn.Module] = []
        in_dim = 1 + 2 * num_frequencies
        for index in range(num_layers):
            layers += [nn.Linear(in_dim if index == 0 else hidden_dim, hidden_dim), nn.ReLU()]
        layers.append(nn.Linear(hidden_dim if num_layers else in_dim, 4))
        self.mlp = nn.Sequential(*layers)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Fresh hidden layers (seeded: the same for a slot every time, whatever drew random numbers before) and a
        zero output layer, so the residual is exactly 0 again."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        self.mlp[-1].weight.zero_()
        self.mlp[-1].bias.zero_()

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.mlp(frequency_encoding(values, self.num_frequencies))


class PartTransfer(nn.Module):
    """A pool of `max_parts` part slots over a base `TransferMLP`; builds the edited and per-part tables.

    Buffers (in checkpoints): `ranges` (P, 3) = low, high, softness in normalised values; `active` (P,); `opacity`
    (P,): whether the part may change opacity. `labels` (extra state) names each slot's target for exports.
    """

    ranges: torch.Tensor
    active: torch.Tensor
    opacity: torch.Tensor

    def __init__(self, max_parts: int = DEFAULT_MAX_PARTS, hidden_dim: int = 64, num_layers: int = 2,
                 num_frequencies: int = 6):
        super().__init__()
        if max_parts < 1:
            raise ValueError(f"max_parts must be at least 1, got {max_parts}")
        self.residuals = nn.ModuleList(
            PartResidual(hidden_dim, num_layers, num_frequencies, seed=slot) for slot in range(max_parts))
        self.register_buffer("ranges", torch.tensor([[0.0, 1.0, 0.0]] * max_parts))
        self.register_buffer("active", torch.zeros(max_parts, dtype=torch.bool))
        self.register_buffer("opacity", torch.ones(max_parts, dtype=torch.bool))
        self.labels: List[str] = [""] * max_parts
        self._register_load_state_dict_pre_hook(_keep_missing_part_state, with_module=True)

    @property
    def max_parts(self) -> int:
        return len(self.residuals)

    def set_part(self, slot: int, low: float, high: float, softness: float = 0.0, edit_opacity: bool = True,
                 label: str = "") -> None:
        """Make `slot` a part over [low, high] (its residual is kept: retargeting continues from the current edit)."""
        if not 0 <= slot < self.max_parts:
            raise ValueError(f"part slot {slot} is outside 0..{self.max_parts - 1}")
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"a part's range needs 0 <= low < high <= 1, got [{low:g}, {high:g}]")
        self.ranges[slot] = torch.tensor([low, high, max(float(softness), 0.0)], device=self.ranges.device)
        self.active[slot] = True
        self.opacity[slot] = bool(edit_opacity)
        self.labels[slot] = label

    def clear_part(self, slot: int) -> None:
        """Remove the part in `slot`: inactive, residual back to zero."""
        self.active[slot] = False
        self.labels[slot] = ""
        self.residuals[slot].reset()

    def active_slots(self) -> List[int]:
        return [int(slot) for slot in self.active.nonzero().flatten()]

    def free_slot(self) -> Optional[int]:
        """The first inactive slot, or None when all are taken."""
        free = (~self.active).nonzero().flatten()
        return int(free[0]) if free.numel() else None

    def covers_everything(self, slot: int) -> bool:
        """Whether the part spans all of [0, 1] at full weight (its part render is the whole render)."""
        low, high, _ = self.ranges[slot].tolist()
        return low <= 0.0 and high >= 1.0

    def weights(self, slot: int, size: int) -> torch.Tensor:
        """(size,) weights of the part in `slot` at the nodes of a table of `size` entries."""
        low, high, softness = self.ranges[slot].tolist()
        return part_weights(size, low, high, softness, device=self.ranges.device)

    def edited_table(self, base: TransferMLP) -> torch.Tensor:
        """(L, 4) table of the base plus every active part's residual; equal to `base.table()` (bitwise) at every
        node no part weighs. The base's raw outputs are computed without autograd when the base is frozen."""
        nodes = base.nodes()
        if any(parameter.requires_grad for parameter in base.parameters()):
            raw = base.raw(nodes)
        else:
            with torch.no_grad():
                raw = base.raw(nodes)
        warm = base.activate(raw)
        slots = self.active_slots()
        if not slots:
            return warm
        change = torch.zeros_like(raw)
        inside = torch.zeros(nodes.shape[0], dtype=torch.bool, device=nodes.device)
        for slot in slots:
            weights = self.weights(slot, nodes.shape[0])
            residual = self.residuals[slot](nodes)
            if not bool(self.opacity[slot]):
                residual = residual * torch.tensor([1.0, 1.0, 1.0, 0.0], device=residual.device)
            change = change + weights[:, None] * residual
            inside |= weights > 0
        return torch.where(inside[:, None], base.activate(raw + change), warm)

    def part_table(self, table: torch.Tensor, slot: int) -> torch.Tensor:
        """`table` with sigma times the part's weights: renders show that part alone."""
        weights = self.weights(slot, table.shape[0])
        return torch.cat([table[:, :3], table[:, 3:] * weights[:, None]], dim=-1)

    def get_extra_state(self) -> Any:
        return {"labels": list(self.labels)}

    def set_extra_state(self, state: Any) -> None:
        labels = list((state or {}).get("labels", []))[: self.max_parts]
        self.labels = labels + [""] * (self.max_parts - len(labels))


def _keep_missing_part_state(module: PartTransfer, state_dict, prefix, local_metadata, strict, missing_keys,
                             unexpected_keys, error_msgs) -> None:
    """Checkpoints written before parts existed (or with fewer slots) load with the current, empty parts."""
    for name, value in list(module.state_dict(prefix=prefix).items()):
        state_dict.setdefault(name, value)
