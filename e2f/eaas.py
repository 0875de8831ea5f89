"""EAAS: the CG product with the first-order solid harmonic, as a gather in the polar frame.

The product ``S_r(v) = v (x) R^1(r)`` maps degrees l1 = 0..L (rows ``(L+1)^2``) to one
output block per path (l1, 1, l3), grouped by l3 ascending and then by l1 ascending (for
L = 2: (1,0) | (0,1) (1,1) (2,1) | (1,2) (2,2), 20 rows). Per path::

    [v (x) R^1(r)]_{l3, m3} = sqrt(2 l3 + 1) sum_{m1, a} W^{l1 1 l3}_{m1 a m3} v_{l1 m1} R^1(r)_a

with W e3nn's real Wigner-3j (Frobenius norm 1) and ``R^1(r) = sqrt(3) r``: e3nn's
``component`` normalisation for every path. In the frame where ``r = |r| y_hat`` only
``a = y`` survives, and each output row reads at most one input row; the index map and the
constants are read off ``wigner_3j`` at first use (and cached), never typed in.

The product is bilinear in (v, r). Its autograd Functions use the frames only for values:
the gradient in v is the adjoint (again EAAS), the gradient in r a contraction with the
dense CG tensor, so all derivatives are polynomials, exact at ``|r| = 0`` and on the poles,
and differentiable to any order.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from e3nn import o3
from torch import Tensor

from e2f.so3 import PolarFrames, degree_slice, num_rows

_ZERO_TOL = 1e-12


@dataclass(frozen=True)
class EAASTable:
    """Index map and constants of every (l1, 1, l3) path for one ``lmax`` (float64, CPU).

    Attributes
    ----------
    lmax : int
    paths : tuple of (l1, l3)
        In output order.
    out_degrees : tuple of int
        l3 of each path (the degree of each output block).
    source_row : Tensor
        ``[rows_out]`` input row each output row reads in the polar frame (0 where the
        constant is 0).
    coef : Tensor
        ``[rows_out]``: output = coef * |r| * input[source_row] in the polar frame.
    dense : Tensor
        ``[rows_out, rows_in, 3]``: the CG tensor with the solid harmonic's sqrt(3) in it,
        ``S_r(v)[o] = sum_{i, a} dense[o, i, a] v[i] r[a]`` in any frame.
    """

    lmax: int
    paths: tuple[tuple[int, int], ...]
    out_degrees: tuple[int, ...]
    source_row: Tensor
    coef: Tensor
    dense: Tensor

    @property
    def rows_in(self) -> int:
        return num_rows(self.lmax)

    @property
    def rows_out(self) -> int:
        return self.source_row.shape[0]

    @property
    def paths_per_degree(self) -> tuple[int, ...]:
        """Number of paths into each l3 = 0..L (their output blocks are adjacent)."""
        return tuple(self.out_degrees.count(l3) for l3 in range(self.lmax + 1))


def paths_for(lmax: int) -> tuple[tuple[int, int], ...]:
    """All (l1, l3) with l1, l3 <= lmax coupled through degree 1, ordered by (l3, l1)."""
    return tuple((l1, l3) for l3 in range(lmax + 1) for l1 in range(lmax + 1) if abs(l1 - l3) <= 1 <= l1 + l3)


@functools.lru_cache(maxsize=None)
def eaas_table(lmax: int) -> EAASTable:
    """The EAAS table of ``lmax`` (>= 1), derived from e3nn's ``wigner_3j``."""
    if lmax < 1:
        raise ValueError(f"EAAS needs lmax >= 1, got {lmax}")
    paths = paths_for(lmax)
    rows_out = sum(2 * l3 + 1 for _, l3 in paths)
    dense = torch.zeros(rows_out, num_rows(lmax), 3, dtype=torch.float64)
    source_row = torch.zeros(rows_out, dtype=torch.long)
    coef = torch.zeros(rows_out, dtype=torch.float64)
    row = 0
    for l1, l3 in paths:
        w = o3.wigner_3j(l1, 1, l3, dtype=torch.float64) * math.sqrt(2 * l3 + 1)  # [m1, a, m3]
        block = w.permute(2, 0, 1) * math.sqrt(3.0)  # [m3, m1, a], R^1 = sqrt(3) r
        dense[row : row + 2 * l3 + 1, degree_slice(l1)] = block
        polar = block[:, :, 1]  # r = |r| y_hat: only a = y (index 1 in e3nn's x, y, z)
        for m3 in range(2 * l3 + 1):
            nonzero = torch.nonzero(polar[m3].abs() > _ZERO_TOL).flatten()
            if len(nonzero) > 1:
                raise AssertionError(f"path ({l1},1,{l3}) row {m3} is not axis-aligned sparse: {polar[m3]}")
            if len(nonzero) == 1:
                source_row[row + m3] = l1 * l1 + int(nonzero[0])
                coef[row + m3] = polar[m3, nonzero[0]]
        row += 2 * l3 + 1
    return EAASTable(lmax, paths, tuple(l3 for _, l3 in paths), source_row, coef, dense)


def dense_cg_product(v: Tensor, r: Tensor, lmax: int) -> Tensor:
    """The dense-CG twin of :func:`eaas_product`: ``[n, rows_in, C], [n, 3] -> [n, rows_out, C]``."""
    dense = _dense_table(lmax, v.device, v.dtype)
    return torch.einsum("oia,nic,na->noc", dense, v, r.to(v.dtype))


def dense_cg_moments(moments: Tensor, lmax: int) -> Tensor:
    """The dense CG product applied to first moments: ``[n, 3, rows_in, C] -> [n, rows_out, C]``.

    :func:`dense_cg_product` is linear in ``r``, so ``sum_j w_j dense_cg_product(v_j, r_j)`` equals
    ``dense_cg_moments(sum_j w_j r_j (x) v_j)`` with ``moments[n, a] = sum_j w_j r_j[a] v_j``: one
    contraction a node however many vectors were summed (the attention's moments form).
    """
    dense = _dense_table(lmax, moments.device, moments.dtype)
    return torch.einsum("oia,naic->noc", dense, moments)


@functools.lru_cache(maxsize=None)
def _dense_table(lmax: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Cast and moved once per (device, dtype), not on every call (one launch each, and a
    # host-to-device copy on a GPU).
    return eaas_table(lmax).dense.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _source_rows(lmax: int, device: torch.device) -> Tensor:
    return eaas_table(lmax).source_row.to(device)


@dataclass(frozen=True)
class _OutGroup:
    """The paths into one l3: adjacent in the output, so one batched matmul for all of them."""

    l3: int
    count: int  # paths into l3
    coef: Tensor  # [count, 2 l3 + 1] float64, on the device

    @property
    def size(self) -> int:
        return self.count * (2 * self.l3 + 1)

    def matmul(self, m: Tensor, x: Tensor) -> Tensor:
        """``m [n, count, 2l3+1, 2l3+1]`` applied per path to the rows ``x [n, size, C]``."""
        n, _, c = x.shape
        return torch.matmul(m, x.view(n, self.count, 2 * self.l3 + 1, c)).view(n, self.size, c)


@functools.lru_cache(maxsize=None)
def _out_groups(lmax: int, device: torch.device) -> tuple[_OutGroup, ...]:
    table = eaas_table(lmax)
    groups, row = [], 0
    for l3, count in enumerate(table.paths_per_degree):
        size = count * (2 * l3 + 1)
        groups.append(_OutGroup(l3, count, table.coef[row : row + size].view(count, 2 * l3 + 1).to(device)))
        row += size
    return tuple(groups)


def _r_contraction(g: Tensor, v: Tensor, lmax: int) -> Tensor:
    """``d/dr <g, S_r(v)> = sum_{o,i,c} dense[o,i,a] g[o,c] v[i,c]``, ``[n, 3]``."""
    return torch.einsum("oia,noc,nic->na", _dense_table(lmax, v.device, v.dtype), g, v)


def _frames(r: Tensor, lmax: int, frames: PolarFrames | None) -> PolarFrames:
    return PolarFrames.from_vectors(r, lmax) if frames is None else frames


def _rotate_back(frames: PolarFrames, table: EAASTable, dtype: torch.dtype) -> list[Tensor]:
    """Per l3: ``[n, paths, 2l3+1, 2l3+1]``, ``D^{l3 T} diag(coef |r|)`` of each path into l3.

    The polar-frame scale folded into the rotation back: out = this @ gathered input rows.
    """

    def make(f: PolarFrames) -> list[Tensor]:
        norm = f.norm.double()[:, None, None, None]
        groups = _out_groups(table.lmax, f.norm.device)
        return [(f.blocks[g.l3].transpose(-1, -2)[:, None] * (g.coef[None, :, None, :] * norm)).to(dtype) for g in groups]

    return frames.derived(("eaas", table.lmax, dtype), make)


def _to_polar(x: Tensor, blocks: list[Tensor], lmax: int, transpose: bool) -> Tensor:
    """Rows of degrees 0..L (``x [n, (L+1)^2, C]``) rotated by D (or D^T) per degree.

    D^0 is exactly 1, so row 0 passes through. One split rather than a slice per degree:
    its backward is one cat instead of a zero-filled tensor per degree.
    """
    parts = list(x.split([2 * l + 1 for l in range(lmax + 1)], dim=1))
    for l in range(1, lmax + 1):
        parts[l] = torch.bmm(blocks[l].transpose(-1, -2) if transpose else blocks[l], parts[l])
    return torch.cat(parts, dim=1)


def _apply(v: Tensor, frames: PolarFrames, table: EAASTable) -> Tensor:
    v_polar = _to_polar(v, frames.blocks_as(v.dtype), table.lmax, transpose=False)
    groups = _out_groups(table.lmax, v.device)
    gathered = v_polar[:, _source_rows(table.lmax, v.device)].split([grp.size for grp in groups], dim=1)
    backs = _rotate_back(frames, table, v.dtype)
    return torch.cat([grp.matmul(back, rows) for grp, back, rows in zip(groups, backs, gathered)], dim=1)


def _adjoint(g: Tensor, frames: PolarFrames, table: EAASTable) -> Tensor:
    groups = _out_groups(table.lmax, g.device)
    backs = _rotate_back(frames, table, g.dtype)
    rows = g.split([grp.size for grp in groups], dim=1)
    polar = torch.cat([grp.matmul(back.transpose(-1, -2), r) for grp, back, r in zip(groups, backs, rows)], dim=1)
    v_polar = g.new_zeros(g.shape[0], table.rows_in, g.shape[2]).index_add(1, _source_rows(table.lmax, g.device), polar)
    return _to_polar(v_polar, frames.blocks_as(g.dtype), table.lmax, transpose=True)


class _Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, r, frames, table):
        ctx.save_for_backward(v, r)
        ctx.frames, ctx.table = frames, table
        return _apply(v, frames, table)

    @staticmethod
    def backward(ctx, g):
        v, r = ctx.saved_tensors
        grad_v = _Adjoint.apply(g, r, ctx.frames, ctx.table) if ctx.needs_input_grad[0] else None
        grad_r = _r_contraction(g, v, ctx.table.lmax) if ctx.needs_input_grad[1] else None
        return grad_v, grad_r, None, None


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, r, frames, table):
        ctx.save_for_backward(g, r)
        ctx.frames, ctx.table = frames, table
        return _adjoint(g, frames, table)

    @staticmethod
    def backward(ctx, h):
        g, r = ctx.saved_tensors
        grad_g = _Product.apply(h, r, ctx.frames, ctx.table) if ctx.needs_input_grad[0] else None
        grad_r = _r_contraction(g, h, ctx.table.lmax) if ctx.needs_input_grad[1] else None
        return grad_g, grad_r, None, None


def eaas_product(v: Tensor, r: Tensor, lmax: int, frames: PolarFrames | None = None) -> Tensor:
    """``S_r(v) = v (x) R^1(r)`` by EAAS.

    Parameters
    ----------
    v : Tensor
        ``[n, (L+1)^2, C]``.
    r : Tensor
        ``[n, 3]`` (any length, zero included).
    lmax : int
        L of ``v`` (>= 1).
    frames : PolarFrames, optional
        ``PolarFrames.from_vectors(r, lmax)``, to share between calls with the same r.

    Returns
    -------
    Tensor
        ``[n, rows_out, C]`` (rows as in the module docstring; 20 for L = 2).
    """
    table = eaas_table(lmax)
    return _Product.apply(v, r, _frames(r, lmax, frames), table)


def eaas_adjoint(g: Tensor, r: Tensor, lmax: int, frames: PolarFrames | None = None) -> Tensor:
    """The adjoint ``S_r^T(g)``: ``[n, rows_out, C] -> [n, (L+1)^2, C]``."""
    table = eaas_table(lmax)
    return _Adjoint.apply(g, r, _frames(r, lmax, frames), table)


__all__ = ["EAASTable", "dense_cg_product", "eaas_adjoint", "eaas_product", "eaas_table", "paths_for"]
