"""The function types the renderer and its helpers pass fields around as.

Why a module of their own: the ray marcher and the occupancy grid both take fields as functions; kept here, neither
imports the other for a type (raymarch.py uses OccupancyGrid, occupancy.py only these aliases).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SampleFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""World points (M, 3) -> (rgb (M, 3), sigma (M,)): what the renderer samples (sigma: extinction per world unit)."""

ValueFn = Callable[[torch.Tensor], torch.Tensor]
"""World points (M, 3) -> field values (M,), normalised to [0, 1] (macrocells, normals)."""
