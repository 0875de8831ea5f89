"""``memory-scaling``: activation memory vs N for every model, the attention layer and core.

For each implementation, mode (``fwd``, ``fwd+bwd``) and N (liquid-density boxes,
``suites.workloads.liquid_box``; the attention core on its own workload,
``suites.workloads.core_inputs``):

- ``peak_bytes``: peak CUDA bytes allocated above the inputs (``suites.core.memory``; on
  the CPU there is no allocator peak and ``rss_delta_bytes`` is the coarse stand-in);
- ``saved_bytes``: bytes autograd keeps for backward during the forward (any device);
- ``bytes_per_atom``; out-of-memory points are stored with ``status='oom'`` (and larger N
  of the same series are then skipped by the runner).

Implementations: the four models (``e2former-v2``, ``e2former-v1``, ``escn-md``,
``dense-tp``; whole model, energy + forces), ``layer:<model>`` (its interaction layer
alone, ``baselines.registry.build_layer``) and ``core:<backend>`` (the attention core:
materialized, chunked, triton). For a model, ``fwd`` is inference (energy + forces) and
``fwd+bwd`` a training step (the backward through the forces, double backward).
The log-log slope and bytes/atom per implementation are computed at report time
(``reports.render.memory_slopes``).

Sizes: ``--quick`` (CPU) models at the tiny preset on 32..128 atoms and the core at the
reduced widths on 128..512; ``--full`` (GPU) the paper setting on 100 .. 1,000,000 atoms
and the paper's core sizes on 1,024 .. 1,048,576.
"""
from __future__ import annotations

import torch

from suites import workloads
from suites.core.measure import measure
from suites.core.runner import Point, Suite, SweepConfig, register_suite

MODELS = ("e2former-v2", "e2former-v1", "escn-md", "dense-tp")
BACKENDS = ("materialized", "chunked", "triton")
MODES = ("fwd", "fwd+bwd")
QUICK_MODEL_SIZES = (32, 64, 128)
FULL_MODEL_SIZES = (100, 300, 1000, 3000, 10000, 30000, 100000, 300000, 1000000)
QUICK_CORE_SIZES = (128, 256, 512)
FULL_CORE_SIZES = (1024, 4096, 16384, 65536, 262144, 1048576)
# Memory is the point here: a few timed calls only (quick: one).
QUICK_TIMING, FULL_TIMING = (0, 1), (1, 3)


def kind(impl: str) -> tuple[str, str]:
    """('model' | 'layer' | 'core', name)."""
    if impl.startswith("layer:"):
        return "layer", impl.split(":", 1)[1]
    if impl.startswith("core:"):
        return "core", impl.split(":", 1)[1]
    return "model", impl


@register_suite
class MemoryScaling(Suite):
    name = "memory-scaling"
    description = ("peak activation bytes above inputs and bytes saved for backward vs N (liquid-density boxes), "
                   "fwd and fwd+bwd, for every model, its attention layer and the attention core")
    impls = (*MODELS, *(f"layer:{m}" for m in MODELS), *(f"core:{b}" for b in BACKENDS))
    metrics = ("peak_bytes", "saved_bytes", "bytes_per_atom", "rss_delta_bytes", "latency_ms")

    def points(self, cfg: SweepConfig) -> list[Point]:
        dtype = cfg.pick_dtypes(("float32",))[0]
        lmax = cfg.pick_lmax((2,), (2,))[0]
        out = []
        for impl in self.impls:
            what, _ = kind(impl)
            if what == "core":
                continue
            for mode in MODES:
                for n in cfg.pick_sizes(QUICK_MODEL_SIZES, FULL_MODEL_SIZES):
                    out.append(Point(impl, {"n_atoms": int(n), "mode": mode, "dtype": dtype, "neighbors": 32, "lmax": lmax}))
        # The core points N-outermost: the backends of one N share one drawn workload.
        for n in cfg.pick_sizes(QUICK_CORE_SIZES, FULL_CORE_SIZES):
            for mode in MODES:
                for impl in self.impls:
                    if kind(impl)[0] == "core":
                        out.append(Point(impl, {"n_atoms": int(n), "mode": mode, "dtype": dtype, "neighbors": 32}))
        return out

    def unavailable(self, impl: str, cfg: SweepConfig) -> str | None:
        what, name = kind(impl)
        if what == "core":
            try:
                from e2f.attention.backends import unavailable_reason
            except ImportError as exc:
                return f"e2f.attention.backends cannot be imported ({exc})"
            return unavailable_reason(name, cfg.device)
        return workloads.model_unavailable(name)

    def measure(self, point: Point, cfg: SweepConfig) -> dict:
        p = point.params
        what, name = kind(point.impl)
        dtype = workloads.torch_dtype(p["dtype"])
        n = p["n_atoms"]
        tf32 = workloads.speed_precision(cfg)
        if what == "core":
            sizes = workloads.QUICK_CORE if cfg.quick else workloads.PAPER_CORE
            inp = workloads.cached_core_inputs(n, sizes=sizes, dtype=dtype, device=cfg.device, seed=cfg.seed,
                                               requires_grad=True, backend=name)
            forward = workloads.core_call(name, inp)
            extra = {"n_edges": workloads.num_edges(inp.nbr), "input_bytes": _bytes(inp.tensors().values())}
        else:
            workloads.clear_cache()  # a cached core workload would sit in the memory measured here
            config = workloads.model_config(cfg.quick, lmax=p.get("lmax", 2), max_neighbors=p["neighbors"])
            batch = workloads.liquid_box(n, seed=cfg.seed, device=cfg.device, dtype=dtype)
            if what == "layer":
                forward, _, inputs = workloads.layer_call(name, config, batch, device=cfg.device, dtype=dtype, seed=cfg.seed)
                extra = {"input_bytes": _bytes(_tensors(inputs))}
            else:
                forward, _ = workloads.model_call(name, config, batch, p["mode"], device=cfg.device, dtype=dtype, seed=cfg.seed)
                extra = {"input_bytes": _bytes([batch.pos])}
        metrics = measure(forward, mode=p["mode"], device=cfg.device, n_atoms=n, dtype=p["dtype"], quick=cfg.quick,
                          warmup=(QUICK_TIMING if cfg.quick else FULL_TIMING)[0],
                          repeats=(QUICK_TIMING if cfg.quick else FULL_TIMING)[1])
        metrics.update(extra, tf32_matmul=tf32)
        config = workloads.core_config(name) if what == "core" else None
        if config is not None:
            metrics["config"] = config
        return metrics


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif hasattr(obj, "__dataclass_fields__"):
        obj = [getattr(obj, f) for f in obj.__dataclass_fields__]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _bytes(tensors) -> int:
    """Bytes the tensors' storages hold (each storage once: a padded view counts its padding)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return int(sum(storages.values()))
