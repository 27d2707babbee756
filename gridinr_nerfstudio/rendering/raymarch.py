"""Differentiable emission-absorption ray marching and shading.

Any field plugs in through a sample function `sample_fn(points (M, 3)) -> (rgb (M, 3), sigma (M,))`,
typically `lambda p: transfer_function(field(p))`; sigma is extinction per world unit (DESIGN.md).

Rays are marched in chunks of samples so that three accelerations keep the image unchanged:
rays missing the box are never sampled, rays whose transmittance fell below `early_stop_eps` are
dropped (the rest of such a ray changes its colour by less than that), and with an `OccupancyGrid`
samples in cells where the transfer function is transparent get sigma 0 without calling sample_fn.
Autograd flows through all chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gridinr_nerfstudio.rendering.field_functions import SampleFn, ValueFn
from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid


@dataclass
class RenderStats:
    """Counters a render adds to (pass one to several calls to total them), for benchmarks."""

    rays: int = 0
    rays_hit: int = 0
    samples_total: int = 0
    """Samples the plain renderer evaluates: rays hitting the box times samples per ray."""
    samples_evaluated: int = 0
    """Points actually passed to sample_fn (fused path: trilinear lookups of the grid)."""
    fused_rays: int = 0
    """Rays rendered by the fused kernel (`rendering/fused_march.py`) rather than the torch path."""


def intersect_aabb(
    origins: torch.Tensor, directions: torch.Tensor, aabb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab-method ray/box intersection: t_near (R,), t_far (R,), hit (R,) bool for aabb [[min], [max]] (2, 3).

    t_near is clamped to 0 (origins inside the box start at the origin); zero direction components are
    handled exactly. Rays that miss (or touch only an edge, or have the box behind them) get t_near = t_far = 0.
    """
    aabb = aabb.to(origins)
    low, high = aabb[0], aabb[1]
    parallel = directions == 0
    safe_directions = torch.where(parallel, torch.ones_like(directions), directions)
    t_low = (low - origins) / safe_directions
    t_high = (high - origins) / safe_directions
    inside_slab = (origins >= low) & (origins <= high)
    infinity = torch.full_like(origins, float("inf"))
    t_enter = torch.where(parallel, torch.where(inside_slab, -infinity, infinity), torch.minimum(t_low, t_high))
    t_exit = torch.where(parallel, torch.where(inside_slab, infinity, -infinity), torch.maximum(t_low, t_high))
    t_near = t_enter.amax(dim=-1).clamp_min(0.0)
    t_far = t_exit.amin(dim=-1)
    hit = t_far > t_near
    zero = torch.zeros_like(t_near)
    return torch.where(hit, t_near, zero), torch.where(hit, t_far, zero), hit


def sample_along_rays(
    t_near: torch.Tensor,
    t_far: torch.Tensor,
    num_samples: int,
    stratified: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample distances t (R, N) in N equal bins of [t_near, t_far] and the bin width dt (R, 1).

    Bin midpoints, or with `stratified` one uniform random position per bin (training).
    """
    offsets = torch.arange(num_samples, dtype=t_near.dtype, device=t_near.device)
    if stratified:
        offsets = offsets + torch.rand(
            (t_near.shape[0], num_samples), dtype=t_near.dtype, device=t_near.device, generator=generator
        )
    else:
        offsets = (offsets + 0.5).expand(t_near.shape[0], num_samples)
    dt = ((t_far - t_near) / num_samples).unsqueeze(-1)
    return t_near.unsqueeze(-1) + offsets * dt, dt


def composite_weights(
    sigma: torch.Tensor, step: torch.Tensor, transmittance_in: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back weights T_i * (1 - exp(-sigma_i * step_i)) of samples (R, N) and the transmittance after them (R,).

    `transmittance_in` (R,) is the transmittance before the first sample (1 by default), for marching in chunks.
    """
    optical_depth = sigma * step
    accumulated = torch.cumsum(optical_depth, dim=-1)
    transmittance = torch.exp(-(accumulated - optical_depth))
    if transmittance_in is not None:
        transmittance = transmittance * transmittance_in.unsqueeze(-1)
    weights = transmittance * -torch.expm1(-optical_depth)
    transmittance_out = transmittance[:, -1] * torch.exp(-optical_depth[:, -1])
    return weights, transmittance_out


FLAT_DIFFERENCE_ULPS = 16
"""A central difference of normalised values (in [0, 1]) within this many machine epsilons of their dtype is
rounding, not slope: it counts as 0 (the fused kernel applies the same rule, csrc/raymarch.cpp)."""


def estimate_normals(value_fn: ValueFn, points: torch.Tensor, eps: float) -> torch.Tensor:
    """Unit normals (M, 3) = -gradient / |gradient| of a scalar field by central differences with step `eps`.

    They point from high to low values (outwards from dense structures, as nerfstudio's density normals);
    zero where the gradient vanishes. Differences within rounding (`FLAT_DIFFERENCE_ULPS`) count as 0: in a flat
    region grid_sample's weighted sum of equal corner values is off by an ulp or two, and normalising that noise
    gave unit normals in arbitrary directions there (lit at random when shading) where the gradient is 0.
    """
    offsets = torch.eye(3, dtype=points.dtype, device=points.device) * eps
    shifted = torch.cat([points.unsqueeze(1) + offsets, points.unsqueeze(1) - offsets], dim=1)
    values = value_fn(shifted.view(-1, 3)).view(-1, 6)
    difference = values[:, :3] - values[:, 3:]
    rounding = FLAT_DIFFERENCE_ULPS * torch.finfo(difference.dtype).eps
    difference = difference.masked_fill(difference.detach().abs() <= rounding, 0.0)
    return -F.normalize(difference / (2.0 * eps), dim=-1, eps=1e-12)


def shade(
    rgb: torch.Tensor,
    normals: torch.Tensor,
    view_directions: torch.Tensor,
    ambient: float = 0.3,
    diffuse: float = 0.7,
    specular: float = 0.2,
    shininess: float = 32.0,
) -> torch.Tensor:
    """Two-sided Phong shading with a headlight (light along the view direction): rgb (M, 3) -> (M, 3).

    Samples without a normal (zero vector) keep only the ambient term of their colour.
    """
    cosine = (normals * F.normalize(view_directions, dim=-1)).sum(dim=-1, keepdim=True).abs()
    return (rgb * (ambient + diffuse * cosine) + specular * cosine.pow(shininess)).clamp(0.0, 1.0)


def render_rays(
    origins: torch.Tensor,
    directions: torch.Tensor,
    sample_fn: SampleFn,
    aabb: torch.Tensor,
    num_samples: int = 128,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    background: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0),
    occupancy_grid: OccupancyGrid | None = None,
    early_stop_eps: float = 1e-4,
    chunk_samples: int = 32,
    normal_fn: ValueFn | None = None,
    shading: bool = False,
    stats: RenderStats | None = None,
    dense_chunk_share: float = 0.9,
    fused: bool = True,
) -> dict[str, torch.Tensor]:
    """Emission-absorption rendering of rays (R, 3) through `aabb` (2, 3) with `num_samples` samples per ray.

    Returns `rgb` (R, 3) composited over `background` ((3,) or (R, 3)), `accumulation` (R, 1), `depth` (R, 1)
    (expected termination distance t along the ray divided by the accumulation; 0 where nothing accumulates)
    and, when `normal_fn(points) -> unit normals (M, 3)` is given, `normals` (R, 3): the weight-averaged
    normal, unit length. `shading` applies `shade` to each sample's colour and needs `normal_fn`.
    `early_stop_eps=0`, `occupancy_grid=None` and `chunk_samples=num_samples` give the plain renderer.
    sigma is per world unit, so non-unit directions are fine; t is in units of the direction's length.
    Dense volumes: a chunk in which at least `dense_chunk_share` of the samples are in occupied cells is evaluated
    whole, with sigma set to 0 in the others (the same image), and a grid with that share of occupied cells is not
    consulted at all (transparent cells then get the sigma the transfer function gives them, 0 for the values the
    cell bounds allow): gathering occupied samples and scattering their results back, or even looking up their
    cells, then costs more than evaluating the few transparent samples.

    With `fused` (default) a `GridSamples` sample function (a grid field read through a transfer table, optionally
    with `GridNormals`) on CPU tensors is rendered by the fused C++ kernel instead (`rendering/fused_march.py`):
    the same outputs, differentiable w.r.t. the table; `chunk_samples` and `dense_chunk_share` do not apply there,
    and it always skips transparent macrocells (exact: sigma is 0 in them). Everything else takes this torch path.
    """
    from gridinr_nerfstudio.rendering import fused_march  # here: fused_march builds on this module

    if fused and fused_march.fused_applies(origins, sample_fn, normal_fn, shading):
        return fused_march.render_fused(
            origins, directions, sample_fn, aabb, num_samples=num_samples, stratified=stratified, generator=generator,
            background=background, occupancy_grid=occupancy_grid, early_stop_eps=early_stop_eps, normal_fn=normal_fn,
            shading=shading, stats=stats,
        )
    if occupancy_grid is not None and occupancy_grid.occupied_fraction() >= dense_chunk_share:
        occupancy_grid = None
    if shading and normal_fn is None:
        raise ValueError("shading needs normal_fn (e.g. lambda p: estimate_normals(field, p, eps))")
    num_rays = origins.shape[0]
    t_near, t_far, hit = intersect_aabb(origins, directions, aabb)
    t_samples, dt = sample_along_rays(t_near, t_far, num_samples, stratified, generator)
    step = dt * directions.norm(dim=-1, keepdim=True)

    transmittance = origins.new_ones(num_rays)
    # Per-ray sums of weight * (rgb, 1, t[, normal]) in one tensor: one index_add per chunk.
    sums = origins.new_zeros(num_rays, 5 if normal_fn is None else 8)
    active = hit.nonzero().squeeze(-1)
    if stats is not None:
        stats.rays += num_rays
        stats.rays_hit += int(active.numel())
        stats.samples_total += int(active.numel()) * num_samples

    for start in range(0, num_samples, chunk_samples):
        if early_stop_eps > 0:
            active = active[transmittance.detach()[active] > early_stop_eps]
        if active.numel() == 0:
            break
        t_chunk = t_samples[active, start : start + chunk_samples]
        count = t_chunk.shape[1]
        active_directions = directions[active]
        points = torch.addcmul(
            origins[active].unsqueeze(1), active_directions.unsqueeze(1), t_chunk.unsqueeze(-1)
        ).view(-1, 3)
        # `samples`: indices of the points sample_fn sees (None: all of them); the others have sigma 0.
        samples = occupied = None
        if occupancy_grid is not None:
            occupied = occupancy_grid.is_occupied(points)
            samples = occupied.nonzero().squeeze(-1)
            if samples.numel() < dense_chunk_share * points.shape[0]:
                occupied = None  # sparse chunk: only the occupied samples are evaluated
            else:
                samples = None
        evaluated_points = points if samples is None else points.index_select(0, samples)
        rgb, sigma = _evaluate(sample_fn, evaluated_points)
        if occupied is not None:
            sigma = sigma * occupied.to(sigma.dtype)
        if stats is not None:
            stats.samples_evaluated += evaluated_points.shape[0]
        rows = torch.div(samples, count, rounding_mode="floor") if samples is not None else None
        if normal_fn is not None:
            normals = _evaluate_normals(normal_fn, evaluated_points, sigma)
            if shading:
                view = (
                    active_directions.repeat_interleave(count, dim=0)
                    if rows is None
                    else active_directions.index_select(0, rows)
                )
                rgb = shade(rgb, normals, view)
        if samples is not None:
            sigma = points.new_zeros(points.shape[0]).index_copy(0, samples, sigma)
        weights, transmittance_out = composite_weights(sigma.view(-1, count), step[active], transmittance[active])
        chunk_sums = [
            _weighted_sums(weights, rgb, samples, rows),
            weights.sum(dim=1, keepdim=True),
            (weights * t_chunk).sum(dim=1, keepdim=True),
        ]
        if normal_fn is not None:
            chunk_sums.append(_weighted_sums(weights, normals, samples, rows))
        sums = sums.index_add(0, active, torch.cat(chunk_sums, dim=1))
        transmittance = transmittance.index_copy(0, active, transmittance_out)

    background = torch.as_tensor(background, dtype=origins.dtype, device=origins.device)
    accumulation, depth_sum = sums[:, 3:4], sums[:, 4:5]
    outputs = {
        "rgb": sums[:, :3] + (1.0 - accumulation) * background,
        "accumulation": accumulation,
        "depth": torch.where(
            accumulation > 0, depth_sum / accumulation.clamp_min(1e-10), torch.zeros_like(accumulation)
        ),
    }
    if normal_fn is not None:
        outputs["normals"] = F.normalize(sums[:, 5:], dim=-1, eps=1e-12)
    return outputs


def _evaluate(sample_fn: SampleFn, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_fn as (rgb (M, 3), sigma (M,)) in the points' dtype; sample_fn is not called without points."""
    if points.shape[0] == 0:
        return points.new_zeros(0, 3), points.new_zeros(0)
    rgb, sigma = sample_fn(points)
    return rgb.to(points.dtype), sigma.reshape(-1).to(points.dtype)


def _evaluate_normals(normal_fn: ValueFn, points: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Normals where sigma > 0 (the only samples they can affect), zero elsewhere."""
    visible = (sigma.detach() > 0).nonzero().squeeze(-1)
    normals = points.new_zeros(points.shape[0], 3)
    if visible.numel() == 0:
        return normals
    return normals.index_copy(0, visible, normal_fn(points.index_select(0, visible)).to(points.dtype))


def _weighted_sums(
    weights: torch.Tensor, values: torch.Tensor, samples: torch.Tensor | None, rows: torch.Tensor | None
) -> torch.Tensor:
    """Per-ray sums (R, C) of weight * value: weights (R, n), values of all R*n samples or of `samples` only."""
    if samples is None:
        return torch.einsum("rn,rnc->rc", weights, values.reshape(weights.shape[0], -1, values.shape[-1]))
    weighted = weights.reshape(-1).index_select(0, samples).unsqueeze(-1) * values
    return values.new_zeros(weights.shape[0], values.shape[-1]).index_add(0, rows, weighted)
