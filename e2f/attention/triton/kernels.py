"""Raw Triton kernels of the fused attention core (see ``e2f.attention.core``).

The forward as one kernel or two, and seven backward kernels. Every output row is written by
exactly one program, and every sum over edges runs in a fixed order (bitwise reproducible, no
atomics).
The row counts and offsets (``N``, ``NT``, ``T0``, ``A0``, ...) are not specialised
on: a training run meets a new count with every batch, and divisibility-by-16 variants would
recompile every autotune candidate.

* ``fwd_kernel``: ``TB`` (1, 2 or 4) consecutive targets, each with all its ``K <= BK``
  neighbour slots, in one edge tile of ``TB * BK`` rows, so every target's softmax max is
  exact (no rescaling needed). Geometry, envelope and 1/d per edge; the gate MLP (its
  radial part interpolated in ``function.radial_table``, as every Triton kernel reads it,
  plus the per-node parts, SiLU, then tensor-core ``[TB BK, G] @ [G, HC]`` tiles per head
  chunk), computed once per edge and
  kept in registers while a loop walks the heads in chunks of ``HC``: the gate weights are
  read once per ``TB`` targets and the products have ``TB * BK`` rows. The keys and values
  are gathered one target at a time (a target's tiles are as large as with ``TB = 1``), the
  ``TB`` targets back-to-back per head group: atoms are in Morton order, so consecutive
  targets share many neighbours and the second gather of a row hits L1. Writes
  ``out [N, H, DV]`` and the per-target, per-head statistics ``m`` (max logit, sink 0
  included) and ``s`` (denominator, sink included).
* ``fwd_logit_kernel`` and ``fwd_aggregate_kernel``: the same forward in two kernels (the
  ``split`` form, ``function.forward_plan``). The first runs the edge-tile part above for ``TB``
  targets (geometry, gate MLP from the table, q.k) and writes per edge and head the logit
  (``-inf`` where the edge is not live) and ``u / d``, and per edge the envelope, into a stash
  of one chunk of targets. The second owns one target and ``HB`` heads a program: it reads the
  target's stashed logits ``SB`` slots at a time for the softmax's max (the sink's logit 0
  included), then walks the slots once, each weighed exactly (no running max, so the sums are
  never rescaled: ~half the arithmetic of an online softmax an edge); every head's denominator
  (from the sink's ``eps exp(-m)``) and ``[DV]`` sum live in the thread that owns them, so the
  walk reduces nothing across threads (the fused kernel's softmax reduces over the edge axis
  across warps).
* ``fwd_moment_kernel``: the aggregation for the moments (``CoreInputs.moments``), after the
  same logits kernel: each slot's value row also weighted by the displacement
  ``pos_dst[i] - pos_src[j]`` (three sums a head), the row read as two column tiles
  (``_moment_tiles``: a power of two and the rest, so no register holds padding).
The radial table every kernel reads is built by ``radial_table_kernel``: ``BP`` grid points
and ``BG`` hidden units a program, the Gaussians and the products over the basis in float64
(one launch, no temporaries: its PyTorch twin, ``radial.build_table``, takes ~35 launches
and float64 ``[P, R]`` temporaries); ``radial_table_backward_kernel`` takes the table's
gradient to ``w_radial`` and the centres alike (its twin: autograd through that build).

The backward runs the targets in chunks (``function._stash_chunk``); per chunk, seven kernels
pass each other a per-edge stash of the chunk's edges (row ``(i - T0) K + slot``), so that one
of them computes the gate's hidden layer and q.k and one walks the value rows:

* ``bwd_edge_kernel``: ``fwd_logit_kernel``'s edge tiles (geometry, the gate's hidden layer
  from the radial table, q.k), storing per edge and head ``q.k`` (``qk_edge``) and per edge
  ``hid`` into a ``gate_edge`` row of ``SW = 2 H + G + 16`` numbers (``g``, ``u``, ``hid``, a
  one, padding to a multiple of 16); ``function`` then writes ``[g u] = [hid 1] [w_out; b_out]``
  into the row's first ``2 H`` numbers with one cuBLAS product a chunk.
* ``bwd_weight_kernel``: one target a program, elementwise over its edges and heads: the
  softmax weight ``w`` from the stashed ``g``, ``q.k``, ``u`` and the forward's ``m``, ``s``
  into ``dw_edge``.
* ``bwd_value_kernel``: one source with in-edges from the chunk (the transposed neighbour
  list, CSR by (source, chunk)) and ``HB`` heads a one-warp program, in-edges one at a time:
  ``w`` from ``dw_edge``, ``dv += w dout_i`` and ``dw = dout_i . v_j`` (``v_j`` held in
  registers) over it. The only pass that moves value-sized rows: ``dout_i``, 58 numbers a head.
* ``bwd_moment_value_kernel``: the value pass for the moments, same walk: ``dv`` from the
  displacement-weighted ``dout`` rows, ``dw`` over ``w``, and the displacement's own gradient
  per edge and head block (the targets' share, summed afterwards in a fixed order) and per
  source (its share).
* ``bwd_target_kernel``: one target a program, elementwise over its edges and heads: the
  softmax's backward from ``dw`` (``dout_i . out_i`` as the sum of ``dw w``), written over the
  stash (``dqk`` over ``q.k``, ``dg``, ``du`` over ``g``, ``u``), ``dq`` from the gathered key
  rows, and the envelope and 1/d parts of ``dd = dL/dd_ij`` (an [N K] scalar). ``function``
  then adds ``[hid 1]^T [dg du]`` to the output layer's weight and bias gradients.
* ``bwd_gate_kernel``: elementwise over ``fwd_logit_kernel``'s edge tiles; ``function`` first
  writes the gate's hidden-layer gradient ``dhid = [dg du] w_out^T`` over ``hid`` (one matrix
  product a chunk), which this kernel turns into the pre-activation gradient ``dpre`` in place
  (the pre-activation recomputed from the radial table) and sums into ``dgate_dst``; the radial
  layer's part of ``dd`` (the interpolant's derivative, ``_radial_slope_dot``), so ``dpos_dst``.
* ``bwd_grid_kernel`` (once a backward, before the chunks): every edge slot's position on the
  radial table's grid, which ``function._radial_order`` sorts chunk by chunk in one batched sort.
* ``bwd_radial_table_kernel``: one grid point of the radial table a program: the gradient of
  the chunk's pre-activations with respect to the table, summed over the edges of the two
  intervals around the point in their sorted order;
  ``radial_table_backward_kernel`` takes it to ``w_radial`` and the centres at the end.
* ``bwd_source_kernel``: the transposed walk again, one source and ``HB`` heads a program:
  ``dk += dqk q_i``; one more program a source sums ``dgate_src += dpre`` and ``dpos_src``
  from ``dd`` in steps of ``BKS`` in-edges.

Value traffic dominates. The one-warp kernels (aggregation, value pass) move one
edge's ``[HB, DVP]`` head rows at a time, each head's sums in the threads that own its
columns. The fused forward moves the per-head rows of ``v`` (``DV`` contiguous numbers) whole:
a head chunk's weights ``[BK, HC]`` are split (``tl.split``) into groups of heads, and each
group moves one value tile. Two tile shapes exist:

* ``GROUPS`` = 4 or 8: heads ``h0 + r + 4 i``, a ``[BK, HC / 4, DVP]`` tile. The compiler
  spreads its warps over the *edges*, so every sum over edges ends in a cross-warp reduction
  through shared memory and a barrier.
* ``GROUPS`` = 2: groups of contiguous heads, each read as one ``[BK, HA * DVP]`` block a
  row (``_value_rows``) and reshaped to heads. The warps then own heads and each thread holds
  all edges of its columns: the sum over edges stays in registers (perf-notes section 9).
Performance notes and measurements: ``docs/perf-notes.md``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _geometry(pos_dst, pos_src, tgt, src, ok, cutoff):
    """Per-edge vector, distance terms and masks ([E] each)."""
    dx = tl.load(pos_dst + tgt * 3 + 0, mask=ok, other=0.0) - tl.load(pos_src + src * 3 + 0, mask=ok, other=0.0)
    dy = tl.load(pos_dst + tgt * 3 + 1, mask=ok, other=0.0) - tl.load(pos_src + src * 3 + 1, mask=ok, other=0.0)
    dz = tl.load(pos_dst + tgt * 3 + 2, mask=ok, other=0.0) - tl.load(pos_src + src * 3 + 2, mask=ok, other=0.0)
    d = tl.sqrt(tl.maximum(dx * dx + dy * dy + dz * dz, 1e-30))
    inside = ok & (d < cutoff)
    d_safe = tl.where(inside, d, 1.0)
    x = d_safe / cutoff
    env = 1.0 - x * x * x * (10.0 - x * (15.0 - 6.0 * x))
    env = tl.where(inside, env, 0.0)
    inv_d = tl.where(inside, 1.0 / d_safe, 0.0)
    # the reference masks logits with env > 0 (env can round to 0 just inside the cutoff)
    live = inside & (env > 0.0)
    return dx, dy, dz, d_safe, x, env, inv_d, inside, live


@triton.jit
def _node_gates(acc, tgt, src, ok, gate_dst, gate_src, G, GP: tl.constexpr):
    """``acc + gate_dst[i] + gate_src[j]``: the per-node parts of the gate pre-activation."""
    offs_g = tl.arange(0, GP)
    m2 = ok[:, None] & (offs_g < G)[None, :]
    acc += tl.load(gate_dst + tgt[:, None] * G + offs_g[None, :], mask=m2, other=0.0)
    acc += tl.load(gate_src + src[:, None] * G + offs_g[None, :], mask=m2, other=0.0)
    return acc


@triton.jit
def _table_point(d_safe, inv_h, NT):
    """Where each distance falls on the radial table's grid: ``x = d / h`` (at most ``NT``),
    its interval ``i`` and the position ``t`` in it."""
    x = tl.minimum(d_safe * inv_h, NT * 1.0)
    i = tl.minimum(x.to(tl.int32), NT - 1)
    return x, i, x - i.to(tl.float32)


@triton.jit
def _table_rows(d_safe, ok, table, inv_h, NT, G, GP: tl.constexpr):
    """Each distance's position ``t`` in its grid interval, the pointers ``[E, GP]`` to the
    interval's first table row (value; ``+ G`` its slope, ``+ 2 G`` and ``+ 3 G`` the next grid
    point's), and their mask."""
    offs_g = tl.arange(0, GP)
    _, i, t = _table_point(d_safe, inv_h, NT)
    base = table + i.to(tl.int64)[:, None] * (2 * G) + offs_g[None, :]
    return t, base, ok[:, None] & (offs_g < G)[None, :]


@triton.jit
def _radial_from_table(d_safe, ok, table, inv_h, NT, G, GP: tl.constexpr):
    """``rbf(d) @ w_radial`` ``[E, GP]`` as the cubic Hermite interpolation of ``table``
    (``function.radial_table``: per grid point ``d = g h`` the value and ``h`` times the
    derivative, ``[NT + 1, 2, G]``): four row gathers from L2 instead of ``R`` exponentials and
    an ``[E, R] @ [R, G]`` product."""
    t, base, m2 = _table_rows(d_safe, ok, table, inv_h, NT, G, GP)
    t2 = t * t
    t3 = t2 * t
    acc = (2.0 * t3 - 3.0 * t2 + 1.0)[:, None] * tl.load(base, mask=m2, other=0.0)
    acc += (t3 - 2.0 * t2 + t)[:, None] * tl.load(base + G, mask=m2, other=0.0)
    acc += (3.0 * t2 - 2.0 * t3)[:, None] * tl.load(base + 2 * G, mask=m2, other=0.0)
    acc += (t3 - t2)[:, None] * tl.load(base + 3 * G, mask=m2, other=0.0)
    return acc


@triton.jit
def _radial_slope_dot(dpre, d_safe, ok, table, inv_h, NT, G, GP: tl.constexpr):
    """``sum_g dpre[:, g] dT_g(d)/dd`` ``[E]``: the radial layer's part of ``dL/dd``, the
    derivative of ``_radial_from_table``'s interpolant (its rows read again, L2 hits: holding
    the four ``[E, GP]`` tiles from the value's evaluation costs more registers)."""
    t, base, m2 = _table_rows(d_safe, ok, table, inv_h, NT, G, GP)
    t2 = t * t
    # d/dt of the four Hermite weights; the two value terms share theirs up to the sign
    dv = tl.sum(dpre * (tl.load(base + 2 * G, mask=m2, other=0.0) - tl.load(base, mask=m2, other=0.0)), axis=1)
    s0 = tl.sum(dpre * tl.load(base + G, mask=m2, other=0.0), axis=1)
    s1 = tl.sum(dpre * tl.load(base + 3 * G, mask=m2, other=0.0), axis=1)
    return ((6.0 * t - 6.0 * t2) * dv + (3.0 * t2 - 4.0 * t + 1.0) * s0 + (3.0 * t2 - 2.0 * t) * s1) * inv_h


@triton.jit
def _float64(hi, lo):
    """A float64 scalar passed as two float32 numbers ``hi + lo`` (Triton passes Python floats
    as float32; ``function._float_pair`` splits them)."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def radial_table_kernel(centers, w_radial, table, P, R, G, gamma_hi, gamma_lo, h_hi, h_lo,
                        BP: tl.constexpr, BG: tl.constexpr, RC: tl.constexpr):
    """``table[p] = (rbf(p h) @ w_radial, h d/dd rbf(p h) @ w_radial)`` for the grid points
    ``p`` of ``BP`` rows and the hidden units of ``BG`` columns: float64 Gaussians of ``RC``
    basis functions a step and float64 products (DMMA on sm_80+; the table's float32 rounding is
    then its only error), stored as float32 ``[P, 2, G]``. ``gamma`` and ``h`` come as float32
    pairs ``hi + lo`` (Triton passes Python floats as float32: ``gamma`` rounded so would shift
    the Gaussians' tails by ~1e-6)."""
    offs_p = tl.program_id(0) * BP + tl.arange(0, BP)
    offs_g = tl.program_id(1) * BG + tl.arange(0, BG)
    gmask = offs_g < G
    gamma = _float64(gamma_hi, gamma_lo)
    h = _float64(h_hi, h_lo)
    x = offs_p.to(tl.float64) * h
    value = tl.zeros([BP, BG], dtype=tl.float64)
    slope = tl.zeros([BP, BG], dtype=tl.float64)
    for r0 in range(0, R, RC):
        offs_r = r0 + tl.arange(0, RC)
        rmask = offs_r < R
        diff = x[:, None] - tl.load(centers + offs_r, mask=rmask, other=0.0).to(tl.float64)[None, :]
        rbf = tl.where(rmask[None, :], tl.exp(-gamma * diff * diff), 0.0)
        w = tl.load(w_radial + offs_r[:, None] * G + offs_g[None, :], mask=rmask[:, None] & gmask[None, :],
                    other=0.0).to(tl.float64)
        value = tl.dot(rbf, w, value, out_dtype=tl.float64)
        slope = tl.dot(rbf * diff, w, slope, out_dtype=tl.float64)
    mask = (offs_p < P)[:, None] & gmask[None, :]
    row = table + offs_p.to(tl.int64)[:, None] * (2 * G) + offs_g[None, :]
    tl.store(row, value.to(tl.float32), mask=mask)
    tl.store(row + G, (slope * (-2.0 * gamma * h)).to(tl.float32), mask=mask)


@triton.jit
def radial_table_backward_kernel(centers, w_radial, dtable, dw_part, dc_part, P, R, G, PB,
                                 gamma_hi, gamma_lo, h_hi, h_lo,
                                 BR: tl.constexpr, BG: tl.constexpr, BP: tl.constexpr):
    """The gradients of ``sum(dtable * table)`` (``radial_table_kernel``'s table) with respect to
    ``w_radial`` and ``centers`` over the grid points ``PB k .. PB (k + 1) - 1`` (program axis 2)
    for ``BR`` basis functions and ``BG`` hidden units: with ``a = rbf(p h)`` and
    ``b = -2 gamma h (p h - c) a``, ``dw += a^T dT0 + b^T dT1`` and
    ``dc += sum_p a (2 gamma (p h - c) S0 - 2 gamma h (2 gamma (p h - c)^2 - 1) S1)``,
    ``S = dT w^T``. Float64 Gaussians and products (DMMA); per-block partial sums (``dw_part
    [k, R, G]``, ``dc_part [k, G block, R]``) that the caller adds in a fixed order."""
    pid_r, pid_g, pid_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_r = pid_r * BR + tl.arange(0, BR)
    offs_g = pid_g * BG + tl.arange(0, BG)
    rmask = offs_r < R
    gmask = offs_g < G
    gamma = _float64(gamma_hi, gamma_lo)
    h = _float64(h_hi, h_lo)
    mu = tl.load(centers + offs_r, mask=rmask, other=0.0).to(tl.float64)
    w = tl.load(w_radial + offs_r[:, None] * G + offs_g[None, :], mask=rmask[:, None] & gmask[None, :],
                other=0.0).to(tl.float64)
    acc_w = tl.zeros([BR, BG], dtype=tl.float64)
    acc_c = tl.zeros([BR], dtype=tl.float64)
    p_end = tl.minimum(pid_p * PB + PB, P)
    for p0 in range(pid_p * PB, p_end, BP):
        offs_p = p0 + tl.arange(0, BP)
        pmask = offs_p < p_end
        diff = offs_p.to(tl.float64)[None, :] * h - mu[:, None]  # [BR, BP]
        a = tl.where(rmask[:, None] & pmask[None, :], tl.exp(-gamma * diff * diff), 0.0)
        b = a * diff * (-2.0 * gamma * h)
        rows = dtable + offs_p.to(tl.int64)[:, None] * (2 * G) + offs_g[None, :]
        m2 = pmask[:, None] & gmask[None, :]
        d0 = tl.load(rows, mask=m2, other=0.0).to(tl.float64)  # [BP, BG]
        d1 = tl.load(rows + G, mask=m2, other=0.0).to(tl.float64)
        acc_w = tl.dot(a, d0, acc_w, out_dtype=tl.float64)
        acc_w = tl.dot(b, d1, acc_w, out_dtype=tl.float64)
        s0 = tl.dot(w, tl.trans(d0), out_dtype=tl.float64)  # [BR, BP]
        s1 = tl.dot(w, tl.trans(d1), out_dtype=tl.float64)
        acc_c += tl.sum(a * (s0 * (2.0 * gamma) * diff + s1 * (-2.0 * gamma * h) * (2.0 * gamma * diff * diff - 1.0)),
                        axis=1)
    tl.store(dw_part + (pid_p * R + offs_r[:, None]).to(tl.int64) * G + offs_g[None, :], acc_w,
             mask=rmask[:, None] & gmask[None, :])
    tl.store(dc_part + (pid_p * tl.num_programs(1) + pid_g) * R + offs_r, acc_c, mask=rmask)


@triton.jit
def _out_weights(w_out, offs_h, hmask, H, G, GP: tl.constexpr):
    """The ``[GP, HC]`` column tiles of the gate output layer for the heads offs_h: g's, u's."""
    offs_g = tl.arange(0, GP)
    wmask = (offs_g < G)[:, None] & hmask[None, :]
    wg = tl.load(w_out + offs_g[:, None] * (2 * H) + offs_h[None, :], mask=wmask, other=0.0)
    wu = tl.load(w_out + offs_g[:, None] * (2 * H) + H + offs_h[None, :], mask=wmask, other=0.0)
    return wg, wu


@triton.jit
def _gates(hid, w_out, b_out, offs_h, hmask, H, G, GP: tl.constexpr, PREC: tl.constexpr):
    """g and u ([E, HC]) for the heads offs_h."""
    wg, wu = _out_weights(w_out, offs_h, hmask, H, G, GP)
    g = tl.dot(hid, wg, input_precision=PREC) + tl.load(b_out + offs_h, mask=hmask, other=0.0)[None, :]
    u = tl.dot(hid, wu, input_precision=PREC) + tl.load(b_out + H + offs_h, mask=hmask, other=0.0)[None, :]
    return g, u


@triton.jit
def _split4(x):
    """[E, HC] -> four [E, HC/4]: the columns 0 (mod 4), 2 (mod 4), 1 (mod 4), 3 (mod 4)."""
    E: tl.constexpr = x.shape[0]
    HC: tl.constexpr = x.shape[1]
    a, b = tl.split(tl.reshape(x, (E, HC // 2, 2)))
    a0, a1 = tl.split(tl.reshape(a, (E, HC // 4, 2)))
    b0, b1 = tl.split(tl.reshape(b, (E, HC // 4, 2)))
    return a0, a1, b0, b1


@triton.jit
def _halves(x):
    """[E, C] -> the first and the second C/2 columns."""
    E: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.split(tl.permute(tl.reshape(x, (E, 2, C // 2)), (0, 2, 1)))


@triton.jit
def _split2(x):
    """[E, C] -> the even and the odd columns."""
    E: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.split(tl.reshape(x, (E, C // 2, 2)))


@triton.jit
def _value_tile(base, rows, rmask, hh, hm, H, DV: tl.constexpr, DVP: tl.constexpr, VS: tl.constexpr = 0):
    """[E, HA, DVP] float32 tile of a [*, H, DV] tensor with head stride ``VS`` (0: ``DV``):
    rows x heads hh x all DV numbers, zero beyond DV.

    With padded head rows (``VS >= DVP``) the load is not masked along the row, so it
    vectorises to 16-byte accesses (rows of 58 numbers allow 8 bytes at best); the padding is
    read and then replaced by zeros (it may hold anything).
    """
    STRIDE: tl.constexpr = DV if VS == 0 else VS
    offs_d = tl.arange(0, DVP)
    ptr = base + rows[:, None, None] * (H * STRIDE) + hh[None, :, None] * STRIDE + offs_d[None, None, :]
    if STRIDE >= DVP:
        x = tl.load(ptr, mask=rmask[:, None, None] & hm[None, :, None], other=0.0).to(tl.float32)
        return tl.where((offs_d < DV)[None, None, :], x, 0.0)
    mask = rmask[:, None, None] & hm[None, :, None] & (offs_d < DV)[None, None, :]
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _value_rows(base, rows, rmask, hbase, H, HA: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                VS: tl.constexpr = 0):
    """[E, HA, DVP] float32 tile of a [*, H, DV] tensor with head stride ``VS`` (0: ``DV``) for
    the contiguous heads ``hbase .. hbase + HA - 1``, zero beyond DV.

    Loaded as one ``[E, HA * DVP]`` block a row, so the compiler spreads threads and warps
    along the row (the warps own heads) and keeps all edges of a thread's columns in that
    thread: a sum over edges needs no shared memory. The reshape to heads keeps that
    distribution. Padded rows (``VS == DVP``) are one contiguous block, read unmasked along
    the row in 16-byte vectors and the padding replaced by zeros.
    """
    STRIDE: tl.constexpr = DV if VS == 0 else VS
    offs = tl.arange(0, HA * DVP)
    if STRIDE == DVP:
        ptr = base + rows[:, None] * (H * DVP) + hbase * DVP + offs[None, :]
        x = tl.load(ptr, mask=rmask[:, None] & (offs < (H - hbase) * DVP)[None, :], other=0.0).to(tl.float32)
        x = tl.reshape(x, (rows.shape[0], HA, DVP))
        return tl.where((tl.arange(0, DVP) < DV)[None, None, :], x, 0.0)
    col = offs % DVP
    head = hbase + offs // DVP
    ptr = base + rows[:, None] * (H * STRIDE) + head[None, :] * STRIDE + col[None, :]
    x = tl.load(ptr, mask=rmask[:, None] & ((head < H) & (col < DV))[None, :], other=0.0).to(tl.float32)
    return tl.reshape(x, (rows.shape[0], HA, DVP))


@triton.jit
def _group_tile(base, rows, rmask, hbase, hh, hm, H, HA: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                VS: tl.constexpr, STEP: tl.constexpr):
    """The ``[E, HA, DVP]`` tile of the heads ``hh = hbase + STEP a``: contiguous heads
    (``STEP == 1``) as whole rows (``_value_rows``), strided ones head by head (``_value_tile``)."""
    if STEP == 1:
        return _value_rows(base, rows, rmask, hbase, H, HA, DV, DVP, VS)
    return _value_tile(base, rows, rmask, hh, hm, H, DV, DVP, VS)


@triton.jit
def _slots(nbr, i, N, K, BK: tl.constexpr):
    """Neighbour slots of target ``i`` (none for ``i >= N``): source rows (0 where empty) and the valid mask."""
    # bounds folded into the limit (tl.where(i < N, ...)) rather than `mask & (i < N)`: the
    # Triton 3.9 interpreter mistypes a tensor mask and-ed with a scalar boolean
    slot = tl.arange(0, BK)
    j = tl.load(nbr + i * K + slot, mask=slot < tl.where(i < N, K, 0), other=-1)
    ok = j >= 0
    return _row_index(j, ok), ok


@triton.jit
def _row_index(j, ok):
    """Row indices (0 where not ``ok``) as int64 known to fit 32 bits: ``row * stride`` then
    compiles to 32x32->64-bit multiplies (fewer registers: 168 -> 152 a thread in the HC = 8
    forward)."""
    return tl.where(ok, j, 0).to(tl.int32).to(tl.int64)


@triton.jit
def _target_rows(x, t, TB: tl.constexpr):
    """The ``BK`` rows of target ``t`` of an edge tile ``[TB * BK, C]``, as ``[BK, C]``."""
    if TB == 1:
        rows = x
    else:
        # a masked sum over the target axis: register tensors cannot be sliced
        BK: tl.constexpr = x.shape[0] // TB
        C: tl.constexpr = x.shape[1]
        x3 = tl.reshape(x, (TB, BK, C))
        rows = tl.sum(tl.where((tl.arange(0, TB) == t)[:, None, None], x3, 0.0), axis=0)
    return rows


@triton.jit
def _fwd_qk(q, k, nbr, t0, N, K, H, offs_h, hmask, inv_sqrt_dk, DK: tl.constexpr, DKP: tl.constexpr,
            TB: tl.constexpr, BK: tl.constexpr):
    """Scaled q.k ``[TB * BK, HC]`` of the targets ``t0 ..`` and their slots for the heads ``offs_h``.

    One target's key tile ``[BK, HC, DKP]`` is live at a time (registers as with ``TB = 1``),
    and the targets' key gathers run back-to-back (shared neighbour rows hit L1).
    """
    HC: tl.constexpr = offs_h.shape[0]
    offs_k = tl.arange(0, DKP)
    hk = offs_h[:, None] * DK + offs_k[None, :]
    qm = hmask[:, None] & (offs_k < DK)[None, :]
    qk = tl.zeros([TB, BK, HC], dtype=tl.float32)
    for t in tl.static_range(TB):
        i = t0 + t
        src, ok = _slots(nbr, i, N, K, BK)
        qi = tl.load(q + i * (H * DK) + hk, mask=(offs_h < tl.where(i < N, H, 0))[:, None] & (offs_k < DK)[None, :],
                     other=0.0).to(tl.float32)
        kj = tl.load(k + src[:, None, None] * (H * DK) + hk[None, :, :], mask=ok[:, None, None] & qm[None, :, :],
                     other=0.0).to(tl.float32)
        qk_t = tl.sum(kj * qi[None, :, :], axis=2) * inv_sqrt_dk
        qk = tl.where((tl.arange(0, TB) == t)[:, None, None], qk_t[None, :, :], qk)
    return tl.reshape(qk, (TB * BK, HC))


@triton.jit
def _fwd_group(v, out, nbr, w, t0, N, K, hbase, H, DV: tl.constexpr, DVP: tl.constexpr, VS: tl.constexpr,
               AGG: tl.constexpr, STEP: tl.constexpr, TB: tl.constexpr):
    """``out`` of the targets ``t0 ..`` for the heads ``hbase + STEP a`` from their weights ``w [TB * BK, HA]``.

    The targets' value gathers run back-to-back, so a neighbour row shared by consecutive
    targets is read from L2 once and then hit in L1.
    """
    BK: tl.constexpr = w.shape[0] // TB
    HA: tl.constexpr = w.shape[1]
    hh = hbase + STEP * tl.arange(0, HA)
    hm = hh < H
    offs_d = tl.arange(0, DVP)
    for t in tl.static_range(TB):
        i = t0 + t
        src, ok = _slots(nbr, i, N, K, BK)
        if AGG:
            vt = _group_tile(v, src, ok, hbase, hh, hm, H, HA, DV, DVP, VS, STEP)
        else:
            vt = tl.zeros([BK, HA, DVP], dtype=tl.float32) + src[:, None, None].to(tl.float32)
        o = tl.sum(_target_rows(w, t, TB)[:, :, None] * vt, axis=0)
        tl.store(out + i * (H * DV) + hh[:, None] * DV + offs_d[None, :], o,
                 mask=(hh < tl.where(i < N, H, 0))[:, None] & (offs_d < DV)[None, :])


@triton.jit(do_not_specialize=["N"])
def fwd_kernel(pos_dst, pos_src, nbr, q, k, v, gate_dst, gate_src, radial, w_out, b_out,
               out, m_out, s_out,
               N, K, H, G, NT, inv_h, cutoff, eps, inv_sqrt_dk,
               DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, HC: tl.constexpr,
               DKP: tl.constexpr, DVP: tl.constexpr, GP: tl.constexpr,
               PREC: tl.constexpr, VS: tl.constexpr = 0, TB: tl.constexpr = 1, GROUPS: tl.constexpr = 4, GATE: tl.constexpr = True,
               AGG: tl.constexpr = True):
    # TB (1, 2 or 4): consecutive targets per program (grid cdiv(N, TB)); edge row
    # e = t * BK + slot belongs to target t0 + t.
    # GROUPS (2, 4 or 8): head groups a chunk's values move in (module docstring).
    # GATE / AGG: profiling switches (False skips the gate's radial part and products / the value
    # gathers); the library always runs with both on.
    E: tl.constexpr = TB * BK
    t0 = tl.program_id(0).to(tl.int64) * TB
    edge = tl.arange(0, E)
    tgt = t0 + edge // BK
    slot = edge % BK
    j = tl.load(nbr + tgt * K + slot, mask=(slot < K) & (tgt < N), other=-1)
    ok = j >= 0
    src = _row_index(j, ok)
    dx, dy, dz, d_safe, x, env, inv_d, inside, live = _geometry(pos_dst, pos_src, tgt, src, ok, cutoff)
    if GATE:
        pre = _node_gates(_radial_from_table(d_safe, ok, radial, inv_h, NT, G, GP), tgt, src, ok, gate_dst, gate_src,
                          G, GP)
    else:
        pre = tl.zeros([E, GP], dtype=tl.float32) + d_safe[:, None]
    hid = pre * tl.sigmoid(pre)
    env_t = tl.reshape(env, (TB, BK))
    inv_d_t = tl.reshape(inv_d, (TB, BK))
    rows = t0 + tl.arange(0, TB)
    for h0 in range(0, H, HC):
        offs_h = h0 + tl.arange(0, HC)
        hmask = offs_h < H
        g, u = _gates(hid, w_out, b_out, offs_h, hmask, H, G, GP, PREC)
        qk = _fwd_qk(q, k, nbr, t0, N, K, H, offs_h, hmask, inv_sqrt_dk, DK, DKP, TB, BK)
        lv = live[:, None] & hmask[None, :]
        # [TB, BK, HC]: each target's softmax reduces over its own BK slots
        logit = tl.reshape(tl.where(lv, g * qk, float("-inf")), (TB, BK, HC))
        mx = tl.maximum(tl.max(logit, axis=1), 0.0)  # [TB, HC]; 0 is the sink logit
        p = env_t[:, :, None] * tl.exp(logit - mx[:, None, :])
        s = eps * tl.exp(-mx) + tl.sum(p, axis=1)
        w = tl.reshape(tl.reshape(u, (TB, BK, HC)) * p * inv_d_t[:, :, None] / s[:, None, :], (E, HC))
        stat = rows[:, None] * H + offs_h[None, :]
        stat_mask = (rows < N)[:, None] & hmask[None, :]
        tl.store(m_out + stat, mx, mask=stat_mask)
        tl.store(s_out + stat, s, mask=stat_mask)
        if GROUPS == 2:
            # heads h0 .. h0 + HC/2 - 1 contiguous in one tile: the compiler can then give each
            # warp its own heads, so the sum over edges stays inside a thread
            wa, wb = _halves(w)
            _fwd_group(v, out, nbr, wa, t0, N, K, h0, H, DV, DVP, VS, AGG, 1, TB)
            _fwd_group(v, out, nbr, wb, t0, N, K, h0 + HC // 2, H, DV, DVP, VS, AGG, 1, TB)
        elif GROUPS == 4:
            w0, w2, w1, w3 = _split4(w)
            _fwd_group(v, out, nbr, w0, t0, N, K, h0 + 0, H, DV, DVP, VS, AGG, 4, TB)
            _fwd_group(v, out, nbr, w1, t0, N, K, h0 + 1, H, DV, DVP, VS, AGG, 4, TB)
            _fwd_group(v, out, nbr, w2, t0, N, K, h0 + 2, H, DV, DVP, VS, AGG, 4, TB)
            _fwd_group(v, out, nbr, w3, t0, N, K, h0 + 3, H, DV, DVP, VS, AGG, 4, TB)
        elif GROUPS == 8:
            # heads h0 + r + 8 a: w0 -> r = 0, 4; w2 -> 2, 6; w1 -> 1, 5; w3 -> 3, 7
            w0, w2, w1, w3 = _split4(w)
            wa, wb = _split2(w0)
            _fwd_group(v, out, nbr, wa, t0, N, K, h0 + 0, H, DV, DVP, VS, AGG, 8, TB)
            _fwd_group(v, out, nbr, wb, t0, N, K, h0 + 4, H, DV, DVP, VS, AGG, 8, TB)
            wa, wb = _split2(w2)
            _fwd_group(v, out, nbr, wa, t0, N, K, h0 + 2, H, DV, DVP, VS, AGG, 8, TB)
            _fwd_group(v, out, nbr, wb, t0, N, K, h0 + 6, H, DV, DVP, VS, AGG, 8, TB)
            wa, wb = _split2(w1)
            _fwd_group(v, out, nbr, wa, t0, N, K, h0 + 1, H, DV, DVP, VS, AGG, 8, TB)
            _fwd_group(v, out, nbr, wb, t0, N, K, h0 + 5, H, DV, DVP, VS, AGG, 8, TB)
            wa, wb = _split2(w3)
            _fwd_group(v, out, nbr, wa, t0, N, K, h0 + 3, H, DV, DVP, VS, AGG, 8, TB)
            _fwd_group(v, out, nbr, wb, t0, N, K, h0 + 7, H, DV, DVP, VS, AGG, 8, TB)


@triton.jit
def _edge_tile(nbr, T0, N, K, BK: tl.constexpr, TB: tl.constexpr):
    """The ``TB * BK`` edge rows of the targets ``T0 + program id * TB ..`` (those below ``N``):
    target, whether the slot exists (``keep``), source row (0 where empty), whether the slot
    holds an edge (``ok``), and the stash row ``(target - T0) K + slot``."""
    t0 = T0 + tl.program_id(0).to(tl.int64) * TB
    edge = tl.arange(0, TB * BK)
    tgt = t0 + edge // BK
    slot = edge % BK
    keep = (slot < K) & (tgt < N)
    j = tl.load(nbr + tgt * K + slot, mask=keep, other=-1)
    ok = j >= 0
    return tgt, keep, _row_index(j, ok), ok, (tgt - T0) * K + slot


@triton.jit
def _gate_hidden(d_safe, tgt, src, ok, table, inv_h, NT, gate_dst, gate_src, G, GP: tl.constexpr):
    """The gate's hidden layer ``SiLU(pre)`` of an edge tile, its radial part from the table."""
    pre = _node_gates(_radial_from_table(d_safe, ok, table, inv_h, NT, G, GP), tgt, src, ok, gate_dst, gate_src, G, GP)
    return pre * tl.sigmoid(pre)


@triton.jit
def _edge_qk(q, k, tgt, src, ok, H, offs_h, hmask, inv_sqrt_dk, DK: tl.constexpr, DKP: tl.constexpr):
    """Scaled q.k ``[E, HC]`` of every edge row for the heads ``offs_h`` (the target's query row
    is read once per edge: the rows of one target hit L1)."""
    offs_k = tl.arange(0, DKP)
    hk = offs_h[:, None] * DK + offs_k[None, :]
    m3 = ok[:, None, None] & (hmask[:, None] & (offs_k < DK)[None, :])[None, :, :]
    qi = tl.load(q + tgt[:, None, None] * (H * DK) + hk[None, :, :], mask=m3, other=0.0).to(tl.float32)
    kj = tl.load(k + src[:, None, None] * (H * DK) + hk[None, :, :], mask=m3, other=0.0).to(tl.float32)
    return tl.sum(qi * kj, axis=2) * inv_sqrt_dk


@triton.jit(do_not_specialize=["N", "T0"])
def fwd_logit_kernel(pos_dst, pos_src, nbr, q, k, gate_dst, gate_src, radial, w_out, b_out,
                     logit_edge, coef_edge, env_edge,
                     T0, N, K, H, G, NT, inv_h, cutoff, inv_sqrt_dk,
                     DK: tl.constexpr, BK: tl.constexpr, HC: tl.constexpr, DKP: tl.constexpr, GP: tl.constexpr,
                     PREC: tl.constexpr, TB: tl.constexpr = 1):
    tgt, keep, src, ok, row = _edge_tile(nbr, T0, N, K, BK, TB)
    dx, dy, dz, d_safe, x, env, inv_d, inside, live = _geometry(pos_dst, pos_src, tgt, src, ok, cutoff)
    hid = _gate_hidden(d_safe, tgt, src, ok, radial, inv_h, NT, gate_dst, gate_src, G, GP)
    tl.store(env_edge + row, tl.where(live, env, 0.0), mask=keep)
    for h0 in range(0, H, HC):
        offs_h = h0 + tl.arange(0, HC)
        hmask = offs_h < H
        g, u = _gates(hid, w_out, b_out, offs_h, hmask, H, G, GP, PREC)
        qk = _edge_qk(q, k, tgt, src, ok, H, offs_h, hmask, inv_sqrt_dk, DK, DKP)
        at = row[:, None] * H + offs_h[None, :]
        m2 = keep[:, None] & hmask[None, :]
        tl.store(logit_edge + at, tl.where(live[:, None], g * qk, float("-inf")), mask=m2)
        tl.store(coef_edge + at, u * inv_d[:, None], mask=m2)


@triton.jit
def _head_rows(base, row, hh, hm, H, DV: tl.constexpr, DVP: tl.constexpr, VS: tl.constexpr):
    """The ``[HB, DVP]`` float32 rows of the heads ``hh`` (where ``hm``) of row ``row`` of a
    ``[*, H, DV]`` tensor with head stride ``VS`` (0: ``DV``), as the one-warp kernels walk them.

    Padded rows (``VS >= DVP``) are read whole, in 16-byte vectors, padding included: it may
    hold anything, so a caller zeroes it or keeps it out of the columns it stores.
    """
    STRIDE: tl.constexpr = DV if VS == 0 else VS
    offs_d = tl.arange(0, DVP)
    mask = hm[:, None] & (offs_d < (DVP if STRIDE >= DVP else DV))[None, :]
    return tl.load(base + row * (H * STRIDE) + hh[:, None] * STRIDE + offs_d[None, :], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _stash_loads(logit_edge, coef_edge, env_edge, row, hh, hm, H):
    """Stash row ``row`` of the split forward for the heads ``hh``: logit, ``u / d``, envelope
    (issued before the slot's value rows, so that their latencies overlap)."""
    lg = tl.load(logit_edge + row * H + hh, mask=hm, other=float("-inf"))
    c = tl.load(coef_edge + row * H + hh, mask=hm, other=0.0)
    return lg, c, tl.load(env_edge + row)


@triton.jit
def _stash_max(logit_edge, row0, K, hh, hm, H, SB: tl.constexpr):
    """The softmax's max for the heads ``hh`` of the ``K`` stash rows from ``row0``: the largest
    logit, the sink's 0 included. Read ``SB`` slots at a time (the loads in flight together),
    so the walk after it weighs every slot exactly and never rescales its sums."""
    mx = tl.zeros_like(hh).to(tl.float32)
    slot = tl.arange(0, SB)
    for s0 in range(0, K, SB):
        at = row0 + s0 + slot
        lg = tl.load(logit_edge + at[:, None] * H + hh[None, :], mask=((s0 + slot) < K)[:, None] & hm[None, :],
                     other=float("-inf"))
        mx = tl.maximum(mx, tl.max(lg, axis=0))
    return mx


@triton.jit
def _softmax_term(mx, lg, c, env):
    """A slot's share of the softmax's denominator, ``env exp(logit - m)``, and its weight
    ``env exp(logit - m) u / d`` (a head each; 0 for an empty slot, whose logit is -inf)."""
    p = env * tl.exp(lg - mx)
    return p, p * c


@triton.jit(do_not_specialize=["T0"])
def fwd_aggregate_kernel(nbr, v, logit_edge, coef_edge, env_edge, out, m_out, s_out,
                         T0, K, H, eps,
                         DV: tl.constexpr, DVP: tl.constexpr, VS: tl.constexpr, HB: tl.constexpr,
                         SB: tl.constexpr = 8):
    # target T0 + program id 0, heads program id 1 * HB ..: the softmax's max first (the sink's
    # logit 0 included), then one walk over the slots summing the denominator (from the sink's
    # eps exp(-m)) and the weighted value rows, every sum inside a thread
    i = T0 + tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * HB + tl.arange(0, HB)
    hm = hh < H
    offs_d = tl.arange(0, DVP)
    dmask = offs_d < DV
    mx = _stash_max(logit_edge, (i - T0) * K, K, hh, hm, H, SB)
    s = eps * tl.exp(-mx)
    acc = tl.zeros([HB, DVP], dtype=tl.float32)
    for slot in range(K):
        lg, c, env = _stash_loads(logit_edge, coef_edge, env_edge, (i - T0) * K + slot, hh, hm, H)
        # the padding of the value rows only reaches columns that are never stored
        j = tl.load(nbr + i * K + slot)
        vt = _head_rows(v, tl.where(j >= 0, j, 0).to(tl.int64), hh, hh < tl.where(j >= 0, H, 0), H, DV, DVP, VS)
        p, w = _softmax_term(mx, lg, c, env)
        s += p
        acc += w[:, None] * vt
    stat = i * H + hh
    tl.store(m_out + stat, mx, mask=hm)
    tl.store(s_out + stat, s, mask=hm)
    tl.store(out + i * (H * DV) + hh[:, None] * DV + offs_d[None, :], acc / s[:, None],
             mask=hm[:, None] & dmask[None, :])


@triton.jit
def _moment_tiles(base, hh, hm, DV: tl.constexpr, DA: tl.constexpr, DBP: tl.constexpr):
    """The head rows ``base + hh[:, None] * stride`` (rows of ``DV`` numbers from ``base``) as two
    float32 column tiles, ``[HB, DA]`` (``DA`` the largest power of two <= ``DV``) and the rest,
    ``[HB, DBP]`` zero beyond ``DV``: no register holds padding (18 numbers: 16 + 2, not 32)."""
    ca = tl.arange(0, DA)
    cb = DA + tl.arange(0, DBP)
    a = tl.load(base + ca[None, :], mask=hm[:, None], other=0.0).to(tl.float32)
    b = tl.load(base + cb[None, :], mask=hm[:, None] & (cb < DV)[None, :], other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _store_moment_tiles(base, a, b, hm, DV: tl.constexpr, DA: tl.constexpr, DBP: tl.constexpr):
    """Stores ``_moment_tiles``' two tiles back as rows of ``DV`` numbers from ``base``."""
    ca = tl.arange(0, DA)
    cb = DA + tl.arange(0, DBP)
    tl.store(base + ca[None, :], a, mask=hm[:, None])
    tl.store(base + cb[None, :], b, mask=hm[:, None] & (cb < DV)[None, :])


@triton.jit(do_not_specialize=["T0"])
def fwd_moment_kernel(nbr, pos_dst, pos_src, v, logit_edge, coef_edge, env_edge, out, m_out, s_out,
                      T0, K, H, eps,
                      DV: tl.constexpr, DA: tl.constexpr, DBP: tl.constexpr, VS: tl.constexpr, HB: tl.constexpr,
                      SB: tl.constexpr = 8):
    # fwd_aggregate_kernel for the moments (CoreInputs.moments): each edge's value row also
    # weighted by the displacement r = pos_dst[i] - pos_src[j], three sums (x, y, z) a head
    # into out[i, h, a DV + d]; the rows in _moment_tiles' two tiles
    i = T0 + tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * HB + tl.arange(0, HB)
    hm = hh < H
    STRIDE: tl.constexpr = DV if VS == 0 else VS
    px = tl.load(pos_dst + i * 3)
    py = tl.load(pos_dst + i * 3 + 1)
    pz = tl.load(pos_dst + i * 3 + 2)
    mx = _stash_max(logit_edge, (i - T0) * K, K, hh, hm, H, SB)
    s = eps * tl.exp(-mx)
    xa = tl.zeros([HB, DA], dtype=tl.float32)
    ya = tl.zeros([HB, DA], dtype=tl.float32)
    za = tl.zeros([HB, DA], dtype=tl.float32)
    xb = tl.zeros([HB, DBP], dtype=tl.float32)
    yb = tl.zeros([HB, DBP], dtype=tl.float32)
    zb = tl.zeros([HB, DBP], dtype=tl.float32)
    for slot in range(K):
        lg, c, env = _stash_loads(logit_edge, coef_edge, env_edge, (i - T0) * K + slot, hh, hm, H)
        # an empty slot reads source 0 with weight exactly 0 (logit -inf)
        j = tl.load(nbr + i * K + slot)
        j = tl.where(j >= 0, j, 0).to(tl.int64)
        rx = px - tl.load(pos_src + j * 3)
        ry = py - tl.load(pos_src + j * 3 + 1)
        rz = pz - tl.load(pos_src + j * 3 + 2)
        va, vb = _moment_tiles(v + j * (H * STRIDE) + hh[:, None] * STRIDE, hh, hm, DV, DA, DBP)
        p, w = _softmax_term(mx, lg, c, env)
        s += p
        wx = (w * rx)[:, None]
        wy = (w * ry)[:, None]
        wz = (w * rz)[:, None]
        xa += wx * va
        ya += wy * va
        za += wz * va
        xb += wx * vb
        yb += wy * vb
        zb += wz * vb
    stat = i * H + hh
    tl.store(m_out + stat, mx, mask=hm)
    tl.store(s_out + stat, s, mask=hm)
    inv = (1.0 / s)[:, None]
    o = out + i * (H * 3 * DV) + hh[:, None] * (3 * DV)
    _store_moment_tiles(o, xa * inv, xb * inv, hm, DV, DA, DBP)
    _store_moment_tiles(o + DV, ya * inv, yb * inv, hm, DV, DA, DBP)
    _store_moment_tiles(o + 2 * DV, za * inv, zb * inv, hm, DV, DA, DBP)


@triton.jit(do_not_specialize=["N", "T0"])
def bwd_edge_kernel(pos_dst, pos_src, nbr, q, k, gate_dst, gate_src, radial, qk_edge, gate_edge,
                    T0, N, K, H, G, NT, SW, inv_h, cutoff, inv_sqrt_dk,
                    DK: tl.constexpr, BK: tl.constexpr, HC: tl.constexpr, DKP: tl.constexpr, GP: tl.constexpr,
                    TB: tl.constexpr = 1):
    # fwd_logit_kernel's tiles, stashing the logit's and the coefficient's factors but the gate
    # outputs: q.k per edge and head into qk_edge, the gate's hidden layer after the first 2 H
    # numbers of the edge's gate_edge row (function's product then writes g and u there)
    tgt, keep, src, ok, row = _edge_tile(nbr, T0, N, K, BK, TB)
    dx, dy, dz, d_safe, x, env, inv_d, inside, live = _geometry(pos_dst, pos_src, tgt, src, ok, cutoff)
    hid = _gate_hidden(d_safe, tgt, src, ok, radial, inv_h, NT, gate_dst, gate_src, G, GP)
    offs_g = tl.arange(0, GP)
    tl.store(gate_edge + row[:, None] * SW + 2 * H + offs_g[None, :], hid, mask=keep[:, None] & (offs_g < G)[None, :])
    for h0 in range(0, H, HC):
        offs_h = h0 + tl.arange(0, HC)
        hmask = offs_h < H
        tl.store(qk_edge + row[:, None] * H + offs_h[None, :],
                 _edge_qk(q, k, tgt, src, ok, H, offs_h, hmask, inv_sqrt_dk, DK, DKP), mask=keep[:, None] & hmask[None, :])


@triton.jit
def _softmax_weight(g, qk, u, env, inv_d, live, mx, s):
    """The forward's attention weight ``w = u / d * env * e / s`` with ``e = exp(g q.k - m)``
    (0 where not ``live``), and ``e``."""
    e = tl.exp(tl.where(live, g * qk, float("-inf")) - mx)
    return u * (env * e) * inv_d / s, e


@triton.jit
def _source_in_edges(active, rowptr, A0, NC, C):
    """Source ``active[A0 + program id 0]`` of a source-major pass over target chunk ``C`` of
    ``NC`` (the transposed neighbour list, CSR by (source, chunk)): its row, and where its
    in-edges from the chunk start in ``edge_ids`` and how many there are."""
    j = tl.load(active + A0 + tl.program_id(0)).to(tl.int64)
    start = tl.load(rowptr + j * NC + C)
    return j, start, tl.load(rowptr + j * NC + C + 1) - start


@triton.jit
def _target_edges(pos_dst, pos_src, nbr, T0, K, cutoff, BK: tl.constexpr):
    """Target ``i = T0 + program id`` of a target-major backward pass and its ``BK`` slots:
    ``i``, the slots, their stash rows ``(program id) K + slot``, which hold an edge, their
    source rows, and the edges' ``_geometry``."""
    local = tl.program_id(0).to(tl.int64)
    i = T0 + local
    slot = tl.arange(0, BK)
    j = tl.load(nbr + i * K + slot, mask=slot < K, other=-1)
    ok = j >= 0
    src = _row_index(j, ok)
    tgt = tl.zeros([BK], dtype=tl.int64) + i
    dx, dy, dz, d_safe, x, env, inv_d, inside, live = _geometry(pos_dst, pos_src, tgt, src, ok, cutoff)
    return i, slot, local * K + slot, ok, src, dx, dy, dz, d_safe, x, env, inv_d, inside, live


@triton.jit
def _head_chunk(h0, slot, row, K, H, SW, HC: tl.constexpr):
    """Heads ``h0 .. h0 + HC`` of a target-major pass's slots: the heads and their mask, the
    ``[BK, HC]`` mask of real slots and heads, and the offsets of those numbers in the per-edge
    stash (rows of ``H``) and in the gate rows (rows of ``SW``)."""
    offs_h = h0 + tl.arange(0, HC)
    hmask = offs_h < H
    em = (slot < K)[:, None] & hmask[None, :]
    return offs_h, hmask, em, row[:, None] * H + offs_h[None, :], row[:, None] * SW + offs_h[None, :]


@triton.jit(do_not_specialize=["T0"])
def bwd_weight_kernel(pos_dst, pos_src, nbr, m_in, s_in, qk_edge, gate_edge, w_edge,
                      T0, K, H, SW, cutoff,
                      BK: tl.constexpr, HC: tl.constexpr):
    # target T0 + program id, its slots (stash rows (program id) K + slot) and heads HC at a
    # time: the softmax weight w from the stashed g, q.k, u and the forward's m, s (0 on a slot
    # without a live edge) into w_edge, in the target-major order the stash is written in, so
    # that the value pass, which walks the same rows source by source, reads one number an
    # edge and head instead of recomputing w from five
    i, slot, row, ok, src, dx, dy, dz, d_safe, x, env, inv_d, inside, live = _target_edges(
        pos_dst, pos_src, nbr, T0, K, cutoff, BK)
    for h0 in range(0, H, HC):
        offs_h, hmask, em, stash, gu = _head_chunk(h0, slot, row, K, H, SW, HC)
        w = _softmax_weight(tl.load(gate_edge + gu, mask=em, other=0.0),
                            tl.load(qk_edge + stash, mask=em, other=0.0),
                            tl.load(gate_edge + gu + H, mask=em, other=0.0), env[:, None], inv_d[:, None],
                            live[:, None] & hmask[None, :],
                            tl.load(m_in + i * H + offs_h, mask=hmask, other=0.0)[None, :],
                            tl.load(s_in + i * H + offs_h, mask=hmask, other=1.0)[None, :])[0]
        tl.store(w_edge + stash, w, mask=em)


@triton.jit(do_not_specialize=["A0", "C", "NC", "T0"])
def bwd_value_kernel(v, dout, rowptr, edge_ids, active, dw_edge, dv,
                     A0, K, H, C, NC, T0,
                     DV: tl.constexpr, DVP: tl.constexpr, VS: tl.constexpr, HB: tl.constexpr):
    # source j = active[A0 + program id 0], one of those with in-edges from target chunk C
    # (targets T0 ..), heads program id 1 * HB ..: in-edges (i, slot) one at a time (stash row
    # i K + slot - T0 K), the softmax weight w that bwd_weight_kernel left in dw_edge;
    # dv += w dout_i, and dw = dout_i . v_j over it. v_j stays in registers, every head's sums
    # in the threads that own its columns (as in fwd_aggregate_kernel)
    E0 = T0 * K
    j, start, count = _source_in_edges(active, rowptr, A0, NC, C)
    hh = tl.program_id(1) * HB + tl.arange(0, HB)
    hm = hh < H
    offs_d = tl.arange(0, DVP)
    dmask = (offs_d < DV)[None, :]
    vm = hm[:, None] & dmask
    # the padding of the value rows is zeroed before the products
    vj = tl.where(dmask, _head_rows(v, j, hh, hm, H, DV, DVP, VS), 0.0)
    acc = tl.zeros([HB, DVP], dtype=tl.float32)
    for c in range(count):
        eid = tl.load(edge_ids + start + c)
        at = eid - E0
        w = tl.load(dw_edge + at * H + hh, mask=hm, other=0.0)
        go = _head_rows(dout, eid // K, hh, hm, H, DV, DVP, 0)
        acc += w[:, None] * go
        dot = tl.sum(go * vj, axis=1)
        # dw goes over the w just read, which other threads may hold: every thread's loads first
        tl.debug_barrier()
        tl.store(dw_edge + at * H + hh, dot, mask=hm)
    pv = dv + j * (H * DV) + hh[:, None] * DV + offs_d[None, :]
    tl.store(pv, tl.load(pv, mask=vm, other=0.0) + acc, mask=vm)


@triton.jit(do_not_specialize=["A0", "C", "NC", "T0"])
def bwd_moment_value_kernel(pos_dst, pos_src, v, dout, rowptr, edge_ids, active, dw_edge, dv, dr_part, dps_part,
                            A0, K, H, C, NC, T0, RS,
                            DV: tl.constexpr, DA: tl.constexpr, DBP: tl.constexpr, VS: tl.constexpr,
                            HB: tl.constexpr):
    # bwd_value_kernel for the moments: over the in-edges (i, slot) of source j, with
    # r = pos_dst[i] - pos_src[j] and t_a = dout_i[a] . v_j a head (a = x, y, z): dv_j += w
    # sum_a r_a dout_i[a], dw = sum_a r_a t_a over w, and the displacement's gradient
    # sum_heads w t_a of this program's heads: per edge into dr_part[head block, stash row]
    # (rows RS apart; the targets' share, summed over the head blocks afterwards) and summed
    # over the in-edges into dps_part[j, head block] (the source's share, with a minus sign)
    E0 = T0 * K
    j, start, count = _source_in_edges(active, rowptr, A0, NC, C)
    blk = tl.program_id(1)
    hh = blk * HB + tl.arange(0, HB)
    hm = hh < H
    STRIDE: tl.constexpr = DV if VS == 0 else VS
    va, vb = _moment_tiles(v + j * (H * STRIDE) + hh[:, None] * STRIDE, hh, hm, DV, DA, DBP)
    qx = tl.load(pos_src + j * 3)
    qy = tl.load(pos_src + j * 3 + 1)
    qz = tl.load(pos_src + j * 3 + 2)
    acc_a = tl.zeros([HB, DA], dtype=tl.float32)
    acc_b = tl.zeros([HB, DBP], dtype=tl.float32)
    sx = 0.0
    sy = 0.0
    sz = 0.0
    for c in range(count):
        eid = tl.load(edge_ids + start + c)
        at = eid - E0
        i = eid // K
        rx = tl.load(pos_dst + i * 3) - qx
        ry = tl.load(pos_dst + i * 3 + 1) - qy
        rz = tl.load(pos_dst + i * 3 + 2) - qz
        w = tl.load(dw_edge + at * H + hh, mask=hm, other=0.0)
        go = dout + i * (H * 3 * DV) + hh[:, None] * (3 * DV)
        gxa, gxb = _moment_tiles(go, hh, hm, DV, DA, DBP)
        gya, gyb = _moment_tiles(go + DV, hh, hm, DV, DA, DBP)
        gza, gzb = _moment_tiles(go + 2 * DV, hh, hm, DV, DA, DBP)
        acc_a += w[:, None] * (rx * gxa + ry * gya + rz * gza)
        acc_b += w[:, None] * (rx * gxb + ry * gyb + rz * gzb)
        tx = tl.sum(gxa * va, axis=1) + tl.sum(gxb * vb, axis=1)
        ty = tl.sum(gya * va, axis=1) + tl.sum(gyb * vb, axis=1)
        tz = tl.sum(gza * va, axis=1) + tl.sum(gzb * vb, axis=1)
        ex = tl.sum(w * tx, axis=0)
        ey = tl.sum(w * ty, axis=0)
        ez = tl.sum(w * tz, axis=0)
        part = dr_part + (blk * RS + at) * 3
        tl.store(part, ex)
        tl.store(part + 1, ey)
        tl.store(part + 2, ez)
        sx += ex
        sy += ey
        sz += ez
        # dw goes over the w just read, which other threads may hold: every thread's loads first
        tl.debug_barrier()
        tl.store(dw_edge + at * H + hh, rx * tx + ry * ty + rz * tz, mask=hm)
    pv = dv + j * (H * DV) + hh[:, None] * DV
    old_a, old_b = _moment_tiles(pv, hh, hm, DV, DA, DBP)
    _store_moment_tiles(pv, old_a + acc_a, old_b + acc_b, hm, DV, DA, DBP)
    ps = dps_part + (j * tl.num_programs(1) + blk) * 3
    tl.store(ps, tl.load(ps) + sx)
    tl.store(ps + 1, tl.load(ps + 1) + sy)
    tl.store(ps + 2, tl.load(ps + 2) + sz)


@triton.jit(do_not_specialize=["T0"])
def bwd_target_kernel(pos_dst, pos_src, nbr, k, m_in, s_in,
                      dq, dd_edge, dw_edge, qk_edge, gate_edge,
                      T0, K, H, SW, cutoff, inv_sqrt_dk,
                      DK: tl.constexpr, BK: tl.constexpr, HC: tl.constexpr, DKP: tl.constexpr):
    # target T0 + program id; its edges are stash rows (program id) K + slot: from g, u, q.k
    # (bwd_edge_kernel) and dw (bwd_value_kernel; none for an empty slot) the softmax's
    # backward, written over them: dg, du over g, u, and dqk over q.k; dq, and the envelope and
    # 1/d parts of dd = dL/dd_ij. No gate products: elementwise but for the key gathers of dq
    i, slot, row, ok, src, dx, dy, dz, d_safe, x, env, inv_d, inside, live = _target_edges(
        pos_dst, pos_src, nbr, T0, K, cutoff, BK)
    offs_k = tl.arange(0, DKP)
    kmask = offs_k < DK
    denv = tl.zeros([BK], dtype=tl.float32)
    dinvd = tl.zeros([BK], dtype=tl.float32)
    for h0 in range(0, H, HC):
        offs_h, hmask, em, stash, gu = _head_chunk(h0, slot, row, K, H, SW, HC)
        g = tl.load(gate_edge + gu, mask=em, other=0.0)
        u = tl.load(gate_edge + gu + H, mask=em, other=0.0)
        qk = tl.load(qk_edge + stash, mask=em, other=0.0)
        dw = tl.load(dw_edge + stash, mask=ok[:, None] & hmask[None, :], other=0.0)
        s = tl.load(s_in + i * H + offs_h, mask=hmask, other=1.0)
        lv = live[:, None] & hmask[None, :]
        w, e = _softmax_weight(g, qk, u, env[:, None], inv_d[:, None], lv,
                               tl.load(m_in + i * H + offs_h, mask=hmask, other=0.0)[None, :], s[None, :])
        p = env[:, None] * e
        bsum = tl.sum(dw * w, axis=0)  # [HC] = dout_i . out_i
        dp = tl.where(lv, (dw * u * inv_d[:, None] - bsum[None, :]) / s[None, :], 0.0)
        dlogit = dp * p
        t = dw * p / s[None, :]
        dinvd += tl.sum(t * u, axis=1)
        denv += tl.sum(dp * e, axis=1)
        dqk = tl.where(lv, dlogit * g, 0.0) * inv_sqrt_dk
        hk = offs_h[:, None] * DK + offs_k[None, :]
        qm = hmask[:, None] & kmask[None, :]
        kj = tl.load(k + src[:, None, None] * (H * DK) + hk[None, :, :], mask=ok[:, None, None] & qm[None, :, :],
                     other=0.0).to(tl.float32)
        tl.store(dq + i * (H * DK) + hk, tl.sum(dqk[:, :, None] * kj, axis=0), mask=qm)
        # the stores below go over what this head chunk loaded: every thread's loads first
        tl.debug_barrier()
        tl.store(qk_edge + stash, dqk, mask=em)
        tl.store(gate_edge + gu, tl.where(lv, dlogit * qk, 0.0), mask=em)
        tl.store(gate_edge + gu + H, tl.where(lv, t * inv_d[:, None], 0.0), mask=em)
    # the envelope and 1/d parts of dL/dd (the gate backward adds the radial part)
    denv_dx = -30.0 * x * x * (1.0 - x) * (1.0 - x)
    dd = tl.where(inside, denv * denv_dx / cutoff - dinvd * inv_d * inv_d, 0.0)
    tl.store(dd_edge + i * K + slot, dd, mask=slot < K)


@triton.jit(do_not_specialize=["N", "T0"])
def bwd_gate_kernel(pos_dst, pos_src, nbr, gate_dst, gate_src, radial, hid_edge, dd_edge, dgate_dst, dpos_dst,
                    T0, N, K, G, NT, SW, inv_h, cutoff,
                    BK: tl.constexpr, GP: tl.constexpr, TB: tl.constexpr = 1):
    # elementwise over fwd_logit_kernel's edge tiles: the pre-activation gradient dpre from the
    # hidden layer's (dhid = [dg du] w_out^T, function's product, written over hid in the
    # stash), in place (each number read and written by the same thread), the pre-activation
    # recomputed; the radial table's gradient is bwd_radial_table_kernel's, from dpre
    tgt, keep, src, ok, row = _edge_tile(nbr, T0, N, K, BK, TB)
    dx, dy, dz, d_safe, x, env, inv_d, inside, live = _geometry(pos_dst, pos_src, tgt, src, ok, cutoff)
    pre = _node_gates(_radial_from_table(d_safe, ok, radial, inv_h, NT, G, GP), tgt, src, ok, gate_dst, gate_src,
                      G, GP)
    offs_g = tl.arange(0, GP)
    gmask = offs_g < G
    at = hid_edge + row[:, None] * SW + offs_g[None, :]
    m2 = keep[:, None] & gmask[None, :]
    sig = tl.sigmoid(pre)
    dpre = tl.load(at, mask=m2, other=0.0) * sig * (1.0 + pre * (1.0 - sig))
    dpre = tl.where(ok[:, None], dpre, 0.0)
    tl.store(at, dpre, mask=m2)
    rows_t = tl.program_id(0).to(tl.int64) * TB + T0 + tl.arange(0, TB)
    in_chunk = rows_t < N
    tl.store(dgate_dst + rows_t[:, None] * G + offs_g[None, :], tl.sum(tl.reshape(dpre, (TB, BK, GP)), axis=1),
             mask=in_chunk[:, None] & gmask[None, :])
    # the radial layer's part of d(loss)/d(distance), then the target's position gradient
    slot = T0 * K + row  # the edge's slot in dd_edge: tgt K + slot
    ddist = _radial_slope_dot(dpre, d_safe, ok, radial, inv_h, NT, G, GP)
    ddist = tl.where(inside, ddist + tl.load(dd_edge + slot, mask=keep, other=0.0), 0.0)
    tl.store(dd_edge + slot, ddist, mask=keep)
    f = tl.reshape(ddist * inv_d, (TB, BK))
    tl.store(dpos_dst + rows_t * 3 + 0, tl.sum(f * tl.reshape(dx, (TB, BK)), axis=1), mask=in_chunk)
    tl.store(dpos_dst + rows_t * 3 + 1, tl.sum(f * tl.reshape(dy, (TB, BK)), axis=1), mask=in_chunk)
    tl.store(dpos_dst + rows_t * 3 + 2, tl.sum(f * tl.reshape(dz, (TB, BK)), axis=1), mask=in_chunk)


@triton.jit(do_not_specialize=["N"])
def bwd_grid_kernel(pos_dst, pos_src, nbr, x_edge, N, K, NT, inv_h, cutoff, BK: tl.constexpr, TB: tl.constexpr):
    # each edge slot's position on the radial table's grid, as bwd_gate_kernel's geometry finds
    # it (+inf: no edge or beyond the cutoff, no contribution), at row i K + slot
    tgt, keep, src, ok, row = _edge_tile(nbr, 0, N, K, BK, TB)
    _, _, _, d_safe, _, _, _, inside, _ = _geometry(pos_dst, pos_src, tgt, src, ok, cutoff)
    xg, _, _ = _table_point(d_safe, inv_h, NT)
    tl.store(x_edge + row, tl.where(inside, xg, float("inf")), mask=keep)


@triton.jit(do_not_specialize=["NT"])
def bwd_radial_table_kernel(x_sorted, order, bounds, dpre_edge, dtable, NT, G, SW,
                            BE: tl.constexpr, GP: tl.constexpr):
    # one grid point n a program: adds to row n of the table's gradient the Hermite weights of
    # the edges in the two intervals around it (n - 1 and n: one run of the edges sorted by
    # grid position, bounds[i] the first edge of interval i) times their dpre rows, in that
    # order (deterministic; each row of dtable has one owner)
    n = tl.program_id(0)
    lo = tl.load(bounds + tl.maximum(n - 1, 0))
    hi = tl.load(bounds + tl.minimum(n + 1, NT))
    offs_g = tl.arange(0, GP)
    gmask = offs_g < G
    acc_v = tl.zeros([BE, GP], dtype=tl.float32)
    acc_s = tl.zeros([BE, GP], dtype=tl.float32)
    for e0 in range(lo, hi, BE):
        e = e0 + tl.arange(0, BE)
        em = e < hi
        x, i, t = _table_point(tl.load(x_sorted + e, mask=em, other=0.0), 1.0, NT)
        t2 = t * t
        t3 = t2 * t
        own = i == n  # the edge's interval starts at n: n is its left grid point
        wv = tl.where(em, tl.where(own, 2.0 * t3 - 3.0 * t2 + 1.0, 3.0 * t2 - 2.0 * t3), 0.0)
        ws = tl.where(em, tl.where(own, t3 - 2.0 * t2 + t, t3 - t2), 0.0)
        r = tl.load(order + e, mask=em, other=0).to(tl.int64)
        dp = tl.load(dpre_edge + r[:, None] * SW + offs_g[None, :], mask=em[:, None] & gmask[None, :], other=0.0)
        acc_v += wv[:, None] * dp
        acc_s += ws[:, None] * dp
    at = dtable + n.to(tl.int64) * (2 * G) + offs_g
    tl.store(at, tl.load(at, mask=gmask, other=0.0) + tl.sum(acc_v, axis=0), mask=gmask)
    tl.store(at + G, tl.load(at + G, mask=gmask, other=0.0) + tl.sum(acc_s, axis=0), mask=gmask)


@triton.jit
def _in_edges(edge_ids, start, c0, count, K, BKS: tl.constexpr):
    """In-edges ``c0 .. c0 + BKS - 1`` of a source's list ``edge_ids[start .. start + count]``:
    the valid mask, the edge ids ``i K + slot`` and the targets ``i`` (0 where not valid)."""
    ok = (c0 + tl.arange(0, BKS)) < count
    eid = tl.load(edge_ids + start + c0 + tl.arange(0, BKS), mask=ok, other=0)
    return ok, eid, _row_index(eid // K, ok)


@triton.jit(do_not_specialize=["A0", "C", "NC", "T0"])
def bwd_source_kernel(pos_dst, pos_src, q, dd_edge, dqk_edge, dpre_edge, rowptr, edge_ids, active,
                      dk, dgate_src, dpos_src,
                      A0, K, H, G, SW, C, NC, T0, cutoff,
                      DK: tl.constexpr, DKP: tl.constexpr, GP: tl.constexpr, HB: tl.constexpr, BKS: tl.constexpr):
    # source j = active[A0 + program id 0], one of those with in-edges from target chunk C
    # (targets T0 ..): edge_ids[rowptr[j NC + C] ..]; stash rows eid - T0 K. Program id 1
    # below cdiv(H, HB) owns the heads HB pid1 ..; the one past them, the source's gate and
    # position gradients
    E0 = T0 * K
    j, start, count = _source_in_edges(active, rowptr, A0, NC, C)
    h0 = tl.program_id(1) * HB
    if h0 < H:
        # in-edges one at a time, each head's dk sums in the threads that own its columns
        hh = h0 + tl.arange(0, HB)
        hm = hh < H
        offs_k = tl.arange(0, DKP)
        km = hm[:, None] & (offs_k < DK)[None, :]
        acc_k = tl.zeros([HB, DKP], dtype=tl.float32)
        for c in range(count):
            eid = tl.load(edge_ids + start + c)
            i = eid // K
            dqk = tl.load(dqk_edge + (eid - E0) * H + hh, mask=hm, other=0.0)
            qi = tl.load(q + i * (H * DK) + hh[:, None] * DK + offs_k[None, :], mask=km, other=0.0)
            acc_k += dqk[:, None] * qi.to(tl.float32)
        pk = dk + j * (H * DK) + hh[:, None] * DK + offs_k[None, :]
        tl.store(pk, tl.load(pk, mask=km, other=0.0) + acc_k, mask=km)
    else:
        offs_g = tl.arange(0, GP)
        gmask = offs_g < G
        src = tl.zeros([BKS], dtype=tl.int64) + j
        dgs = tl.zeros([GP], dtype=tl.float32)
        fx = tl.sum(tl.zeros([BKS], dtype=tl.float32), axis=0)
        fy = fx
        fz = fx
        for c0 in range(0, count, BKS):
            ok, eid, tgt = _in_edges(edge_ids, start, c0, count, K, BKS)
            dgs += tl.sum(tl.load(dpre_edge + (eid - E0)[:, None] * SW + offs_g[None, :],
                                  mask=ok[:, None] & gmask[None, :], other=0.0), axis=0)
            dx, dy, dz, d_safe, x, env, inv_d, inside, live = _geometry(pos_dst, pos_src, tgt, src, ok, cutoff)
            f = tl.load(dd_edge + eid, mask=ok, other=0.0) * inv_d
            fx -= tl.sum(f * dx, axis=0)
            fy -= tl.sum(f * dy, axis=0)
            fz -= tl.sum(f * dz, axis=0)
        pg = dgate_src + j * G + offs_g
        tl.store(pg, tl.load(pg, mask=gmask, other=0.0) + dgs, mask=gmask)
        tl.store(dpos_src + j * 3 + 0, tl.load(dpos_src + j * 3 + 0) + fx)
        tl.store(dpos_src + j * 3 + 1, tl.load(dpos_src + j * 3 + 1) + fy)
        tl.store(dpos_src + j * 3 + 2, tl.load(dpos_src + j * 3 + 2) + fz)
