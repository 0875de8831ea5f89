"""Registry of attention-core backends: ``materialized`` | ``chunked`` | ``triton``.

All backends compute ``e2f.attention.core.attention_core_reference``'s function and are
differentiable w.r.t. every tensor of ``CoreInputs``. ``Backend.check`` raises
``ValueError`` when a precondition fails (shapes, dtypes, devices, index range);
``triton`` adds its own through ``e2f.attention.triton.function.check``.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from e2f.attention.chunked import chunked_attention_core
from e2f.attention.core import CoreInputs, attention_core_reference, pad_value_rows, value_head_stride


def check_core_inputs(inp: CoreInputs) -> None:
    """Shape, dtype and device preconditions shared by every backend.

    Raises
    ------
    ValueError
        With the offending field named.
    """
    n = inp.pos_dst.shape[0]
    m = inp.pos_src.shape[0]
    if inp.q.ndim != 3:
        raise ValueError(f"q must be [N, H, dk], got {tuple(inp.q.shape)}")
    h, dk = inp.q.shape[1:]
    expected = {
        "pos_dst": (n, 3),
        "pos_src": (m, 3),
        "q": (n, h, dk),
        "k": (m, h, dk),
        "gate_dst": (n, inp.w_radial.shape[1]),
        "gate_src": (m, inp.w_radial.shape[1]),
        "rbf_centers": (inp.w_radial.shape[0],),
        "w_out": (inp.w_radial.shape[1], 2 * h),
        "b_out": (2 * h,),
    }
    for name, shape in expected.items():
        got = tuple(getattr(inp, name).shape)
        if got != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(got)}")
    if inp.v.ndim != 3 or inp.v.shape[:2] != (m, h):
        raise ValueError(f"v must be [M={m}, H={h}, dv], got {tuple(inp.v.shape)}")
    if inp.nbr.ndim != 2 or inp.nbr.shape[0] != n:
        raise ValueError(f"nbr must be [N={n}, K], got {tuple(inp.nbr.shape)}")
    if inp.nbr.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"nbr must be an integer tensor, got {inp.nbr.dtype}")
    if inp.nbr.numel():
        # one transfer (a wait for the device) instead of one for each bound: a model calls this every layer
        lo, hi = torch.stack(torch.aminmax(inp.nbr)).tolist()
        if hi >= m or lo < -1:
            raise ValueError(f"nbr entries must lie in [-1, {m}), got [{lo}, {hi}]")
    devices = {t.device for t in inp.tensors().values()}
    if len(devices) != 1:
        raise ValueError(f"all CoreInputs tensors must be on one device, got {sorted(map(str, devices))}")
    for name, t in inp.tensors().items():
        if name != "nbr" and not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if not (inp.cutoff > 0 and inp.eps > 0 and inp.rbf_gamma > 0):
        raise ValueError(f"cutoff, eps and rbf_gamma must be positive, got {inp.cutoff}, {inp.eps}, {inp.rbf_gamma}")


@dataclass
class Backend:
    """One attention-core implementation behind the registry.

    Attributes
    ----------
    name : str
    fn : callable
        ``fn(inp) -> out [N, H, dv]``.
    extra_check : callable, optional
        Backend-specific preconditions (``ValueError``).
    uses_spatial_order : bool
        The model sorts atoms along a Morton curve when this backend runs (cache reuse).
    value_head_stride : callable, optional
        ``(dv, moments) -> head stride`` of the ``v`` layout this backend reads fastest
        (:meth:`prepare` pads to it); None: any layout.
    """

    name: str
    fn: Callable[[CoreInputs], Tensor]
    extra_check: Callable[[CoreInputs], None] | None = None
    uses_spatial_order: bool = False
    description: str = field(default="")
    value_head_stride: Callable[[int, bool], int] | None = None

    def check(self, inp: CoreInputs) -> None:
        check_core_inputs(inp)
        if self.extra_check is not None:
            self.extra_check(inp)

    def prepare(self, inp: CoreInputs) -> CoreInputs:
        """``inp`` in this backend's preferred layout (the same function; differentiable)."""
        if self.value_head_stride is None:
            return inp
        return inp.replace(v=pad_value_rows(inp.v, self.value_head_stride(inp.v.shape[-1], inp.moments)))

    def __call__(self, inp: CoreInputs) -> Tensor:
        return self.fn(inp)


def _triton_unavailable_reason(device: torch.device | str | None) -> str | None:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if device is not None and not interpret and torch.device(device).type != "cuda":
        return f"triton needs a CUDA device (got {device}) or TRITON_INTERPRET=1"
    if device is None and not interpret and not torch.cuda.is_available():
        return "triton needs CUDA or TRITON_INTERPRET=1"
    try:
        importlib.import_module("e2f.attention.triton.function")
    except ImportError as exc:
        return f"e2f.attention.triton.function cannot be imported ({exc})"
    return None


def _triton_backend() -> Backend:
    reason = _triton_unavailable_reason(None)
    if reason is not None:
        raise ValueError(f"backend 'triton' is unavailable: {reason}")
    module = importlib.import_module("e2f.attention.triton.function")
    return Backend(
        name="triton",
        fn=module.fused_attention_core,
        extra_check=module.check,
        uses_spatial_order=True,
        description="fused Triton forward/backward kernels",
        value_head_stride=value_head_stride,
    )


_STATIC = {
    "materialized": Backend(
        name="materialized",
        fn=attention_core_reference,
        description="per-edge tensors gathered and summed (the oracle)",
    ),
    "chunked": Backend(
        name="chunked",
        fn=chunked_attention_core,
        description="streamed target/neighbour blocks, recomputing autograd Function",
    ),
}
BACKEND_NAMES = ("materialized", "chunked", "triton")


def get_backend(name: str) -> Backend:
    """The backend called ``name``.

    Raises
    ------
    ValueError
        Unknown name (the valid ones are listed) or an unavailable backend (with why).
    """
    if name in _STATIC:
        return _STATIC[name]
    if name == "triton":
        return _triton_backend()
    raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKEND_NAMES)}")


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None: it can)."""
    if name in _STATIC:
        return None
    if name == "triton":
        return _triton_unavailable_reason(device)
    raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKEND_NAMES)}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (any device if None)."""
    return [name for name in BACKEND_NAMES if unavailable_reason(name, device) is None]


def attention_core(inp: CoreInputs, backend: str = "chunked") -> Tensor:
    """Check the preconditions of ``backend`` and run it: ``out [N, H, dv]``."""
    impl = get_backend(backend)
    inp = impl.prepare(inp)
    impl.check(inp)
    return impl(inp)
