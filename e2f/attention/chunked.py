"""The ``chunked`` backend: the attention core streamed over target and neighbour blocks.

Forward walks blocks of target rows and, within each, blocks of neighbour slots with an
online softmax (running max ``m`` starting at the sink logit 0, running sum ``s`` starting
at ``eps``), so ``m`` and ``s`` end exactly as in ``core.attention_core_reference``. Only
the inputs, the output and the per-(target, head) statistics ``m`` and ``s`` are saved.

Backward recomputes every block. With ``m``, ``s``, ``out`` fixed from the forward, the
gradient of ``L(out)`` equals the gradient of the block-local surrogate::

    sum_{i,j,h} p_ijh * ( c_ijh * (dout_ih . v_jh) - (dout_ih . out_ih) ) / s_ih

with ``p = env exp(logit - m)``, ``c = u / d`` and ``v_jh`` what the edge moves (with
``moments`` the displacement-weighted value, so positions get that term's gradient too);
``s`` and ``m`` cancel in the function, so holding them constant is exact. It therefore
streams over neighbour blocks too. The backward is itself an autograd Function whose backward (second order, needed for
force training) recomputes each target block through the reference formula. No tensor
with an edge dimension outlives a block in any pass: activation memory is O(N).

Per-edge source rows are gathered per block and their gradients scattered back with
``index_add``; on CUDA that is a float atomic (not bitwise deterministic; the ``triton``
backend is).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from e2f.attention.core import CoreInputs, attention_core_reference, edge_terms, edge_values
from e2f.attention.radial import build_table

_DST_FIELDS = ("pos_dst", "q", "gate_dst")
_SRC_FIELDS = ("pos_src", "k", "v", "gate_src")
_RADIAL_FIELDS = ("rbf_centers", "w_radial")
_SHARED_FIELDS = _RADIAL_FIELDS + ("w_out", "b_out")
_FIELDS = ("pos_dst", "pos_src", "nbr", "q", "k", "v", "gate_dst", "gate_src") + _SHARED_FIELDS
_DIFF_FIELDS = tuple(f for f in _FIELDS if f != "nbr")
#: The key under which ``second_order_grads`` hands its blocks the call's radial table.
_TABLE = "radial_table"


def _differentiable_table(t: dict[str, Tensor], plan: BlockPlan) -> tuple[dict[str, Tensor], tuple[Tensor, float]]:
    """``(leaves, (table, 1 / h))``: fresh leaves of ``t``'s radial fields and the radial table
    built from them with its graph, so one build serves every block of a pass."""
    leaves = {f: t[f].detach().requires_grad_(True) for f in _RADIAL_FIELDS}
    with torch.enable_grad():
        return leaves, build_table(leaves["rbf_centers"], leaves["w_radial"], plan.rbf_gamma, plan.cutoff)


#: Default bound on a block's per-edge temporaries, in numbers.
DEFAULT_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class BlockPlan:
    """Block sizes and the non-tensor constants of one call."""

    target_block: int
    neighbor_block: int
    rbf_gamma: float
    cutoff: float
    eps: float
    moments: bool = False


def block_plan(inp: CoreInputs, target_block: int | None = None, neighbor_block: int | None = None,
               max_elements: int = DEFAULT_BLOCK_ELEMENTS) -> BlockPlan:
    """Block sizes of one call: ``target_block`` rows (default: as many as fit ``max_elements``
    numbers of per-edge temporaries) and ``neighbor_block`` slots (default up to 64)."""
    n, kslots = inp.nbr.shape
    h = inp.num_heads
    kb = neighbor_block or min(kslots, 64)
    # Numbers held per edge inside a block: gathered k, v, the gate hidden layer and its
    # outputs, the radial table's four float64 rows and the [H]-wide softmax terms.
    per_edge = h * (inp.k.shape[-1] + 2 * _out_width(inp.v, inp.moments) + 8) + 11 * inp.w_radial.shape[1]
    tb = target_block or max(1, max_elements // (per_edge * max(kslots, 1)))
    return BlockPlan(max(1, min(tb, max(n, 1))), max(1, min(kb, kslots)), inp.rbf_gamma, inp.cutoff, inp.eps,
                     inp.moments)


def _out_width(v: Tensor, moments: bool) -> int:
    """Numbers a head of the output: ``dv``, or ``3 dv`` for the moments."""
    return v.shape[-1] * (3 if moments else 1)


def _gather_block(t: dict[str, Tensor], rows: slice, cols: slice):
    """Block-local CoreInputs whose source slots are the block's edges, one per slot."""
    nb = t["nbr"][rows, cols]
    valid = (nb >= 0).reshape(-1)
    src = nb.clamp_min(0).reshape(-1)
    block = {f: t[f][rows] for f in _DST_FIELDS}
    block.update({f: t[f][src] for f in _SRC_FIELDS})
    block.update({f: t[f] for f in _SHARED_FIELDS})
    return block, src, valid


def _block_edges(block: dict[str, Tensor], valid: Tensor, rows: int, plan: BlockPlan):
    """A block as CoreInputs over its own edges, and each edge's (target row, source slot)."""
    inp = CoreInputs(nbr=None, rbf_gamma=plan.rbf_gamma, cutoff=plan.cutoff, eps=plan.eps, moments=plan.moments,
                     **block)
    num_edges = valid.shape[0]
    dst = torch.arange(rows, device=valid.device).repeat_interleave(num_edges // max(rows, 1))
    return inp, dst, torch.arange(num_edges, device=valid.device)


def _edge_weights(block: dict[str, Tensor], valid: Tensor, rows: int, plan: BlockPlan,
                  table: tuple[Tensor, float]):
    """``p``-ready terms of a block: ``logit [E, H]`` (-inf off-edge), ``env``, ``u / d``
    (``table``: ``radial.build_table``'s, built once a pass)."""
    inp, dst, src = _block_edges(block, valid, rows, plan)
    env, inv_d, g, u, qk = edge_terms(inp, dst, src, valid, table)
    logit = torch.where((valid & (env > 0))[:, None], g * qk, torch.full_like(qk, -math.inf))
    return logit, env, u * inv_d[:, None]


def _block_values(block: dict[str, Tensor], valid: Tensor, rows: int, plan: BlockPlan) -> Tensor:
    """``[rows, slots, H, dv_out]``: what the block's edges move (``core.edge_values``; the
    gathered ``v`` itself unless ``plan.moments``)."""
    values = edge_values(*_block_edges(block, valid, rows, plan)) if plan.moments else block["v"]
    return values.reshape(rows, -1, *values.shape[1:])


def _forward(t: dict[str, Tensor], plan: BlockPlan):
    n, kslots = t["nbr"].shape
    h, dv = t["v"].shape[1], _out_width(t["v"], plan.moments)
    like = t["v"]
    out = like.new_empty(n, h, dv)
    m_all = like.new_empty(n, h)
    s_all = like.new_empty(n, h)
    table = build_table(t["rbf_centers"], t["w_radial"], plan.rbf_gamma, plan.cutoff)
    for a in range(0, n, plan.target_block):
        rows = slice(a, min(a + plan.target_block, n))
        nr = rows.stop - a
        m = like.new_zeros(nr, h)
        s = like.new_full((nr, h), plan.eps)
        acc = like.new_zeros(nr, h, dv)
        for c in range(0, kslots, plan.neighbor_block):
            cols = slice(c, min(c + plan.neighbor_block, kslots))
            kb = cols.stop - c
            block, _, valid = _gather_block(t, rows, cols)
            logit, env, coef = _edge_weights(block, valid, nr, plan, table)
            logit = logit.reshape(nr, kb, h)
            m_new = torch.maximum(m, logit.amax(1))
            scale = torch.exp(m - m_new)
            p = env.reshape(nr, kb, 1) * torch.exp(logit - m_new[:, None])
            s = s * scale + p.sum(1)
            w = p * coef.reshape(nr, kb, h)
            acc = acc * scale[..., None] + torch.einsum("rkh,rkhd->rhd", w, _block_values(block, valid, nr, plan))
            m = m_new
        out[rows] = acc / s[..., None]
        m_all[rows] = m
        s_all[rows] = s
    return out, m_all, s_all


def _scatter_grads(grads: dict[str, Tensor], parts: dict[str, Tensor | None], rows: slice, src: Tensor):
    """Add a block's gradients (by input name) into the full ones: target rows, source rows or whole."""
    for name, g in parts.items():
        if g is None:
            continue
        if name in _DST_FIELDS:
            grads[name] = grads[name].index_add(0, torch.arange(rows.start, rows.stop, device=src.device), g)
        elif name in _SRC_FIELDS:
            grads[name] = grads[name].index_add(0, src, g)
        else:
            grads[name] = grads[name] + g


def _first_order_grads(t, dout, out, m_all, s_all, plan: BlockPlan) -> dict[str, Tensor]:
    """Gradients of ``<dout, out>`` by the streamed surrogate (see the module docstring)."""
    n, kslots = t["nbr"].shape
    h = t["v"].shape[1]
    grads = {f: torch.zeros_like(t[f]) for f in _DIFF_FIELDS}
    delta = (dout * out).sum(-1)
    # the blocks' gradients of the radial table add up in dtable, taken to the centres and
    # w_radial once at the end, through the table's build
    radial_leaves, (table, inv_h) = _differentiable_table(t, plan)
    table_leaf = table.detach().requires_grad_(True)
    dtable = torch.zeros_like(table)
    for a in range(0, n, plan.target_block):
        rows = slice(a, min(a + plan.target_block, n))
        nr = rows.stop - a
        inv_s = 1.0 / s_all[rows]
        for c in range(0, kslots, plan.neighbor_block):
            cols = slice(c, min(c + plan.neighbor_block, kslots))
            kb = cols.stop - c
            block, src, valid = _gather_block(t, rows, cols)
            leaves = {f: x.detach().requires_grad_(True) for f, x in block.items()}
            with torch.enable_grad():
                logit, env, coef = _edge_weights(leaves, valid, nr, plan, (table_leaf, inv_h))
                p = env.reshape(nr, kb, 1) * torch.exp(logit.reshape(nr, kb, h) - m_all[rows, None])
                dv_dot = torch.einsum("rhd,rkhd->rkh", dout[rows], _block_values(leaves, valid, nr, plan))
                surrogate = (p * (coef.reshape(nr, kb, h) * dv_dot - delta[rows, None]) * inv_s[:, None]).sum()
                *parts, part_table = torch.autograd.grad(surrogate, [*leaves.values(), table_leaf],
                                                         allow_unused=True)
            _scatter_grads(grads, dict(zip(leaves, parts)), rows, src)
            if part_table is not None:
                dtable += part_table
    with torch.enable_grad():
        grads["rbf_centers"], grads["w_radial"] = torch.autograd.grad(table, list(radial_leaves.values()), dtable)
    return grads


class _CoreGrad(torch.autograd.Function):
    """``(dout, inputs) -> d<dout, out>/d inputs``, differentiable once more by recomputation."""

    @staticmethod
    def forward(ctx, plan, out, m_all, s_all, dout, *tensors):
        t = dict(zip(_FIELDS, tensors))
        grads = _first_order_grads(t, dout, out, m_all, s_all, plan)
        ctx.plan = plan
        ctx.save_for_backward(dout, *tensors)
        return tuple(grads[f] for f in _DIFF_FIELDS)

    @staticmethod
    def backward(ctx, *gg):
        dout, *tensors = ctx.saved_tensors
        t = dict(zip(_FIELDS, tensors))
        d_dout, grads = second_order_grads(ctx.plan, dout, t, dict(zip(_DIFF_FIELDS, gg)), torch.is_grad_enabled())
        return (None, None, None, None, d_dout, *(grads.get(f) for f in _FIELDS))


def _second_order_block(plan: BlockPlan, dout: Tensor, t: dict, gg: dict, rows: slice, create: bool):
    """One target block of :func:`second_order_grads`: ``(parts, d_dout, src)``, or None if
    ``gg`` pairs with nothing here; ``parts`` maps the block's leaves to their gradients and
    ``d_dout`` is the gradient of the block's rows of ``dout``. ``t``'s radial fields are the
    call's leaves and ``t[_TABLE]`` the table built from them once a call (every block
    differentiates through that one build, so its graph is retained)."""
    kslots = t["nbr"].shape[1]
    block, src, valid = _gather_block(t, rows, slice(0, kslots))
    with torch.enable_grad():
        leaves = {f: x if f in _RADIAL_FIELDS else x.detach().requires_grad_(True) for f, x in block.items()}
        dout_blk = dout[rows].detach().requires_grad_(True)
        local_nbr = torch.where(valid, torch.arange(valid.shape[0], device=valid.device), -1)
        inp = CoreInputs(
            nbr=local_nbr.reshape(rows.stop - rows.start, kslots),
            rbf_gamma=plan.rbf_gamma, cutoff=plan.cutoff, eps=plan.eps, moments=plan.moments, **leaves,
        )
        out_blk = attention_core_reference(inp, t[_TABLE])
        g = torch.autograd.grad(out_blk, list(leaves.values()), dout_blk, create_graph=True, allow_unused=True)
        pairing = []
        for name, gi in zip(leaves, g):
            w = gg[name]
            if gi is None or w is None:
                continue
            if name in _DST_FIELDS:
                w = w[rows]
            elif name in _SRC_FIELDS:
                w = w[src]
            pairing.append((gi * w).sum())
        if not pairing:
            return None
        *parts, d_dout = torch.autograd.grad(sum(pairing), [*leaves.values(), dout_blk], create_graph=create,
                                             retain_graph=True, allow_unused=True)
    return dict(zip(leaves, parts)), d_dout, src


def second_order_grads(plan: BlockPlan, dout: Tensor, t: dict[str, Tensor], gg: dict, create: bool):
    """The gradients of ``<gg, d<dout, out>/d inputs>`` with respect to ``dout`` and the inputs.

    What the first-order gradients' backward needs (force training), whichever way their
    values were computed. Each target block of ``plan`` recomputes its edges through the
    reference formula and differentiates twice; blocks are independent, so a block that runs
    out of memory is redone as two halves (down to one target, then the error is raised).

    Returns
    -------
    tuple
        ``d_dout`` (like ``dout``) and a dict of the inputs' gradients (``_DIFF_FIELDS``).
    """
    n = t["nbr"].shape[0]
    grads = {f: torch.zeros_like(t[f]) for f in _DIFF_FIELDS}
    d_dout = torch.zeros_like(dout)
    # one radial table for all blocks (its float64 build costs a few blocks' worth of edges)
    radial_leaves, table = _differentiable_table(t, plan)
    t = {**t, **radial_leaves, _TABLE: table}
    # a stack: blocks pop in order, and a split block's halves go back on top
    pending = [slice(a, min(a + plan.target_block, n)) for a in range(0, n, plan.target_block)][::-1]
    while pending:
        rows = pending.pop()
        try:
            result = _second_order_block(plan, dout, t, gg, rows, create)
            split = False
        except torch.OutOfMemoryError:
            if rows.stop - rows.start == 1:
                raise
            split = True
        if split:
            # outside the except clause, so the failed attempt's tensors are already freed
            mid = (rows.start + rows.stop) // 2
            pending += [slice(mid, rows.stop), slice(rows.start, mid)]
            continue
        if result is None:
            continue
        parts, d_block, src = result
        _scatter_grads(grads, parts, rows, src)
        if d_block is not None:
            d_dout = d_dout.index_add(0, torch.arange(rows.start, rows.stop, device=dout.device), d_block)
    return d_dout, grads


class _Core(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, *tensors):
        t = dict(zip(_FIELDS, tensors))
        out, m_all, s_all = _forward(t, plan)
        ctx.plan = plan
        ctx.save_for_backward(out, m_all, s_all, *tensors)
        ctx.mark_non_differentiable(m_all, s_all)
        return out, m_all, s_all

    @staticmethod
    def backward(ctx, dout, _dm, _ds):
        out, m_all, s_all, *tensors = ctx.saved_tensors
        grads = _CoreGrad.apply(ctx.plan, out.detach(), m_all, s_all, dout, *tensors)
        by_name = dict(zip(_DIFF_FIELDS, grads))
        return (None, *(by_name.get(f) if ctx.needs_input_grad[i + 1] else None for i, f in enumerate(_FIELDS)))


def chunked_attention_core(
    inp: CoreInputs,
    *,
    target_block: int | None = None,
    neighbor_block: int | None = None,
    max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> Tensor:
    """The attention core, streamed and recomputed; same function as the reference.

    Parameters
    ----------
    inp : CoreInputs
        See ``e2f.attention.core``.
    target_block, neighbor_block : int, optional
        Rows and neighbour slots per block. By default neighbour blocks of up to 64 slots
        and as many target rows as fit ``max_block_elements`` numbers of per-edge
        temporaries.
    max_block_elements : int
        Bound on the per-block temporaries (bounded memory independent of N and K).

    Returns
    -------
    Tensor
        ``[N, H, dv]`` (``[N, H, 3 dv]`` with ``inp.moments``); differentiable (any order) w.r.t.
        every floating tensor of ``inp``.
    """
    plan = block_plan(inp, target_block, neighbor_block, max_block_elements)
    tensors = [getattr(inp, f) for f in _FIELDS]
    out, _, _ = _Core.apply(plan, *tensors)
    return out
