"""``smoke``: a seconds-long end-to-end check of the harness (timing, memory, records).

Implementations:

- ``matmul``: ``(a @ b).relu()`` on square ``n x n`` matrices, both inputs requiring
  grad. Analytic FLOPs: forward ``2 n^3``, backward ``4 n^3`` (one product per input
  gradient), forward+backward ``6 n^3``.
- ``core-<backend>``: one attention-core call (``e2f.attention``) on tiny random inputs
  built here: ``n_atoms`` atoms in a cube at 0.1 atoms/Å^3, the ``SMOKE_K`` nearest
  within the cutoff as neighbours. ``core-materialized`` is the reference oracle and
  always runs; the other backends run where ``e2f.attention.backends`` says they can.
  Forward points carry the registered ``attention-core`` analytic count; every point also
  records ``flops_counted`` (FlopCounterMode) as a cross-check.
- every model of ``baselines.registry`` (tiny preset): energy + forces of ``n_atoms / 12``
  benzene molecules in one batch; ``flops_energy_forward`` is the model's analytic count
  of one energy forward (not of the measured call, which adds the force pass).
  A model that cannot be built here is recorded as skipped, with the reason.
"""
from __future__ import annotations

import math

import torch

from suites.core.flops import analytic_flops
from suites.core.measure import measure
from suites.core.runner import Point, Suite, SweepConfig, register_suite, torch_dtype

SMOKE_K = 8
_HEADS, _DK, _DV, _RBF, _GATE = 2, 4, 6, 8, 8
_CORE_BACKENDS = ("materialized", "chunked", "triton")
_MOLECULE, _MOLECULE_ATOMS = "C6H6", 12
try:
    from baselines.registry import MODEL_NAMES as _MODELS
except ImportError:  # listed anyway; unavailable() tells why they cannot run
    _MODELS = ("e2former-v2", "e2former-v2-moments", "e2former-v1", "escn-md", "dense-tp")


def matmul_flops(n: int, mode: str) -> float:
    """Analytic FLOPs of ``(a @ b)`` for n x n matrices in ``mode`` (see the module docstring)."""
    return {"fwd": 2.0, "bwd": 4.0, "fwd+bwd": 6.0}[mode] * n**3


def smoke_core_inputs(n_atoms: int, *, dtype: torch.dtype, device, generator: torch.Generator):
    """Tiny attention-core inputs (molecule-like: sources are the atoms themselves)."""
    from e2f.attention.core import CoreInputs

    cutoff = 5.0
    side = (n_atoms / 0.1) ** (1.0 / 3.0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    pos = torch.rand(n_atoms, 3, generator=generator, dtype=torch.float64) * side
    dist = torch.cdist(pos, pos)
    dist.fill_diagonal_(math.inf)
    k = min(SMOKE_K, max(n_atoms - 1, 1))
    d_near, nbr = dist.topk(k, dim=1, largest=False)
    nbr = torch.where(d_near < cutoff, nbr, torch.full_like(nbr, -1))
    pos = pos.to(dtype)
    tensors = dict(
        pos_dst=pos,
        pos_src=pos.clone(),
        q=rand(n_atoms, _HEADS, _DK),
        k=rand(n_atoms, _HEADS, _DK),
        v=rand(n_atoms, _HEADS, _DV),
        gate_dst=rand(n_atoms, _GATE, scale=0.5),
        gate_src=rand(n_atoms, _GATE, scale=0.5),
        rbf_centers=torch.linspace(0.0, cutoff, _RBF, dtype=torch.float64).to(dtype),
        w_radial=rand(_RBF, _GATE, scale=1 / math.sqrt(_RBF)),
        w_out=rand(_GATE, 2 * _HEADS, scale=1 / math.sqrt(_GATE)),
        b_out=rand(2 * _HEADS, scale=0.1),
    )
    tensors = {name: t.to(device).requires_grad_() for name, t in tensors.items()}
    return CoreInputs(
        nbr=nbr.to(device), rbf_gamma=(_RBF / cutoff) ** 2 / 2, cutoff=cutoff, eps=1e-3, **tensors
    )


def _core_callable(backend: str):
    if backend == "materialized":
        from e2f.attention.core import attention_core_reference

        return attention_core_reference
    from e2f.attention.backends import get_backend

    return get_backend(backend)


@register_suite
class SmokeSuite(Suite):
    name = "smoke"
    description = "seconds-long end-to-end check of timing, memory and records (matmul, attention core, tiny models)"
    impls = ("matmul", *(f"core-{b}" for b in _CORE_BACKENDS), *_MODELS)
    metrics = ("latency_ms", "latency_iqr_ms", "samples_ms", "peak_bytes", "saved_bytes", "bytes_per_atom",
               "flops_core", "tflops_core", "flops_counted", "roof_fraction")

    def unavailable(self, impl: str, cfg: SweepConfig) -> str | None:
        if impl in ("matmul", "core-materialized"):
            return None
        if impl in _MODELS:
            try:
                from suites.workloads import model_unavailable
            except ImportError as exc:
                return f"suites.workloads not importable ({exc})"
            return model_unavailable(impl)
        try:
            from e2f.attention.backends import unavailable_reason
        except ImportError as exc:
            return f"e2f.attention.backends not importable ({exc})"
        return unavailable_reason(impl.removeprefix("core-"), cfg.device)

    def points(self, cfg: SweepConfig) -> list[Point]:
        modes = ("fwd", "fwd+bwd") if cfg.quick else ("fwd", "bwd", "fwd+bwd")
        points = []
        for dtype in cfg.pick_dtypes(("float32",)):
            for n in cfg.pick_sizes(quick=[64, 128], full=[256, 1024]):
                for mode in modes:
                    points.append(Point("matmul", {"n": n, "dtype": dtype, "mode": mode}))
            for impl in self.impls[1:1 + len(_CORE_BACKENDS)]:
                for n in cfg.pick_sizes(quick=[32, 64], full=[256, 1024]):
                    for mode in modes:
                        points.append(
                            Point(impl, {"n_atoms": n, "neighbors": SMOKE_K, "heads": _HEADS, "dtype": dtype, "mode": mode})
                        )
            for impl in _MODELS:
                sizes = cfg.pick_sizes(quick=[12, 24], full=[96, 768])
                for copies in dict.fromkeys(max(1, n // _MOLECULE_ATOMS) for n in sizes):
                    for mode in modes:
                        points.append(Point(impl, {"n_atoms": copies * _MOLECULE_ATOMS, "molecule": _MOLECULE,
                                                   "preset": "tiny", "dtype": dtype, "mode": mode}))
        return points

    def measure(self, point: Point, cfg: SweepConfig) -> dict:
        p = point.params
        dtype = torch_dtype(p["dtype"])
        gen = torch.Generator().manual_seed(cfg.seed)
        if point.impl == "matmul":
            n = p["n"]
            a = torch.randn(n, n, generator=gen, dtype=dtype).to(cfg.device).requires_grad_()
            b = torch.randn(n, n, generator=gen, dtype=dtype).to(cfg.device).requires_grad_()
            return measure(lambda: (a @ b).relu(), mode=p["mode"], device=cfg.device, flops=matmul_flops(n, p["mode"]),
                           dtype=p["dtype"], quick=cfg.quick, count_flops=True)
        if point.impl in _MODELS:
            from suites import workloads

            copies = p["n_atoms"] // _MOLECULE_ATOMS
            batch = workloads.molecule_batch(p["molecule"], copies, seed=cfg.seed, device=cfg.device, dtype=dtype)
            config = workloads.model_config(quick=True)
            forward, module = workloads.model_call(point.impl, config, batch, p["mode"], device=cfg.device,
                                                   dtype=dtype, seed=cfg.seed)
            metrics = measure(forward, mode=p["mode"], device=cfg.device, n_atoms=p["n_atoms"], dtype=p["dtype"],
                              quick=cfg.quick)
            # The registry counts one energy forward; forces (and training's double backward)
            # cost a model-dependent multiple of it, so it is recorded as what it is.
            metrics["flops_energy_forward"] = module.flops(batch)["total"]
            return metrics
        inp = smoke_core_inputs(p["n_atoms"], dtype=dtype, device=cfg.device, generator=gen)
        core = _core_callable(point.impl.removeprefix("core-"))
        # The analytic count is of one forward; backward modes record FlopCounterMode's only.
        flops = None
        if p["mode"] == "fwd":
            flops = analytic_flops("attention-core", n_atoms=p["n_atoms"], neighbors=SMOKE_K, heads=_HEADS, dk=_DK,
                                   dv=_DV, num_rbf=_RBF, gate_hidden=_GATE)
        return measure(lambda: core(inp), mode=p["mode"], device=cfg.device, n_atoms=p["n_atoms"], dtype=p["dtype"],
                       flops=flops, quick=cfg.quick, count_flops=True)
