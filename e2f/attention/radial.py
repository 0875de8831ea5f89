"""The gate's radial layer as a table: the one definition every attention backend computes.

The first gate layer's radial part, ``rbf(d) @ w_radial`` with Gaussians
``exp(-gamma (d - mu_k)^2)``, is a function of the distance alone. Every backend evaluates it
as the cubic Hermite interpolation of a table: the value and ``h`` times the derivative of
``rbf(d) @ w_radial`` at the grid points ``d = p h`` over ``[0, cutoff]``, ``RADIAL_POINTS_PER_SIGMA``
points a basis width (12: the interpolant is within ~3e-7 of the exact function relative to its
largest value, its derivative within ~2e-5). So the fused kernels, which read the table instead
of ``R`` exponentials and an ``[E, R] @ [R, G]`` product an edge, compute the same function as
``chunked`` and ``materialized`` (``core.edge_terms``).

The table is built, kept and interpolated in float64 (the result cast to the distances'
dtype); the fused kernels keep a float32 copy of the same table (within 6e-8 of it) and
interpolate in float32. Float64 matters for the second derivative in the distance (force
training's position terms, Hessians): ``(T1 - T0) / h^2`` from a float32 table carries its
rounding times ``(sigma / h)^2`` (~600 at 24 points a width: ~1e-4 relative in float32
arithmetic). Its gradients (to the weights and the centres) come from autograd through the
build, ``radial_rows``; the fused backward's from ``kernels.radial_table_backward_kernel``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

#: Grid points a basis width ``sigma``. Every backend reads the table, so its density sets how
#: close the layer is to the Gaussian basis, not whether the backends agree (the fused kernels'
#: float32 copy differs from the float64 table by its rounding, which the slope divides by ``h``:
#: the agreement improves with fewer points). Largest error relative to the largest value, R =
#: 256 Gaussians of width 2 spacings over 5 Å, random weights, float64 table (value / slope):
#: 1.7e-6 / 5.8e-5 at 8 points, 3.4e-7 / 1.7e-5 at 12, 1.1e-7 / 7.3e-6 at 16, 2.1e-8 / 2.2e-6 at
#: 24. At 12 the table holds 1,531 points, 1.5 MB at G = 128; at 24 its 3 MB made the fused
#: forward's peak at N = 1,024 12 % above that at 16,384 per atom (issue 4 asks for 10 %;
#: perf-notes 31).
RADIAL_POINTS_PER_SIGMA = 12
#: At most this many intervals (a basis narrower than
#: ``RADIAL_POINTS_PER_SIGMA cutoff / RADIAL_MAX_INTERVALS`` is refused by the fused backend's ``check``).
RADIAL_MAX_INTERVALS = 1 << 16
#: At least this many (a wide or constant basis).
RADIAL_MIN_INTERVALS = 16


def radial_intervals(gamma: float, cutoff: float) -> int:
    """Intervals of the radial table over ``[0, cutoff]`` for Gaussians ``exp(-gamma x^2)``."""
    if gamma <= 0:  # a constant basis: any grid interpolates it exactly
        return RADIAL_MIN_INTERVALS
    sigma = math.sqrt(0.5 / gamma)
    return max(RADIAL_MIN_INTERVALS, math.ceil(RADIAL_POINTS_PER_SIGMA * cutoff / sigma))


def radial_spacing(gamma: float, cutoff: float) -> tuple[int, float]:
    """The table's intervals and their width ``h``."""
    nt = radial_intervals(gamma, cutoff)
    return nt, cutoff / nt


def radial_grid(gamma: float, cutoff: float, device) -> tuple[Tensor, float]:
    """The table's grid points ``p h`` (float64) and ``h``."""
    nt, h = radial_spacing(gamma, cutoff)
    return torch.arange(nt + 1, device=device, dtype=torch.float64) * h, h


def radial_rows(points: Tensor, centers: Tensor, w: Tensor, gamma: float, h: float) -> Tensor:
    """``rbf(d) @ w`` and ``h`` times its derivative at the distances ``points`` (``[P, 2, G]``):
    the table's rows (differentiable, any order)."""
    diff = points[:, None] - centers[None, :]
    rbf = torch.exp(-gamma * diff * diff)
    return torch.stack((rbf @ w, (rbf * (-2.0 * gamma * h) * diff) @ w), dim=1)


def build_table(centers: Tensor, w_radial: Tensor, gamma: float, cutoff: float) -> tuple[Tensor, float]:
    """``(table [intervals + 1, 2, G], 1 / h)``: the radial table of the weights, float64;
    differentiable (any order) with respect to ``centers`` and ``w_radial``."""
    grid, h = radial_grid(gamma, cutoff, w_radial.device)
    return radial_rows(grid, centers.to(torch.float64), w_radial.to(torch.float64), gamma, h), 1.0 / h


def interpolate(d: Tensor, table: Tensor, inv_h: float) -> Tensor:
    """``rbf(d) @ w_radial`` ``[E, G]`` at the distances ``d`` ``[E]`` as the cubic Hermite
    interpolation of ``table`` (``build_table``), computed in float64 and returned in ``d``'s
    dtype: the fused kernels' formula (``kernels._table_point``, ``_radial_from_table``).
    Differentiable with respect to ``d`` (the interpolant's derivatives) and ``table``;
    distances beyond the grid read its end."""
    nt = table.shape[0] - 1
    x = torch.clamp(d.to(torch.float64) * inv_h, max=float(nt))
    i = torch.clamp(x.detach().floor().long(), max=nt - 1)
    t = (x - i.to(x.dtype))[:, None]
    t2 = t * t
    t3 = t2 * t
    rows = table.to(torch.float64)
    left, right = rows[i], rows[i + 1]
    value = ((2.0 * t3 - 3.0 * t2 + 1.0) * left[:, 0] + (t3 - 2.0 * t2 + t) * left[:, 1]
             + (3.0 * t2 - 2.0 * t3) * right[:, 0] + (t3 - t2) * right[:, 1])
    return value.to(d.dtype)
