"""Analytic FLOP counts, throughput figures, and a FlopCounterMode cross-check.

Every implementation registers a function that counts its *useful* FLOPs analytically
(a multiply-add is 2 FLOPs; the formula lives in that function's docstring)::

    @register_flops("my-kernel")
    def _my_kernel_flops(*, n_atoms, width, **_):
        '''2 * N * width^2: one [N, width] @ [width, width] product.'''
        return {"core": 2.0 * n_atoms * width**2}

    analytic_flops("my-kernel", n_atoms=1000, width=64)

``attention-core`` (the E2Former-V2 attention core) is registered here, below.
A count returns ``{"core": float, "total": float}`` (either may be missing). Models
behind ``baselines.registry`` expose the same through ``module.flops(batch)``; suites
pass the dict to :func:`suites.core.measure.measure`, which derives TFLOPS.

``torch.utils.flop_counter.FlopCounterMode`` counts only the matmul/convolution/attention
ops PyTorch dispatches, so it cannot see inside Triton kernels and ignores elementwise
work: use :func:`counted_flops` as a cross-check of analytic formulas on pure-PyTorch
paths, not as the figure of record.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

FlopCount = dict  # {"core": float, "total": float}

_COUNTERS: dict[str, Callable[..., FlopCount]] = {}


def register_flops(name: str) -> Callable[[Callable[..., FlopCount]], Callable[..., FlopCount]]:
    """Decorator: register ``fn(**params) -> {"core": ..., "total": ...}`` under ``name``."""

    def decorate(fn):
        if name in _COUNTERS and _COUNTERS[name] is not fn:
            raise ValueError(f"a FLOP count is already registered for {name!r}")
        _COUNTERS[name] = fn
        return fn

    return decorate


def registered_flops() -> list[str]:
    """Names with a registered analytic count."""
    return sorted(_COUNTERS)


def analytic_flops(name: str, **params) -> FlopCount:
    """The registered analytic count of ``name`` at ``params``; ValueError naming the valid ones."""
    try:
        counter = _COUNTERS[name]
    except KeyError:
        valid = ", ".join(registered_flops()) or "(none registered)"
        raise ValueError(f"no FLOP count registered for {name!r}; registered: {valid}") from None
    return normalize_flops(counter(**params))


def normalize_flops(flops: Any) -> FlopCount:
    """Accept a number (taken as both core and total) or a dict with 'core'/'total'."""
    if flops is None:
        return {}
    if isinstance(flops, (int, float)):
        return {"core": float(flops), "total": float(flops)}
    if isinstance(flops, dict):
        unknown = set(flops) - {"core", "total"}
        if unknown:
            raise ValueError(f"FLOP count keys must be 'core'/'total', got {sorted(unknown)}")
        return {k: float(v) for k, v in flops.items() if v is not None}
    raise TypeError(f"FLOP count must be a number or a dict, got {type(flops).__name__}")


def matmul_flops(m: int, n: int, k: int) -> float:
    """FLOPs of an ``[m, k] @ [k, n]`` product: 2 m n k."""
    return 2.0 * m * n * k


def tflops(flops: float | None, latency_ms: float | None) -> float | None:
    """TFLOP/s of ``flops`` done in ``latency_ms``; None if either is missing or zero."""
    if not flops or not latency_ms or latency_ms <= 0:
        return None
    return flops / (latency_ms * 1e-3) / 1e12


def gbps(nbytes: float | None, latency_ms: float | None) -> float | None:
    """GB/s (1e9 bytes per second) for ``nbytes`` moved in ``latency_ms``."""
    if not nbytes or not latency_ms or latency_ms <= 0:
        return None
    return nbytes / (latency_ms * 1e-3) / 1e9


def counted_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` under ``FlopCounterMode`` and return ``(total_flops, output)``.

    Counts matmul-like ops only (see the module docstring). Backward ops run inside
    ``fn`` are counted too.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return int(counter.get_total_flops()), out


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Sum of ``numel * element_size`` (for an analytic bytes-moved figure)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@register_flops("attention-core")
def attention_core_flops(*, n_atoms, neighbors, heads, dk, dv, num_rbf, gate_hidden, moments=False,
                         **_) -> FlopCount:
    """Useful FLOPs of one attention-core forward (``e2f.attention.core``), per the
    ``attention-core`` workload of issue 4, counted over all K neighbour *slots*::

        core  = N (2 K H dk + 2 K H dv + 8 K H)     logits q.k, weighted sum of v, softmax
        total = core + N 2 K (R G + G 2H)           + the in-kernel gate MLP (rbf @ w_radial,
                                                      hid @ w_out)

    With ``moments`` (``CoreInputs.moments``: 3 dv sums a head, each weight times the three
    displacement components first) the weighted sum counts ``2 K H 3 dv + 3 K H``: 552,960
    core FLOPs per atom at dv = 18 (L = 2, C / H = 2), against 573,440 for the 29-row values.

    with N = ``n_atoms``, K = ``neighbors``, H = ``heads``, R = ``num_rbf``, G =
    ``gate_hidden``. The 8 K H term is the per-edge softmax/envelope work as the public
    kernels count it. At the paper sizes (K 32, H 128, dk 8, dv 58, R 256, G 128):
    573,440 core and 4,767,744 total FLOPs per atom.
    """
    edges_heads = n_atoms * neighbors * heads
    summed = 2.0 * edges_heads * 3 * dv + 3.0 * edges_heads if moments else 2.0 * edges_heads * dv
    core = 2.0 * edges_heads * dk + summed + 8.0 * edges_heads
    gate = 2.0 * n_atoms * neighbors * (num_rbf * gate_hidden + gate_hidden * 2 * heads)
    return {"core": core, "total": core + gate}
