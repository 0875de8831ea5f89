"""Is a forward in two kernels faster than the fused one? Logits by edge tiles, then an aggregation whose sums stay in a thread.

The fused forward's skeleton (no value gathers, no gate products) takes ~12 ms at N = 65,536
(perf-notes 21): its softmax and aggregation reduce over the edge axis of tiles whose other
axis is heads, so every sum crosses warps, and the gate MLP's tiles keep ~255 registers live
beside them. Split in two:

* ``fwd_logit_kernel`` (edge tiles of ``TB`` targets): geometry, gate MLP, q.k; writes per edge
  and head the logit (``-inf`` where not live) and ``u / d``, and per edge the envelope;
* ``fwd_aggregate_kernel`` (one target and ``HB`` heads a program): walks the slots with an
  online softmax started from the sink, one thread per (head, value columns): no reduction
  crosses threads.

The per-edge stash lives only for a chunk of targets. This probe checks ``out``, ``m``, ``s``
against the fused forward and times both (``do_bench`` medians, L2 flushed), each kernel alone
and the pair::

    PYTHONPATH=. python scripts/split_forward_probe.py --out split.jsonl --sizes 16384,65536
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton

from e2f.attention.backends import get_backend
from e2f.attention.triton import function as F
from e2f.attention.triton import kernels as K
from e2f.attention.workload import random_core_inputs
from suites.workloads import prepared_inputs


def split_forward(t: dict, gamma: float, cutoff: float, eps: float, *, tb=1, hc=16, rc=32, warps_a=4,
                  maxnreg_a=None, hb=32, warps_b=1, chunk=None, stash=None):
    """``out``, ``m``, ``s`` through the two kernels, targets in chunks of ``chunk``."""
    d = F._dims(t)
    n, kk, h = d["N"], d["K"], d["H"]
    dev = t["q"].device
    out = torch.empty(n, h, d["DV"], device=dev, dtype=torch.float32)
    m = torch.empty(n, h, device=dev, dtype=torch.float32)
    s = torch.empty(n, h, device=dev, dtype=torch.float32)
    chunk = chunk or n
    if stash is None:
        stash = (torch.empty(chunk * kk, h, device=dev), torch.empty(chunk * kk, h, device=dev),
                 torch.empty(chunk * kk, device=dev))
    logit, coef, env = stash
    prec = F._gate_precision()
    extra = {"maxnreg": maxnreg_a} if maxnreg_a else {}
    for t0 in range(0, n, chunk):
        rows = min(chunk, n - t0)
        K.fwd_logit_kernel[(triton.cdiv(rows, tb),)](
            t["pos_dst"], t["pos_src"], t["nbr"], t["q"], t["k"], t["gate_dst"], t["gate_src"],
            t["rbf_centers"], t["w_radial"], t["w_out"], t["b_out"], logit, coef, env,
            t0, t0 + rows, kk, h, d["G"], d["R"], float(gamma), float(cutoff), 1.0 / math.sqrt(d["DK"]),
            DK=d["DK"], BK=d["BK"], HC=hc, DKP=d["DKP"], GP=d["GP"], RC=rc, PREC=prec, TB=tb,
            num_warps=warps_a, num_stages=1, **extra)
        K.fwd_aggregate_kernel[(rows, triton.cdiv(h, hb))](
            t["nbr"], t["v"], logit, coef, env, out, m, s, t0, t0 + rows, kk, h, float(eps),
            DV=d["DV"], DVP=d["DVP"], VS=d["VS"], HB=hb, num_warps=warps_b, num_stages=1)
    return out, m, s


def max_rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def bench(fn):
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


VARIANTS = [  # tb, hc, rc, warps_a, maxnreg_a, hb, warps_b
    dict(tb=1, hc=16, rc=32, warps_a=4, hb=32, warps_b=1),
    dict(tb=1, hc=16, rc=32, warps_a=4, maxnreg_a=128, hb=32, warps_b=1),
    dict(tb=2, hc=16, rc=32, warps_a=4, hb=32, warps_b=1),
    dict(tb=4, hc=16, rc=32, warps_a=8, hb=32, warps_b=1),
    dict(tb=2, hc=32, rc=32, warps_a=8, hb=32, warps_b=1),
    dict(tb=1, hc=16, rc=32, warps_a=4, hb=64, warps_b=2),
    dict(tb=1, hc=16, rc=32, warps_a=4, hb=128, warps_b=4),
    dict(tb=1, hc=16, rc=32, warps_a=4, hb=16, warps_b=1),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="split-forward.jsonl")
    ap.add_argument("--sizes", default="16384,65536")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--variants", default=",".join(str(i) for i in range(len(VARIANTS))))
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_float32_matmul_precision("high")
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    commit = os.environ.get("E2F_GIT_COMMIT", "")
    for n in (int(x) for x in args.sizes.split(",")):
        base = random_core_inputs(n, device=dev, seed=3)
        for dt in args.dtypes.split(","):
            inp = base if dt == "float32" else base.replace(
                **{name: getattr(base, name).to(getattr(torch, dt)) for name in ("q", "k", "v")})
            inp = prepared_inputs(get_backend("triton"), inp)
            t = {name: getattr(inp, name).detach() for name in F.TENSOR_NAMES}
            ref = F._forward(t, inp.rbf_gamma, inp.cutoff, inp.eps)
            fused_ms = bench(lambda: F._forward(t, inp.rbf_gamma, inp.cutoff, inp.eps))
            rec = {"n_atoms": n, "dtype": dt, "gpu": gpu, "commit": commit, "fused_config": F.last_config().get("fwd")}
            print(json.dumps({**rec, "variant": "fused", "ms": fused_ms}), flush=True)
            for vi in (int(x) for x in args.variants.split(",")):
                var = VARIANTS[vi]
                try:
                    kk, h = t["nbr"].shape[1], t["q"].shape[1]
                    stash = (torch.empty(n * kk, h, device=dev), torch.empty(n * kk, h, device=dev),
                             torch.empty(n * kk, device=dev))
                    got = split_forward(t, inp.rbf_gamma, inp.cutoff, inp.eps, stash=stash, **var)
                    err = {f"max_rel_{k}": max_rel(a, b) for k, a, b in zip(("out", "m", "s"), got, ref)}
                    pair_ms = bench(lambda: split_forward(t, inp.rbf_gamma, inp.cutoff, inp.eps, stash=stash, **var))
                    d = F._dims(t)
                    agg_ms = bench(lambda: K.fwd_aggregate_kernel[(n, triton.cdiv(h, var["hb"]))](
                        t["nbr"], t["v"], *stash, *got, 0, n, kk, h, float(inp.eps), DV=d["DV"], DVP=d["DVP"],
                        VS=d["VS"], HB=var["hb"], num_warps=var["warps_b"], num_stages=1))
                    rec2 = {**rec, "variant": var, "ms": pair_ms, "aggregate_ms": agg_ms,
                            "logit_ms": pair_ms - agg_ms, "fused_ms": fused_ms, **err}
                except Exception as exc:  # a variant that does not compile or run is data
                    rec2 = {**rec, "variant": var, "error": str(exc)[:400]}
                print(json.dumps(rec2), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec2) + "\n")
            del ref
            torch.cuda.empty_cache() if dev == "cuda" else None


if __name__ == "__main__":
    main()
