"""How fast can the split forward's aggregation go by blocks of targets? One chunk, kernels alone.

The block aggregation (``kernels.fwd_block_aggregate_kernel``) reads each of a block's
distinct sources' value rows once for all its targets and multiplies ``[HG, BT, BS]`` weight
tiles (zero where a target lacks that source) by ``[HG, BS, DVP]`` value tiles on tensor
cores. This probe times it on one chunk of the ``attention-core`` workload against the edge
aggregation (``kernels.fwd_aggregate_kernel``, one value row an edge), with variants kept
here until one earns its place in the library:

* ``stages``: Triton's software pipelining of the tile loop (1, 2, 3);
* ``prefetch``: the next tile's source and slot indices loaded before this tile's product, so
  a tile waits on one gather latency instead of two;
* ``heads_last``: the weights gathered as ``[BT, BS, HG]`` (a target-source pair's ``HG``
  heads are contiguous: one vector load) and permuted;
* blocks of 16, 32 and 64 targets; and the cost of ``function.target_blocks`` itself.

Each variant's output is checked against the edge aggregation's. Timings: ``do_bench``
medians (L2 flushed), ms::

    PYTHONPATH=. python scripts/block_aggregate_probe.py --out DIR [--n 65536] [--chunk 10923]
    TRITON_INTERPRET=1 PYTHONPATH=. python scripts/block_aggregate_probe.py --out DIR --n 300 --chunk 100 --dtypes float32
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
import triton.language as tl

from e2f.attention.triton import function as F
from e2f.attention.triton import kernels as K
from e2f.attention.workload import random_core_inputs

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under TRITON_INTERPRET=1 (one call's wall time)


@triton.jit
def _tile_indices(sources, slots, b, tgt, tm, u0, count, UP, BS: tl.constexpr):
    us = u0 + tl.arange(0, BS)
    um = us < count
    j = tl.load(sources + b * UP + us, mask=um, other=0).to(tl.int64)
    e = tl.load(slots + tgt[:, None] * UP + us[None, :], mask=tm[:, None] & um[None, :], other=-1).to(tl.int64)
    return j, e, um


@triton.jit
def block_variant_kernel(sources, slots, counts, v, weight_edge, out, T0, T1, B0, K, H, UP,
                         DV: tl.constexpr, DVP: tl.constexpr, VS: tl.constexpr, BT: tl.constexpr,
                         PREC: tl.constexpr, BS: tl.constexpr, HG: tl.constexpr,
                         PREFETCH: tl.constexpr, HEADS_LAST: tl.constexpr):
    b = B0 + tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * HG + tl.arange(0, HG)
    hm = hh < H
    tgt = b * BT + tl.arange(0, BT)
    tm = (tgt >= T0) & (tgt < T1)
    first = (b * BT - T0) * K
    count = tl.load(counts + b)
    STRIDE: tl.constexpr = DV if VS == 0 else VS
    offs_d = tl.arange(0, DVP)
    dcols = offs_d < (DVP if STRIDE >= DVP else DV)
    acc = tl.zeros([HG, BT, DVP], dtype=tl.float32)
    j, e, um = _tile_indices(sources, slots, b, tgt, tm, 0, count, UP, BS)
    for u0 in range(0, count, BS):
        if not PREFETCH:
            j, e, um = _tile_indices(sources, slots, b, tgt, tm, u0, count, UP, BS)
        if HEADS_LAST:
            wl = tl.load(weight_edge + (first + e)[:, :, None] * H + hh[None, None, :],
                         mask=(e >= 0)[:, :, None] & hm[None, None, :], other=0.0)
            w = tl.permute(wl, (2, 0, 1))
        else:
            w = tl.load(weight_edge + (first + e)[None, :, :] * H + hh[:, None, None],
                        mask=(e >= 0)[None, :, :] & hm[:, None, None], other=0.0)
        vt = tl.load(v + j[None, :, None] * (H * STRIDE) + hh[:, None, None] * STRIDE + offs_d[None, None, :],
                     mask=hm[:, None, None] & um[None, :, None] & dcols[None, None, :], other=0.0)
        if PREFETCH:
            j, e, um = _tile_indices(sources, slots, b, tgt, tm, u0 + BS, count, UP, BS)
        if vt.dtype == tl.float32:
            acc = tl.dot(w, vt, acc, input_precision=PREC)
        else:
            acc = tl.dot(w.to(vt.dtype), vt, acc)
    tl.store(out + tgt[None, :, None] * (H * DV) + hh[:, None, None] * DV + offs_d[None, None, :], acc,
             mask=hm[:, None, None] & tm[None, :, None] & (offs_d < DV)[None, None, :])


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=10923)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "block-probe.jsonl"), "a")
    torch.set_float32_matmul_precision("high")
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"

    def emit(row):
        row = {"gpu": gpu, "n": args.n, "chunk": args.chunk, **row}
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()

    def bench(fn):
        fn()
        if DEV == "cpu":
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")

    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        inp = random_core_inputs(args.n, dtype=dtype, device=DEV, seed=3, value_head_stride=64)
        v = inp.v
        nbr = inp.nbr
        n, kslots = nbr.shape
        h, dv = v.shape[1], v.shape[2]
        d = F._dims({**{name: getattr(inp, name) for name in F.TENSOR_NAMES}, "v": v})
        rows = min(args.chunk, n)
        weight = torch.rand(rows * kslots, h, device=DEV) * (nbr[:rows].reshape(-1, 1) >= 0)
        ref = torch.zeros(n, h, dv, device=DEV)
        edge = lambda: K.fwd_aggregate_kernel[(rows, triton.cdiv(h, 32))](  # noqa: E731
            nbr, v, weight, ref, 0, kslots, h, DV=dv, DVP=d["DVP"], VS=d["VS"], HB=32, num_warps=1, num_stages=1)
        emit({"dtype": dname, "variant": "edge HB=32", "ms": bench(edge)})
        for bt in (32, 16, 64):
            blocks_ms = bench(lambda: F.target_blocks(nbr, bt))
            sources, slots, counts = F.target_blocks(nbr, bt)
            emit({"dtype": dname, "variant": f"target_blocks BT={bt}", "ms": blocks_ms,
                  "mean_sources": counts.float().mean().item(), "width": sources.shape[1]})
            grid_b = triton.cdiv(rows, bt)
            variants = [("lib", dict(BS=32, HG=4), 4, 1)] if bt != 32 else [
                ("lib", dict(BS=32, HG=4), 4, 1), ("lib", dict(BS=32, HG=4), 4, 2), ("lib", dict(BS=32, HG=4), 4, 3),
                ("prefetch", dict(BS=32, HG=4, PREFETCH=True, HEADS_LAST=False), 4, 1),
                ("heads_last", dict(BS=32, HG=4, PREFETCH=False, HEADS_LAST=True), 4, 1),
                ("prefetch+heads_last", dict(BS=32, HG=4, PREFETCH=True, HEADS_LAST=True), 4, 1),
                ("prefetch+heads_last", dict(BS=32, HG=4, PREFETCH=True, HEADS_LAST=True), 4, 2),
                ("prefetch+heads_last", dict(BS=16, HG=4, PREFETCH=True, HEADS_LAST=True), 4, 1),
                ("prefetch+heads_last", dict(BS=32, HG=2, PREFETCH=True, HEADS_LAST=True), 4, 1),
                ("prefetch+heads_last", dict(BS=32, HG=8, PREFETCH=True, HEADS_LAST=True), 8, 1),
                ("prefetch+heads_last", dict(BS=16, HG=8, PREFETCH=True, HEADS_LAST=True), 8, 1),
                ("prefetch+heads_last", dict(BS=16, HG=4, PREFETCH=True, HEADS_LAST=True, maxnreg=168), 4, 1),
                ("heads_last", dict(BS=16, HG=4, PREFETCH=False, HEADS_LAST=True), 4, 2)]
            for name, meta, warps, stages in variants:
                out = torch.zeros(n, h, dv, device=DEV)
                kern = K.fwd_block_aggregate_kernel if name == "lib" else block_variant_kernel

                def run(kern=kern, meta=meta, warps=warps, stages=stages, out=out):
                    return kern[(grid_b, triton.cdiv(h, meta["HG"]))](  # maxnreg, where given, is a compile option
                        sources, slots, counts, v, weight, out, 0, rows, 0, kslots, h, sources.shape[1],
                        DV=dv, DVP=d["DVP"], VS=d["VS"], BT=bt, PREC="tf32", num_warps=warps, num_stages=stages,
                        **meta)
                try:
                    ms = bench(run)
                    compiled = run()
                    err = rel(out[:rows], ref[:rows])
                    emit({"dtype": dname, "variant": name, "BT": bt, **meta, "num_warps": warps, "num_stages": stages,
                          "ms": ms, "rel_vs_edge": err, "n_regs": getattr(compiled, "n_regs", None),
                          "n_spills": getattr(compiled, "n_spills", None)})
                except Exception as exc:  # a variant that does not compile is data
                    emit({"dtype": dname, "variant": name, "BT": bt, **meta, "error": repr(exc)[:300]})


if __name__ == "__main__":
    main()
