"""Where a whole-model call spends its time: torch.profiler on one warm call.

Run from the repository root (CPU or GPU)::

    PYTHONPATH=. python scripts/profile_model.py --model e2former-v2 --n 1000 --out prof.json

Builds the model at the suites' default (paper) configuration, on a liquid-density box of
``--n`` atoms, exactly as the ``latency`` suite calls it (``fwd``: energy + forces in eval
mode; ``fwd+bwd``: a force-training step through the double backward) and at the suites'
precision (TF32 products on a GPU), warms it up (Triton autotuning included), then profiles
one call per mode. Prints, per mode: wall time, device time (sum of kernel times), the
number of launched kernels and aten ops, and the top entries by device (or CPU) time; writes
the same as JSON. Launch-bound calls show wall time far above device time.

``--host`` adds where the host's time goes, for launch-bound calls: one more call under
cProfile (the functions of this repository and of torch with the most time of their own and
in all) and, on a GPU, the calls that synchronise the host with the device (CUDA's
sync-debug mode), counted by the line of this repository that made them.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import time
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from baselines.registry import default_config
from suites.workloads import liquid_box, model_call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_call(fn, device: torch.device, top: int) -> dict:
    fn()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    on_device = device.type == "cuda"
    kernels = [e for e in events if on_device and e.device_time_total > 0 and e.device_type.name == "CUDA"]
    ops = [e for e in events if e.key.startswith("aten::")]
    key = (lambda e: e.device_time_total) if on_device else (lambda e: e.self_cpu_time_total)
    rows = sorted(kernels if on_device else ops, key=key, reverse=True)[:top]
    return {
        "wall_ms": wall * 1e3,
        "device_ms": sum(e.device_time_total for e in kernels) / 1e3 if on_device else None,
        "kernel_launches": sum(e.count for e in kernels) if on_device else None,
        "aten_ops": sum(e.count for e in ops),
        "top": [{"name": e.key[:120], "count": e.count, "ms": key(e) / 1e3} for e in rows],
    }


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _repo_line(stack) -> str:
    """``file:line function`` of the innermost frame of this repository (not this script)."""
    frames = [f for f in stack if os.path.abspath(f.filename).startswith(REPOSITORY + os.sep)
              and os.path.abspath(f.filename) != os.path.abspath(__file__) and "/site-packages/" not in f.filename]
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"


def host_profile(fn, device: torch.device, top: int) -> dict:
    """cProfile of one call, and the host synchronisations by the repository line making them."""
    fn()
    _sync(device)
    prof = cProfile.Profile()
    prof.enable()
    fn()
    _sync(device)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, name), (_, calls, own, total, _) in stats.stats.items():
        rows.append({"function": f"{os.path.basename(filename)}:{line} {name}", "calls": calls,
                     "own_ms": own * 1e3, "total_ms": total * 1e3})
    syncs = collections.Counter()
    if device.type == "cuda":
        with warnings.catch_warnings():  # restores showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = lambda *args, **kwargs: syncs.update([_repo_line(traceback.extract_stack())])
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
                _sync(device)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    return {"by_own_time": sorted(rows, key=lambda r: -r["own_ms"])[:top],
            "by_total_time": sorted(rows, key=lambda r: -r["total_ms"])[:top],
            "syncs": dict(syncs.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="e2former-v2")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None)
    ap.add_argument("--host", action="store_true", help="also cProfile one call and list its host synchronisations")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 products, as the suites time fp32 (workloads.speed_precision)
    batch = liquid_box(a.n, device=device)
    result = {"model": a.model, "n_atoms": a.n, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "tf32_matmul": torch.get_float32_matmul_precision() != "highest"}
    for mode in ("fwd", "fwd+bwd"):
        forward, module = model_call(a.model, default_config(), batch, mode, device=device)

        def call():
            energy, forces = forward()
            if mode == "fwd+bwd":
                (energy.sum() + forces.square().sum()).backward()

        r = profile_call(call, device, a.top)
        result[mode] = r
        print(f"== {a.model} N={a.n} {mode}: wall {r['wall_ms']:.1f} ms, device {r['device_ms']} ms, "
              f"{r['kernel_launches']} kernels, {r['aten_ops']} aten ops")
        for row in r["top"]:
            print(f"  {row['ms']:9.2f} ms  x{row['count']:<6} {row['name']}")
        if a.host:
            h = host_profile(call, device, a.top)
            r["host"] = h
            for title, key in (("own", "own_ms"), ("total", "total_ms")):
                print(f"  -- host, by {title} time")
                for row in h[f"by_{title}_time"]:
                    print(f"  {row[key]:9.2f} ms  x{row['calls']:<6} {row['function'][:110]}")
            print(f"  -- host synchronisations: {sum(h['syncs'].values())}")
            for where, count in h["syncs"].items():
                print(f"  x{count:<5} {where}")
        del forward, module
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
