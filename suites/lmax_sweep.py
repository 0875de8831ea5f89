"""``lmax-sweep``: latency, FLOPs and memory vs L_max at fixed N for the four models.

L_max = 1..6 (as far as each model fits: an OOM is stored and the sweep goes on), fixed N
(liquid-density periodic box), modes ``fwd`` (energy + forces) and ``fwd+bwd`` (training
step). Metrics: latency, ``flops_core``/``flops_total`` (the model's analytic count of one
*energy forward*, ``module.flops``: the scaling with L, not the FLOPs of the timed call),
peak bytes above the inputs (GPU), bytes saved for backward.

``--quick`` (CPU): tiny preset, N = 48, L = 1..3. ``--full`` (GPU): the paper setting at
N = 4,096, L = 1..6. ``--sizes`` sets N (the first value), ``--lmax`` the degrees.
"""
from __future__ import annotations

from suites import workloads
from suites.core.measure import measure
from suites.core.runner import Point, Suite, SweepConfig, register_suite

MODELS = ("e2former-v2", "e2former-v1", "escn-md", "dense-tp")
MODES = ("fwd", "fwd+bwd")
QUICK_N, FULL_N = 48, 4096
QUICK_LMAX, FULL_LMAX = (1, 2, 3), (1, 2, 3, 4, 5, 6)


@register_suite
class LmaxSweep(Suite):
    name = "lmax-sweep"
    description = "latency, FLOPs and memory vs L_max (1..6) at fixed N for every model"
    impls = MODELS
    metrics = ("latency_ms", "flops_core", "flops_total", "peak_bytes", "saved_bytes")

    def points(self, cfg: SweepConfig) -> list[Point]:
        dtype = cfg.pick_dtypes(("float32",))[0]
        n = cfg.pick_sizes((QUICK_N,), (FULL_N,))[0]
        # Degree-major: a sweep cut short (a capped GPU call) still compares every model at
        # the degrees it reached.
        return [Point(m, {"n_atoms": int(n), "lmax": int(lmax), "mode": mode, "dtype": dtype, "neighbors": 32})
                for mode in MODES for lmax in cfg.pick_lmax(QUICK_LMAX, FULL_LMAX) for m in self.impls]

    def unavailable(self, impl: str, cfg: SweepConfig) -> str | None:
        return workloads.model_unavailable(impl)

    def measure(self, point: Point, cfg: SweepConfig) -> dict:
        p = point.params
        tf32 = workloads.speed_precision(cfg)
        forward, module, batch = workloads.model_point(point.impl, p, cfg)
        warmup, repeats = workloads.timing_plan(forward, p["mode"], cfg)
        metrics = measure(forward, mode=p["mode"], device=cfg.device, n_atoms=p["n_atoms"], dtype=p["dtype"],
                          quick=cfg.quick, warmup=warmup, repeats=repeats)
        flops = module.flops(batch)
        metrics.update(flops_core=flops.get("core"), flops_total=flops.get("total"), flops_basis="energy forward (analytic)",
                       parameters=sum(t.numel() for t in module.parameters()), tf32_matmul=tf32)
        return metrics
