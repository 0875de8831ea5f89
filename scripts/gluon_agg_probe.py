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

Outcome (H100, 2026-11-27, perf-notes 33): the prediction was wrong. One target a program
matches the edge walk (8.43 against 8.24 ms); more targets, fewer heads a slab or copies
through L1 are slower (9-25 ms): each step waits on its neighbour index, ``wait_group``, two
barriers and a shared-memory read, so the walk is bound by its steps, not by bytes in flight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

from agg_order_probe import probe_args, time_and_check, workload, write_record

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


def main() -> None:
    args = probe_args(__doc__.splitlines()[0], [
        "edge,32,1", "edge,16,1", "async,1,32,4,1,4", "async,8,32,8,1,4", "async,8,16,8,1,4", "async,16,8,16,1,4",
        "async,16,8,16,1,2", "async,32,8,16,1,4", "async,32,8,16,1,2", "async,32,16,8,1,4", "async,32,16,8,1,2",
        "async,8,32,4,2,4", "async,16,16,8,2,4", "async,16,16,8,2,2", "async,64,8,16,1,2", "async,32,8,24,1,2",
        "async,32,4,32,1,2"],
        "edge,HB,warps or async,TR,HB,S,warps,VEC")
    dev = "cuda"
    with open(args.out, "a") as out_file:
        for n in args.sizes:
            nbr, v, w, rows, ref, logical = workload(n, dev, "float32")
            kslots, heads, dv = nbr.shape[1], v.shape[1], v.shape[2]
            dvp = v.stride(1)
            assert dvp == 64 and v.stride(0) == heads * 64, "padded value rows expected"
            nbr = nbr.contiguous()
            for text in args.variants:
                kind, *numbers = text.split(",")
                out = torch.zeros(n, heads, dv, device=dev)
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
                try:
                    err, ms = time_and_check(run, out, rows, ref, dev, args.rep)
                    record = {"ms": ms, "logical_TBps": logical / ms / 1e9, "rel_err": err}
                except Exception as exc:  # noqa: BLE001 -- a variant that does not compile is a result
                    record = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
                write_record(out_file, {"n_atoms": n, "variant": kind, **fields, **record})


if __name__ == "__main__":
    main()
