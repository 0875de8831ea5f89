"""Wall-clock timing of a callable: CUDA events on the GPU, ``perf_counter`` on the CPU.

Every suite times through :func:`benchmark` (or :func:`time_mode`, which builds the
forward / backward / forward+backward callables), never by hand, so that all numbers
share one method:

- warm-up calls first (Triton autotuning and lazy initialisation happen there, outside
  the timed region);
- on CUDA, each sample is bracketed by a pair of CUDA events on the current stream, and
  the L2 cache is flushed before each sample by zeroing a buffer larger than any current
  L2 (as ``triton.testing.do_bench`` does), so a sample never profits from the previous
  one's cache;
- an optional ``setup`` runs before every sample, outside the timed region (the backward
  mode builds the autograd graph there);
- the median and the interquartile range of the samples are reported.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

MODES = ("fwd", "bwd", "fwd+bwd")

# Larger than the L2 of every current datacentre GPU (H100/H200: 50 MiB, B200: 126 MiB).
_L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass
class TimingResult:
    """Timing samples of one callable, in milliseconds."""

    median_ms: float
    iqr_ms: float
    samples_ms: list[float] = field(repr=False)
    repeats: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "TimingResult":
        samples = [float(s) for s in samples_ms]
        if not samples:
            raise ValueError("no timing samples")
        if len(samples) >= 2:
            q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
            iqr = q3 - q1
        else:
            iqr = 0.0
        return cls(median_ms=statistics.median(samples), iqr_ms=iqr, samples_ms=samples, repeats=len(samples))

    def as_metrics(self) -> dict:
        """The record keys ``latency_ms``, ``latency_iqr_ms``, ``repeats``, ``samples_ms``."""
        return {
            "latency_ms": self.median_ms,
            "latency_iqr_ms": self.iqr_ms,
            "repeats": self.repeats,
            "samples_ms": list(self.samples_ms),
        }


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def benchmark(
    fn: Callable[..., Any],
    *,
    device,
    warmup: int = 3,
    repeats: int = 10,
    setup: Callable[[], Any] | None = None,
    flush_l2: bool = True,
) -> TimingResult:
    """Time ``fn`` and return the median and IQR over ``repeats`` samples.

    Parameters
    ----------
    fn
        The timed work. Called as ``fn()`` when ``setup`` is None, else as
        ``fn(setup())``: the value ``setup`` returns is handed to ``fn``.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``. On CUDA the samples come
        from CUDA events on the current stream; on the CPU from ``time.perf_counter``.
    warmup
        Untimed calls before the samples (autotuning, caches, lazy initialisation).
    repeats
        Number of timed samples (at least 1).
    setup
        Optional untimed preparation run before every call, warm-up included.
    flush_l2
        On CUDA, zero a 256 MiB buffer before each sample (outside the timed region) so
        that no sample finds its inputs in L2. Ignored on the CPU.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")

    def call():
        if setup is None:
            return fn()
        return fn(setup())

    if _is_cuda(device):
        return _benchmark_cuda(fn, setup, torch.device(device), warmup, repeats, flush_l2)
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        state = setup() if setup is not None else None
        start = time.perf_counter()
        if setup is None:
            fn()
        else:
            fn(state)
        samples.append((time.perf_counter() - start) * 1e3)
        del state
    return TimingResult.from_samples(samples)


def _benchmark_cuda(fn, setup, device, warmup, repeats, flush_l2) -> TimingResult:
    with torch.cuda.device(device):
        cache = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
        for _ in range(warmup):
            if setup is None:
                fn()
            else:
                fn(setup())
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            state = setup() if setup is not None else None
            if cache is not None:
                cache.zero_()
            starts[i].record()
            if setup is None:
                fn()
            else:
                fn(state)
            ends[i].record()
            del state
        torch.cuda.synchronize(device)
        return TimingResult.from_samples([s.elapsed_time(e) for s, e in zip(starts, ends)])


# --------------------------------------------------------------------------- modes


def output_tensors(out: Any) -> list[Tensor]:
    """The floating-point tensors in a callable's output (tensor, tuple/list, dict)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        found = []
        for item in out:
            found.extend(output_tensors(item))
        return found
    return []


def differentiable_outputs(out: Any) -> list[Tensor]:
    """The outputs of ``out`` that carry an autograd graph."""
    return [t for t in output_tensors(out) if t.requires_grad]


def graph_leaves(outputs: Iterable[Tensor]) -> list[Tensor]:
    """Leaf tensors (inputs and parameters) that a backward from ``outputs`` writes ``.grad`` to."""
    leaves, seen, stack = [], set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    visited = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and id(variable) not in seen:
            seen.add(id(variable))
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def backward_all(outputs: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """One backward pass from every output, seeded with ``grads``."""
    torch.autograd.backward(list(outputs), grad_tensors=list(grads))


def mode_callables(forward: Callable[[], Any], mode: str):
    """Return ``(fn, setup)`` for :func:`benchmark` that time ``forward`` in ``mode``.

    - ``'fwd'``: ``forward()`` as given (wrap it in ``torch.no_grad()`` yourself for
      inference; the output is dropped, so any graph is freed).
    - ``'bwd'``: the backward pass alone. ``setup`` runs ``forward()`` (untimed) and resets
      the ``.grad`` of every leaf the graph reaches; the timed call is one backward from
      all differentiable outputs, seeded with ones.
    - ``'fwd+bwd'``: forward then backward in one timed call; grads reset in ``setup``.

    Raises ``ValueError`` for an unknown mode, or when a backward mode is asked of a
    forward whose output carries no graph.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if mode == "fwd":
        return (lambda: forward()), None

    probe = differentiable_outputs(forward())
    if not probe:
        raise ValueError(f"mode {mode!r} needs a forward whose output requires grad")
    leaves = graph_leaves(probe)
    seeds = [torch.ones_like(t) for t in probe]
    del probe

    def reset_grads():
        for leaf in leaves:
            leaf.grad = None

    if mode == "bwd":

        def setup():
            reset_grads()
            return differentiable_outputs(forward())

        def fn(outputs):
            backward_all(outputs, seeds)

        return fn, setup

    def setup_fb():
        reset_grads()

    def fn_fb(_):
        backward_all(differentiable_outputs(forward()), seeds)

    return fn_fb, setup_fb


def time_mode(
    forward: Callable[[], Any],
    mode: str,
    *,
    device,
    warmup: int = 3,
    repeats: int = 10,
    flush_l2: bool = True,
) -> TimingResult:
    """Time ``forward`` in ``mode`` ('fwd', 'bwd' or 'fwd+bwd'); see :func:`mode_callables`."""
    fn, setup = mode_callables(forward, mode)
    return benchmark(fn, device=device, warmup=warmup, repeats=repeats, setup=setup, flush_l2=flush_l2)
