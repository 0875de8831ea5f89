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


def launch_logits(t: dict, table: tuple, cutoff: float, stash, t0: int, rows: int, *, tb=1, hc=16,
                  warps=4, maxnreg=None):
    """The logits kernel; ``table``: ``F.radial_table``'s ``(radial, 1 / h)``, built once by the caller."""
    d = F._dims(t)
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    radial, inv_h = table
    return K.fwd_logit_kernel[(triton.cdiv(rows, tb),)](
        t["pos_dst"], t["pos_src"], t["nbr"], t["q"], t["k"], t["gate_dst"], t["gate_src"],
        radial, t["w_out"], t["b_out"], *stash,
        t0, t0 + rows, d["K"], d["H"], d["G"], radial.shape[0] - 1, inv_h, float(cutoff), 1.0 / math.sqrt(d["DK"]),
        DK=d["DK"], BK=d["BK"], HC=hc, DKP=d["DKP"], GP=d["GP"], PREC=F._gate_precision(), TB=tb,
        num_warps=warps, num_stages=1, **extra)


def launch_aggregate(t: dict, eps: float, stash, out, t0: int, rows: int, *, hb=32, warps=1, stages=1,
                     maxnreg=None):
    d = F._dims(t)
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    return K.fwd_aggregate_kernel[(rows, triton.cdiv(d["H"], hb))](
        t["nbr"], t["v"], *stash, *out, t0, d["K"], d["H"], float(eps),
        DV=d["DV"], DVP=d["DVP"], VS=d["VS"], HB=hb, num_warps=warps, num_stages=stages, **extra)


def new_stash(rows: int, kk: int, h: int, dev):
    return (torch.empty(rows * kk, h, device=dev), torch.empty(rows * kk, h, device=dev),
            torch.empty(rows * kk, device=dev))


def split_forward(t: dict, table: tuple, cutoff: float, eps: float, *, logits=None, aggregate=None, chunk=None,
                  stash=None):
    """``out``, ``m``, ``s`` through the two kernels, targets in chunks of ``chunk`` (``table``:
    ``F.radial_table``'s ``(radial, 1 / h)``)."""
    n, kk = t["nbr"].shape
    h, dv = t["q"].shape[1], t["v"].shape[-1]
    dev = t["q"].device
    out = (torch.empty(n, h, dv, device=dev), torch.empty(n, h, device=dev), torch.empty(n, h, device=dev))
    chunk = chunk or n
    stash = stash or new_stash(chunk, kk, h, dev)
    for t0 in range(0, n, chunk):
        rows = min(chunk, n - t0)
        launch_logits(t, table, cutoff, stash, t0, rows, **(logits or {}))
        launch_aggregate(t, eps, stash, out, t0, rows, **(aggregate or {}))
    return out


def max_rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def bench(fn):
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


# (session 11 call 7 also tried the key width in steps of 4, 2, 1 numbers, for fewer registers:
# 7.6, 9.8, 16.7 ms against 6.5 ms with whole rows; those variants were removed)
LOGIT_VARIANTS = [dict(tb=4, hc=32, warps=8), dict(tb=4, hc=32, warps=8, maxnreg=128), dict(tb=8, hc=32, warps=8),
                  dict(tb=4, hc=64, warps=8), dict(tb=2, hc=32, warps=4), dict(tb=1, hc=16, warps=4, maxnreg=128),
                  dict(tb=4, hc=16, warps=8), dict(tb=4, hc=32, warps=4), dict(tb=8, hc=16, warps=8)]
AGGREGATE_VARIANTS = [dict(hb=32, warps=1), dict(hb=32, warps=1, maxnreg=128), dict(hb=32, warps=1, maxnreg=96),
                      dict(hb=16, warps=1), dict(hb=64, warps=2, maxnreg=128)]


FORMS = [("fused", ""), ("split", "3072"), ("split", "6144"), ("split", str(1 << 30))]


def forms(record, sizes, dtypes, dev) -> None:
    """The library's forward (``function._forward``) in each form and stash budget
    (``E2F_TRITON_FORWARD``, ``E2F_TRITON_FWD_STASH_BYTES``): time and peak bytes above the inputs."""
    from suites.core.memory import free_memory, peak_bytes_above_inputs

    for n in sizes:
        base = random_core_inputs(n, device=dev, seed=3)
        for dt in dtypes:
            inp = base if dt == "float32" else base.replace(
                **{name: getattr(base, name).to(getattr(torch, dt)) for name in ("q", "k", "v")})
            inp = prepared_inputs(get_backend("triton"), inp)
            t = {name: getattr(inp, name).detach() for name in F.TENSOR_NAMES}
            ref = None
            for mode, budget in FORMS:
                os.environ[F.FWD_MODE_ENV], os.environ[F.FWD_STASH_ENV] = mode, budget
                run = lambda: F._forward(t, inp.rbf_gamma, inp.cutoff, inp.eps)  # noqa: E731
                got = run()
                ref = got if ref is None else ref
                err = max(max_rel(a, b) for a, b in zip(got, ref))
                del got
                free_memory(dev)
                peak = peak_bytes_above_inputs(run, device=dev)
                record({"n_atoms": n, "dtype": dt, "kernel": "form", "mode": mode, "stash_bytes": budget,
                        "chunks": F.last_config().get("fwd_chunks", 1), "ms": bench(run),
                        "kib_per_atom": peak / n / 1024 if peak else None, "max_rel_vs_fused": err})
            os.environ.pop(F.FWD_MODE_ENV)
            os.environ.pop(F.FWD_STASH_ENV)
            del ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="split-forward.jsonl")
    ap.add_argument("--sizes", default="16384,65536")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--neighbors", type=int, default=32, help="K (the suites' workload keeps the 32 nearest)")
    ap.add_argument("--chunks", default="", help="also time the pair with the targets in these numbers of chunks")
    ap.add_argument("--forms", action="store_true", help="only the library's forward in each form and stash budget")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_float32_matmul_precision("high")
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    commit = os.environ.get("E2F_GIT_COMMIT", "")

    def record(rec):
        print(json.dumps(rec), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    if args.forms:
        forms(record, [int(x) for x in args.sizes.split(",")], args.dtypes.split(","), dev)
        return
    for n in (int(x) for x in args.sizes.split(",")):
        base = random_core_inputs(n, max_neighbors=args.neighbors, device=dev, seed=3)
        for dt in args.dtypes.split(","):
            inp = base if dt == "float32" else base.replace(
                **{name: getattr(base, name).to(getattr(torch, dt)) for name in ("q", "k", "v")})
            inp = prepared_inputs(get_backend("triton"), inp)
            t = {name: getattr(inp, name).detach() for name in F.TENSOR_NAMES}
            gamma, cutoff, eps = inp.rbf_gamma, inp.cutoff, inp.eps
            ref = F._forward(t, gamma, cutoff, eps)
            head = {"n_atoms": n, "dtype": dt, "neighbors": args.neighbors, "gpu": gpu, "commit": commit}
            record({**head, "kernel": "fused", "config": F.last_config().get("fwd"),
                    "ms": bench(lambda: F._forward(t, gamma, cutoff, eps))})
            stash = new_stash(n, t["nbr"].shape[1], t["q"].shape[1], dev)
            table = F.radial_table(t["rbf_centers"], t["w_radial"], gamma, cutoff)
            got = split_forward(t, table, cutoff, eps, stash=stash)
            record({**head, "kernel": "split-check", **{f"max_rel_{k}": max_rel(a, b)
                                                       for k, a, b in zip(("out", "m", "s"), got, ref)}})
            for kind, variants in (("logits", LOGIT_VARIANTS), ("aggregate", AGGREGATE_VARIANTS)):
                for var in variants:
                    try:
                        if kind == "logits":
                            def run():
                                launch_logits(t, table, cutoff, stash, 0, n, **var)
                        else:
                            def run():
                                launch_aggregate(t, eps, stash, got, 0, n, **var)
                        compiled = run()
                        check = split_forward(t, table, cutoff, eps, **{kind: var})
                        err = max(max_rel(a, b) for a, b in zip(check, ref))
                        if hasattr(compiled, "_init_handles"):
                            compiled._init_handles()  # sets the register and spill counts
                        record({**head, "kernel": kind, "variant": var, "ms": bench(run), "max_rel_vs_fused": err,
                                "n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None)})
                    except Exception as exc:  # a variant that does not compile or run is data
                        record({**head, "kernel": kind, "variant": var, "error": str(exc)[:400]})
            for parts in (int(x) for x in filter(None, args.chunks.split(","))):
                chunk = -(-n // parts)
                small = new_stash(chunk, t["nbr"].shape[1], t["q"].shape[1], dev)
                # the pair as the library runs it: the radial table built in each call
                record({**head, "kernel": "pair", "chunks": parts, "ms": bench(
                    lambda: split_forward(t, F.radial_table(t["rbf_centers"], t["w_radial"], gamma, cutoff), cutoff,
                                          eps, chunk=chunk, stash=small,
                                          logits=LOGIT_VARIANTS[0], aggregate=AGGREGATE_VARIANTS[0]))})
            del ref, got, stash
            if dev == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
