"""``kernel-tflops``: the ``attention-core`` workload per backend, dtype and N.

Workload (issue 4): atoms uniform in a periodic cube at 0.1 atoms/Å^3, cutoff 5 Å, the
K = 32 nearest kept, H = 128 heads, d = 8, dv = 58 (C = 256), gate hidden G = 128, R = 256
Gaussians; ``suites.workloads.core_inputs``. ``--quick`` (CPU) keeps the geometry and
shrinks the widths (``suites.workloads.QUICK_CORE``).

Metrics per point: latency (median), core and total TFLOPS, GB/s, fraction of the card's
roof, and the roofline bound.

``<backend>-moments`` (``triton-moments``, ...): the same backend computing the moments form
that E2Former-V2's layer uses with ``node_product="moments"`` (``CoreInputs.moments``): 9-row
values (``dv`` = 18 a head, ``CoreSizes.dv_moments``) weighted by the displacement as well,
``3 dv`` sums a head. The same geometry, gates and softmax; the point records its ``dv``.

FLOPs of one forward (a multiply-add = 2), the shared count registered in
``suites.core.flops`` as ``attention-core`` (K = neighbour *slots*, 32 per atom):

- ``core`` = N K (2 H d + 2 H dv + 8 H): q.k logits, the weighted sum of v, and 8 per
  (edge, head) for the softmax (the public code's count; dv = 58 for the paper's sizes):
  573,440 FLOPs per atom;
- ``total`` = core + N 2 K (R G + G 2H): the in-kernel gate (radial layer and output layer):
  4,767,744 FLOPs per atom.

Other per-edge work, counted apart as ``flops_elementwise`` over the E kept edges (and
``tflops_with_elementwise`` = (total + elementwise) / latency): E [4 R (Gaussians:
subtract, square, scale, exp) + 6 G (adding the two per-node parts of the first gate layer,
SiLU) + 2 H (output bias) + 18 (distance, x = d/r_c, envelope, 1/d)].

Forward+backward counts 3x the forward (backward = 2x forward, the usual useful-FLOP
convention; recomputation inside a fused backward is not counted as useful).

Bytes (compulsory traffic, each tensor touched once): forward reads every ``CoreInputs``
tensor (I bytes) and writes ``out`` (O); forward+backward adds a backward that reads the
inputs and ``grad_out`` and writes one gradient per input: 3 I + 2 O. GB/s = bytes / latency.

Roof: ``roof_fraction`` = core TFLOPS / the card's dense peak for the dtype (fp32: the
plain-fp32 peak for the PyTorch backends, TF32 tensor cores for ``triton``, whose ``tl.dot``
uses them; ``roof_dtype`` is recorded). ``roofline_fraction`` = total TFLOPS /
min(peak, arithmetic intensity x HBM bandwidth) and ``roof_bound`` says which limits.

The dense reference ``sdpa-dense``: ``torch.nn.functional.scaled_dot_product_attention``
over all N atoms as one sequence with the same heads: FlashAttention when it applies
(equal head dims: q, k and v zero-padded to 64), else the memory-efficient kernel (q/k at
d = 8, v padded to 64); the math backend is never used (it materialises N^2). Useful FLOPs
2 N^2 H (d + dv) forward (padding not counted; ``flops_executed`` counts it). Capped at
N <= 65,536 on the GPU (N^2 work: beyond it a point takes minutes), recorded as skipped above.
"""
from __future__ import annotations

import math

import torch

from suites import workloads
from suites.core import roofs
from suites.core.env import environment
from suites.core.measure import measure
from suites.core.runner import Point, SkipPoint, Suite, SweepConfig, register_suite

BACKENDS = ("materialized", "chunked", "triton")
MOMENTS_SUFFIX = "-moments"
MOMENT_IMPLS = tuple(b + MOMENTS_SUFFIX for b in BACKENDS)
DENSE = "sdpa-dense"
QUICK_SIZES = (128, 512)
FULL_SIZES = (1024, 4096, 16384, 65536, 262144, 1048576)
DENSE_MAX_N = 65536
DENSE_MAX_N_CPU = 4096
MODES = ("fwd", "fwd+bwd")


def backend_of(impl: str) -> tuple[str, bool]:
    """``(attention-core backend, moments form?)`` of an implementation name."""
    return impl.removesuffix(MOMENTS_SUFFIX), impl.endswith(MOMENTS_SUFFIX)


def core_flops(n_atoms: int, sizes: workloads.CoreSizes, mode: str, moments: bool = False) -> dict:
    """Useful FLOPs of one attention-core call: the shared count
    ``suites.core.flops.analytic_flops("attention-core", ...)`` (K neighbour slots per atom),
    times 3 for forward+backward."""
    from suites.core.flops import analytic_flops

    counts = analytic_flops("attention-core", n_atoms=n_atoms, neighbors=sizes.neighbors, heads=sizes.heads,
                            dk=sizes.head_dim, dv=sizes.dv_moments if moments else sizes.dv, num_rbf=sizes.num_rbf,
                            gate_hidden=sizes.gate_hidden, moments=moments)
    scale = 1.0 if mode == "fwd" else 3.0
    return {k: scale * v for k, v in counts.items()}


def elementwise_flops(n_edges: int, sizes: workloads.CoreSizes, mode: str) -> float:
    """Per-edge work outside ``total`` (module docstring), over the kept edges; 3x for fwd+bwd."""
    per_edge = 4 * sizes.num_rbf + 6 * sizes.gate_hidden + 2 * sizes.heads + 18
    return (1.0 if mode == "fwd" else 3.0) * n_edges * per_edge


def core_bytes(inp, mode: str) -> float:
    """Compulsory bytes of one call (module docstring): I + O forward, 3 I + 2 O forward+backward."""
    i = sum(t.numel() * t.element_size() for t in inp.tensors().values())
    n, h = inp.q.shape[:2]
    o = n * h * inp.v.shape[-1] * (3 if inp.moments else 1) * inp.v.element_size()
    return float(i + o) if mode == "fwd" else float(3 * i + 2 * o)


def dense_flops(n: int, sizes: workloads.CoreSizes, mode: str, dk: int | None = None, dv: int | None = None) -> float:
    """2 N^2 H (dk + dv) forward (softmax not counted), 3x for forward+backward."""
    dk = sizes.head_dim if dk is None else dk
    dv = sizes.dv if dv is None else dv
    return (1.0 if mode == "fwd" else 3.0) * 2.0 * n * n * sizes.heads * (dk + dv)


def _roofline(metrics: dict, gpu_name: str | None, roof_dtype: str) -> None:
    roof = roofs.roof_for(gpu_name)
    flops, lat, nbytes = metrics.get("flops_total"), metrics.get("latency_ms"), metrics.get("bytes_moved")
    if roof is None or not flops or not lat or not nbytes:
        return
    peak = roof.peak_tflops(roof_dtype)
    if not peak:
        return
    intensity = flops / nbytes  # FLOP per byte
    memory_tflops = intensity * roof.hbm_gbps / 1e3
    attainable = min(peak, memory_tflops)
    metrics["arithmetic_intensity"] = intensity
    metrics["roof_attainable_tflops"] = attainable
    metrics["roofline_fraction"] = (flops / (lat * 1e-3) / 1e12) / attainable
    metrics["roof_bound"] = "compute" if peak <= memory_tflops else "memory"


@register_suite
class KernelTflops(Suite):
    name = "kernel-tflops"
    description = ("attention-core workload (0.1/Å^3, r_c 5, K 32, H 128, d 8, dv 58; <backend>-moments: the moments "
                   "form, dv 18): latency, core/total TFLOPS, GB/s and fraction of roof per backend, dtype and N; "
                   "dense SDPA (FlashAttention) reference line")
    impls = (*BACKENDS, *MOMENT_IMPLS, DENSE)
    metrics = ("latency_ms", "tflops_core", "tflops_total", "gbps", "roof_fraction", "roofline_fraction", "peak_bytes")

    def sizes(self, cfg: SweepConfig) -> workloads.CoreSizes:
        return workloads.QUICK_CORE if cfg.quick else workloads.PAPER_CORE

    def points(self, cfg: SweepConfig) -> list[Point]:
        s = self.sizes(cfg)
        dtypes = cfg.pick_dtypes(("float32",) if cfg.quick else ("float32", "bfloat16"))
        out = []
        # N, dtype and the form outermost: the points of one (N, dtype, form) share one drawn
        # workload (suites.workloads keeps one); the moments draw their narrower values apart.
        forms = ([i for i in self.impls if not backend_of(i)[1]], [i for i in self.impls if backend_of(i)[1]])
        for n in cfg.pick_sizes(QUICK_SIZES, FULL_SIZES):
            for dtype in dtypes:
                for impls in forms:
                    for mode in MODES:
                        for impl in impls:
                            out.append(Point(impl, dict(
                                n_atoms=int(n), dtype=dtype, mode=mode, neighbors=s.neighbors, heads=s.heads,
                                head_dim=s.head_dim, dv=s.dv_moments if backend_of(impl)[1] else s.dv,
                                gate_hidden=s.gate_hidden, num_rbf=s.num_rbf, density=s.density, cutoff=s.cutoff)))
        return out

    def unavailable(self, impl: str, cfg: SweepConfig) -> str | None:
        backend, _ = backend_of(impl)
        if backend in BACKENDS:
            try:
                from e2f.attention.backends import unavailable_reason
            except ImportError as exc:
                return f"e2f.attention.backends cannot be imported ({exc})"
            return unavailable_reason(backend, cfg.device)
        return None

    def measure(self, point: Point, cfg: SweepConfig) -> dict:
        p = point.params
        backend, moments = backend_of(point.impl)
        sizes = workloads.CoreSizes(density=p["density"], cutoff=p["cutoff"], neighbors=p["neighbors"], heads=p["heads"],
                                    head_dim=p["head_dim"], gate_hidden=p["gate_hidden"], num_rbf=p["num_rbf"],
                                    **({"dv_moments": p["dv"]} if moments else {"dv": p["dv"]}))
        if point.impl == DENSE:
            return self._measure_dense(p, sizes, cfg)
        dtype = workloads.torch_dtype(p["dtype"])
        tf32 = workloads.speed_precision(cfg)
        inp = workloads.cached_core_inputs(p["n_atoms"], sizes=sizes, dtype=dtype, device=cfg.device, seed=cfg.seed,
                                           requires_grad=p["mode"] != "fwd", backend=backend, moments=moments)
        forward = workloads.core_call(backend, inp)
        n_edges = workloads.num_edges(inp.nbr)
        nbytes = core_bytes(inp, p["mode"])
        fp32 = p["dtype"] == "float32"
        roof_dtype = ("tf32" if backend == "triton" else "fp32") if fp32 else p["dtype"]
        warmup, repeats = workloads.timing_plan(forward, p["mode"], cfg)
        metrics = measure(forward, mode=p["mode"], device=cfg.device, n_atoms=p["n_atoms"],
                          flops=core_flops(p["n_atoms"], sizes, p["mode"], moments), bytes_moved=nbytes, dtype=p["dtype"],
                          roof_dtype=roof_dtype, quick=cfg.quick, warmup=warmup, repeats=repeats)
        ew = elementwise_flops(n_edges, sizes, p["mode"])
        metrics.update(n_edges=n_edges, bytes_moved=nbytes, roof_dtype=roof_dtype, flops_elementwise=ew,
                       tflops_with_elementwise=(metrics["flops_total"] + ew) / (metrics["latency_ms"] * 1e-3) / 1e12,
                       tf32_matmul=tf32)
        config = workloads.core_config(backend)
        if config is not None:
            metrics["config"] = config
        _roofline(metrics, environment(cfg.device)["gpu_name"] if cfg.is_cuda else None, roof_dtype)
        return metrics

    def _measure_dense(self, p: dict, sizes: workloads.CoreSizes, cfg: SweepConfig) -> dict:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        n, h = p["n_atoms"], sizes.heads
        cap = DENSE_MAX_N if cfg.is_cuda else DENSE_MAX_N_CPU
        if n > cap:
            raise SkipPoint(f"dense N^2 attention above the suite's cap N <= {cap} on {cfg.torch_device.type}")
        dtype = workloads.torch_dtype(p["dtype"])
        pad = lambda x: max(8, math.ceil(x / 8) * 8)  # noqa: E731 -- kernels want multiples of 8
        gen = torch.Generator().manual_seed(cfg.seed)
        attempts = ((SDPBackend.FLASH_ATTENTION, max(pad(sizes.head_dim), pad(sizes.dv)), max(pad(sizes.head_dim), pad(sizes.dv))),
                    (SDPBackend.EFFICIENT_ATTENTION, pad(sizes.head_dim), pad(sizes.dv)),
                    (SDPBackend.CUDNN_ATTENTION, max(pad(sizes.head_dim), pad(sizes.dv)), max(pad(sizes.head_dim), pad(sizes.dv))))
        failures = []
        for backend, dk_pad, dv_pad in attempts:
            def tensor(width, used):
                t = torch.zeros(1, h, n, width, dtype=dtype)
                t[..., :used] = torch.randn(1, h, n, used, generator=gen, dtype=torch.float32).to(dtype)
                return t.to(cfg.device).requires_grad_(p["mode"] != "fwd")

            q, k, v = tensor(dk_pad, sizes.head_dim), tensor(dk_pad, sizes.head_dim), tensor(dv_pad, sizes.dv)
            scale = 1.0 / math.sqrt(sizes.head_dim)

            def forward():
                with sdpa_kernel([backend]):
                    return sdpa(q, k, v, scale=scale)

            try:
                with torch.no_grad():
                    forward()
            except RuntimeError as exc:
                if "out of memory" in str(exc).lower():
                    raise
                failures.append(f"{backend.name}: {str(exc).splitlines()[0][:80]}")
                continue
            warmup, repeats = workloads.timing_plan(forward, p["mode"], cfg)
            useful = dense_flops(n, sizes, p["mode"])
            executed = dense_flops(n, sizes, p["mode"], dk_pad, dv_pad)
            nbytes = (3 if p["mode"] != "fwd" else 1) * (q.numel() + k.numel() + 2 * v.numel()) * q.element_size()
            metrics = measure(forward, mode=p["mode"], device=cfg.device, n_atoms=n,
                              flops={"core": useful, "total": useful}, bytes_moved=nbytes, dtype=p["dtype"],
                              quick=cfg.quick, warmup=warmup, repeats=repeats)
            metrics.update(sdpa_backend=backend.name, padded_head_dim=dk_pad, padded_dv=dv_pad,
                           flops_executed=executed, tflops_executed=executed / (metrics["latency_ms"] * 1e-3) / 1e12,
                           bytes_moved=nbytes, roof_dtype=p["dtype"])
            _roofline(metrics, environment(cfg.device)["gpu_name"] if cfg.is_cuda else None, p["dtype"])
            return metrics
        raise SkipPoint("no fused SDPA kernel applies (" + "; ".join(failures) + ")")
