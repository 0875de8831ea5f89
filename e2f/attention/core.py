"""The attention core: the one function every aggregation backend computes.

The attention layer (``layer.py``) reduces the equivariant message of METHOD.md
sections 2-4 to a per-head, scalar-weighted sum over neighbours. Everything with an
edge dimension lives here, so this is the only place where a backend may choose to
materialise, stream or fuse.

For every target atom ``i``, head ``h`` and neighbour slot ``j = nbr[i, s]``::

    d_ij   = |pos_dst[i] - pos_src[j]|                       (valid: nbr >= 0 and d_ij < cutoff)
    x      = d_ij / cutoff
    env_ij = 1 - 6 x^5 + 15 x^4 - 10 x^3                     (C2-smooth to zero at the cutoff)
    rbf_ij = exp(-rbf_gamma * (d_ij - rbf_centers)^2)        [R]
    T(d)   = rbf(d) @ w_radial, read from a table               [G] (see below)
    hid_ij = silu(T(d_ij) + gate_dst[i] + gate_src[j])          [G]
    g, u   = split(hid_ij @ w_out + b_out, [H, H])           [H] each
    logit  = g * (q[i, h] . k[j, h]) / sqrt(dk)
    m_ih   = max(0, max_j logit_ijh)                         (0: the eps "sink", see below)
    s_ih   = eps * exp(-m_ih) + sum_j env_ij exp(logit_ijh - m_ih)
    w_ijh  = u_ijh * env_ij * exp(logit_ijh - m_ih) / s_ih / d_ij
    out[i, h, :] = sum_j w_ijh * v[j, h, :]

With ``moments`` set, each edge moves its value weighted by the displacement as well::

    out[i, h, a dv : (a + 1) dv] = sum_j w_ijh * (pos_dst[i] - pos_src[j])_a * v[j, h, :]   (a = x, y, z)

the first moments of the weighted values, ``[N, H, 3 dv]``. The layer's message is a fixed
linear map of them (``e2f.eaas.dense_cg_moments``), so a source moves its ``(L+1)^2``-row
value ``v`` instead of the ``rows_out + (L+1)^2`` rows of ``[S_r(v); v]`` (``node_product=
"moments"`` in ``e2f.attention.layer``).

So the softmax denominator is ``sum_j env exp(logit) + eps`` with an *absolute* eps: it
is an extra "sink" logit of value 0 and weight eps, carried through the max-shift
exactly. (The public reference adds eps *after* the max shift, which makes the energy
jump when a neighbour with the largest logit crosses the cutoff; ours is continuous.)

``T`` is the cubic Hermite interpolation of a table of ``rbf(d) @ w_radial`` and its
derivative at 12 points a basis width (``e2f.attention.radial``): within ~3e-7 of the exact
Gaussians, and the same table in every backend, so the fused kernels (which read it instead
of R exponentials and an R x G product an edge) compute this very function.

``pos_src``/``k``/``v``/``gate_src`` describe *source slots*: for molecules the atoms
themselves (M == N); for periodic systems the atoms followed by the periodic images the
neighbour list uses (see ``e2f.neighbors``). Backends differentiate with respect to
every tensor here, the gate weights included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from e2f.attention.radial import build_table, interpolate


@dataclass
class CoreInputs:
    """Inputs of one attention-core call.

    Shapes: N targets, M source slots, K neighbour slots, H heads, ``dk`` query/key
    width, ``dv`` value numbers per head (29 * C / H for L = 2; 9 * C / H with
    ``moments``), R radial basis functions, G gate hidden width. ``moments``: the output is
    the displacement-weighted ``[N, H, 3 dv]`` (see the module docstring).
    """

    pos_dst: Tensor  # [N, 3]
    pos_src: Tensor  # [M, 3]
    nbr: Tensor  # [N, K] integer, -1 marks an empty slot
    q: Tensor  # [N, H, dk]
    k: Tensor  # [M, H, dk]
    v: Tensor  # [M, H, dv]
    gate_dst: Tensor  # [N, G] per-target part of the first gate layer (bias included)
    gate_src: Tensor  # [M, G] per-source part of the first gate layer
    rbf_centers: Tensor  # [R]
    w_radial: Tensor  # [R, G]
    w_out: Tensor  # [G, 2H]
    b_out: Tensor  # [2H]
    rbf_gamma: float
    cutoff: float
    eps: float
    moments: bool = False

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def replace(self, **changes) -> "CoreInputs":
        return replace(self, **changes)


def value_head_stride(dv: int, moments: bool = False) -> int:
    """The head stride of ``v`` the fused kernels read fastest: rows padded to a power of two
    >= 16 numbers (64 for the paper's 58), 16-byte aligned and loaded unmasked; for the
    moments (``CoreInputs.moments``) a multiple of 4 (20 for 18: 16-byte aligned rows, read as
    a power-of-two tile and the rest)."""
    if moments:
        return -(-dv // 4) * 4
    return max(16, 1 << max(0, dv - 1).bit_length())


def padded_head_stride(v: Tensor) -> int | None:
    """The head stride of ``v [M, H, dv]`` if its head rows are padded (strides
    ``(H VS, VS, 1)`` with ``VS > dv``, as :func:`pad_value_rows` makes them), else None."""
    if v.dim() != 3:
        return None
    h, dv = v.shape[1:]
    vs = v.stride(1)
    return vs if v.stride(2) == 1 and vs > dv and v.stride(0) == h * vs else None


def pad_value_rows(v: Tensor, head_stride: int) -> Tensor:
    """``v [M, H, dv]`` as a view of a zero-padded ``[M, H, head_stride]`` tensor (differentiable).

    The same values in a layout some backends read faster (aligned head rows: the fused
    kernel's ``value_head_stride``); ``v`` itself if ``head_stride <= dv`` or ``v`` already
    has that layout.
    """
    dv = v.shape[-1]
    if head_stride <= dv or padded_head_stride(v) == head_stride:
        return v
    return torch.nn.functional.pad(v, (0, head_stride - dv))[..., :dv]


def envelope(x: Tensor) -> Tensor:
    """Polynomial cutoff 1 - 6x^5 + 15x^4 - 10x^3, zero (with two zero derivatives) at x = 1."""
    x3 = x * x * x
    return 1.0 - x3 * (10.0 - x * (15.0 - 6.0 * x))


def radial_table(inp: CoreInputs) -> tuple[Tensor, float]:
    """``inp``'s radial table and ``1 / h`` (``radial.build_table``; differentiable)."""
    return build_table(inp.rbf_centers, inp.w_radial, inp.rbf_gamma, inp.cutoff)


def edge_terms(inp: CoreInputs, dst: Tensor, src: Tensor, valid: Tensor, table: tuple[Tensor, float]):
    """Per-edge quantities for the edges (dst[e], src[e]), the radial layer read from ``table``
    (``radial_table(inp)``, built once a call).

    Returns ``(env, inv_d, g, u, qk)``: envelope and 1/d with invalid edges set to 0,
    and the gate outputs and scaled q.k per head, ``[E, H]``. Shared by the
    materialised oracle and the chunked backend so both compute the same function.
    """
    vec = inp.pos_dst[dst] - inp.pos_src[src]
    d = vec.square().sum(-1).clamp_min(1e-30).sqrt()
    inside = valid & (d < inp.cutoff)
    d_safe = torch.where(inside, d, torch.ones_like(d))
    env = torch.where(inside, envelope(d_safe / inp.cutoff), torch.zeros_like(d))
    inv_d = torch.where(inside, 1.0 / d_safe, torch.zeros_like(d))
    hid = torch.nn.functional.silu(interpolate(d_safe, *table) + inp.gate_dst[dst] + inp.gate_src[src])
    gu = hid @ inp.w_out + inp.b_out
    h = inp.num_heads
    g, u = gu[:, :h], gu[:, h:]
    qk = (inp.q[dst] * inp.k[src]).sum(-1) / math.sqrt(inp.q.shape[-1])
    return env, inv_d, g, u, qk


def edge_values(inp: CoreInputs, dst: Tensor, src: Tensor) -> Tensor:
    """What each edge (dst[e], src[e]) moves: ``v[src]`` ``[E, H, dv]``, or with ``inp.moments``
    ``(pos_dst[dst] - pos_src[src])_a v[src]`` as ``[E, H, 3 dv]`` (x, y, z blocks)."""
    v = inp.v[src]
    if not inp.moments:
        return v
    vec = inp.pos_dst[dst] - inp.pos_src[src]
    return (vec[:, None, :, None] * v[:, :, None, :]).flatten(2)


def attention_core_reference(inp: CoreInputs, table: tuple[Tensor, float] | None = None) -> Tensor:
    """The obviously-right twin: materialises every per-edge tensor ([E, H, dv] too).

    ``table``: ``radial_table(inp)`` when the caller already built it (blocks of one call
    share it); built here otherwise. Returns ``out`` of shape [N, H, dv] ([N, H, 3 dv] with
    ``inp.moments``). Differentiable by plain autograd (any order).
    """
    n, kslots = inp.nbr.shape
    dst = torch.arange(n, device=inp.nbr.device).repeat_interleave(kslots)
    flat = inp.nbr.reshape(-1).long()
    valid = flat >= 0
    src = flat.clamp_min(0)
    env, inv_d, g, u, qk = edge_terms(inp, dst, src, valid, radial_table(inp) if table is None else table)
    logit = torch.where((valid & (env > 0))[:, None], g * qk, torch.full_like(qk, -math.inf))
    # [N, H]; 0 is the sink logit. The function does not depend on m (it cancels), so no
    # gradient flows through it.
    m = logit.reshape(n, kslots, -1).amax(1).clamp_min(0.0).detach()
    p = env[:, None] * torch.exp(logit - m[dst])  # exp(-inf) = 0 on invalid slots
    s = inp.eps * torch.exp(-m) + p.reshape(n, kslots, -1).sum(1)
    w = u * p * inv_d[:, None] / s[dst]
    msg = w[:, :, None] * edge_values(inp, dst, src)
    return msg.reshape(n, kslots, *msg.shape[1:]).sum(1)
