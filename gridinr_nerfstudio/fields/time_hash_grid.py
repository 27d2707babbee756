"""`TimeHashGrid`: a 4-D multi-resolution hash grid (x, y, z, t hashed together), served by the 3-D kernels.

Why: a sequence whose features move cannot share a 3-D grid between its steps, and one grid per step makes each
step's grid small. Dynamic instant-ngp variants hash (x, y, z, t) into one table per level, so the table is shared
by all steps wherever they differ and its size does not grow with the number of steps. The time axis has one
lattice node per step (nodes at the step times, linear in t between them), so a point at a step's time reads one
node per level: training at step times costs what a 3-D grid costs, a time between two steps blends two lookups.

How the 3-D kernels (C++, Triton, torch; `fields/hash_grid`) serve it unchanged: node k of level l is a 3-D level
with the same scale, whose entries are
- dense levels small enough for every node (T * r^3 <= 2^log2_hashmap_size): node k's own dense block (index
  x + y r + z r^2 + k r^3, the 4-D dense index);
- hashed levels: the level's one table, the 3-D hash h folded into a window that starts `rotation_k` entries in and
  is `rotation_k` entries shorter (index rotation_k + h mod (size - rotation_k)). For h = q size + a this is
  rotation_k + (a + q rotation_k) mod (size - rotation_k): a shift that changes with q = h // size, i.e. a fresh
  pseudo-random placement of every vertex per node, as a hash of (x, y, z, t) gives. Nodes share the entries.
Within one kernel call the levels of one node lie in disjoint slices, so the kernels' per-level scatter is race-free.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from gridinr_nerfstudio.fields.hash_grid import _backend
from gridinr_nerfstudio.fields.hash_grid.encoding import HashGridEncoding
from gridinr_nerfstudio.fields.hash_grid.geometry import GridGeometry
from gridinr_nerfstudio.thread_policy import kernel_threads

ROTATION_PRIME = 7919
"""Node k's window starts (k * ROTATION_PRIME) mod (size / 4) entries into a hashed level: distinct per node, at
most a quarter of the table left out of a node's window."""


def node_geometries(base: GridGeometry, num_nodes: int) -> tuple[list[GridGeometry], int]:
    """The 3-D geometry of every time node (see the module docstring) and the number of table entries in all."""
    offsets, per_node_offsets, per_node_sizes, dense, total = [], [], [], [], 0
    for level in range(base.num_levels):
        block = -(-base.resolutions[level] ** 3 // 8) * 8
        dense_4d = base.dense[level] and block * num_nodes <= _hashed_size(base)
        dense.append(dense_4d)
        offsets.append(total)
        if dense_4d:
            per_node_offsets.append([total + node * block for node in range(num_nodes)])
            per_node_sizes.append([block] * num_nodes)
            total += block * num_nodes
        else:
            hashed = _hashed_size(base)
            rotations = [(node * ROTATION_PRIME) % max(hashed // 4, 1) for node in range(num_nodes)]
            per_node_offsets.append([total + r for r in rotations])
            per_node_sizes.append([hashed - r for r in rotations])
            total += hashed
    geometries = [
        replace(base, dense=tuple(dense), table_offsets=tuple(o[node] for o in per_node_offsets),
                table_sizes=tuple(s[node] for s in per_node_sizes))
        for node in range(num_nodes)
    ]
    return geometries, total


def _hashed_size(base: GridGeometry) -> int:
    """Entries of a hashed level: the largest level slice of the 3-D geometry (2^log2_hashmap_size)."""
    return max(base.table_sizes)


class _NodeViews:
    """One `HashGridEncoding` per time node that reads the shared table (kept out of the module tree)."""

    def __init__(self, template: HashGridEncoding, geometries: list[GridGeometry]):
        self.encodings = []
        for geometry in geometries:
            view = HashGridEncoding(
                num_levels=template.num_levels, features_per_level=template.features_per_level,
                log2_hashmap_size=template.log2_hashmap_size, base_resolution=template.base_resolution,
                per_level_scale=template.per_level_scale, backend=template.backend, init_scale=0.0,
            )
            view.geometry = geometry
            view._kernel_arguments = geometry.kernel_arguments()
            view.convention = "time-node"  # never tiny-cuda-nn: its geometry is not this one
            self.encodings.append(view)


class _NodeGroupsCpp(torch.autograd.Function):
    """C++ kernels over rows grouped by time node: one table gradient buffer for all groups (no dense sum)."""

    @staticmethod
    def forward(ctx, positions, params, counts, arguments, features):  # type: ignore[override]
        ctx.save_for_backward(positions, params)
        ctx.groups = (counts, arguments, features)
        outputs, start = [], 0
        for count, (scales, info, shift) in zip(counts, arguments):
            if count:
                outputs.append(_backend.cpp.forward(positions[start : start + count], params, scales, info, shift, features,
                                                    kernel_threads()))
            start += count
        return torch.cat(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        positions, params = ctx.saved_tensors
        counts, arguments, features = ctx.groups
        grad_out = grad_out.contiguous()
        grad_params = _backend.take_zeroed_grad_buffer(params)
        start = 0
        for count, (scales, info, shift) in zip(counts, arguments):
            if count:
                rows = slice(start, start + count)
                _backend.cpp.backward_params(positions[rows].contiguous(), grad_out[rows].contiguous(), grad_params,
                                             scales, info, shift, features, kernel_threads())
            start += count
        return None, grad_params, None, None, None


class TimeHashGrid(nn.Module):
    """4-D hash grid: (N, 3) points in [0, 1]^3 at times (N,) in [0, 1] -> (N, num_levels * features_per_level).

    Node k sits at time k / (num_nodes - 1); a time between two nodes blends their features linearly.
    """

    def __init__(self, num_nodes: int, num_levels: int, features_per_level: int, log2_hashmap_size: int,
                 base_resolution: int, max_resolution: int, backend: str = "auto", init_scale: float = 1e-4):
        super().__init__()
        self.num_nodes = max(1, int(num_nodes))
        template = HashGridEncoding(num_levels=num_levels, features_per_level=features_per_level,
                                    log2_hashmap_size=log2_hashmap_size, base_resolution=base_resolution,
                                    max_resolution=max_resolution, backend=backend, init_scale=0.0)
        geometries, entries = node_geometries(template.geometry, self.num_nodes)
        self.features_per_level = features_per_level
        self.num_levels = num_levels
        self.params = nn.Parameter(torch.empty(entries * features_per_level).uniform_(-init_scale, init_scale))
        self.__dict__["_views"] = _NodeViews(template, geometries)

    def get_out_dim(self) -> int:
        return self.num_levels * self.features_per_level

    def node_encoding(self, node: int) -> HashGridEncoding:
        """The 3-D encoding of time node `node`, reading this grid's table."""
        view = self._views.encodings[node]
        view._parameters["params"] = self.params  # the shared table (a plain attribute swap; views own nothing)
        return view

    def node_weights(self, times: torch.Tensor | float, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(lower node (N,), weight of the next node (N,)) at `times` in [0, 1]."""
        from gridinr_nerfstudio.fields.time_features import snap_to_steps

        position = snap_to_steps(torch.as_tensor(times, dtype=torch.float32, device=device).clamp(0, 1).expand(count),
                                 self.num_nodes)
        low = position.floor().long().clamp(max=max(self.num_nodes - 2, 0))
        return low, position - low

    def forward(self, unit_points: torch.Tensor, times: torch.Tensor | float) -> torch.Tensor:
        count = unit_points.shape[0]
        if self.num_nodes == 1:
            return self.node_encoding(0)(unit_points)
        low, weight = self.node_weights(times, count, unit_points.device)
        rows = torch.arange(count, device=unit_points.device)
        upper = weight > 0
        entry_rows = torch.cat([rows, rows[upper]])
        entry_nodes = torch.cat([low, low[upper] + 1])
        entry_weights = torch.cat([1.0 - weight, weight[upper]])
        order = torch.argsort(entry_nodes, stable=True)
        entry_rows, entry_nodes, entry_weights = entry_rows[order], entry_nodes[order], entry_weights[order]
        counts = torch.bincount(entry_nodes, minlength=self.num_nodes).tolist()
        positions = unit_points[entry_rows]
        features = self._grouped(positions, counts)
        weighted = features * entry_weights[:, None].to(features.dtype)
        return torch.zeros(count, weighted.shape[-1], dtype=weighted.dtype, device=weighted.device).index_add(
            0, entry_rows, weighted)

    def _grouped(self, positions: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Features of rows sorted by node, `counts[k]` rows at node k."""
        first = self.node_encoding(0)
        positions = positions.to(self.params.dtype).contiguous()
        if first.backend_for(positions.device) == "cpp" and not positions.requires_grad:
            arguments = [self._views.encodings[node]._kernel_arguments for node in range(self.num_nodes)]
            return _NodeGroupsCpp.apply(positions, self.params, counts, arguments, self.features_per_level)
        outputs, start = [], 0  # other backends (and position gradients): one call per node, autograd sums
        for node, count in enumerate(counts):
            if count:
                outputs.append(self.node_encoding(node)(positions[start : start + count]))
            start += count
        return torch.cat(outputs)

