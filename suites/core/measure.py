"""The standard metrics of one callable in one mode: what most suites' ``measure`` returns.

::

    from suites.core.measure import measure
    metrics = measure(lambda: model(batch), mode="fwd+bwd", device=cfg.device,
                      n_atoms=batch.num_atoms, flops=model.flops(batch), dtype="float32",
                      quick=cfg.quick)

Order of work: timing first (its warm-up also triggers Triton autotuning), then one
extra call for the CUDA peak, one for the saved-for-backward bytes and, on the CPU, one
for the RSS growth. See the README "Results schema" for every key.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from suites.core import flops as flops_mod
from suites.core import memory, roofs, timing
from suites.core.env import environment


def default_repeats(device, quick: bool) -> tuple[int, int]:
    """``(warmup, repeats)`` for a device and sweep size."""
    cuda = torch.device(device).type == "cuda"
    if quick:
        return (3, 10) if cuda else (1, 5)
    return (10, 50) if cuda else (2, 15)


def autotune_config(fn: Any) -> Any:
    """The Triton autotune config a callable exposes, or None.

    Looks for ``fn.autotune_config`` (a value, or a zero-argument callable returning it)
    and for Triton's ``Autotuner.best_config`` on ``fn`` or on ``fn.kernel``.
    """
    for owner in (fn, getattr(fn, "kernel", None)):
        if owner is None:
            continue
        value = getattr(owner, "autotune_config", None)
        if value is not None:
            return value() if callable(value) else value
        best = getattr(owner, "best_config", None)
        if best is not None:
            kwargs = getattr(best, "all_kwargs", None)
            return kwargs() if callable(kwargs) else str(best)
    return None


def measure(
    forward: Callable[[], Any],
    *,
    mode: str,
    device,
    n_atoms: int | None = None,
    flops: float | dict | None = None,
    bytes_moved: float | None = None,
    dtype=None,
    roof_dtype=None,
    quick: bool = True,
    warmup: int | None = None,
    repeats: int | None = None,
    flush_l2: bool = True,
    memory_metrics: bool = True,
    count_flops: bool = False,
    config: Any = None,
) -> dict:
    """Time and size ``forward`` in ``mode`` and return the standard metrics dict.

    Parameters
    ----------
    forward
        Zero-argument callable doing the forward work (inputs bound in a closure). For
        'bwd'/'fwd+bwd' its output must require grad; every differentiable output is
        seeded with ones.
    mode
        'fwd', 'bwd' (backward alone) or 'fwd+bwd'; see :func:`suites.core.timing.mode_callables`.
    device
        Where ``forward`` runs.
    n_atoms
        Atoms in the call; gives ``bytes_per_atom`` and ``saved_bytes_per_atom``.
    flops
        Analytic FLOPs **of the measured call in this mode** (a number, or
        ``{"core": ..., "total": ...}``); gives ``tflops_core``/``tflops_total``.
    bytes_moved
        Analytic bytes the call must move; gives ``gbps`` and ``bandwidth_fraction``.
    dtype, roof_dtype
        ``roof_dtype`` (else ``dtype``) picks the roof for ``roof_fraction``: pass 'tf32'
        for fp32 tensor-core kernels. No roof on the CPU or for an unknown GPU.
    quick, warmup, repeats, flush_l2
        Timing settings (defaults from :func:`default_repeats`).
    memory_metrics
        Measure peak/saved/RSS bytes (one extra call each).
    count_flops
        Also run once under ``FlopCounterMode`` (``flops_counted``; PyTorch ops only).
    config
        The autotune config to record; by default taken from ``forward`` if it exposes one.
    """
    w_default, r_default = default_repeats(device, quick)
    warmup = w_default if warmup is None else warmup
    repeats = r_default if repeats is None else repeats
    cuda = torch.device(device).type == "cuda"

    fn, setup = timing.mode_callables(forward, mode)
    # cached blocks left by building the inputs are returned first: a 1,048,576-atom forward
    # on an H100 asked for 29.0 GiB with 28.65 GiB free and 4.8 GiB cached but unusable
    if cuda:
        memory.free_memory(device)
    result = timing.benchmark(fn, device=device, warmup=warmup, repeats=repeats, setup=setup, flush_l2=flush_l2)
    metrics: dict[str, Any] = result.as_metrics()

    def run_once():
        return fn() if setup is None else fn(setup())

    if memory_metrics:
        memory.free_memory(device)
        peak = memory.peak_bytes_above_inputs(fn, device=device, setup=setup)
        saved = memory.saved_tensor_bytes(forward)
        metrics["peak_bytes"] = peak
        metrics["saved_bytes"] = saved
        if not cuda:
            metrics["rss_delta_bytes"] = memory.peak_rss_delta(run_once)
        if n_atoms:
            metrics["memory_source"] = "cuda_peak" if peak is not None else "saved"
            metrics["bytes_per_atom"] = (peak if peak is not None else saved) / n_atoms
            metrics["saved_bytes_per_atom"] = saved / n_atoms

    counts = flops_mod.normalize_flops(flops)
    latency = metrics["latency_ms"]
    gpu_name = environment(device)["gpu_name"] if cuda else None
    for part in ("core", "total"):
        if part in counts:
            metrics[f"flops_{part}"] = counts[part]
            metrics[f"tflops_{part}"] = flops_mod.tflops(counts[part], latency)
    achieved = metrics.get("tflops_core", metrics.get("tflops_total"))
    rdtype = roof_dtype if roof_dtype is not None else dtype
    if achieved is not None and rdtype is not None:
        metrics["roof_fraction"] = roofs.roof_fraction(achieved, gpu_name, rdtype)
    if bytes_moved:
        metrics["gbps"] = flops_mod.gbps(bytes_moved, latency)
        metrics["bandwidth_fraction"] = roofs.bandwidth_fraction(metrics["gbps"], gpu_name)
    if count_flops:
        metrics["flops_counted"], _ = flops_mod.counted_flops(run_once)

    chosen = config if config is not None else autotune_config(forward)
    if chosen is not None:
        metrics["config"] = chosen
    return metrics
