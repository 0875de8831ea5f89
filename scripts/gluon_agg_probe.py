"""Can explicit asynchronous copies lift the per-edge aggregation above the L2's rate? A Gluon probe.

Every Triton scheme that gave a program several targets (for L1 reuse of the rows that
Morton-consecutive targets share) lost to the one-target walk, because a program's gathers
then waited on their latency with few programs in flight (perf-notes 19), and every union
scheme lost to dense-tile waste (21, 29). Gluon (``triton.experimental.gluon``, Triton 3.6)
exposes ``cp.async``: a program can keep ``S - 1`` row gathers in flight while it sums the
current one, whatever its occupancy. This probe times the forward's aggregation alone,
``out[i, h] = sum_k w[i, k, h] v[nbr[i, k], h]`` (``agg_order_probe``'s workload and check),
in two forms:

* ``edge``: the library's split-forward walk (``fwd_aggregate_kernel`` without the softmax):
  a program per target and ``HB`` heads, one warp, a head a thread;
* ``async``: a Gluon program per ``TR`` consecutive targets and ``HB`` heads walks their
  ``TR K`` slots in order; slot ``g + S - 1``'s value slab ``[HB, 64]`` and weights ``[HB]``
  are copied into a ring of ``S`` shared-memory stages while slot ``g`` is summed, so
  successive targets re-read shared rows shortly after (through L1 with ``VEC = 2``).

Prediction: at ``HB`` = 8-32 and ``TR`` = 8-32 the asynchronous walk keeps ~100-200 KB in
flight an SM (enough for ~20 TB/s at ~1 us of latency) and re-reads a shared row within
``K HB 256`` bytes, so it beats the edge walk's 8.4 ms (7.3 logical TB/s) at N = 65,536
if L1 serves the shared rows. Run on a GPU (Gluon has no interpreter)::

    PYTHONPATH=. python scripts/gluon_agg_probe.py --out gluon-agg.jsonl --sizes 65536

Variants: ``edge,HB,warps`` and ``async,TR,HB,S,warps,VEC`` (``VEC`` 4: 16-byte value copies,
``cp.async.cg``, L2 only; 2: 8-byte copies, ``cp.async.ca``, through L1).

``--only-value`` (or ``--value-variants``) times the backward's value pass instead, without its
softmax weights: source ``j`` walks its in-edges (CSR), ``dv_j += w dout_i`` and
``dw = dout_i . v_j`` with ``v_j`` in registers (``value-edge,HB,warps``, ``bwd_value_kernel``'s
form), or with the in-edges' ``dout`` slabs copied ``S - 1`` ahead into a ring
(``value-async,HB,S,warps,ROWS``; ``dout`` rows are 8-byte aligned, so 8-byte ``cp.async.ca``).

Outcome (H100, 2026-11-27, perf-notes 33): the prediction was wrong. One target a program
matches the edge walk (8.43 against 8.24 ms); more targets, fewer heads a slab or copies
through L1 are slower (9-25 ms): each step waits on its neighbour index, ``wait_group``, two
barriers and a shared-memory read, so the walk is bound by its steps, not by bytes in flight.
The value pass's core: 10.2-10.9 ms as the edge walk, 17.4-52 ms with the ring (deeper rings
are slower: the ring's shared memory leaves 2-6 one-warp programs an SM).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

from agg_order_probe import probe_args, time_and_check, workload, write_record
from e2f.attention.triton.function import _transposed

# Gluon is experimental: Triton 3.9 renamed 3.6's copy and barrier (the GPU box runs 3.6, CPU CI 3.9)
async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@triton.jit
def edge_kernel(nbr, w, v, out, K, H, HB: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * HB + tl.arange(0, HB)
    offs_d = tl.arange(0, DVP)
    acc = tl.zeros([HB, DVP], dtype=tl.float32)
    for slot in range(K):
        j = tl.load(nbr + i * K + slot)
        wt = tl.load(w + (i * K + slot) * H + hh, mask=j >= 0, other=0.0)
        vt = tl.load(v + tl.where(j >= 0, j, 0).to(tl.int64) * (H * DVP) + hh[:, None] * DVP + offs_d[None, :])
        acc += wt[:, None] * vt
    tl.store(out + i * (H * DV) + hh[:, None] * DV + offs_d[None, :], acc, mask=(offs_d < DV)[None, :])


@gluon.jit
def _issue(g, nbr, w, v, v_ring, w_ring, first, N, K, H, h0, TR: gl.constexpr, HB: gl.constexpr, S: gl.constexpr,
           DVP: gl.constexpr, slab: gl.constexpr, vec: gl.constexpr):
    """Copy slot ``g`` (of the program's ``TR K``) into ring stage ``g % S``: its value slab and weights."""
    t = g // K
    slot = g - t * K
    i = first + t
    live = (g < TR * K) & (i < N)
    j = gl.load(nbr + i * K + slot, mask=live, other=-1)
    ok = j >= 0
    jj = gl.where(ok, j, 0).to(gl.int64)
    hs = gl.arange(0, HB, layout=gl.SliceLayout(1, slab))
    ds = gl.arange(0, DVP, layout=gl.SliceLayout(0, slab))
    async_load(v_ring.index(g % S), v + jj * (H * DVP) + (h0 + hs)[:, None] * DVP + ds[None, :],
               mask=ok & (hs < HB)[:, None])
    hv = gl.arange(0, HB, layout=vec)
    async_load(w_ring.index(g % S), w + (i * K + slot) * H + h0 + hv, mask=ok & (hv < HB))
    cp.commit_group()


@gluon.jit
def async_kernel(nbr, w, v, out, N, K, H, TR: gl.constexpr, HB: gl.constexpr, S: gl.constexpr, DV: gl.constexpr,
                 DVP: gl.constexpr, VEC: gl.constexpr, num_warps: gl.constexpr):
    # a thread copies and sums VEC-number pieces of a head row, DVP / VEC threads a row; Triton
    # 3.6 emits 16-byte copies (VEC = 4) as cp.async.cg (L2 only) and smaller ones as
    # cp.async.ca (through L1, where the next targets' copies of a shared row can hit)
    slab: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // DVP, DVP // VEC], [num_warps, 1], [1, 0])
    vec: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    ring: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    flat: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    first = gl.program_id(0).to(gl.int64) * TR
    h0 = gl.program_id(1) * HB
    v_ring = gl.allocate_shared_memory(gl.float32, [S, HB, DVP], layout=ring)
    w_ring = gl.allocate_shared_memory(gl.float32, [S, HB], layout=flat)
    for g in gl.static_range(S - 1):
        _issue(g, nbr, w, v, v_ring, w_ring, first, N, K, H, h0, TR, HB, S, DVP, slab, vec)
    hs = gl.arange(0, HB, layout=gl.SliceLayout(1, slab))
    ds = gl.arange(0, DVP, layout=gl.SliceLayout(0, slab))
    g = 0
    for t in range(TR):
        acc = gl.zeros([HB, DVP], gl.float32, layout=slab)
        for slot in range(K):
            # the weights are copied by other threads than read them (the copy of a replicated
            # layout is done once): every thread has read the stage about to be refilled, and
            # every thread's copy of the stage about to be read has landed
            barrier()
            _issue(g + S - 1, nbr, w, v, v_ring, w_ring, first, N, K, H, h0, TR, HB, S, DVP, slab, vec)
            cp.wait_group(S - 1)
            barrier()
            vt = v_ring.index(g % S).load(slab)
            wt = w_ring.index(g % S).load(gl.SliceLayout(1, slab))
            acc += wt[:, None] * vt
            g += 1
        i = first + t
        gl.store(out + i * (H * DV) + (h0 + hs)[:, None] * DV + ds[None, :], acc,
                 mask=(i < N) & (ds < DV)[None, :] & (hs < HB)[:, None])
    cp.wait_group(0)


@triton.jit
def value_edge_kernel(rowptr, edge_ids, w, v, dout, dv, dw, K, H, HB: tl.constexpr, DV: tl.constexpr,
                      DVP: tl.constexpr):
    # the backward's value pass without its softmax weights: source j walks its in-edges (CSR),
    # dv_j += w dout_i and dw = dout_i . v_j, v_j held in registers (bwd_value_kernel's form)
    j = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * HB + tl.arange(0, HB)
    offs_d = tl.arange(0, DVP)
    dmask = (offs_d < DV)[None, :]
    vj = tl.load(v + j * (H * DVP) + hh[:, None] * DVP + offs_d[None, :], mask=dmask, other=0.0)
    start = tl.load(rowptr + j)
    acc = tl.zeros([HB, DVP], dtype=tl.float32)
    for c in range(tl.load(rowptr + j + 1) - start):
        eid = tl.load(edge_ids + start + c)
        i = eid // K
        wt = tl.load(w + eid * H + hh)
        go = tl.load(dout + i * (H * DV) + hh[:, None] * DV + offs_d[None, :], mask=dmask, other=0.0)
        acc += wt[:, None] * go
        tl.store(dw + eid * H + hh, tl.sum(go * vj, axis=1))
    tl.store(dv + j * (H * DV) + hh[:, None] * DV + offs_d[None, :], acc, mask=dmask)


@gluon.jit
def _issue_in_edge(c, count, start, edge_ids, w, dout, go_ring, w_ring, K, H, h0, HB: gl.constexpr,
                   S: gl.constexpr, DV: gl.constexpr, DVP: gl.constexpr, slab: gl.constexpr, vec: gl.constexpr):
    """Copy in-edge ``c`` of ``count`` into ring stage ``c % S``: the target's ``dout`` slab and the weights."""
    live = c < count
    eid = gl.load(edge_ids + start + c, mask=live, other=0)
    i = eid // K
    hs = gl.arange(0, HB, layout=gl.SliceLayout(1, slab))
    ds = gl.arange(0, DVP, layout=gl.SliceLayout(0, slab))
    async_load(go_ring.index(c % S), dout + i * (H * DV) + (h0 + hs)[:, None] * DV + ds[None, :],
               mask=live & (ds < DV)[None, :] & (hs < HB)[:, None])
    hv = gl.arange(0, HB, layout=vec)
    async_load(w_ring.index(c % S), w + eid * H + h0 + hv, mask=live & (hv < HB))
    cp.commit_group()


@gluon.jit
def value_async_kernel(rowptr, edge_ids, w, v, dout, dv, dw, K, H, HB: gl.constexpr, S: gl.constexpr,
                       DV: gl.constexpr, DVP: gl.constexpr, slab: gl.constexpr, ring: gl.constexpr,
                       num_warps: gl.constexpr):
    # dout rows are 58 numbers a head (8-byte aligned): copies of 2 numbers, cp.async.ca; ``slab``
    # spreads a head row over threads (``value_slab(False)``) or gives each thread whole rows
    vec: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    flat: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    j = gl.program_id(0).to(gl.int64)
    h0 = gl.program_id(1) * HB
    hs = gl.arange(0, HB, layout=gl.SliceLayout(1, slab))
    ds = gl.arange(0, DVP, layout=gl.SliceLayout(0, slab))
    dmask = (ds < DV)[None, :] & (hs < HB)[:, None]
    go_ring = gl.allocate_shared_memory(gl.float32, [S, HB, DVP], layout=ring)
    w_ring = gl.allocate_shared_memory(gl.float32, [S, HB], layout=flat)
    start = gl.load(rowptr + j)
    count = (gl.load(rowptr + j + 1) - start).to(gl.int32)  # ring indices are int32
    for c in gl.static_range(S - 1):
        _issue_in_edge(c, count, start, edge_ids, w, dout, go_ring, w_ring, K, H, h0, HB, S, DV, DVP, slab, vec)
    vj = gl.load(v + j * (H * DVP) + (h0 + hs)[:, None] * DVP + ds[None, :], mask=dmask, other=0.0)
    acc = gl.zeros([HB, DVP], gl.float32, layout=slab)
    for c in range(count):
        barrier()
        _issue_in_edge(c + S - 1, count, start, edge_ids, w, dout, go_ring, w_ring, K, H, h0, HB, S, DV, DVP,
                       slab, vec)
        cp.wait_group(S - 1)
        barrier()
        go = go_ring.index(c % S).load(slab)
        wt = w_ring.index(c % S).load(gl.SliceLayout(1, slab))
        acc += wt[:, None] * go
        eid = gl.load(edge_ids + start + c)
        gl.store(dw + eid * H + h0 + hs, gl.sum(go * vj, axis=1))
    cp.wait_group(0)
    gl.store(dv + j * (H * DV) + (h0 + hs)[:, None] * DV + ds[None, :], acc, mask=dmask)


def value_slab(rows_in_threads: bool, num_warps: int, dvp: int = 64):
    """The value pass's register layout of a ``[HB, DVP]`` slab and its ring's shared layout:
    head rows spread over ``DVP / 2`` threads in pairs of numbers, or whole rows a thread (the
    dot product ``dout_i . v_j`` then needs no shuffles, as in ``bwd_value_kernel``), whose
    rows are swizzled in the ring so that a warp's 32 rows do not fall in one bank."""
    if rows_in_threads:
        return (gl.BlockedLayout([1, dvp], [32, 1], [num_warps, 1], [1, 0]),
                gl.SwizzledSharedLayout(vec=2, per_phase=1, max_phase=32, order=[1, 0]))
    return (gl.BlockedLayout([1, 2], [32 * 2 // dvp, dvp // 2], [num_warps, 1], [1, 0]),
            gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))


def value_workload(nbr, v, w):
    """The value pass's inputs: in-edges by source (CSR, the backend's ``_transposed`` with one
    chunk), ``dout [N, H, DV]`` (unpadded, as the backward receives it), ``v`` as
    ``[M, H, DVP]`` with zeroed padding, and ``dv`` by PyTorch on 256 sources."""
    n, kslots = nbr.shape
    m, heads, dv = v.shape
    rowptr, edge_ids, _, _ = _transposed(nbr, m, n)
    gen = torch.Generator(device=nbr.device).manual_seed(2)
    dout = torch.randn(n, heads, dv, device=nbr.device, generator=gen)
    vz = torch.zeros(m, heads, v.stride(1), device=v.device)  # padded head rows, zero padding
    vz[..., :dv] = v[..., :dv]
    rows = torch.randperm(m, device=nbr.device, generator=gen)[:256]
    ref_dv = torch.stack([(w[edge_ids[rowptr[j]:rowptr[j + 1]]][:, :, None]
                           * dout[edge_ids[rowptr[j]:rowptr[j + 1]] // kslots]).sum(0) for j in rows.tolist()])
    return rowptr, edge_ids, dout, vz, rows, ref_dv


def measure_variant(out_file, n: int, kind: str, fields: dict, logical: float, timed) -> None:
    """One variant's record: ``timed() -> (relative error, ms)``, or the error it raised."""
    try:
        err, ms = timed()
        record = {"ms": ms, "logical_TBps": logical / ms / 1e9, "rel_err": err}
    except Exception as exc:  # noqa: BLE001 -- a variant that does not compile is a result
        record = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    write_record(out_file, {"n_atoms": n, "variant": kind, **fields, **record})


def value_pass(args, nbr, v, w, out_file) -> None:
    """Time the value pass's core in both forms (``value-edge,HB,warps``, ``value-async,HB,S,warps,ROWS``)."""
    rowptr, edge_ids, dout, vz, rows, ref_dv = value_workload(nbr, v, w)
    n, kslots = nbr.shape
    m, heads, dvp = vz.shape
    dv_dim = dout.shape[2]
    logical = float(edge_ids.numel()) * heads * dv_dim * 4
    some = edge_ids[:4096]
    ref_dw = (dout[some // kslots] * vz[nbr.reshape(-1)[some]][..., :dv_dim]).sum(-1)
    for text in args.value_variants:
        kind, *numbers = text.split(",")
        dv = torch.zeros(m, heads, dv_dim, device=nbr.device)
        dw = torch.zeros(n * kslots, heads, device=nbr.device)
        if kind == "value-edge":
            hb, warps = (int(x) for x in numbers)
            fields = {"HB": hb, "num_warps": warps}

            def run():
                value_edge_kernel[(m, heads // hb)](rowptr, edge_ids, w, vz, dout, dv, dw, kslots, heads, HB=hb,
                                                    DV=dv_dim, DVP=dvp, num_warps=warps)
        else:
            hb, stages, warps, rows_in_threads = (int(x) for x in numbers)
            fields = {"HB": hb, "S": stages, "num_warps": warps, "rows_in_threads": bool(rows_in_threads)}
            slab, ring = value_slab(bool(rows_in_threads), warps, dvp)

            def run():
                value_async_kernel[(m, heads // hb)](rowptr, edge_ids, w, vz, dout, dv, dw, kslots, heads, HB=hb,
                                                     S=stages, DV=dv_dim, DVP=dvp, slab=slab, ring=ring,
                                                     num_warps=warps)

        def timed():
            err, ms = time_and_check(run, dv, rows, ref_dv, "cuda", args.rep)
            return max(err, float((dw[some] - ref_dw).norm() / ref_dw.norm())), ms

        measure_variant(out_file, n, kind, fields, logical, timed)


def _value_options(ap) -> None:
    ap.add_argument("--value-variants", nargs="*", default=[
        "value-edge,32,1", "value-edge,16,1", "value-async,32,4,1,1", "value-async,32,8,1,1", "value-async,32,16,1,1",
        "value-async,64,8,2,1", "value-async,32,4,1,0", "value-async,16,8,1,0", "value-async,16,16,1,0",
        "value-async,8,16,1,0", "value-async,32,8,2,0"],
        help="the value pass's core: value-edge,HB,warps or value-async,HB,S,warps,ROWS (ROWS 1: whole head "
             "rows a thread); none given: skip")
    ap.add_argument("--only-value", action="store_true", help="time the value pass's core only")


def main() -> None:
    args = probe_args(__doc__.splitlines()[0], [
        "edge,32,1", "edge,16,1", "async,1,32,4,1,4", "async,8,32,8,1,4", "async,8,16,8,1,4", "async,16,8,16,1,4",
        "async,16,8,16,1,2", "async,32,8,16,1,4", "async,32,8,16,1,2", "async,32,16,8,1,4", "async,32,16,8,1,2",
        "async,8,32,4,2,4", "async,16,16,8,2,4", "async,16,16,8,2,2", "async,64,8,16,1,2", "async,32,8,24,1,2",
        "async,32,4,32,1,2"],
        "edge,HB,warps or async,TR,HB,S,warps,VEC", extra=_value_options)
    with open(args.out, "a") as out_file:
        for n in args.sizes:
            nbr, v, w, rows, ref, logical = workload(n, "cuda", "float32")
            nbr = nbr.contiguous()
            if args.value_variants:
                value_pass(args, nbr, v, w, out_file)
            if args.only_value:
                continue
            kslots, heads, dv = nbr.shape[1], v.shape[1], v.shape[2]
            dvp = v.stride(1)
            assert dvp == 64 and v.stride(0) == heads * 64, "padded value rows expected"
            for text in args.variants:
                kind, *numbers = text.split(",")
                out = torch.zeros(n, heads, dv, device="cuda")
                if kind == "edge":
                    hb, warps = (int(x) for x in numbers)
                    fields = {"HB": hb, "num_warps": warps}

                    def run():
                        edge_kernel[(n, heads // hb)](nbr, w, v, out, kslots, heads, HB=hb, DV=dv, DVP=dvp,
                                                       num_warps=warps)
                else:
                    tr, hb, stages, warps, vec = (int(x) for x in numbers)
                    fields = {"TR": tr, "HB": hb, "S": stages, "num_warps": warps, "VEC": vec}

                    def run():
                        async_kernel[(triton.cdiv(n, tr), heads // hb)](
                            nbr, w, v, out, n, kslots, heads, TR=tr, HB=hb, S=stages, DV=dv, DVP=dvp, VEC=vec,
                            num_warps=warps)
                measure_variant(out_file, n, kind, fields, logical,
                                lambda: time_and_check(run, out, rows, ref, "cuda", args.rep))


if __name__ == "__main__":
    main()
