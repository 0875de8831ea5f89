"""The ``kernel-regression`` suite and the CPU-side invariants of the fused attention core.

Two halves, one purpose: catch a kernel change that makes things worse.

**On a GPU** the suite times a small, fixed set of attention-core points (``triton`` in
fp32 and bf16, forward and forward+backward, at a few N; ``chunked`` beside it) with many
repeats, so that ``run_bench.py --compare BASELINE.json`` (``suites.core.compare``) has
the raw samples its decision rule needs. On the CPU the timed part is skipped.

**On any machine** (CPU CI) what does not depend on timing noise is checked against the
committed values in ``reports/baselines/cpu-invariants.json``:

- the analytic FLOPs and bytes per atom of each kernel configuration;
- what the fused path saves for backward (``saved_tensors_hooks``, deduplicated by
  storage, plus tensors stashed on the autograd node): no saved tensor may have an edge
  dimension (N*K, or N and K side by side), the bytes per atom must not grow with K, and
  the list of saved shapes and the bytes must equal the committed ones;
- the number of kernel launches of one forward+backward (Triton launches counted by
  wrapping the launcher; PyTorch operator calls counted with a dispatch mode);
- correctness against the oracle ``attention_core_reference``, forward and every gradient.

Refresh the committed values after an intended change with
``python -m suites.kernel_regression --refresh-invariants``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from e2f.attention.core import CoreInputs, attention_core_reference
from suites.core.runner import Point, SkipPoint, Suite, SweepConfig, register_suite

INVARIANTS_PATH = Path(__file__).resolve().parents[1] / "reports" / "baselines" / "cpu-invariants.json"
INVARIANTS_FORMAT = "e2f-cpu-invariants"
INVARIANTS_VERSION = 1
CHECKED_BACKENDS = ("triton", "triton-split", "chunked")
#: Checked forms of a registered backend: name -> (backend, environment while its forward runs).
#: At the probe's size the triton backend runs its fused forward; ``triton-split`` pins the
#: split forward's launches and its per-edge stash (one chunk of the probe's edges).
BACKEND_FORMS = {"triton-split": ("triton", {"E2F_TRITON_FORWARD": "split"})}

# The small probe input of the saved-tensor, launch and correctness checks. Every size is
# distinct (and E = N*K is distinct from all of them) so a saved tensor's shape can be read
# back symbolically; two K values show whether saved bytes grow with the neighbour count.
PROBE = dict(n_atoms=23, neighbors=6, neighbors_alt=10, num_heads=2, head_dim=8, value_dim=29,
             num_rbf=16, gate_hidden=24)
CORRECTNESS_RTOL = 1e-5  # fp32 (TF32 off) against the fp64 oracle, max-norm relative


# --------------------------------------------------------------------------- backends


class BackendUnavailable(RuntimeError):
    """The named backend cannot be built here (module missing, or no Triton)."""


@contextlib.contextmanager
def _environment(changes: dict):
    """``os.environ`` with ``changes`` applied inside the block, restored after."""
    old = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def resolve_backend(name: str) -> Callable[[CoreInputs], Tensor]:
    """The attention-core backend ``name`` (or a form of one, ``BACKEND_FORMS``) as
    ``fn(inp) -> out``, through the registry.

    Raises ``BackendUnavailable`` (with the reason) if it cannot be imported here.
    """
    try:
        from e2f.attention.backends import get_backend, unavailable_reason
    except ImportError as e:
        raise BackendUnavailable(f"e2f.attention.backends is not importable: {e}") from e
    registered, env = BACKEND_FORMS.get(name, (name, {}))
    reason = unavailable_reason(registered)
    if reason is not None:
        raise BackendUnavailable(f"backend {registered!r} is unavailable: {reason}")
    backend = get_backend(registered)

    def call(inp: CoreInputs) -> Tensor:
        backend.check(inp)
        with _environment(env):
            return backend(inp)

    call.__name__ = name
    return call


def probe_inputs(neighbors: int | None = None, *, dtype=torch.float32, seed: int = 0) -> CoreInputs:
    """The fixed small input of the CPU checks (``PROBE`` sizes), leaves requiring grad."""
    from e2f.attention.workload import random_core_inputs

    k = PROBE["neighbors"] if neighbors is None else neighbors
    inp = random_core_inputs(
        PROBE["n_atoms"], max_neighbors=k, num_heads=PROBE["num_heads"], head_dim=PROBE["head_dim"],
        dv=PROBE["value_dim"], gate_hidden=PROBE["gate_hidden"], num_rbf=PROBE["num_rbf"],
        dtype=dtype, seed=seed, requires_grad=True)
    if inp.nbr.shape[1] != k:
        raise RuntimeError(f"probe input has {inp.nbr.shape[1]} neighbour slots, wanted {k}: "
                           "the probe box is too sparse for this K")
    return inp


# --------------------------------------------------------------------------- saved tensors


def _dim_names(inp: CoreInputs) -> dict[int, str]:
    n, k = inp.nbr.shape
    h, dk = inp.q.shape[1:]
    r, g = inp.w_radial.shape
    from e2f.attention.triton.function import GATE_ROW_EXTRA, _gate_stash_width

    # the fused backward's gate stash row width first: a probe size it happens to equal keeps
    # its own name
    return {_gate_stash_width(h, g): f"2H+G+{GATE_ROW_EXTRA}", n * k: "E", n: "N", k: "K", h: "H", dk: "dk",
            inp.v.shape[2]: "dv", r: "R", g: "G", 2 * h: "2H",
            inp.pos_src.shape[0]: "M" if inp.pos_src.shape[0] != n else "N", 3: "3"}


def symbolic_shape(shape, names: dict[int, str]) -> list[str]:
    """``(37, 2, 29)`` -> ``['N', 'H', 'dv']`` with the probe's distinct sizes (unknown sizes as numbers)."""
    return [names.get(int(s), str(int(s))) for s in shape]


def _has_edge_dim(shape, n: int, k: int) -> bool:
    shape = [int(s) for s in shape]
    if n * k in shape:
        return True
    return any(a == n and b == k for a, b in zip(shape, shape[1:]))


def saved_for_backward(fn: Callable[[CoreInputs], Tensor], inp: CoreInputs) -> list[dict]:
    """What one forward of ``fn`` keeps alive for backward, one entry per distinct storage.

    Collected with ``saved_tensors_hooks`` (deduplicated by storage, as
    ``suites.core.memory.saved_tensors`` does) plus the tensors stashed as attributes of
    custom autograd nodes (``ctx.foo = t`` bypasses the hooks but is kept just the same).
    Each entry: ``shape``, ``symbolic`` (names of the probe's sizes), ``dtype``,
    ``nbytes`` (the storage's), ``input`` (aliases an input tensor: not an activation),
    ``how`` ('saved' or 'ctx attribute').
    """
    def key(t: Tensor):
        s = t.untyped_storage()
        return (t.device.type, s.data_ptr(), s.nbytes())

    input_keys = {key(t) for t in inp.tensors().values()}
    found: dict[tuple, dict] = {}
    keep: list[Tensor] = []

    def note(t: Tensor, how: str):
        if not isinstance(t, Tensor) or t.layout != torch.strided:
            return
        kk = key(t)
        if kk not in found:
            found[kk] = dict(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."), nbytes=kk[2],
                             input=kk in input_keys, how=how)
            keep.append(t)

    def pack(t):
        note(t, "saved")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(inp)
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            for t in (value if isinstance(value, (list, tuple)) else [value]):
                note(t, "ctx attribute")
        stack.extend(nxt for nxt, _ in node.next_functions)
    names = _dim_names(inp)
    entries = list(found.values())
    for e in entries:
        e["symbolic"] = symbolic_shape(e["shape"], names)
    del out, keep
    return entries


def saved_summary(fn: Callable[[CoreInputs], Tensor]) -> dict:
    """Saved-for-backward figures at the probe's two K values, and the problems found.

    ``activation_bytes_per_atom`` counts saved storages that are not inputs; it must be
    the same at both K. ``problems`` lists every violation in words (empty: clean).
    """
    per_k = {}
    problems = []
    for k in (PROBE["neighbors"], PROBE["neighbors_alt"]):
        inp = probe_inputs(k)
        entries = saved_for_backward(fn, inp)
        n = inp.nbr.shape[0]
        for e in entries:
            if not e["input"] and _has_edge_dim(e["shape"], n, k):
                problems.append(f"K={k}: saves an edge-sized tensor {e['symbolic']} ({e['dtype']}, {e['how']}, "
                                f"shape {e['shape']}, N={n}, K={k})")
        act = sum(e["nbytes"] for e in entries if not e["input"])
        per_k[k] = dict(entries=entries, activation_bytes_per_atom=act / n,
                        input_bytes_per_atom=sum(e["nbytes"] for e in entries if e["input"]) / n)
    k0, k1 = PROBE["neighbors"], PROBE["neighbors_alt"]
    a0, a1 = per_k[k0]["activation_bytes_per_atom"], per_k[k1]["activation_bytes_per_atom"]
    if a0 != a1:
        problems.append(f"activation bytes saved per atom grow with K: {a0:g} at K={k0}, {a1:g} at K={k1}")
    first = per_k[k0]
    tensors = sorted(({k: e[k] for k in ("symbolic", "dtype", "input", "how")} for e in first["entries"]),
                     key=lambda e: json.dumps(e, sort_keys=True))
    return dict(activation_bytes_per_atom=a0, activation_bytes_per_atom_alt_k=a1,
                input_bytes_per_atom=first["input_bytes_per_atom"], tensors=tensors, problems=problems)


# --------------------------------------------------------------------------- launches


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


_NO_KERNEL_PREFIXES = ("empty", "_local_scalar_dense", "detach", "alias", "lift_fresh", "sym_", "is_", "_to_copy_noop")


class _LaunchCounter(TorchDispatchMode):
    """Counts PyTorch operators that run a kernel (views and bare allocations excluded)."""

    def __init__(self):
        super().__init__()
        self.torch_ops: Counter = Counter()
        self.allocated: list[tuple[tuple[int, ...], str]] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            if not _is_view(func) and not name.startswith(_NO_KERNEL_PREFIXES):
                self.torch_ops[name] += 1
        out = func(*args, **(kwargs or {}))
        if not self.paused and not _is_view(func):
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, Tensor):
                    self.allocated.append((tuple(t.shape), str(t.dtype).removeprefix("torch.")))
        return out


@contextlib.contextmanager
def count_launches():
    """Count kernel launches inside the block: ``{"triton": Counter, "torch": Counter, "allocated": list}``.

    Triton launches are counted by wrapping ``run`` of Triton's kernel classes (the
    interpreter's ``InterpretedFunction`` under ``TRITON_INTERPRET=1``, ``JITFunction``
    on a GPU); a warm-up call must come first, or autotuning's trial launches count too.
    PyTorch operators are counted with a dispatch mode, except those that Triton's
    interpreter itself issues while running a kernel; ``allocated`` lists the
    ``(shape, dtype)`` of every tensor those operators return (views excluded).
    """
    counts = {"triton": Counter(), "torch": Counter(), "allocated": []}
    patched = []
    mode = _LaunchCounter()
    try:
        import triton.runtime.jit as tjit

        classes = [tjit.JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:
            pass
    except ImportError:
        classes = []
    for cls in classes:
        original = cls.run

        def run(self, *args, __original=original, **kwargs):
            if not kwargs.get("warmup", False):
                counts["triton"][getattr(self, "__name__", None) or self.fn.__name__] += 1
            mode.paused += 1
            try:
                return __original(self, *args, **kwargs)
            finally:
                mode.paused -= 1

        cls.run = run
        patched.append((cls, original))
    try:
        with mode:
            yield counts
    finally:
        for cls, original in patched:
            cls.run = original
        counts["torch"].update(mode.torch_ops)
        counts["allocated"].extend(mode.allocated)


def forward_backward(fn: Callable[[CoreInputs], Tensor], inp: CoreInputs, cotangent: Tensor) -> Tensor:
    """One forward and one backward (seeded with ``cotangent``) of ``fn``."""
    out = fn(inp)
    leaves = [t for t in inp.tensors().values() if t.requires_grad]
    torch.autograd.grad(out, leaves, cotangent.to(out.dtype), allow_unused=True)
    return out


def launch_summary(fn: Callable[[CoreInputs], Tensor], *, warmup: bool = True) -> dict:
    """Kernel launches of one forward+backward on the probe input, and the edge-sized
    tensors PyTorch operators allocate on the way (symbolic shapes).

    ``warmup`` runs one untimed forward+backward first (autotuning's trial launches,
    caches); pass False only when ``fn`` already ran on the probe's shapes.
    """
    inp = probe_inputs()
    n, k = inp.nbr.shape
    cot = torch.linspace(-1.0, 1.0, n * inp.num_heads * inp.v.shape[2]).reshape(n, inp.num_heads, -1)
    if warmup:
        forward_backward(fn, inp, cot)
    with count_launches() as c:
        forward_backward(fn, inp, cot)
    names = _dim_names(inp)
    edge = sorted({json.dumps([symbolic_shape(shape, names), dtype]) for shape, dtype in c["allocated"]
                   if _has_edge_dim(shape, n, k)})
    triton = dict(sorted(c["triton"].items()))
    return dict(triton=triton, triton_total=sum(triton.values()), torch_ops=sum(c["torch"].values()),
                torch_by_op=dict(sorted(c["torch"].items())), edge_allocations=[json.loads(e) for e in edge])


# --------------------------------------------------------------------------- correctness


def _rel_err(a: Tensor | None, b: Tensor | None) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return math.inf
    scale = b.abs().max().item()
    return (a.double() - b.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def correctness_summary(fn: Callable[[CoreInputs], Tensor], *, seeds=(0,)) -> dict:
    """Max relative error (max-norm) of ``fn`` in fp32 against the fp64 oracle, value and every gradient."""
    worst: dict[str, float] = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for seed in seeds:
            inp = probe_inputs(seed=seed)
            ref_inp = inp.replace(**{k: v.detach().double().requires_grad_(True) if v.is_floating_point() else v
                                     for k, v in inp.tensors().items()})
            names = [k for k, v in inp.tensors().items() if v.requires_grad]
            out, ref = fn(inp), attention_core_reference(ref_inp)
            cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            grads = torch.autograd.grad(out, [getattr(inp, k) for k in names], cot.to(out.dtype), allow_unused=True)
            ref_grads = torch.autograd.grad(ref, [getattr(ref_inp, k) for k in names], cot, allow_unused=True)
            errs = {"out": _rel_err(out, ref)}
            errs.update({f"grad_{k}": _rel_err(g, rg) for k, g, rg in zip(names, grads, ref_grads)})
            for k, e in errs.items():
                worst[k] = max(worst.get(k, 0.0), e)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    bad = {k: e for k, e in worst.items() if not e <= CORRECTNESS_RTOL}
    problems = [f"{k}: relative error {e:.3g} > {CORRECTNESS_RTOL:g} against the fp64 oracle" for k, e in bad.items()]
    return dict(max_rel_err=worst, problems=problems)


# --------------------------------------------------------------------------- FLOPs and bytes

# The kernel configurations whose analytic figures are pinned: the paper's sizes (issue 4)
# at K = 16, 32, 64, in fp32 and bf16.
FLOP_CONFIGS = tuple(
    dict(name=f"paper-K{k}-{dt}", neighbors=k, dtype=dt) for k in (16, 32, 64) for dt in ("float32", "bfloat16"))
BYTES_PROBE_ATOMS = 64  # bytes per atom are read off real (open-boundary, M = N) inputs of this many atoms


def config_figures(cfg: dict) -> dict:
    """Analytic FLOPs and compulsory bytes per atom of one kernel configuration.

    FLOPs come from the registered ``attention-core`` count (``suites.core.flops``).
    Bytes are the compulsory memory traffic per atom, read off the shapes and dtypes of
    the workload's real per-atom tensors, one row each (q/k/v in the configuration's dtype,
    the rest fp32, K ``nbr`` slots; the shared weights, ``weight_bytes``, are excluded
    because they amortise to zero per atom): the forward reads every per-atom input once and writes
    ``out`` (fp32); forward+backward adds reading the inputs and ``dout`` again and writing
    one gradient per floating per-atom input.
    """
    import dataclasses

    from suites import workloads
    from suites.core.flops import analytic_flops

    sizes = dataclasses.replace(workloads.PAPER_CORE, neighbors=cfg["neighbors"])
    flops = analytic_flops("attention-core", n_atoms=1, neighbors=sizes.neighbors, heads=sizes.heads,
                           dk=sizes.head_dim, dv=sizes.dv, num_rbf=sizes.num_rbf, gate_hidden=sizes.gate_hidden)
    inp = timed_inputs(BYTES_PROBE_ATOMS, cfg["dtype"], device="cpu", seed=0, grad=False, neighbors=sizes.neighbors)
    rows = (inp.nbr.shape[0], inp.pos_src.shape[0])  # targets N, source slots M

    def row_bytes(name: str, t: Tensor) -> int:
        width = sizes.neighbors if name == "nbr" else math.prod(t.shape[1:])  # K slots, however many are filled
        return width * t.element_size()

    per_atom = {k: row_bytes(k, t) for k, t in inp.tensors().items() if t.shape[0] in rows and t.ndim > 1}
    weights = sum(t.numel() * t.element_size() for k, t in inp.tensors().items() if k not in per_atom)
    floating = sum(b for k, b in per_atom.items() if k != "nbr")
    out_row = sizes.heads * sizes.dv * 4
    fwd = sum(per_atom.values()) + out_row
    fwd_bwd = fwd + sum(per_atom.values()) + out_row + floating
    return dict(flops_core_per_atom=flops["core"], flops_total_per_atom=flops["total"],
                bytes_fwd_per_atom=fwd, bytes_fwd_bwd_per_atom=fwd_bwd, weight_bytes=weights)


# --------------------------------------------------------------------------- invariants


def backend_figures(name: str) -> dict:
    """The measured CPU invariants of backend ``name`` (``BackendUnavailable`` if absent)."""
    fn = resolve_backend(name)
    correct = correctness_summary(fn)  # first: it also warms up the probe's shapes
    saved = saved_summary(fn)
    launches = launch_summary(fn, warmup=False)
    return dict(saved=saved, launches=launches, correctness=correct)


def compute_invariants(backends=CHECKED_BACKENDS) -> dict:
    """Every invariant, ready to commit. Refuses a backend whose own checks fail."""
    doc = dict(format=INVARIANTS_FORMAT, version=INVARIANTS_VERSION,
               refresh="python -m suites.kernel_regression --refresh-invariants",
               probe=PROBE, correctness_rtol=CORRECTNESS_RTOL,
               configs={c["name"]: dict(c, **config_figures(c)) for c in FLOP_CONFIGS}, backends={})
    for name in backends:
        figs = backend_figures(name)
        problems = figs["saved"].pop("problems") + figs["correctness"].pop("problems")
        if problems:
            raise ValueError(f"backend {name!r} fails its own invariants; not writing them:\n  " + "\n  ".join(problems))
        figs["correctness"] = dict(rtol=CORRECTNESS_RTOL)  # errors vary by platform; the bound is what is pinned
        doc["backends"][name] = figs
    return doc


def load_invariants(path: str | os.PathLike = INVARIANTS_PATH) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") != INVARIANTS_FORMAT or data.get("version") != INVARIANTS_VERSION:
        raise ValueError(f"{path} is not an e2f CPU-invariants file of version {INVARIANTS_VERSION}")
    return data


def check_configs(committed: dict) -> list[str]:
    """Differences between the analytic FLOPs/bytes now and the committed ones."""
    problems = []
    for cfg in FLOP_CONFIGS:
        want = committed["configs"].get(cfg["name"])
        if want is None:
            problems.append(f"config {cfg['name']}: not in the committed invariants (refresh them)")
            continue
        got = config_figures(cfg)
        for key, value in got.items():
            if not math.isclose(value, want.get(key, math.nan), rel_tol=1e-12):
                problems.append(f"config {cfg['name']}: {key} is {value:g}, committed {want.get(key)}")
    return problems


def check_backend(name: str, committed: dict, figures: dict | None = None) -> list[str]:
    """Every violation of backend ``name`` against the committed invariants, in words.

    Absolute rules (no edge-sized saved tensor, saved bytes independent of K, matches the
    oracle) and committed figures (saved shapes and bytes per atom, Triton launches and
    PyTorch operator calls of one forward+backward, edge-sized allocations).
    """
    want = committed["backends"].get(name)
    if want is None:
        return [f"backend {name}: no committed invariants (run the refresh command)"]
    figs = figures if figures is not None else backend_figures(name)
    saved, launches = figs["saved"], figs["launches"]
    problems = [f"backend {name}: {p}" for p in saved.get("problems", []) + figs["correctness"].get("problems", [])]
    ws, wl = want["saved"], want["launches"]
    for key in ("activation_bytes_per_atom", "input_bytes_per_atom"):
        if saved[key] != ws[key]:
            problems.append(f"backend {name}: saved {key} is {saved[key]:g}, committed {ws[key]:g}")
    if saved["tensors"] != ws["tensors"]:
        added = [t for t in saved["tensors"] if t not in ws["tensors"]]
        gone = [t for t in ws["tensors"] if t not in saved["tensors"]]
        problems.append(f"backend {name}: tensors saved for backward changed; new {added}, no longer saved {gone}")
    if launches["triton"] != wl["triton"]:
        problems.append(f"backend {name}: Triton launches of one forward+backward are {launches['triton']}, "
                        f"committed {wl['triton']}")
    if launches["torch_ops"] != wl["torch_ops"]:
        problems.append(f"backend {name}: PyTorch operator calls of one forward+backward: {launches['torch_ops']}, "
                        f"committed {wl['torch_ops']} (by op now: {launches['torch_by_op']})")
    new_edge = [a for a in launches["edge_allocations"] if a not in wl["edge_allocations"]]
    if new_edge:
        problems.append(f"backend {name}: new edge-sized tensors allocated in forward+backward: {new_edge}")
    return problems


# --------------------------------------------------------------------------- the suite

# The timed points: fixed, so a baseline made today compares with a run made next year.
# triton at every size, dtype and mode; chunked in fp32 at the smallest size.
TIMED_SIZES = (16384, 65536)
TIMED_DTYPES = ("float32", "bfloat16")
TIMED_MODES = ("fwd", "fwd+bwd")
WARMUP, REPEATS = 10, 50  # enough repeats for the Mann-Whitney test to resolve a few per cent


def timed_inputs(n_atoms: int, dtype: str, *, device, seed: int, grad: bool, periodic: bool = True,
                 neighbors: int = 32) -> CoreInputs:
    """The paper-size ``attention-core`` workload, with q/k/v in ``dtype`` (everything else fp32)."""
    import dataclasses

    from suites import workloads

    sizes = dataclasses.replace(workloads.PAPER_CORE, neighbors=neighbors)
    inp = workloads.core_inputs(n_atoms, sizes=sizes, dtype=torch.float32, device=device, seed=seed,
                                periodic=periodic)
    low = workloads.torch_dtype(dtype)
    inp = inp.replace(q=inp.q.to(low), k=inp.k.to(low), v=inp.v.to(low))
    if grad:
        inp = inp.replace(**{k: v.detach().requires_grad_(True) for k, v in inp.tensors().items() if v.is_floating_point()})
    return inp


def _interpreter_ready() -> str | None:
    """Why the CPU checks cannot run the Triton kernels in this process (None: they can)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if "e2f.attention.triton.kernels" in sys.modules:
        return "the Triton kernels were imported without TRITON_INTERPRET=1; run the checks in a fresh process"
    os.environ["TRITON_INTERPRET"] = "1"  # nothing compiled yet: the CPU checks interpret the kernels
    return None


@register_suite
class KernelRegression(Suite):
    """Regression gate of the attention-core kernels.

    Timed points (GPU only; on the CPU they are recorded as skipped): ``triton`` fp32 and
    bf16 q/k/v, ``fwd`` and ``fwd+bwd``, N = 16,384 and 65,536, paper sizes (H = 128,
    d = 8, dv = 58, K = 32, R = 256, G = 128); ``chunked`` fp32 at N = 16,384 beside them.
    50 repeats each after 10 warm-up calls. Compare against a baseline with
    ``run_bench.py --suite kernel-regression --compare BASELINE.json``.

    Invariant points (CPU only; ``params.check = 'cpu-invariants'``): the committed CPU
    invariants of each backend, checked with the Triton interpreter; a violation is an
    ``error`` record listing it.
    """

    name = "kernel-regression"
    description = ("attention-core regression gate: timed triton/chunked points for --compare "
                   "(GPU), committed FLOP/byte/saved-tensor/launch/correctness invariants (CPU)")
    impls = CHECKED_BACKENDS
    metrics = ("latency_ms", "samples_ms", "tflops_core", "tflops_total", "peak_bytes", "invariant_problems")

    def points(self, cfg: SweepConfig) -> list[Point]:
        """The fixed timed points (``--sizes``/``--dtype`` narrow or replace them), then the invariant checks."""
        sizes = tuple(cfg.sizes) if cfg.sizes is not None else TIMED_SIZES
        dtypes = tuple(cfg.dtypes) if cfg.dtypes is not None else TIMED_DTYPES
        timed = [("triton", n, dt, mode) for dt in dtypes for mode in TIMED_MODES for n in sizes]
        if "float32" in dtypes:
            timed += [("chunked", min(sizes), "float32", mode) for mode in TIMED_MODES]
        from suites.workloads import PAPER_CORE as w

        pts = [Point(impl, {"n_atoms": n, "dtype": dt, "mode": mode, "neighbors": w.neighbors, "heads": w.heads,
                            "head_dim": w.head_dim, "dv": w.dv, "workload": "attention-core"})
               for impl, n, dt, mode in timed]
        return pts + [Point(name, {"check": "cpu-invariants"}) for name in CHECKED_BACKENDS]

    def measure(self, point: Point, cfg: SweepConfig) -> dict:
        if point.params.get("check") == "cpu-invariants":
            return self._check_invariants(point.impl, cfg)
        if not cfg.is_cuda:
            raise SkipPoint("timed regression points need a CUDA GPU (this run is on "
                            f"{cfg.device}); the CPU invariants are checked by the 'cpu-invariants' points")
        return self._time(point, cfg)

    def _time(self, point: Point, cfg: SweepConfig) -> dict:
        from suites import workloads
        from suites.core.measure import measure
        from suites.kernel_tflops import core_flops

        p = point.params
        tf32 = workloads.speed_precision(cfg)  # as in kernel-tflops: the speed users get
        from e2f.attention.backends import get_backend

        fn = resolve_backend(point.impl)
        # in the layout the backend prefers (the model gives the triton backend padded value rows)
        inp = workloads.prepared_inputs(get_backend(point.impl), timed_inputs(
            p["n_atoms"], p["dtype"], device=cfg.device, seed=cfg.seed, grad=p["mode"] != "fwd"))
        fn(inp)  # precondition check, compilation and autotuning before anything is timed

        if p["mode"] == "fwd":
            def forward():
                with torch.no_grad():
                    return fn(inp)
        else:
            def forward():
                return fn(inp)

        if point.impl == "triton":
            from e2f.attention.triton.function import last_config

            forward.autotune_config = last_config
        flops = core_flops(p["n_atoms"], workloads.PAPER_CORE, p["mode"])  # the kernel-tflops suite's count
        metrics = measure(forward, mode=p["mode"], device=cfg.device, n_atoms=p["n_atoms"], flops=flops,
                          dtype=p["dtype"], warmup=WARMUP, repeats=REPEATS)
        metrics["tf32_matmul"] = tf32
        metrics["value_head_stride"] = inp.v.stride(1)
        return metrics

    def _check_invariants(self, backend: str, cfg: SweepConfig) -> dict:
        if cfg.is_cuda:
            raise SkipPoint("the CPU invariants run in CPU CI (pytest tests/suites/test_regression_cpu.py)")
        reason = _interpreter_ready()
        if reason:
            raise SkipPoint(reason)
        try:
            figs = backend_figures(backend)
        except BackendUnavailable as e:
            raise SkipPoint(str(e)) from None
        committed = load_invariants()
        problems = check_configs(committed) + check_backend(backend, committed, figs)
        if problems:
            raise AssertionError(f"{len(problems)} CPU invariant(s) violated: " + "; ".join(problems))
        launches = figs["launches"]
        return {"invariant_problems": 0, "activation_bytes_per_atom": figs["saved"]["activation_bytes_per_atom"],
                "triton_launches": launches["triton_total"], "torch_ops": launches["torch_ops"],
                "max_rel_err": max(figs["correctness"]["max_rel_err"].values())}


def write_invariants(doc: dict, path: str | os.PathLike = INVARIANTS_PATH) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m suites.kernel_regression",
                                 description="CPU invariants of the fused attention core: check or refresh.")
    ap.add_argument("--refresh-invariants", action="store_true",
                    help=f"recompute and write {INVARIANTS_PATH.relative_to(INVARIANTS_PATH.parents[2])}")
    ap.add_argument("--check", action="store_true", help="check against the committed values (default)")
    ap.add_argument("--backend", action="append", choices=CHECKED_BACKENDS,
                    help="backend(s) to handle (default: all of %s)" % ", ".join(CHECKED_BACKENDS))
    ap.add_argument("--path", default=str(INVARIANTS_PATH), help="invariants file")
    args = ap.parse_args(argv)
    backends = tuple(args.backend or CHECKED_BACKENDS)
    if args.refresh_invariants:
        doc = compute_invariants(backends)
        if args.backend and Path(args.path).exists():  # refresh only the named backends
            old = load_invariants(args.path)
            old["backends"].update(doc["backends"])
            doc["backends"] = old["backends"]
        write_invariants(doc, args.path)
        print(f"wrote {args.path}: configs {', '.join(doc['configs'])}; backends {', '.join(doc['backends'])}")
        return 0
    committed = load_invariants(args.path)
    problems = check_configs(committed)
    for name in backends:
        problems += check_backend(name, committed)
    for p in problems:
        print(f"FAIL {p}")
    print("CPU invariants: " + ("FAIL" if problems else "PASS"))
    return 1 if problems else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
