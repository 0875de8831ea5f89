"""One-call GPU check and timing of the fused Triton attention core (kernel development).

Run on the lent GPU from the repository root::

    PYTHONPATH=. python scripts/kernel_dev.py --out $OUT [--sizes 16384 65536] [--big-check]
    PYTHONPATH=. python scripts/kernel_dev.py --out $OUT --skip-check --fwd-variants [CONFIG ...]

Stages (each prints as it goes; a short table is printed last):

1. correctness, fp32 with IEEE matmuls, N = 2,048 (full sizes: H = 128, d = 8, dv = 58,
   G = 128, R = 256, K = 32): out and every gradient against the materialised reference;
   bf16 q/k/v against the fp32 reference; two backward runs bitwise equal; the TF32 error.
2. (``--big-check``) N = 65,536 against the chunked backend, forward and every gradient.
3. timing with ``triton.testing.do_bench`` (median, L2 flushed; autotuning in the warm-up
   call, outside the timed region): fwd and fwd+bwd, fp32 (TF32 gate products) and bf16,
   plus the materialised backend at N = 16,384 for the core-TFLOPS ratio; peak bytes above
   the inputs per atom (``torch.cuda.max_memory_allocated`` after a reset).
   With ``--fwd-variants``, instead: the forward alone for each forced configuration
   (``E2F_TRITON_FWD_CONFIG`` syntax; default ``DEFAULT_FWD_VARIANTS``, one target per
   program first) at every ``--sizes`` N and ``--dtypes`` q/k/v dtype, each first checked
   against the first configuration's ``out``, ``m``, ``s`` (max relative difference).

A CPU dry run under ``TRITON_INTERPRET=1``: ``--tiny`` (small dims; timings are then one
interpreted call's wall time).

Every number is written as one JSON line to ``<out>/kernel-dev.jsonl``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from e2f.attention.core import attention_core_reference
from e2f.attention.triton import function as F
from e2f.attention.triton.function import check, fused_attention_core, last_config
from e2f.attention.workload import random_core_inputs
from suites.core.env import git_state
from suites.core.memory import free_memory, peak_bytes_above_inputs

FLOATS = ("pos_dst", "pos_src", "q", "k", "v", "gate_dst", "gate_src", "rbf_centers", "w_radial", "w_out", "b_out")
ROWS: list[dict] = []
# --tiny: small dims on any device (a CPU dry run of this script under TRITON_INTERPRET=1)
DIMS: dict = {}
DEV = "cuda"


def env() -> dict:
    import triton
    commit, dirty = git_state()
    p = torch.cuda.get_device_properties(0) if DEV == "cuda" else None
    return {"gpu_name": p.name if p else "cpu", "sms": p.multi_processor_count if p else 0, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": commit,
            "git_dirty": dirty, "command": " ".join(sys.argv)}


ENV: dict = {}


def emit(out_dir, kind, params, metrics):
    rec = {"schema": 1, "suite": "kernel-dev", "kind": kind, "params": params, "metrics": metrics,
           "env": ENV, "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernel-dev.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
    ROWS.append(rec)
    print(kind, json.dumps(params), json.dumps({k: v for k, v in metrics.items() if k != "samples_ms"}), flush=True)


_CACHE: dict = {}
_FIRST_OUT: dict = {}  # forward output of the first layout timed per (impl, N, dtype, K)


def inputs(n, dtype=torch.float32, seed=0, k=32):
    key = (n, seed, k)
    if key not in _CACHE:
        _CACHE.clear()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        _CACHE[key] = random_core_inputs(n, max_neighbors=k, dtype=torch.float32, device=DEV, seed=seed,
                                         requires_grad=True, **DIMS)
    inp = _CACHE[key]
    return inp if dtype == torch.float32 else to_qkv(inp, dtype)


def with_layout(inp, layout):
    """``inp`` with ``v`` contiguous (as drawn) or in the kernel's padded head rows (a new leaf)."""
    if layout == "contiguous":
        return inp
    from e2f.attention.backends import get_backend
    from suites.workloads import prepared_inputs
    return prepared_inputs(get_backend("triton"), inp)


def to_qkv(inp, dtype):
    return inp.replace(**{n: getattr(inp, n).detach().to(dtype).requires_grad_(True) for n in ("q", "k", "v")})


def leaves(inp):
    return [getattr(inp, n) for n in FLOATS]


def detached(inp, dtype=None):
    return inp.replace(**{n: (getattr(inp, n).detach().to(dtype) if dtype else getattr(inp, n).detach().clone())
                          .requires_grad_(True) for n in FLOATS})


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def grads_of(fn, inp, dout):
    out = fn(inp)
    g = torch.autograd.grad(out, leaves(inp), dout)
    return out, dict(zip(FLOATS, g))


def correctness(out_dir, n=2048):
    torch.set_float32_matmul_precision("highest")
    inp = inputs(n, seed=1)
    check(inp)
    dout = torch.randn(n, inp.q.shape[1], inp.v.shape[-1], device=DEV, generator=torch.Generator(DEV).manual_seed(0))
    out, g = grads_of(fused_attention_core, inp, dout)
    ref, rg = grads_of(attention_core_reference, detached(inp), dout)
    errs = {"out": rel(out, ref), **{k: rel(g[k], rg[k]) for k in FLOATS}}
    emit(out_dir, "check-fp32-ieee-vs-materialized", {"n_atoms": n}, {"max_rel": max(errs.values()), **errs,
                                                                       "pass": max(errs.values()) < 1e-5})
    _, g2 = grads_of(fused_attention_core, inp, dout)
    same = all(torch.equal(g[k], g2[k]) for k in FLOATS)
    emit(out_dir, "check-determinism", {"n_atoms": n}, {"bitwise_equal": same})
    torch.set_float32_matmul_precision("high")
    out_t, g_t = grads_of(fused_attention_core, inp, dout)
    errs = {"out": rel(out_t, ref), **{k: rel(g_t[k], rg[k]) for k in FLOATS}}
    emit(out_dir, "check-fp32-tf32-vs-materialized", {"n_atoms": n}, {"max_rel": max(errs.values()), **errs})
    for dt in (torch.bfloat16,):
        b = to_qkv(inp, dt)
        out_b, g_b = grads_of(fused_attention_core, b, dout)
        errs = {"out": rel(out_b, ref), **{k: rel(g_b[k], rg[k]) for k in FLOATS}}
        emit(out_dir, f"check-{str(dt)[6:]}-tf32-vs-fp32-materialized", {"n_atoms": n},
             {"max_rel": max(errs.values()), **errs, "pass": max(errs.values()) < 2e-2})
    del inp, out, g, ref, rg, g2, out_t, g_t
    if DEV == "cuda":
        torch.cuda.empty_cache()


def big_check(out_dir, n=65536, layout="contiguous", moments=False):
    """The fused core against the chunked one at ``n`` atoms, forward and every gradient (fp32,
    IEEE products); ``moments``: the moments form (``CoreInputs.moments``, 18 value numbers a head)."""
    from e2f.attention.chunked import chunked_attention_core
    torch.set_float32_matmul_precision("highest")
    if moments:
        inp = random_core_inputs(n, max_neighbors=32, device=DEV, seed=2, requires_grad=True,
                                 **{**DIMS, "dv": 18}).replace(moments=True)
    else:
        inp = inputs(n, seed=2)
    inp = with_layout(inp, layout)
    width = inp.v.shape[-1] * (3 if moments else 1)
    dout = torch.randn(n, inp.q.shape[1], width, device=DEV, generator=torch.Generator(DEV).manual_seed(0))
    out, g = grads_of(fused_attention_core, inp, dout)
    t0 = time.time()
    ref, rg = grads_of(chunked_attention_core, detached(inp), dout)
    errs = {"out": rel(out, ref), **{k: rel(g[k], rg[k]) for k in FLOATS}}
    emit(out_dir, "check-fp32-ieee-vs-chunked", {"n_atoms": n, "value_layout": layout, "moments": moments},
         {"max_rel": max(errs.values()), **errs, "pass": max(errs.values()) < 1e-5, "chunked_s": time.time() - t0})
    del inp, out, g, ref, rg
    torch.cuda.empty_cache()


def flops_core(n, k, h, dk, dv):
    return n * (2 * k * h * dk + 2 * k * h * dv + 8 * k * h)


def flops_gate(n, k, h, g, r):
    return n * k * (2 * r * g + 2 * g * 2 * h)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(fn):
    """Peak bytes allocated above what was allocated before ``fn()``, cached blocks returned
    first (None on the CPU)."""
    free_memory(DEV)
    return peak_bytes_above_inputs(fn, device=DEV)


def time_point(out_dir, impl, n, dtype, k=32, do_bwd=True, timing=True, layout="contiguous"):
    torch.set_float32_matmul_precision("high")
    fn = {"triton": fused_attention_core, "materialized": attention_core_reference}[impl]
    if DEV == "cuda":
        torch.cuda.empty_cache()
    inp = with_layout(inputs(n, dtype, seed=3, k=k), layout)
    h, dk, dv = inp.q.shape[1], inp.q.shape[2], inp.v.shape[-1]
    g, r = inp.w_radial.shape[1], inp.w_radial.shape[0]
    dout = torch.randn(n, h, dv, device=DEV)
    params = {"impl": impl, "n_atoms": n, "dtype": str(dtype)[6:], "neighbors": k, "gate_matmul": "tf32",
              "value_layout": layout, "num_rbf": r}
    fc, ft = flops_core(n, k, h, dk, dv), flops_core(n, k, h, dk, dv) + flops_gate(n, k, h, g, r)
    lv = leaves(inp)
    try:
        with torch.no_grad():
            first = fn(inp)  # autotune / warm-up
        key = (impl, n, str(dtype), k)
        if key in _FIRST_OUT:  # another layout of the same inputs: the same result
            params["max_rel_vs_first_layout"] = max_rel(first, _FIRST_OUT[key])
        else:
            _FIRST_OUT[key] = first
        del first
        _sync()
        ms = bench_ms(lambda: fn(inp)) if timing else None
        peak = _peak_bytes(lambda: fn(inp))
        emit(out_dir, "time" if timing else "memory", {**params, "mode": "fwd"},
             {"latency_ms": ms, "tflops_core": fc / ms / 1e9 if ms else None, "tflops_total": ft / ms / 1e9 if ms else None,
              "peak_bytes": peak, "bytes_per_atom": peak / n if peak else None,
              "config": last_config() if impl == "triton" else None})
    except torch.OutOfMemoryError as exc:
        emit(out_dir, "time", {**params, "mode": "fwd"}, {"status": "oom", "error": str(exc)[:200]})
        return
    if not do_bwd:
        return
    try:
        def step():
            torch.autograd.grad(fn(inp), lv, dout)
        step()
        _sync()
        ms = bench_ms(step) if timing else None
        peak = _peak_bytes(step)
        emit(out_dir, "time" if timing else "memory", {**params, "mode": "fwd+bwd"},
             {"latency_ms": ms, "tflops_core": 3 * fc / ms / 1e9 if ms else None, "peak_bytes": peak,
              "bytes_per_atom": peak / n if peak else None, "config": last_config() if impl == "triton" else None})
    except torch.OutOfMemoryError as exc:
        emit(out_dir, "time", {**params, "mode": "fwd+bwd"}, {"status": "oom", "error": str(exc)[:200]})


# forced forward configurations (E2F_TRITON_FWD_CONFIG syntax): today's default first (the
# reference the others are checked against), the previous default (GROUPS=4), TB > 1, and
# TB = 2 at 8 warps capped to 128 registers (40 B spilled) so two programs share an SM
DEFAULT_FWD_VARIANTS = [
    "TB=1,HC=16,GROUPS=2,num_warps=4",
    "TB=1,HC=16,GROUPS=4,num_warps=4",
    "TB=2,HC=16,GROUPS=8,num_warps=4",
    "TB=2,HC=16,GROUPS=4,num_warps=8",
    "TB=2,HC=16,GROUPS=4,num_warps=8,maxnreg=128",
    "TB=4,HC=16,GROUPS=4,num_warps=8",
]


def max_rel(a, b):
    """Largest elementwise difference relative to the largest magnitude of ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def bench_ms(fn):
    """Median forward time (GPU); on the CPU (a dry run) the wall time of one call."""
    if DEV != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_variants(out_dir, n, dtype, variants, k=32, layout="contiguous"):
    """Forward latency of each forced configuration at one N and q/k/v dtype (TF32 gate
    products), after checking its out, m and s against the first configuration's."""
    torch.set_float32_matmul_precision("high")
    inp = with_layout(inputs(n, dtype, seed=3, k=k), layout)
    t = {name: getattr(inp, name).detach() for name in F.TENSOR_NAMES}
    params = {"impl": "triton", "n_atoms": n, "dtype": str(dtype)[6:], "neighbors": k, "mode": "fwd",
              "value_layout": layout}
    reference = reference_name = None
    try:
        for text in variants:
            os.environ[F.FWD_CONFIG_ENV] = text
            try:
                with torch.no_grad():
                    got = F._forward(t, inp.rbf_gamma, inp.cutoff, inp.eps)  # compiles, outside the timing
                if reference is None:  # the first configuration that ran
                    reference, reference_name = got, text
                diffs = {f"max_rel_{name}": max_rel(a, b) for name, a, b in zip(("out", "m", "s"), got, reference)}
                del got
                ms = bench_ms(lambda: fused_attention_core(inp))
                emit(out_dir, "time-fwd-variant",
                     {**params, "forced": text, "reference": reference_name, "gate_matmul": last_config()["precision"]},
                     {"latency_ms": ms, "max_rel_vs_reference": max(diffs.values()), **diffs,
                      "config": last_config()["fwd"]})
            except Exception as exc:  # a variant that does not compile or run is data
                emit(out_dir, "time-fwd-variant", {**params, "forced": text}, {"status": "error", "error": str(exc)[:300]})
    finally:
        os.environ.pop(F.FWD_CONFIG_ENV, None)


def probe_variants(dtype=torch.float32) -> list[dict]:
    """Raw forward variants of the probe (padded value rows): the library's first configuration
    for ``dtype``, then with the profiling switches that skip the value gathers (AGG) and the
    gate MLP products (GATE), which split the forward's time between them and the rest; the
    same four without the register cap, if the first configuration has one (under the cap the
    switches change the spills: 6 -> 216 B with AGG off, perf-notes 21)."""
    first = F._fwd_candidates(dtype)[0]
    base = {**first.kwargs, "num_warps": first.num_warps, "num_stages": first.num_stages}
    bases = [base]
    if first.maxnreg is not None:
        bases = [{**base, "maxnreg": first.maxnreg}, base]
    return [{**b, **switches} for b in bases
            for switches in ({}, {"AGG": False}, {"GATE": False}, {"GATE": False, "AGG": False})]


def probe(out_dir, n=16384, dtype=torch.float32):
    """Raw forward-kernel variants (explicit meta-parameters, no autotuning), compiler
    resource report, a torch.profiler breakdown of one fwd+bwd step, its end-to-end time against
    its kernels', its synchronisations, and a cProfile of the host over ten steps
    (``host-cprofile-<n>-<dtype>.txt``)."""
    import triton
    import triton.testing

    from e2f.attention.triton import kernels as K
    torch.set_float32_matmul_precision("high")
    inp = with_layout(inputs(n) if dtype == torch.float32 else to_qkv(inputs(n), dtype), "padded")
    dtype_name = str(dtype).split(".")[-1]
    t = {name: getattr(inp, name).detach() for name in F.TENSOR_NAMES}
    d = F._dims(t)
    out = torch.empty(n, d["H"], d["DV"], device=DEV)
    m = torch.empty(n, d["H"], device=DEV)
    s = torch.empty_like(m)
    radial, inv_h = F.radial_table(t["rbf_centers"], t["w_radial"], inp.rbf_gamma, inp.cutoff)
    for var in probe_variants(dtype):
        grid = (triton.cdiv(n, var.get("TB", 1)),)

        def run():
            return K.fwd_kernel[grid](t["pos_dst"], t["pos_src"], t["nbr"], t["q"], t["k"], t["v"], t["gate_dst"],
                                      t["gate_src"], radial, t["w_out"], t["b_out"], out, m, s,
                                      n, d["K"], d["H"], d["G"], radial.shape[0] - 1, inv_h,
                                      float(inp.cutoff), float(inp.eps), 1.0 / d["DK"] ** 0.5, DK=d["DK"], DV=d["DV"],
                                      BK=d["BK"], DKP=d["DKP"], DVP=d["DVP"], GP=d["GP"], PREC="tf32", VS=d["VS"],
                                      **var)
        try:
            ck = run()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
            emit(out_dir, "probe-fwd", {"n_atoms": n, "dtype": dtype_name, **var},
                 {"latency_ms": ms, "n_regs": getattr(ck, "n_regs", None), "n_spills": getattr(ck, "n_spills", None),
                  "shared": getattr(getattr(ck, "metadata", None), "shared", None)})
        except Exception as exc:  # a variant that does not compile is data
            emit(out_dir, "probe-fwd", {"n_atoms": n, "dtype": dtype_name, **var},
                 {"status": "error", "error": str(exc)[:300]})
    # profiler breakdown of one fwd+bwd (current autotune setting)
    lv = leaves(inp)
    dout = torch.randn(n, d["H"], d["DV"], device=DEV)
    torch.autograd.grad(fused_attention_core(inp), lv, dout)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(fused_attention_core(inp), lv, dout)
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="cuda_time_total", row_limit=12)
    host = events.table(sort_by="self_cpu_time_total", row_limit=15)
    print(table, host, flush=True)
    with open(os.path.join(out_dir, "profile.txt"), "w") as f:
        f.write(table + "\n" + host)
    # end to end against the kernels' sum: what the GPU waits for (host work, synchronisations)
    e2e = triton.testing.do_bench(lambda: torch.autograd.grad(fused_attention_core(inp), lv, dout), warmup=3, rep=20,
                                  return_mode="median")
    emit(out_dir, "probe-e2e", {"n_atoms": n, "dtype": dtype_name, "l2_flushed": True},
         {"fwd_bwd_ms": e2e,
          "kernels_ms": sum(e.self_device_time_total for e in events if str(e.device_type).endswith("CUDA")) / 1e3,
          "host_ms": sum(e.self_cpu_time_total for e in events) / 1e3})
    torch.cuda.set_sync_debug_mode("warn")  # names every synchronising call of one step
    torch.autograd.grad(fused_attention_core(inp), lv, dout)
    torch.cuda.set_sync_debug_mode(0)
    # where the host's time goes without the profiler's own cost: Python functions (Triton's
    # launchers and autotuner among them) by time of their own over ten steps
    import cProfile
    import io
    import pstats
    with cProfile.Profile() as host_prof:
        for _ in range(10):
            torch.autograd.grad(fused_attention_core(inp), lv, dout)
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(host_prof, stream=text).sort_stats("tottime").print_stats(25)
    with open(os.path.join(out_dir, f"host-cprofile-{n}-{dtype_name}.txt"), "w") as f:
        f.write(text.getvalue())
    kernels = {}
    for fp32 in (True, False):
        tuned = F._configs(F.size_bucket(n), d["BK"], fp32)
        kernels.update({f"{name} {'fp32' if fp32 else '16-bit'}": tuned[name] for name in ("fwd", *F._BACKWARD)})
    for name, kern in kernels.items():
        try:
            for ck in kern.fn.device_caches[0][0].values():
                print(name, "regs", ck.n_regs, "spills", ck.n_spills, "shared", ck.metadata.shared, flush=True)
        except Exception as exc:
            print(name, "no resource report:", exc)


def guarded(fn, *a, **kw):
    import traceback
    try:
        fn(*a, **kw)
    except Exception:  # a failing stage is printed and the next one runs
        traceback.print_exc()
        sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sizes", type=int, nargs="*", default=[16384, 65536])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--big-check", action="store_true")
    ap.add_argument("--moments", action="store_true", help="--big-check of the moments form (CoreInputs.moments)")
    ap.add_argument("--no-materialized", action="store_true")
    ap.add_argument("--materialized-bwd", action="store_true")
    ap.add_argument("--fwd-only-sizes", type=int, nargs="*", default=[])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--mem-sizes", type=int, nargs="*", default=[], help="peak memory only (fp32)")
    ap.add_argument("--mem-k", type=int, nargs="*", default=[32], help="neighbour caps of the --mem-sizes points")
    ap.add_argument("--k-sweep", type=int, nargs="*", default=[], help="neighbour caps timed at N = 16,384 (fp32)")
    ap.add_argument("--probe", type=int, nargs="*", default=None, metavar="N",
                    help="the forward's time split at these atom counts (default 16,384), each of --dtypes")
    ap.add_argument("--ncu-fwd", type=int, default=0, help="run one forward at this N and exit (for ncu)")
    ap.add_argument("--ncu-bwd", type=int, default=0, help="run one forward + backward at this N and exit (for ncu)")
    ap.add_argument("--value-layouts", nargs="*", default=["contiguous"], choices=["contiguous", "padded"],
                    help="layouts of v timed back to back at every triton point (padded: head rows of "
                         "value_head_stride numbers, what the model and the suites give the kernel)")
    ap.add_argument("--fwd-variants", nargs="*", default=None, metavar="CONFIG",
                    help="instead of the standard timing of --sizes: the forward of each forced configuration "
                         "(E2F_TRITON_FWD_CONFIG syntax; none given: DEFAULT_FWD_VARIANTS), checked against the first")
    ap.add_argument("--num-rbf", type=int, default=None,
                    help="radial basis size R of every point (default: the workload's 256); a smaller R bounds "
                         "what a tabulated radial layer would save")
    args = ap.parse_args()
    if args.tiny:
        global DEV
        DEV = "cuda" if torch.cuda.is_available() else "cpu"
        DIMS.update(num_heads=4, head_dim=4, dv=6, gate_hidden=16, num_rbf=12)
    if args.num_rbf:
        DIMS["num_rbf"] = args.num_rbf
    ENV.update(env())
    print(ENV, flush=True)
    t0 = time.time()
    if args.ncu_fwd or args.ncu_bwd:
        torch.set_float32_matmul_precision("high")
        inp = with_layout(inputs(args.ncu_fwd or args.ncu_bwd), args.value_layouts[-1])
        if args.ncu_bwd:
            out = fused_attention_core(inp)
            torch.autograd.grad(out, leaves(inp), torch.randn_like(out))
        else:
            with torch.no_grad():
                fused_attention_core(inp)
        _sync()
        return
    probe_sizes = [] if args.probe is None else args.probe or [16384]  # bare --probe: 16,384
    for n in probe_sizes:
        for dt in args.dtypes:
            guarded(probe, args.out, n, getattr(torch, dt))
            print(f"[probe {dt} {n} done {time.time() - t0:.0f}s]", flush=True)
    if not args.skip_check:
        guarded(correctness, args.out, n=40 if args.tiny else 2048)
        print(f"[check done {time.time() - t0:.0f}s]", flush=True)
    for n in args.sizes if args.fwd_variants is not None else ():
        for dt in args.dtypes:
            guarded(fwd_variants, args.out, n, getattr(torch, dt), args.fwd_variants or DEFAULT_FWD_VARIANTS,
                    layout=args.value_layouts[-1])
            print(f"[fwd variants {dt} {n} done {time.time() - t0:.0f}s]", flush=True)
    for n in args.sizes if args.fwd_variants is None else ():
        for dt in args.dtypes:
            for layout in args.value_layouts:
                guarded(time_point, args.out, "triton", n, getattr(torch, dt), layout=layout)
                print(f"[{dt} {n} {layout} done {time.time() - t0:.0f}s]", flush=True)
        if n == 16384 and not args.no_materialized:
            guarded(time_point, args.out, "materialized", 16384, torch.float32, do_bwd=args.materialized_bwd)
            print(f"[materialized done {time.time() - t0:.0f}s]", flush=True)
    layout = args.value_layouts[-1]
    for kk in args.k_sweep:
        guarded(time_point, args.out, "triton", 16384, torch.float32, k=kk, layout=layout)
        print(f"[K={kk} done {time.time() - t0:.0f}s]", flush=True)
    for kk in args.mem_k:
        for n in args.mem_sizes:
            guarded(time_point, args.out, "triton", n, torch.float32, k=kk, timing=False, layout=layout)
            print(f"[memory K={kk} N={n} done {time.time() - t0:.0f}s]", flush=True)
    for n in args.fwd_only_sizes:
        for dt in args.dtypes:
            guarded(time_point, args.out, "triton", n, getattr(torch, dt), do_bwd=False)
    if args.big_check:
        guarded(big_check, args.out, layout=args.value_layouts[-1], moments=args.moments)
        print(f"[big check done {time.time() - t0:.0f}s]", flush=True)
    print("\n==== summary ====")
    for r in ROWS:
        m = r["metrics"]
        if r["kind"] in ("time", "memory"):
            p = r["params"]
            print(f"{p['impl']:12s} {p.get('value_layout', ''):10s} {p['dtype']:8s} N={p['n_atoms']:>8d} "
                  f"K={p['neighbors']:>3d} {p['mode']:8s} "
                  f"{m.get('latency_ms') or float('nan'):9.3f} ms  core {m.get('tflops_core') or 0:6.2f} TF  "
                  f"{(m.get('bytes_per_atom') or 0) / 1024:7.1f} KB/atom {m.get('status', '')} "
                  f"{p.get('max_rel_vs_first_layout', '')}")
        elif r["kind"] == "time-fwd-variant":
            p, c = r["params"], m.get("config") or {}
            print(f"fwd {p['dtype']:8s} N={p['n_atoms']:>8d} {p['forced']:40s} {m.get('latency_ms') or float('nan'):9.3f} ms  "
                  f"max rel {m.get('max_rel_vs_reference', float('nan')):.1e}  regs {c.get('n_regs')} "
                  f"spills {c.get('n_spills')} {m.get('status', '')}")
        else:
            print(r["kind"], {k: (round(v, 8) if isinstance(v, float) else v) for k, v in m.items()})
    print(last_config())


if __name__ == "__main__":
    main()
