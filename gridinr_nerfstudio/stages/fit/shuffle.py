"""A random permutation of 0..n-1 evaluated on the fly, for shuffled passes over more voxels than fit in memory.

`torch.randperm(n)` holds n indices (int64 over 2^31 voxels: 34 GB for a 1536^3 volume). A Feistel network over
the smallest even number of bits covering n is a bijection on [0, 2^bits); cycle-walking (apply it again while the
result is >= n) restricts it to a bijection on [0, n). Each position costs a few integer operations and the
state is four keys, whatever n is. Domain <= 4 n, so a position walks fewer than 4 rounds on average.
"""

from __future__ import annotations

import torch

_ROUNDS = 4
_MUL1, _MUL2 = 0x2C1B3C6D, 0x297A2D39  # odd multipliers < 2^31: products of 31-bit values stay below 2^62


def _round_function(half: torch.Tensor, key: int, mask: int) -> torch.Tensor:
    """A mixing hash of a half-word (< 2^31) and a round key, masked to the half width."""
    value = (half ^ key) & 0x7FFFFFFF
    value = (value * _MUL1) & 0x7FFFFFFF
    value = value ^ (value >> 15)
    value = (value * _MUL2) & 0x7FFFFFFF
    value = value ^ (value >> 13)
    return value & mask


class FeistelPermutation:
    """Bijection of [0, n) drawn from `generator`; call it on positions (int64 tensor) to get their images."""

    def __init__(self, n: int, generator: torch.Generator | None = None):
        if n < 1:
            raise ValueError(f"FeistelPermutation needs n >= 1, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half_bits = (bits + 1) // 2
        if self.half_bits > 31:
            raise ValueError(f"FeistelPermutation supports n < 2^62, got {n}")
        self.mask = (1 << self.half_bits) - 1
        device = generator.device if generator is not None else None  # draws from a CPU or a device generator
        self.keys = [int(k) for k in torch.randint(0, 1 << 31, (_ROUNDS,), generator=generator, device=device)]

    def _feistel(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x >> self.half_bits, x & self.mask
        for key in self.keys:
            left, right = right, left ^ _round_function(right, key, self.mask)
        return (left << self.half_bits) | right

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """Images (same shape, int64) of positions in [0, n)."""
        out = self._feistel(positions.long())
        outside = out >= self.n
        while bool(outside.any()):
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        return out
