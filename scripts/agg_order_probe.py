"""Does the order of the value gathers decide the forward's speed? An aggregation-only probe.

The fused kernels gather ~1 MB of value rows per target (32 neighbours x 128 heads x 64
numbers) and run at roughly the L2's bandwidth (perf-notes sections 8, 11, 18). Atoms are in
Morton order, so consecutive targets share most neighbours; but the forward walks one
target's heads before the next target's, so a shared row comes back only after ~1 MB of other
traffic and misses L1. This probe times the aggregation alone,
``out[i, h] = sum_k w[i, k, h] v[nbr[i, k], h]``, from a given weight tensor, in two orders:

* target-major (``HEADS_OUTER=0``): as the fused forward, one target's head groups in turn;
* head-major (``HEADS_OUTER=1``): a program owns ``TR`` consecutive targets and, head group by
  head group (``HB`` heads), walks all of them, so a row shared by nearby targets is reused
  after ``32 HB 256`` bytes of other traffic instead of ~1 MB.

If head-major runs well above the L2 rate, a forward split into "weights" and "aggregation"
(and the same for the backward's ``dout . v`` and ``sum_i w dout``) can beat the fused kernels'
bound. Paper sizes, fp32, padded value rows, the suites' random workload (non-periodic)::

    PYTHONPATH=. python scripts/agg_order_probe.py --out agg-order.jsonl --sizes 65536

One JSON line per variant: median ms (``do_bench``, L2 flushed), the logical gather rate (value
bytes the sum reads, with repeats), and the check against a PyTorch sum on sampled targets.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

from e2f.attention.core import padded_head_stride
from e2f.attention.triton.kernels import _slots, _value_rows
from e2f.attention.workload import random_core_inputs


@triton.jit
def _one(nbr, w, v, out, i, h0, N, K, H, HB: tl.constexpr, BK: tl.constexpr, DV: tl.constexpr,
         DVP: tl.constexpr, VS: tl.constexpr):
    slot = tl.arange(0, BK)
    hh = h0 + tl.arange(0, HB)
    src, ok = _slots(nbr, i, N, K, BK)
    wt = tl.load(w + (i * K + slot)[:, None] * H + hh[None, :], mask=ok[:, None] & (hh < H)[None, :], other=0.0)
    o = tl.sum(wt[:, :, None] * _value_rows(v, src, ok, h0, H, HB, DV, DVP, VS), axis=0)
    offs_d = tl.arange(0, DVP)
    tl.store(out + i * (H * DV) + hh[:, None] * DV + offs_d[None, :], o,
             mask=(hh < tl.where(i < N, H, 0))[:, None] & (offs_d < DV)[None, :])


@triton.jit
def agg_kernel(nbr, w, v, out, N, K, H, TR: tl.constexpr, HB: tl.constexpr, HEADS_OUTER: tl.constexpr,
               BK: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, VS: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * TR
    if HEADS_OUTER:
        for h0 in range(0, H, HB):
            for t in range(TR):
                _one(nbr, w, v, out, first + t, h0, N, K, H, HB, BK, DV, DVP, VS)
    else:
        for t in range(TR):
            for h0 in range(0, H, HB):
                _one(nbr, w, v, out, first + t, h0, N, K, H, HB, BK, DV, DVP, VS)


def reference(nbr, w, v, rows):
    """The sum in PyTorch for the targets ``rows``."""
    src = nbr[rows]
    ok = (src >= 0).to(v.dtype)
    vals = v[src.clamp_min(0)].float()  # [r, K, H, dv]
    wk = w.reshape(nbr.shape[0], nbr.shape[1], -1)[rows] * ok[..., None]
    return torch.einsum("rkh,rkhd->rhd", wk, vals)


def workload(n: int, dev: str, dtype: str = "float32"):
    """The suites' non-periodic workload at ``n`` atoms with padded value rows of ``dtype`` and
    random fp32 weights ``w [N K, H]``: ``(nbr, v, w, rows, ref, logical)``, ``ref`` the sum on
    256 sampled targets ``rows`` and ``logical`` the value bytes the per-edge sum reads."""
    inp = random_core_inputs(n, max_neighbors=32, device=dev, value_head_stride=64, dtype=getattr(torch, dtype))
    nbr, v = inp.nbr, inp.v
    gen = torch.Generator(device=dev).manual_seed(1)
    w = torch.rand(n * nbr.shape[1], v.shape[1], device=dev, generator=gen)
    rows = torch.randperm(n, device=dev, generator=gen)[:256]
    logical = float((nbr >= 0).sum()) * v.shape[1] * v.shape[2] * v.element_size()
    return nbr, v, w, rows, reference(nbr, w, v, rows), logical


def time_and_check(run, out, rows, ref, dev: str, rep: int):
    """Runs ``run`` once and checks ``out[rows]`` against ``ref``, then times it on a GPU
    (``do_bench`` median, L2 flushed): ``(relative error, ms or None)``."""
    run()
    err = float((out[rows] - ref).norm() / ref.norm())
    ms = triton.testing.do_bench(run, warmup=50, rep=rep, return_mode="median") if dev == "cuda" else None
    return err, ms


def write_record(out_file, record: dict) -> None:
    """One JSON line (the card and ``E2F_GIT_COMMIT`` first) to stdout and ``out_file``."""
    record = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "git_commit": os.environ.get("E2F_GIT_COMMIT"), **record}
    print(json.dumps(record), flush=True)
    out_file.write(json.dumps(record) + "\n")
    out_file.flush()


def probe_args(description: str, variants: list[str], variant_fields: str, extra=None) -> argparse.Namespace:
    """The command line the aggregation probes take (``extra(parser)`` adds a probe's own options)."""
    ap = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(ap)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[65536])
    ap.add_argument("--variants", nargs="+", default=variants, help=variant_fields)
    ap.add_argument("--rep", type=int, default=300, help="do_bench repetition time, ms")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="of the value rows")
    return ap.parse_args()


def main() -> None:
    args = probe_args(__doc__.splitlines()[0], [
        "0,1,16,4", "0,32,16,4", "1,8,1,1", "1,8,2,2", "1,8,4,4", "1,32,1,1", "1,32,2,2", "1,32,4,4",
        "1,32,8,4", "1,128,1,1", "1,128,2,2", "1,128,4,4", "1,32,1,2", "1,32,2,4", "1,128,2,4"],
        "HEADS_OUTER,TR,HB,num_warps")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with open(args.out, "a") as out_file:
        for n in args.sizes:
            nbr, v, w, rows, ref, logical = workload(n, dev, args.dtype)
            kslots, heads, dv = nbr.shape[1], v.shape[1], v.shape[2]
            for text in args.variants:
                outer, tr, hb, warps = (int(x) for x in text.split(","))
                out = torch.zeros(n, heads, dv, device=dev)

                def run():
                    agg_kernel[(triton.cdiv(n, tr),)](
                        nbr, w, v, out, n, kslots, heads, TR=tr, HB=hb, HEADS_OUTER=outer,
                        BK=triton.next_power_of_2(kslots), DV=dv, DVP=triton.next_power_of_2(dv),
                        VS=padded_head_stride(v) or 0, num_warps=warps)

                err, ms = time_and_check(run, out, rows, ref, dev, args.rep)
                write_record(out_file, {"n_atoms": n, "dtype": args.dtype, "heads_outer": outer, "targets_per_program": tr,
                                        "heads_per_group": hb, "num_warps": warps, "ms": ms,
                                        "logical_TBps": logical / ms / 1e9 if ms else None, "rel_err": err})


if __name__ == "__main__":
    main()
