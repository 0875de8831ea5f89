"""``latency``: whole-model energy + forces vs N for all four models (the paper's Figure 1), and
E2Former-V2's moments form (``e2former-v2-moments``).

Per model, mode and N (periodic liquid-density boxes, ``suites.workloads.liquid_box``):
median latency and IQR, ``atoms_per_s`` = N / latency, and for ``fwd`` (an MD step:
energy + forces) ``ns_per_day`` at a 1 fs time step = (86,400 s / latency) x 1e-6 ns.
``fwd+bwd`` is a force-matching training step (double backward through the forces).

``--quick`` (CPU): the tiny preset, N = 32..128. ``--full`` (GPU): the paper setting
(L = 2, C = 256, 4 blocks, K = 32), N = 100 .. 1,000,000; an OOM stops that model's series
(the runner skips larger N). Slow points get fewer repeats (``suites.workloads.timing_plan``).
"""
from __future__ import annotations

from suites import workloads
from suites.core.measure import measure
from suites.core.runner import Point, Suite, SweepConfig, register_suite

MODELS = ("e2former-v2", "e2former-v2-moments", "e2former-v1", "escn-md", "dense-tp")
MODES = ("fwd", "fwd+bwd")
QUICK_SIZES = (32, 64, 128)
FULL_SIZES = (100, 300, 1000, 3000, 10000, 30000, 100000, 300000, 1000000)
MD_STEP_FS = 1.0


def md_rates(n_atoms: int, latency_ms: float, step_fs: float = MD_STEP_FS) -> dict:
    """atoms/s and ns/day of MD at ``step_fs`` when one step takes ``latency_ms``."""
    steps_per_day = 86400.0 / (latency_ms * 1e-3)
    return {"atoms_per_s": n_atoms / (latency_ms * 1e-3), "ns_per_day": steps_per_day * step_fs * 1e-6,
            "md_step_fs": step_fs}


@register_suite
class Latency(Suite):
    name = "latency"
    description = "whole-model energy+forces latency vs N (fwd: inference/MD, fwd+bwd: training step); atoms/s, ns/day at 1 fs"
    impls = MODELS
    metrics = ("latency_ms", "latency_iqr_ms", "atoms_per_s", "ns_per_day", "flops_total")

    def points(self, cfg: SweepConfig) -> list[Point]:
        dtype = cfg.pick_dtypes(("float32",))[0]
        lmax = cfg.pick_lmax((2,), (2,))[0]
        return [Point(m, {"n_atoms": int(n), "mode": mode, "dtype": dtype, "lmax": lmax, "neighbors": 32})
                for m in self.impls for mode in MODES for n in cfg.pick_sizes(QUICK_SIZES, FULL_SIZES)]

    def unavailable(self, impl: str, cfg: SweepConfig) -> str | None:
        return workloads.model_unavailable(impl)

    def measure(self, point: Point, cfg: SweepConfig) -> dict:
        p = point.params
        tf32 = workloads.speed_precision(cfg)
        forward, module, batch = workloads.model_point(point.impl, p, cfg)
        warmup, repeats = workloads.timing_plan(forward, p["mode"], cfg)
        metrics = measure(forward, mode=p["mode"], device=cfg.device, n_atoms=p["n_atoms"], dtype=p["dtype"],
                          quick=cfg.quick, warmup=warmup, repeats=repeats, memory_metrics=False)
        rates = md_rates(p["n_atoms"], metrics["latency_ms"])
        metrics.update(atoms_per_s=rates["atoms_per_s"], tf32_matmul=tf32)
        if p["mode"] == "fwd":
            metrics.update(ns_per_day=rates["ns_per_day"], md_step_fs=rates["md_step_fs"])
        flops = module.flops(batch)
        metrics["flops_energy_core"] = flops.get("core")
        metrics["flops_energy_total"] = flops.get("total")
        return metrics
