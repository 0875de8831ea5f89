"""Staged-union aggregation: does reading each target block's union of source rows once beat the fused forward's gathers?

The fused forward gathers one value row per edge and head (``out[i, h] = sum_k w[i, k, h]
v[nbr[i, k], h]``): ~1 MB of rows per target, served at about the L2's bandwidth
(perf-notes 19: 8.4 ms of the 17.6 ms forward at N = 65,536). Morton-consecutive targets share
most neighbours: a block of 16 targets (~506 edges) has ~139 distinct sources, 32 targets
~209 for ~1,012 edges (the suites' workload, K = 32). This probe times the aggregation as a
block-sparse product instead: per (block of ``TB`` targets, head ``h``),
``out[block, h] = W_h [TB, U] @ V_h [U, DVP]`` with ``V_h`` the union's value rows of head
``h`` (each row read once a block) and ``W_h`` the block's weights placed at their union
column (zero elsewhere), as ``tl.dot`` tiles of ``UC`` union rows.

The union is built once per structure on the device (``block_unions``): per block the sorted
distinct source rows, and per union row and target the neighbour slot that points at it (or
-1). The weights are read head-major (``w[h, i K + slot]``, a block's weights of one head are
2 KB contiguous) or edge-major (``w[i K + slot, h]``) for comparison.

Compare with the target-major baseline of ``agg_order_probe.py`` (variant ``0,1,16,4``) in
the same call::

    PYTHONPATH=. python scripts/union_agg_probe.py --out union-agg.jsonl --sizes 65536

(the defaults: session 9's best variant, 1 warp and TF32, its IEEE and 3xTF32 forms, more
warps, compiler pipelining, 4 heads a ``tl.dot`` batch, 32-target blocks, and the no-load floor)

One JSON line per variant: median ms (``do_bench``, L2 flushed), the union's build time, the
logical gather rate (value bytes the per-edge sum would read) and the check against a PyTorch
sum on sampled targets.
"""
from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

from agg_order_probe import probe_args, time_and_check, workload, write_record
from e2f.attention.core import padded_head_stride


def block_unions(nbr: torch.Tensor, tb: int):
    """Per block of ``tb`` consecutive targets: its distinct source rows and their slots.

    Returns ``uptr [B + 1]`` (int32 offsets of each block's union rows), ``usrc [U]`` (int32
    source row of each union row, ascending within a block) and ``uslot [U, tb]`` (int8: the
    slot of target ``t`` of the block whose neighbour is that row, -1 if none). Assumes a
    target's neighbours are distinct rows (a neighbour list's are).
    """
    n, kslots = nbr.shape
    if kslots > 127:
        raise ValueError(f"slots are stored as int8: K must be <= 127, got {kslots}")
    blocks = triton.cdiv(n, tb)
    padded = torch.full((blocks * tb, kslots), -1, dtype=torch.int64, device=nbr.device)
    padded[:n] = nbr
    flat = padded.reshape(blocks, tb * kslots)
    empty = torch.iinfo(torch.int64).max
    key, order = torch.where(flat >= 0, flat, empty).sort(dim=1)
    valid = key != empty
    first = valid.clone()
    first[:, 1:] &= key[:, 1:] != key[:, :-1]
    counts = first.sum(1)
    uptr = torch.zeros(blocks + 1, dtype=torch.int64, device=nbr.device)
    uptr[1:] = counts.cumsum(0)
    row = uptr[:-1, None] + first.cumsum(1) - 1
    total = int(uptr[-1])
    usrc = torch.zeros(total, dtype=torch.int32, device=nbr.device)
    usrc[row[first]] = key[first].to(torch.int32)
    uslot = torch.full((total, tb), -1, dtype=torch.int8, device=nbr.device)
    uslot[row[valid], (order // kslots)[valid]] = (order % kslots)[valid].to(torch.int8)
    return uptr.to(torch.int32), usrc, uslot


@triton.jit
def union_agg_kernel(w, v, uptr, usrc, uslot, out, N, K, H, EH, TB: tl.constexpr, UC: tl.constexpr,
                     HG: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, VS: tl.constexpr,
                     HEAD_MAJOR_W: tl.constexpr, HEADS_FAST: tl.constexpr, PREC: tl.constexpr,
                     STAGES: tl.constexpr = 1, HB: tl.constexpr = 1, LOAD_W: tl.constexpr = True,
                     LOAD_V: tl.constexpr = True):
    # HB > 1: HB heads a tl.dot batch ([HB, TB, UC] @ [HB, UC, DVP]), their value rows read as
    # one [UC, HB DVP] block (heads are adjacent in a padded row). STAGES: software pipelining
    # of the union loop. LOAD_W / LOAD_V: profiling switches (False: no weight / value loads).
    # EH: the head stride of a head-major w (N K, or more for padding)
    pid = tl.program_id(0)
    groups = tl.cdiv(H, HG)
    if HEADS_FAST:
        b = pid // groups
        hg = pid % groups
    else:
        b = pid % tl.cdiv(N, TB)
        hg = pid // tl.cdiv(N, TB)
    t0 = b.to(tl.int64) * TB
    offs_t = tl.arange(0, TB)
    offs_u = tl.arange(0, UC)
    offs_d = tl.arange(0, DVP)
    u_begin = tl.load(uptr + b)
    u_end = tl.load(uptr + b + 1)
    for hh in range(0, HG, HB):
        h = hg * HG + hh
        if HB == 1:
            acc = tl.zeros([TB, DVP], dtype=tl.float32)
        else:
            acc = tl.zeros([HB, TB, DVP], dtype=tl.float32)
        for u0 in tl.range(u_begin, u_end, UC, num_stages=STAGES):
            uu = u0 + offs_u
            um = uu < u_end
            src = tl.load(usrc + uu, mask=um, other=0).to(tl.int64)
            slot = tl.load(uslot + uu[None, :].to(tl.int64) * TB + offs_t[:, None], mask=um[None, :], other=-1)
            edge = (t0 + offs_t)[:, None] * K + slot.to(tl.int64)
            if HB == 1:
                if not LOAD_W:
                    wt = tl.where(slot >= 0, 0.5, 0.0)
                elif HEAD_MAJOR_W:
                    wt = tl.load(w + h * EH + edge, mask=slot >= 0, other=0.0)
                else:
                    wt = tl.load(w + edge * H + h, mask=slot >= 0, other=0.0)
                if LOAD_V:
                    vt = tl.load(v + src[:, None] * (H * VS) + h * VS + offs_d[None, :], mask=um[:, None],
                                 other=0.0).to(tl.float32)
                else:
                    vt = tl.zeros([UC, DVP], dtype=tl.float32) + src[:, None].to(tl.float32)
                vt = tl.where((offs_d < DV)[None, :], vt, 0.0)
                acc += tl.dot(wt, vt, input_precision=PREC)
            else:
                offs_hb = tl.arange(0, HB)
                if LOAD_W:
                    wt = tl.load(w + (h + offs_hb)[:, None, None] * EH + edge[None, :, :],
                                 mask=(slot >= 0)[None, :, :], other=0.0)
                else:
                    wt = tl.where((slot >= 0)[None, :, :], 0.5, 0.0) + tl.zeros([HB, TB, UC], dtype=tl.float32)
                offs_c = tl.arange(0, HB * DVP)
                if LOAD_V:
                    vr = tl.load(v + src[:, None] * (H * VS) + h * VS + offs_c[None, :], mask=um[:, None],
                                 other=0.0).to(tl.float32)
                else:
                    vr = tl.zeros([UC, HB * DVP], dtype=tl.float32) + src[:, None].to(tl.float32)
                vr = tl.where(((offs_c % DVP) < DV)[None, :], vr, 0.0)
                vt = tl.permute(tl.reshape(vr, (UC, HB, DVP)), (1, 0, 2))
                acc += tl.dot(wt, vt, input_precision=PREC)
        if HB == 1:
            tl.store(out + (t0 + offs_t)[:, None] * (H * DV) + h * DV + offs_d[None, :], acc,
                     mask=((t0 + offs_t) < N)[:, None] & (offs_d < tl.where(h < H, DV, 0))[None, :])
        else:
            offs_hb = tl.arange(0, HB)
            tl.store(out + (t0 + offs_t)[None, :, None] * (H * DV) + (h + offs_hb)[:, None, None] * DV
                     + offs_d[None, None, :], acc,
                     mask=((t0 + offs_t) < N)[None, :, None] & (offs_d < DV)[None, None, :]
                     & ((h + offs_hb) < H)[:, None, None])


def main() -> None:
    args = probe_args(__doc__.splitlines()[0], [
        "16,32,1,1,0,1,tf32", "16,32,1,1,0,1,ieee", "16,32,1,1,0,1,tf32x3", "16,32,1,1,0,2,tf32",
        "16,32,1,1,0,4,tf32,3", "16,32,4,1,1,4,tf32,1,4", "32,32,1,1,0,1,tf32", "16,32,1,1,0,1,tf32,1,1,0,0"],
        "TB,UC,HG,HEAD_MAJOR_W,HEADS_FAST,num_warps,precision[,STAGES,HB,LOAD_W,LOAD_V]")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with open(args.out, "a") as out_file:
        for n in args.sizes:
            nbr, v, w_edge, rows, ref, logical = workload(n, dev, args.dtype)
            kslots, heads, dv = nbr.shape[1], v.shape[1], v.shape[2]
            w_head = w_edge.t().contiguous()
            unions = {}
            for text in args.variants:
                fields = text.split(",")
                tb, uc, hg, head_major, heads_fast, warps = (int(x) for x in fields[:6])
                prec = fields[6]
                stages, hb, load_w, load_v = (int(x) for x in (fields[7:] + ["1", "1", "1", "1"][len(fields) - 7:]))
                if tb not in unions:  # built once per block size, with its own build time
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    built = block_unions(nbr, tb)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    unions[tb] = built, (time.perf_counter() - start) * 1e3
                (uptr, usrc, uslot), build_ms = unions[tb]
                out = torch.zeros(n, heads, dv, device=dev)
                blocks = triton.cdiv(n, tb)

                def run():
                    union_agg_kernel[(blocks * triton.cdiv(heads, hg),)](
                        w_head if head_major else w_edge, v, uptr, usrc, uslot, out, n, kslots, heads,
                        n * kslots, TB=tb, UC=uc, HG=hg, DV=dv, DVP=triton.next_power_of_2(dv),
                        VS=padded_head_stride(v) or dv, HEAD_MAJOR_W=head_major, HEADS_FAST=heads_fast,
                        PREC=prec, STAGES=stages, HB=hb, LOAD_W=bool(load_w), LOAD_V=bool(load_v),
                        num_warps=warps)

                err, ms = time_and_check(run, out, rows, ref, dev, args.rep)
                write_record(out_file, {
                    "n_atoms": n, "dtype": args.dtype, "targets_per_block": tb, "union_chunk": uc, "heads_per_program": hg,
                    "head_major_w": head_major, "heads_fast": heads_fast, "num_warps": warps, "precision": prec,
                    "stages": stages, "heads_per_dot": hb, "load_w": load_w, "load_v": load_v,
                    "union_rows_per_block": usrc.numel() / blocks, "union_build_ms": build_ms, "ms": ms,
                    "logical_TBps": logical / ms / 1e9 if ms else None, "rel_err": err})


if __name__ == "__main__":
    main()
