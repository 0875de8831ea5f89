"""Autograd wrapper of the fused Triton attention core.

Public names (imported lazily by ``e2f.attention.backends`` as backend ``triton``):

``fused_attention_core(inp) -> Tensor``
    ``out [N, H, dv]`` (float32), differentiable with respect to every tensor of ``inp``.
``check(inp) -> None``
    Raises ``ValueError`` naming the first unmet precondition.
``last_config() -> dict``
    The configurations the autotuner chose for the kernels (``fwd``, or ``fwd_logits`` and
    ``fwd_aggregate`` after a split forward (``fwd_moment`` for the moments), then ``bwd_edge``,
    ``bwd_value`` (``bwd_moment_value``), ``bwd_target``, ``bwd_gate``, ``bwd_source``; the
    last shapes run: meta-parameters and
    warps, the autotuner's timings when it benchmarked, the registers and spills the GPU
    driver reports), the last forward's form (``fwd_mode``; ``fwd_chunks`` when split), the
    number of target chunks of the last backward, the gate-MLP matmul precision used, and
    after a ``create_graph`` backward the second order's targets per block
    (``twin_target_block``); the suites record it.
``size_bucket(n_rows) -> int``
    The autotuning bucket of an atom count.

Autotuning runs outside any timed region, once per ``size_bucket`` of the atom count (factors
of 4 from 4,096) and shape key.

Environment:

``E2F_TRITON_AUTOTUNE=0``
    Every kernel runs its first configuration only (no tuning; quick runs and the
    regression gate). The forward, the value pass and the target pass have one candidate list
    for float32 q/k/v and one for 16-bit q/k/v (``_fwd_candidates``, ``_bwd_candidates``),
    each with its own first configuration.
``E2F_TRITON_STASH_BYTES=6144``
    The backward's per-edge stash, in bytes per atom: targets run in as many chunks as keep
    the stash within it. Unset: ``SCRATCH_BYTES_PER_ATOM``, capped at ``STASH_MAX_BYTES`` in
    all, and never below ``STASH_BYTES_PER_ATOM``.
``E2F_TRITON_FWD_CONFIG="TB=2,HC=16,GROUPS=4,num_warps=8"``
    Forces one forward configuration (timing experiments), read at every call: comma-separated
    ``KEY=INT`` among ``TB`` (targets per program: 1, 2 or 4), ``HC`` (heads per chunk),
    ``GROUPS`` (head groups the values move
    in: 2, 4 or 8; see ``kernels``), ``num_warps``, ``num_stages``, ``maxnreg`` (register cap a thread, so that
    more programs share an SM; spills beyond it); a key left out keeps its ``FWD_BASE``
    value (no cap). Unset or empty: autotuned as above.

``E2F_TRITON_FORWARD=auto|split|fused``
    The forward's form. ``fused``: one kernel (``kernels.fwd_kernel``) that writes only per-atom
    outputs. ``split``: two kernels a chunk of targets, ``fwd_logit_kernel`` (geometry, gate
    MLP and q.k on edge tiles; writes each edge's logits and ``u / d``) then
    ``fwd_aggregate_kernel`` (online softmax and value sums, one thread per head and value
    columns), through a per-edge stash of one chunk (``FWD_STASH_BYTES_PER_ATOM``); faster
    where the chunks fill the GPU (H100, N = 65,536, 11 chunks: 16.1 against 17.6 ms in fp32,
    11.6 against 17.4 ms with bf16 q/k/v; perf-notes section 24). ``auto`` (unset): ``split`` when a
    chunk holds at least ``SPLIT_MIN_TARGETS`` targets, else ``fused`` (and ``fused`` whenever
    ``E2F_TRITON_FWD_CONFIG`` forces a fused configuration). The moments
    (``CoreInputs.moments``) run in the split form whatever this asks.
``E2F_TRITON_FWD_STASH_BYTES=3072``
    The split forward's stash, in bytes per atom (default ``FWD_STASH_BYTES_PER_ATOM``, at most
    ``FWD_STASH_MAX_BYTES`` in all).

Precision: the gate MLP's products run on tensor cores in TF32 unless
``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's default), in which case
they are IEEE fp32 (``input_precision="ieee"``); q/k/v may be float32, bfloat16 or float16
(all three the same) and are accumulated in fp32. Everything else is float32.

Backward is deterministic (no float atomics; fixed-order reductions; the two gate weight
gradients are cuBLAS products, bitwise reproducible on one GPU model and library version). With
``create_graph=True`` (force training) the first-order gradients still come from the fused
kernels, and are themselves differentiable: their backward (the second order) recomputes
target blocks through the reference formula (``e2f.attention.chunked.second_order_grads``,
O(N) memory), blocks as large as ``TWIN_MEMORY_FRACTION`` of the GPU's memory allows;
``E2F_TRITON_TWIN_BLOCK=<targets>`` forces the block size.
"""
from __future__ import annotations

import math
import os
import weakref

import numpy
import torch
from torch import Tensor

from e2f.attention.chunked import BlockPlan, block_plan, second_order_grads
from e2f.attention.core import CoreInputs, padded_head_stride
from e2f.attention.radial import RADIAL_MAX_INTERVALS, radial_intervals, radial_spacing

TENSOR_NAMES = ("pos_dst", "pos_src", "nbr", "q", "k", "v", "gate_dst", "gate_src",
                "rbf_centers", "w_radial", "w_out", "b_out")
DIFF_NAMES = tuple(name for name in TENSOR_NAMES if name != "nbr")
MAX_NEIGHBORS = 128
_QKV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FWD_CONFIG_ENV = "E2F_TRITON_FWD_CONFIG"
FWD_MODE_ENV = "E2F_TRITON_FORWARD"
FWD_MODES = ("auto", "split", "fused")
FWD_STASH_ENV = "E2F_TRITON_FWD_STASH_BYTES"
#: The split forward's per-edge stash (a logit and ``u / d`` per edge and head, the envelope per
#: edge: K (8 H + 4) bytes a target, 33 KB at the paper sizes) runs in chunks that keep it
#: within this many bytes an atom, so the forward's peak stays ~10 % above the output's 30 KB.
FWD_STASH_BYTES_PER_ATOM = 3 * 1024
#: ... and within this many bytes in all: at N = 1,048,576 on an 80 GB H100 the inputs (45 GiB
#: periodic), the output (29 GiB) and a 3 GB stash left no room for the allocator's rounding
#: (out of memory asking 1.46 GiB with 1.47 GiB reserved in pieces, perf-notes 31); a 1 GiB
#: stash keeps chunks of ~32,000 targets there, and changes nothing up to ~350,000 atoms.
FWD_STASH_MAX_BYTES = 1 << 30
#: Targets a chunk below which ``auto`` takes the fused forward (smaller launches leave SMs
#: idle), for float32 and for 16-bit q/k/v. H100, 11 chunks, fused against split (ms): fp32
#: 2.21 / 2.51 at N = 8,192 (745 targets a chunk), 4.41 / 4.26 at 16,384 (1,490: within the
#: 5-7 % that two processes of the regression gate differ by there), 8.78 / 8.39 at 32,768
#: (2,979); bf16 0.60 / 0.98 at 2,048 (187), 1.16 / 1.11 at 4,096 (373; 1.61 on another
#: machine, whose host launched the 22 kernels slower than the GPU ran them), 2.24 / 2.06 at
#: 8,192 (745), 4.42 / 3.24 at 16,384 (perf-notes section 24). Since both forms read the radial
#: table (session 19, H100, autotuned, two processes each, perf-notes 32): fp32 2.95 / 3.12 at
#: 12,288 (1,118 targets a chunk), 3.95 / 3.79 at 16,384 (1,490), 5.87 / 5.61 at 24,576 (2,235).
SPLIT_MIN_TARGETS = {True: 1280, False: 1024}
_FWD_KEYS = ("TB", "HC", "GROUPS", "num_warps", "num_stages", "maxnreg")
_kernels: dict = {}
_forced_fwd: dict = {}
_last: dict = {}
#: What ``last_config`` records of a forward and of the backward's value pass, cleared at each
#: call: the other form's kernels from an earlier call would read as this call's.
_FORWARD_RECORDS = ("fwd", "fwd_logits", "fwd_aggregate", "fwd_moment", "fwd_chunks")
_VALUE_RECORDS = ("bwd_value", "bwd_moment_value")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(x) - 1).bit_length())


def _gate_precision() -> str:
    if _interpreting() or torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def check(inp: CoreInputs) -> None:
    """Raise ``ValueError`` if the fused kernels cannot run on ``inp``."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is a test dependency
        raise ValueError("backend 'triton' needs the triton package") from exc
    t = inp.tensors()
    device = inp.q.device
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}")
    for name in TENSOR_NAMES:
        x = t[name]
        if x.device != device:
            raise ValueError(f"backend 'triton': {name} is on {x.device}, q on {device}")
        if not x.is_contiguous() and not (name == "v" and padded_head_stride(x) is not None):
            raise ValueError(f"backend 'triton': {name} must be contiguous"
                             + (" or have padded head rows (e2f.attention.core.pad_value_rows)" if name == "v" else ""))
    if inp.q.dtype not in _QKV_DTYPES or inp.k.dtype != inp.q.dtype or inp.v.dtype != inp.q.dtype:
        raise ValueError("backend 'triton': q, k, v must share one dtype among float32, bfloat16, float16; got "
                         f"{inp.q.dtype}, {inp.k.dtype}, {inp.v.dtype}")
    for name in ("pos_dst", "pos_src", "gate_dst", "gate_src", "rbf_centers", "w_radial", "w_out", "b_out"):
        if t[name].dtype != torch.float32:
            raise ValueError(f"backend 'triton': {name} must be float32, got {t[name].dtype}")
    if inp.nbr.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"backend 'triton': nbr must be int32 or int64, got {inp.nbr.dtype}")
    n, kslots = inp.nbr.shape if inp.nbr.dim() == 2 else (None, None)
    if n is None:
        raise ValueError("backend 'triton': nbr must be [N, K]")
    if kslots > MAX_NEIGHBORS:
        raise ValueError(f"backend 'triton': at most {MAX_NEIGHBORS} neighbour slots, got K = {kslots}")
    if inp.q.dim() != 3:
        raise ValueError("backend 'triton': q must be [N, H, dk]")
    h, dk = inp.q.shape[1:]
    m = inp.pos_src.shape[0]
    g = inp.gate_dst.shape[-1]
    r = inp.rbf_centers.shape[0]
    expect = {
        "pos_dst": (n, 3), "pos_src": (m, 3), "q": (n, h, dk), "k": (m, h, dk),
        "v": (m, h, inp.v.shape[-1]), "gate_dst": (n, g), "gate_src": (m, g), "rbf_centers": (r,),
        "w_radial": (r, g), "w_out": (g, 2 * h), "b_out": (2 * h,),
    }
    for name, shape in expect.items():
        if tuple(t[name].shape) != shape:
            raise ValueError(f"backend 'triton': {name} has shape {tuple(t[name].shape)}, expected {shape}")
    if dk > 64 or inp.v.shape[-1] > 512 or g > 256:
        raise ValueError(f"backend 'triton': needs dk <= 64, dv <= 512, gate hidden <= 256; got {dk}, "
                         f"{inp.v.shape[-1]}, {g}")
    if not (inp.cutoff > 0 and inp.eps >= 0 and inp.rbf_gamma >= 0):
        raise ValueError("backend 'triton': needs cutoff > 0, eps >= 0, rbf_gamma >= 0")
    if radial_intervals(inp.rbf_gamma, inp.cutoff) > RADIAL_MAX_INTERVALS:
        raise ValueError(f"backend 'triton': radial basis too narrow for its table (rbf_gamma = {inp.rbf_gamma} over "
                         f"cutoff {inp.cutoff} needs more than {RADIAL_MAX_INTERVALS} intervals)")


_KEY = ["K", "H", "DK", "DV", "G", "R", "PREC", "VS"]  # + the tensor dtypes (added by the autotuner)


def _config(warps, maxnreg=None, stages=1, **meta):
    """A ``triton.Config`` of ``meta`` at ``warps`` warps (loops not software-pipelined unless
    ``stages`` > 1)."""
    import triton

    return triton.Config(meta, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


def _cfg(hc, warps, stages=1, maxnreg=None, **extra):
    """A configuration of the fused forward: ``HC`` heads a chunk."""
    return _config(warps, maxnreg, stages, HC=hc, **extra)


def _heads_cfg(hb, warps, **extra):
    """A configuration of a one-warp-layout kernel with ``HB`` heads a program (aggregation,
    value pass, source pass)."""
    return _config(warps, HB=hb, **extra)


def _target_cfg(hc, warps):
    """A target-pass configuration: ``HC`` heads a chunk."""
    return _config(warps, HC=hc)


def _src_cfg(hb, bks, warps):
    """A source-pass configuration: ``HB`` heads a program, ``BKS`` in-edges a step of the
    gate and position part."""
    return _heads_cfg(hb, warps, BKS=bks)


#: Meta-parameters a forced forward configuration starts from (``E2F_TRITON_FWD_CONFIG``).
FWD_BASE = dict(HC=16, TB=1, GROUPS=2, num_warps=4, num_stages=1, maxnreg=None)


def _fwd_candidates(dtype: torch.dtype = torch.float32) -> list:
    """Forward configurations for q/k/v of ``dtype``, the default first."""
    if _interpreting():
        return [_cfg(16, 4, TB=1, GROUPS=2)]
    # GROUPS=2 (contiguous heads: the warps own heads, the sum over edges stays in registers),
    # capped at 128 registers a thread so that four programs share an SM (latency-bound: more
    # warps in flight beat the spills). On an H100, N = 65,536 (ms; perf-notes sections 9, 11):
    # fp32 GROUPS=4 29.5, GROUPS=2 22.2, capped at 128 17.5 (50 B spilled), at 96 20.2, HC=8
    # capped at 96 18.9; bf16 GROUPS=2 19.6, capped at 128 17.6, at 96 17.3, HC=8 32-35.
    # GROUPS=8, 8 warps and TB > 1 (several targets a program) were slower and stay
    # forced-configuration experiments. (Timed with the radial layer's R = 256 Gaussians and
    # their product in the kernel, 32 basis functions a product, before it read the table.)
    capped_at_96 = _cfg(8 if dtype == torch.float32 else 16, 4, maxnreg=96, TB=1, GROUPS=2)
    return [_cfg(16, 4, maxnreg=128, TB=1, GROUPS=2), capped_at_96, _cfg(16, 4, TB=1, GROUPS=2)]


def _logit_candidates(bk: int) -> list:
    """Configurations of the split forward's logits kernel for ``bk``-row slot tiles, the
    default first.

    Every candidate keeps ``TB * BK / (num_warps / 4) <= 64`` edge rows a warp group: with more,
    Triton 3.6's Hopper code for this kernel returns wrong logits (H100, K = 16 / 32 / 64: every
    configuration above 64 rows a warp group was off by 0.2-0.4 relative, every one at or below
    it within 7e-7 of the fused forward; perf-notes section 24).
    """
    if _interpreting():
        return [_config(4, HC=16, TB=2)]
    # H100, N = 65,536, K = 32, fp32 / bf16 q/k/v, ms: TB=4 HC=32 8 warps 6.61 / 6.15, TB=1 HC=16
    # capped at 128 registers 6.69 / 6.47, TB=4 HC=16 8 warps 6.89 / 6.55, TB=2 HC=32 4 warps 6.97 / 6.92
    # (timed with the radial layer's R = 256 products in the kernel, before the table)
    wide, narrow = max(1, 128 // bk), max(1, 64 // bk)
    return [_config(max(4, wide * bk // 16), HC=32, TB=wide),
            _config(max(4, narrow * bk // 16), maxnreg=128, HC=16, TB=narrow),
            _config(max(4, wide * bk // 16), HC=16, TB=wide),
            _config(max(4, narrow * bk // 16), HC=32, TB=narrow)]


def _aggregate_candidates() -> list:
    """Configurations of the split forward's aggregation kernel (``HB`` heads a program)."""
    if _interpreting():
        return [_heads_cfg(2, 1)]
    # H100, N = 65,536, fp32 / bf16 values, ms: HB=32 1 warp 8.66 / 4.59, HB=64 2 warps 9.00 / 4.75,
    # HB=16 1 warp 9.27 / 7.08 (HB=128 at 4 warps 9.23 / 5.53 and register caps were slower)
    return [_heads_cfg(hb, w) for hb, w in ((32, 1), (64, 2), (16, 1))]


def _split_kernels(bucket: int, bk: int) -> tuple:
    """The split forward's autotuned kernels (logits, aggregation) for one ``size_bucket`` and
    slot tile ``bk``."""
    key = ("split", bucket, bk)
    if key not in _kernels:
        from e2f.attention.triton import kernels as K

        first_only = os.environ.get("E2F_TRITON_AUTOTUNE", "1") == "0"
        logit_cfgs, aggregate_cfgs = _logit_candidates(bk), _aggregate_candidates()
        _kernels[key] = (_autotuned(K.fwd_logit_kernel, logit_cfgs[:1] if first_only else logit_cfgs),
                         _autotuned(K.fwd_aggregate_kernel, aggregate_cfgs[:1] if first_only else aggregate_cfgs))
    return _kernels[key]


def _bwd_candidates(bk: int, fp32: bool = True) -> dict:
    """Configurations of the backward kernels by role (``edge``, ``weight``, ``value``,
    ``target``, ``gate``, ``source``) for ``bk``-row slot tiles and float32 (or 16-bit) q/k/v, the
    defaults first."""
    if _interpreting():
        return {"edge": _logit_candidates(bk), "weight": [_target_cfg(16, 4)], "value": [_heads_cfg(8, 1)],
                "target": [_target_cfg(16, 4)],
                "gate": [_config(4, TB=1)], "source": [_src_cfg(8, 16, 1)]}
    # Tuned on an H100 (N = 65,536, 6 chunks; ms a chunk, fp32 / bf16 q/k/v, TF32 products;
    # perf-notes section 26): value pass HB = 32 at 1 warp 3.31 / 3.54 (253 registers),
    # HB = 16 3.88 / 3.28, HB = 64 at 2 warps 4.20 / 3.76, HB = 32 at 2 warps 6.69 / 5.55; target
    # pass HC = 8 at 4 warps 1.87 / 1.92 (96 registers), HC = 32 at 8 warps 1.92 / 1.83, HC = 16
    # at 4 warps 1.92 / 2.07, HC = 8 at 1 or 2 warps and HC = 4 slower; source pass (keys only)
    # HB = 128 at 4 warps 0.49 / 0.47, HB = 32 / 64 0.62. The value pass reading its weights from
    # the weight pass (perf-notes 34, H100, fp32 / bf16): HB = 32 3.00 / 2.80, HB = 16 3.02 / 2.77,
    # HB = 64 at 2 warps 3.52 / 2.89; the weight pass HC = 32 at 8 warps 0.268, at 4 warps 0.272,
    # HC = 16 at 4 warps 0.341. The value and target passes start
    # from the faster of their two best for the dtype (the regression gate runs the first
    # configurations: bf16 forward + backward was 5 % slower with fp32's). Gate backward, with
    # the exact radial layer (perf-notes section 13): 1.98 at 4 warps, 1.99 with two targets a
    # tile at 8 warps, 2.19 at 8 warps. Elementwise from section 28 (the hidden layer's
    # gradient a cuBLAS product before it), sm_90a registers: 16 warps 100, 8 warps 160 (128
    # capped: 16 B spilled), 4 warps 251, two targets a tile at 16 warps 128. The exact-layer
    # gate configurations ran at K = 64 with TF32 products (64-row edge tiles; the single
    # target pass they replaced faulted there with 8 warps, perf-notes section 11).
    wide, narrow = _heads_cfg(32, 1), _heads_cfg(16, 1)
    small, large = _target_cfg(8, 4), _target_cfg(32, 8)
    # The edge pass without the gate outputs (cuBLAS writes them): sm_90a registers at 32-row
    # tiles, HC = 16 4 warps 109, HC = 32 144; 64 rows, 8 warps, HC = 16 150 (the logits
    # kernel's 128-row tiles spill: 255 registers). H200, N = 65,536, ms a chunk, fp32 / bf16:
    # HC = 16 4 warps 0.43 / 0.38, HC = 32 0.44 / 0.37, 8 warps 0.67 / 0.62 and 0.63 / 0.59 (the
    # edge pass with the gate outputs: 0.96 / 0.78; perf-notes 29).
    one = max(1, 32 // bk)
    edge = [_config(4, HC=16, TB=one), _config(4, HC=32, TB=one), _config(8, HC=16, TB=2 * one),
            _config(8, HC=32, TB=2 * one)]
    return {"edge": edge,
            "weight": [_target_cfg(32, 8), _target_cfg(32, 4), _target_cfg(16, 4)],
            "value": ([wide, narrow] if fp32 else [narrow, wide]) + [_heads_cfg(64, 2)],
            "target": ([small, large] if fp32 else [large, small]) + [_target_cfg(16, 4)],
            "gate": [_config(16, TB=1), _config(8, TB=1), _config(8, maxnreg=128, TB=1), _config(16, TB=2)],
            "source": [_src_cfg(128, 16, 4), _src_cfg(32, 16, 1), _src_cfg(64, 16, 2)]}


def parse_fwd_config(text: str):
    """The forward configuration ``E2F_TRITON_FWD_CONFIG`` names (see the module docstring).

    Parameters
    ----------
    text : str
        Comma-separated ``KEY=INT`` pairs, e.g. ``"TB=2,num_warps=8"``.

    Returns
    -------
    triton.Config
        ``FWD_BASE`` with the named values replaced.
    """
    meta = dict(FWD_BASE)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in _FWD_KEYS:
            raise ValueError(f"{FWD_CONFIG_ENV}: expected KEY=INT with KEY in {_FWD_KEYS}, got {item!r}")
        try:
            meta[name] = int(value)
        except ValueError:
            raise ValueError(f"{FWD_CONFIG_ENV}: {name} needs an integer, got {value.strip()!r}") from None
    if meta["TB"] not in (1, 2, 4) or meta["GROUPS"] not in (2, 4, 8):
        raise ValueError(f"{FWD_CONFIG_ENV}: needs TB in (1, 2, 4) and GROUPS in (2, 4, 8), got {text!r}")
    for name in ("HC", "num_warps"):
        if meta[name] < 1 or meta[name] & (meta[name] - 1):
            raise ValueError(f"{FWD_CONFIG_ENV}: {name} must be a power of two, got {meta[name]}")
    if meta["maxnreg"] is not None and meta["maxnreg"] < 1:
        raise ValueError(f"{FWD_CONFIG_ENV}: maxnreg must be positive, got {meta['maxnreg']}")
    warps, stages, maxnreg = meta.pop("num_warps"), meta.pop("num_stages"), meta.pop("maxnreg")
    return _cfg(meta.pop("HC"), warps, stages, maxnreg, **meta)


def _fwd_kernel(dtype: torch.dtype, n_rows: int, bk: int):
    """The forward kernel for q/k/v of ``dtype``, ``n_rows`` targets and ``bk``-row slot tiles:
    the forced configuration if ``E2F_TRITON_FWD_CONFIG`` names one."""
    text = os.environ.get(FWD_CONFIG_ENV, "").strip()
    if not text:
        return _configs(size_bucket(n_rows), bk, dtype == torch.float32)["fwd"]
    if text not in _forced_fwd:
        from e2f.attention.triton import kernels as K

        _forced_fwd[text] = _autotuned(K.fwd_kernel, [parse_fwd_config(text)])
    return _forced_fwd[text]


def size_bucket(n_rows: int) -> int:
    """The autotuning bucket of ``n_rows`` atoms: 0 up to 4,096, then one per factor of 4.

    Triton's autotuner keys on ``_KEY`` (shapes other than the atom count, and the dtypes), so
    a training run does not retune for every batch; the best configuration does change with the
    atom count, though (H100, bf16: an 8-warp target pass wins at 4,096, a 4-warp one by 15 % at
    65,536), so each bucket has autotuners of its own.
    """
    return max(0, (max(int(n_rows), 1) - 1).bit_length() - 12 + 1) // 2


def _configs(bucket: int = 0, bk: int = 16, fp32: bool = True) -> dict:
    """Autotuned kernels of one ``size_bucket``, slot tile ``bk`` and float32 (or 16-bit) q/k/v
    (built once each; the interpreter gets a single configuration): ``fwd``, and the backward's
    by role (``_BACKWARD``)."""
    key = (bucket, bk, fp32)
    if key in _kernels:
        return _kernels[key]
    from e2f.attention.triton import kernels as K

    first_only = os.environ.get("E2F_TRITON_AUTOTUNE", "1") == "0"  # quick runs

    def tuned(kernel, cfgs, **buffers):
        return _autotuned(kernel, cfgs[:1] if first_only else cfgs, **buffers)

    candidates = _bwd_candidates(bk, fp32)
    _kernels[key] = {
        "fwd": tuned(K.fwd_kernel, _fwd_candidates(torch.float32 if fp32 else torch.bfloat16)),
        **{role: tuned(getattr(K, name), candidates[role], **buffers) for role, (name, buffers) in _BACKWARD.items()}}
    return _kernels[key]


#: Backward kernels by role, with the buffers the autotuner must reset (``reset_to_zero``:
#: sums a launch adds into, chunk after chunk; they are zero at the first chunk, where tuning
#: happens) or restore (``restore_value``: read and then overwritten: the target pass writes
#: ``dqk``, ``dg``, ``du`` over the ``q.k``, ``g``, ``u`` it reads, the value pass ``dw`` over
#: the weights it reads, the gate backward ``dpre`` over the ``dhid`` it reads, and it adds
#: into ``dd``) around every trial, so the
#: launch after tuning finds its inputs as an untuned one would. Without the restore, the
#: first backward of every size bucket read ``dpre`` as ``dg``, ``du`` (found in session 7).
_BACKWARD = {"edge": ("bwd_edge_kernel", {}),
             "weight": ("bwd_weight_kernel", {}),
             "value": ("bwd_value_kernel", {"reset_to_zero": ["dv"], "restore_value": ["dw_edge"]}),
             "target": ("bwd_target_kernel", {"restore_value": ["qk_edge", "gate_edge"]}),
             "gate": ("bwd_gate_kernel", {"restore_value": ["hid_edge", "dd_edge"]}),
             "source": ("bwd_source_kernel", {"reset_to_zero": ["dk", "dgate_src", "dpos_src"]})}


def _autotuned(kernel, cfgs: list, reset_to_zero=None, restore_value=None):
    """``kernel`` autotuned over ``cfgs`` on ``_KEY``, the named buffers reset or restored
    around every trial (``_BACKWARD``)."""
    import triton

    for cfg in cfgs:  # the interpreter ignores a meta-parameter the kernel lacks; the GPU refuses it
        unknown = set(cfg.kwargs) - set(kernel.arg_names)
        if unknown:
            raise ValueError(f"{kernel.fn.__name__}: configuration {cfg} names {sorted(unknown)}, not its arguments")
    key = [name for name in _KEY if name in kernel.arg_names]  # the source pass has no gate products
    return triton.autotune(cfgs, key=key, reset_to_zero=reset_to_zero, restore_value=restore_value)(kernel)


def backward_role(role: str, cfgs: list):
    """The backward kernel of ``role`` (a key of ``_BACKWARD``) autotuned over ``cfgs`` alone,
    its buffers reset or restored around trials as the library's (experiments and tests that
    pick configurations)."""
    from e2f.attention.triton import kernels as K

    name, buffers = _BACKWARD[role]
    return _autotuned(getattr(K, name), cfgs, **buffers)


def last_config() -> dict:
    """The configurations chosen for the last shapes run (empty before the first call)."""
    return dict(_last)


def _compiled_stats(compiled) -> dict:
    """Registers and spills of a compiled launch (none in the interpreter)."""
    return {stat: getattr(compiled, stat) for stat in ("n_regs", "n_spills") if getattr(compiled, stat, None) is not None}


def _record(name: str, kernel, compiled=None) -> None:
    best = getattr(kernel, "best_config", None)
    if best is not None:
        _last[name] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
        if getattr(best, "maxnreg", None) is not None:
            _last[name]["maxnreg"] = best.maxnreg
        _last[name].update(_compiled_stats(compiled))
        timings = getattr(kernel, "configs_timings", None)  # set by the autotuner when it benchmarked
        if timings:
            _last[name]["tuning_ms"] = {str(c): (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
            # the autotuner times its reset and restore hooks with each trial: these timings
            # exceed the kernel's own time by those copies (perf-notes 27)
            hooks = {h: list(getattr(kernel, h, None) or ()) for h in ("reset_to_zero", "restore_value")}
            if any(hooks.values()):
                _last[name]["tuning_includes"] = {h: names for h, names in hooks.items() if names}


def _dims(t: dict) -> dict:
    n, kslots = t["nbr"].shape
    h, dk = t["q"].shape[1:]
    dv = t["v"].shape[-1]
    g = t["gate_dst"].shape[-1]
    r = t["rbf_centers"].shape[0]
    return dict(N=n, K=kslots, H=h, DK=dk, DV=dv, G=g, R=r, BK=_pow2(kslots, 16), DKP=_pow2(dk, 2),
                DVP=_pow2(dv, 16), GP=_pow2(g, 16), M=t["pos_src"].shape[0],
                VS=padded_head_stride(t["v"]) or 0)


def forward_plan(n_rows: int, kslots: int, h: int, fp32: bool = True, moments: bool = False) -> tuple[str, int]:
    """``(mode, targets per chunk)`` of a forward over ``n_rows`` targets with float32 (or
    16-bit) q/k/v (module docstring: ``E2F_TRITON_FORWARD``, ``E2F_TRITON_FWD_STASH_BYTES``);
    the moments (``CoreInputs.moments``) have the split form only."""
    mode = "split" if moments else os.environ.get(FWD_MODE_ENV, "").strip() or "auto"
    if mode not in FWD_MODES:
        raise ValueError(f"{FWD_MODE_ENV} must be one of {FWD_MODES}, got {mode!r}")
    budget = _bytes_from_env(FWD_STASH_ENV)
    if budget is None:
        budget = max(1, min(FWD_STASH_BYTES_PER_ATOM, FWD_STASH_MAX_BYTES // max(1, n_rows)))
    chunk = _chunk_within(n_rows, kslots * (8 * h + 4), budget)
    if mode == "auto":
        # a forced fused configuration is an experiment on the fused kernel
        forced = bool(os.environ.get(FWD_CONFIG_ENV, "").strip())
        mode = "split" if chunk >= SPLIT_MIN_TARGETS[fp32] and not forced else "fused"
    return mode, chunk


def _forward(t: dict, gamma: float, cutoff: float, eps: float, moments: bool = False):
    d = _dims(t)
    f32 = dict(device=t["q"].device, dtype=torch.float32)
    width = d["DV"] * (3 if moments else 1)
    if d["N"] == 0 or d["M"] == 0:
        return (torch.zeros(d["N"], d["H"], width, **f32), torch.zeros(d["N"], d["H"], **f32),
                torch.full((d["N"], d["H"]), eps, **f32))
    # both forms read the radial table
    radial, inv_h = radial_table(t["rbf_centers"], t["w_radial"], gamma, cutoff)
    # both forms write every row (a target without neighbours gets 0, 0 and eps)
    out = torch.empty(d["N"], d["H"], width, **f32)
    m = torch.empty(d["N"], d["H"], **f32)
    s = torch.empty(d["N"], d["H"], **f32)
    prec = _gate_precision()
    mode, chunk = forward_plan(d["N"], d["K"], d["H"], t["q"].dtype == torch.float32, moments)
    for name in _FORWARD_RECORDS:
        _last.pop(name, None)
    _last["precision"] = prec
    _last["fwd_mode"] = mode
    if mode == "split":
        _forward_split(t, d, chunk, (radial, inv_h), out, m, s, cutoff, eps, prec, moments)
        return out, m, s
    fwd = _fwd_kernel(t["q"].dtype, d["N"], d["BK"])
    n = d["N"]
    compiled = fwd[lambda meta: (triton_cdiv(n, meta["TB"]),)](
        t["pos_dst"], t["pos_src"], t["nbr"], t["q"], t["k"], t["v"], t["gate_dst"], t["gate_src"],
        radial, t["w_out"], t["b_out"], out, m, s,
        n, d["K"], d["H"], d["G"], radial.shape[0] - 1, inv_h, float(cutoff), float(eps), 1.0 / math.sqrt(d["DK"]),
        DK=d["DK"], DV=d["DV"], BK=d["BK"], DKP=d["DKP"], DVP=d["DVP"], GP=d["GP"], PREC=prec, VS=d["VS"])
    _record("fwd", fwd, compiled)
    return out, m, s


def _forward_split(t: dict, d: dict, chunk: int, table: tuple, out: Tensor, m: Tensor, s: Tensor, cutoff: float,
                   eps: float, prec: str, moments: bool = False) -> None:
    """The forward in two kernels a chunk of ``chunk`` targets: logits, then aggregation, or
    with ``moments`` ``kernels.fwd_moment_kernel`` (``table``: ``radial_table``'s ``(radial, 1 / h)``)."""
    n, kslots, h = d["N"], d["K"], d["H"]
    f32 = dict(device=t["q"].device, dtype=torch.float32)
    radial, inv_h = table
    stash = (torch.empty(chunk * kslots, h, **f32), torch.empty(chunk * kslots, h, **f32),
             torch.empty(chunk * kslots, **f32))
    logits, aggregate = _split_kernels(size_bucket(n), d["BK"])
    for t0 in range(0, n, chunk):
        rows = min(chunk, n - t0)
        done = logits[lambda meta: (triton_cdiv(rows, meta["TB"]),)](
            t["pos_dst"], t["pos_src"], t["nbr"], t["q"], t["k"], t["gate_dst"], t["gate_src"],
            radial, t["w_out"], t["b_out"], *stash,
            t0, t0 + rows, kslots, h, d["G"], radial.shape[0] - 1, inv_h, float(cutoff), 1.0 / math.sqrt(d["DK"]),
            DK=d["DK"], BK=d["BK"], DKP=d["DKP"], GP=d["GP"], PREC=prec)
        if moments:
            _moment_forward(t, d, stash, out, m, s, t0, rows, eps)
            continue
        aggregated = aggregate[lambda meta: (rows, triton_cdiv(h, meta["HB"]))](
            t["nbr"], t["v"], *stash, out, m, s, t0, kslots, h, float(eps),
            DV=d["DV"], DVP=d["DVP"], VS=d["VS"])
    _record("fwd_logits", logits, done)
    if not moments:
        _record("fwd_aggregate", aggregate, aggregated)
    _last["fwd_chunks"] = triton_cdiv(n, chunk)


#: Heads a program of the moments' kernels (one warp; fixed, because the value pass's
#: per-head-block partial sums of the displacement's gradient are sized by it). H100, N = 65,536,
#: the aggregation alone (``scripts/moment_agg_probe.py``, perf-notes 36): 32 heads at 1 warp
#: 3.57 ms, 64 at 2 warps 3.55, 128 at 4 warps 3.78, 16 at 1 warp 5.47.
MOMENT_HEADS = 32


def _moment_split(d: dict) -> dict:
    """The moments' kernels' tiling of a value row: ``DA`` (the largest power of two <= ``DV``)
    and the rest padded to ``DBP`` (at least 2), and ``HB`` heads a program."""
    da = 1 << (d["DV"].bit_length() - 1)
    return dict(DA=da, DBP=_pow2(d["DV"] - da, 2), HB=min(MOMENT_HEADS, _pow2(d["H"])))


def _moment_forward(t: dict, d: dict, stash: tuple, out: Tensor, m: Tensor, s: Tensor, t0: int, rows: int,
                    eps: float) -> None:
    """``kernels.fwd_moment_kernel`` over the chunk of ``rows`` targets from ``t0`` (``stash``:
    the logits kernel's)."""
    from e2f.attention.triton import kernels as K

    tiles = _moment_split(d)
    compiled = K.fwd_moment_kernel[(rows, triton_cdiv(d["H"], tiles["HB"]))](
        t["nbr"], t["pos_dst"], t["pos_src"], t["v"], *stash, out, m, s, t0, d["K"], d["H"], float(eps),
        DV=d["DV"], VS=d["VS"], num_warps=1, **tiles)
    _last["fwd_moment"] = {**tiles, "num_warps": 1, **_compiled_stats(compiled)}


def radial_table_bytes(gamma: float, cutoff: float, g: int) -> int:
    """Bytes of ``radial_table``'s table (and of its gradient) for a hidden layer of ``g``."""
    return (radial_intervals(gamma, cutoff) + 1) * 2 * g * 4


def _float_pair(x: float) -> tuple[float, float]:
    """``x`` as two float32 numbers whose float64 sum is ``x`` to ~1e-14 (a kernel's float64
    scalar: Triton passes Python floats as float32)."""
    hi = float(numpy.float32(x))
    return hi, float(numpy.float32(x - hi))


#: Grid points, hidden units and basis functions a step of a ``radial_table_kernel`` program
#: (4 warps, two float64 ``[BP, BG]`` accumulators: 166 registers on sm_90a, ``kernel_regs.py
#: kernel=table``; a loop of one basis function a step with float64 FMAs took ~0.2 ms on an
#: H200, latency-bound); the interpreter takes blocks of 1,024 points and all units.
RADIAL_BUILD_BLOCK = (32, 64, 16)


def radial_table(centers: Tensor, w_radial: Tensor, gamma: float, cutoff: float) -> tuple[Tensor, float]:
    """``(table, 1 / h)``: ``e2f.attention.radial``'s table of the radial part of the gate's
    first layer, ``rbf(d) @ w_radial`` and ``h`` times its derivative on the grid ``d = g h``
    (``[intervals + 1, 2, G]`` float32), computed in float64 by ``kernels.radial_table_kernel``
    in one launch (``radial.build_table`` is its PyTorch twin: the table every other backend
    interpolates), for the kernels' cubic Hermite interpolation in both forms of the forward
    and the backward."""
    from e2f.attention.triton import kernels as K

    nt, h = radial_spacing(gamma, cutoff)
    r, g = w_radial.shape
    table = torch.empty(nt + 1, 2, g, device=w_radial.device, dtype=torch.float32)
    bp, bg, rc = (1024, _pow2(g, 16), 16) if _interpreting() else RADIAL_BUILD_BLOCK
    K.radial_table_kernel[(triton_cdiv(nt + 1, bp), triton_cdiv(g, bg))](
        centers.detach().contiguous(), w_radial.detach().contiguous(), table, nt + 1, r, g,
        *_float_pair(gamma), *_float_pair(h), BP=bp, BG=bg, RC=rc, num_warps=4)
    _last["radial_table"] = {"BP": bp, "BG": bg, "RC": rc, "num_warps": 4}  # a fixed configuration
    return table, 1.0 / h


#: Basis functions, hidden units and grid points a step of a ``radial_table_backward_kernel``
#: program, and the most blocks of grid points it splits the grid into (each block's partial
#: sums, float64 ``[R, G]``, are added at the end: 8 fill an H100 with 256 programs at the paper
#: sizes and take 2 MB).
RADIAL_GRAD_BLOCK = (16, 64, 32)
RADIAL_GRAD_MAX_PARTS = 8


def radial_table_backward(centers: Tensor, w_radial: Tensor, gamma: float, cutoff: float, dtable: Tensor,
                          max_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """The gradients of ``(dtable * radial_table(centers, w_radial)).sum()`` with respect to
    ``w_radial`` and ``centers`` (float32), from ``kernels.radial_table_backward_kernel`` in one
    launch: float64 sums in blocks of grid points whose partial sums (``R G`` float64 numbers
    a block, at least one block) stay within ``max_bytes``, added in a fixed order (the PyTorch
    twin: autograd through ``radial.build_table``)."""
    from e2f.attention.triton import kernels as K

    nt, h = radial_spacing(gamma, cutoff)
    if dtable.shape[0] != nt + 1:
        raise ValueError(f"dtable has {dtable.shape[0]} grid points, the table {nt + 1}")
    r, g = w_radial.shape
    dev = w_radial.device
    # the interpreter runs a program's tiles as numpy arrays: few, large ones
    br, bg, bp = (_pow2(r, 16), _pow2(g, 16), 256) if _interpreting() else RADIAL_GRAD_BLOCK
    parts = RADIAL_GRAD_MAX_PARTS if max_bytes is None else max(1, min(RADIAL_GRAD_MAX_PARTS, max_bytes // (r * g * 8)))
    per_part = triton_cdiv(triton_cdiv(nt + 1, parts), bp) * bp
    parts = triton_cdiv(nt + 1, per_part)
    g_blocks = triton_cdiv(g, bg)
    dw_part = torch.empty(parts, r, g, device=dev, dtype=torch.float64)
    dc_part = torch.empty(parts, g_blocks, r, device=dev, dtype=torch.float64)
    K.radial_table_backward_kernel[(triton_cdiv(r, br), g_blocks, parts)](
        centers.detach().contiguous(), w_radial.detach().contiguous(), dtable.detach().contiguous(), dw_part, dc_part,
        nt + 1, r, g, per_part, *_float_pair(gamma), *_float_pair(h), BR=br, BG=bg, BP=bp, num_warps=4)
    _last["radial_table_backward"] = {"BR": br, "BG": bg, "BP": bp, "parts": parts, "num_warps": 4}
    return dw_part.sum(0).float(), dc_part.sum((0, 1)).float()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _transposed(nbr: Tensor, m: int, targets_per_chunk: int):
    """In-edges of every source slot, per chunk of ``targets_per_chunk`` targets.

    Returns CSR row pointers over (source, chunk) pairs (``rowptr[j * chunks + c]``), the flat
    edge ids ``i * K + slot`` in increasing order within a pair (deterministic), and the
    sources with in-edges from each chunk, ``active[active_ptr[c]:active_ptr[c + 1]]`` in
    increasing order (``active_ptr`` a list of ints: the source pass launches a program for
    each of them only).
    """
    n, kslots = nbr.shape
    chunks = triton_cdiv(n, targets_per_chunk)
    flat = nbr.reshape(-1)
    eids = torch.nonzero(flat >= 0).reshape(-1)
    pair = flat[eids].to(torch.int64) * chunks + eids // (kslots * targets_per_chunk)
    order = torch.argsort(pair, stable=True)
    edge_ids = eids[order].contiguous()
    rowptr = torch.searchsorted(pair[order].contiguous(),
                                torch.arange(m * chunks + 1, device=nbr.device, dtype=torch.int64))
    has = (rowptr[1:] > rowptr[:-1]).reshape(m, chunks).t()  # [chunk, source]
    active = torch.nonzero(has.reshape(-1)).reshape(-1) % m  # chunk by chunk, sources increasing
    active_ptr = [0] + torch.cumsum(has.sum(1), 0).tolist()
    return rowptr.contiguous(), edge_ids.to(torch.int64), active.to(torch.int32).contiguous(), active_ptr


#: ``_transposed`` by ``id(nbr)``: ``((version, m, chunk), result)``, dropped when ``nbr`` dies.
_transposed_by_nbr: dict[int, tuple] = {}


def _transposed_once(nbr: Tensor, m: int, targets_per_chunk: int):
    """``_transposed``, computed once per neighbour list: every layer of a model shares its
    graph's ``nbr``, and each computation costs a sort and three waits for the device (a
    host-bound call's backward ran it once a layer)."""
    key = id(nbr)
    hit = _transposed_by_nbr.get(key)
    stamp = (nbr._version, m, targets_per_chunk)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if hit is None:
        weakref.finalize(nbr, _transposed_by_nbr.pop, key, None)
    result = _transposed(nbr, m, targets_per_chunk)
    _transposed_by_nbr[key] = (stamp, result)
    return result


#: The backward passes each other a per-edge stash: per edge and head ``q.k`` (then ``dqk``)
#: and ``dw``, and per edge a gate row of the two gate outputs (then their gradients), the
#: gate's hidden layer, which becomes its gradient and then the pre-activation's, and a one
#: (``4 H + G + 16`` floats an edge, padded to rows of a multiple of 16: 2.6 KB at the paper
#: sizes). The gate outputs ``[hid 1] [w_out; b_out]``, the output layer's weight and bias
#: gradients ``[hid 1]^T [dg du]`` and the hidden layer's gradient are matrix products per
#: chunk over the stash's columns, the radial layer's a sum over each grid interval's edges
#: (``_radial_gradient``). The edge pass computes the hidden layer and q.k; the value, target
#: and source passes read the stash (the gate backward recomputes the pre-activation).
#: Targets run in chunks so that the stash stays within ``SCRATCH_BYTES_PER_ATOM`` an atom,
#: capped at ``STASH_MAX_BYTES`` in all, and never below ``STASH_BYTES_PER_ATOM`` (K = 32:
#: 6 chunks up to ~230,000 atoms, 7 at 262,144, 14 at 524,288): the backward's bytes per atom
#: stay flat in N, and few chunks visit few halo sources in the source pass (a budget of 14
#: against 6 KB made forward + backward 2-3 % faster at 16,384-65,536 on an H100). From
#: ~230,000 atoms the cap holds the stash at 3 GiB, and from ~520,000 at 6 KB an atom again:
#: there the card's memory binds (N = 524,288 forward + backward on 80 GB ran out of memory
#: with a 13 KB stash). The radial table and its gradient (3 MB each at the paper sizes) come
#: out of the scratch budget: without that they alone add 6 KB an atom at N = 1,024.
#: ``E2F_TRITON_STASH_BYTES`` fixes the stash instead (bytes per atom).
SCRATCH_BYTES_PER_ATOM = 14 * 1024
STASH_BYTES_PER_ATOM = 6 * 1024
STASH_MAX_BYTES = 3 << 30
STASH_ENV = "E2F_TRITON_STASH_BYTES"


#: The column of ones after ``hid`` in a gate row, and padding: a row of a multiple of 16
#: numbers keeps the stride specialised as divisible by 16, so the kernels that walk the stash
#: keep their vector loads (with 4, 388 numbers at the paper sizes, the target pass took 1.09
#: instead of 0.91 ms a chunk; perf-notes 28).
GATE_ROW_EXTRA = 16


def _gate_stash_width(h: int, g: int) -> int:
    """Numbers a ``gate_edge`` row holds: ``g``, ``u`` then ``dg``, ``du``; ``hid`` (then
    ``dhid``, then ``dpre``); a one (the bias's column in the gate's products); padding."""
    return 2 * h + g + GATE_ROW_EXTRA


def _bytes_from_env(name: str) -> int | None:
    """A positive byte count from the environment variable ``name``; None where unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        budget = int(text)
    except ValueError:
        budget = 0
    if budget < 1:
        raise ValueError(f"{name} must be a positive number of bytes, got {text!r}")
    return budget


def _chunk_within(n_rows: int, per_target: int, budget: int) -> int:
    """Targets per chunk: as many equal chunks as keep ``per_target`` bytes a target within
    ``budget`` bytes an atom."""
    chunks = max(1, triton_cdiv(per_target, budget))
    return max(1, triton_cdiv(n_rows, chunks))


def _stash_chunk(n_rows: int, kslots: int, h: int, g: int, fixed_bytes: int = 0) -> int:
    """Targets per chunk of the backward (the stash budget above, less ``fixed_bytes`` of other
    scratch that does not grow with the atoms)."""
    budget = _bytes_from_env(STASH_ENV)
    if budget is None:
        n = max(1, n_rows)
        budget = min(SCRATCH_BYTES_PER_ATOM, STASH_MAX_BYTES // n) - fixed_bytes // n
        budget = max(STASH_BYTES_PER_ATOM, budget)
    return _chunk_within(n_rows, kslots * (2 * h + _gate_stash_width(h, g)) * 4, budget)


#: Targets per chunk below which the backward stops halving a stash that does not fit.
MIN_CHUNK_TARGETS = 256


def _stash_buffers(rows: int, h: int, sw: int, f32: dict) -> tuple:
    """The stash of ``rows`` edges: ``dw``, ``q.k`` then ``dqk`` ([rows, H]), and the gate rows
    ([rows, SW], the column after ``hid`` (``SW - GATE_ROW_EXTRA``) set to one)."""
    gate = torch.empty(rows, sw, **f32)
    gate[:, sw - GATE_ROW_EXTRA] = 1.0
    return torch.empty(rows, h, **f32), torch.empty(rows, h, **f32), gate


def _stash_bytes(rows: int, h: int, g: int) -> int:
    """Bytes of ``_stash_buffers`` for ``rows`` edges."""
    return rows * (2 * h + _gate_stash_width(h, g)) * 4


def _allocate_stash(chunk: int, kslots: int, h: int, g: int, f32: dict) -> tuple:
    """``(targets per chunk, stash buffers)``: ``chunk`` (``_stash_chunk``'s), halved while its
    stash runs out of memory (down to ``MIN_CHUNK_TARGETS``): near a full card the budget alone
    does not decide (N = 524,288 on an 80 GB H100: the inputs, ``dout``, the output and the
    gradients leave ~2 GiB, in pieces)."""
    while True:
        try:
            return chunk, _stash_buffers(chunk * kslots, h, _gate_stash_width(h, g), f32)
        except torch.OutOfMemoryError:
            if chunk <= MIN_CHUNK_TARGETS:
                raise
            chunk = triton_cdiv(chunk, 2)


#: Edges a step, and warps, of the radial table's gradient kernel (not autotuned: 0.21 ms a chunk
#: of 65,536 atoms on an H100, ~2 % of forward + backward).
RADIAL_EDGE_BLOCK = 32
RADIAL_WARPS = 4
#: Edge rows a program of ``kernels.bwd_grid_kernel`` (whole targets' slot tiles), at
#: ``RADIAL_WARPS`` warps: geometry only, 18 registers on sm_90a.
GRID_EDGE_ROWS = 128


def _radial_marks(nt: int, device) -> Tensor:
    """The grid positions that start the radial table's intervals, ``0 .. NT - 1``, and one that
    ends the finite ones (``NT + 1/2``: a position is at most ``NT``), for ``searchsorted``
    (built on the device: an element assignment would synchronise with the host)."""
    grid = torch.arange(nt + 1, device=device, dtype=torch.float32)
    return torch.where(grid < nt, grid, grid + 0.5)


def _radial_sort(x: Tensor, marks: Tensor) -> tuple:
    """Rows of grid positions ``x`` (``[rows, E]``, ``+inf``: no contribution) sorted (stable),
    the slot each sorted position came from (int32), and where each grid interval starts in the
    sorted row, then its end (``[rows, NT + 1]``, int32; ``marks``: ``_radial_marks``)."""
    x_sorted, order = torch.sort(x, dim=-1, stable=True)
    bounds = torch.searchsorted(x_sorted, marks.expand(*x.shape[:-1], -1).contiguous(), out_int32=True)
    return x_sorted, order.to(torch.int32), bounds


def _radial_order(t: dict, d: dict, chunk: int, marks: Tensor, inv_h: float, cutoff: float) -> tuple:
    """``_radial_sort`` of every target chunk's edge slots by their position on the radial
    table's grid (``kernels.bwd_grid_kernel``; the last chunk padded with ``+inf``): one batched
    sort a backward, where a sort a chunk took ~15 % of the GPU's time and ~1 ms of the host's at
    1,024 atoms (perf-notes 32)."""
    from e2f.attention.triton import kernels as K

    n, kslots = d["N"], d["K"]
    chunks = triton_cdiv(n, chunk)
    x = torch.empty(chunks, chunk * kslots, device=t["q"].device, dtype=torch.float32)
    if chunks * chunk > n:
        x.view(-1)[n * kslots:].fill_(float("inf"))
    tb = max(1, GRID_EDGE_ROWS // d["BK"])
    K.bwd_grid_kernel[(triton_cdiv(n, tb),)](t["pos_dst"], t["pos_src"], t["nbr"], x, n, kslots, marks.shape[0] - 1,
                                            inv_h, cutoff, BK=d["BK"], TB=tb, num_warps=RADIAL_WARPS)
    return _radial_sort(x, marks)


def _radial_gradient(x_sorted: Tensor, order: Tensor, bounds: Tensor, dpre_edge: Tensor, dtable: Tensor,
                     gp: int) -> None:
    """Adds to ``dtable`` the gradient of a chunk's gate pre-activations (``dpre``, the first
    ``G`` numbers of each ``dpre_edge`` row) with respect to the radial table: every edge's
    Hermite weights at its grid position on the two grid points around it. Each grid point sums
    its two intervals' edges in their sorted order (``_radial_sort``'s row of the chunk):
    deterministic, and no atomics."""
    from e2f.attention.triton import kernels as K

    nt = dtable.shape[0] - 1
    K.bwd_radial_table_kernel[(nt + 1,)](x_sorted, order, bounds, dpre_edge, dtable, nt, dtable.shape[2],
                                         dpre_edge.stride(0), BE=RADIAL_EDGE_BLOCK, GP=gp, num_warps=RADIAL_WARPS)


def _backward(t: dict, m: Tensor, s: Tensor, dout: Tensor, gamma: float, cutoff: float, moments: bool = False) -> dict:
    d = _dims(t)
    dev = t["q"].device
    f32 = dict(device=dev, dtype=torch.float32)
    n, mm, h, kslots, g, r = d["N"], d["M"], d["H"], d["K"], d["G"], d["R"]
    grads = {
        "q": torch.zeros(n, h, d["DK"], **f32), "k": torch.zeros(mm, h, d["DK"], **f32),
        "v": torch.zeros(mm, h, d["DV"], **f32), "gate_dst": torch.zeros(n, g, **f32),
        "gate_src": torch.zeros(mm, g, **f32), "pos_dst": torch.zeros(n, 3, **f32),
        "pos_src": torch.zeros(mm, 3, **f32), "w_radial": torch.zeros(r, g, **f32),
        "w_out": torch.zeros(g, 2 * h, **f32), "b_out": torch.zeros(2 * h, **f32),
        "rbf_centers": torch.zeros(r, **f32),
    }
    if n == 0 or mm == 0:
        return grads
    kern = _configs(size_bucket(n), d["BK"], t["q"].dtype == torch.float32)
    for name in _VALUE_RECORDS:
        _last.pop(name, None)
    # the radial table and its gradient come out of the stash's budget, and the float64
    # partial sums of the table's gradient (after the stash is freed) stay within the stash
    chunk = _stash_chunk(n, kslots, h, g, fixed_bytes=2 * radial_table_bytes(gamma, cutoff, g))
    scratch = _stash_bytes(chunk * kslots, h, g)
    radial, inv_h = radial_table(t["rbf_centers"], t["w_radial"], gamma, cutoff)
    grid_intervals = radial.shape[0] - 1
    dtable = torch.zeros_like(radial)
    marks = _radial_marks(grid_intervals, dev)
    dd_edge = torch.empty(n * kslots, **f32)
    gamma, cutoff = float(gamma), float(cutoff)
    # sorted before the stash exists, so that the sort's temporaries stay below its peak
    by_grid = _radial_order(t, d, chunk, marks, inv_h, cutoff)
    planned = chunk
    chunk, (dw_edge, qk_edge, gate_edge) = _allocate_stash(chunk, kslots, h, g, f32)
    if chunk != planned:  # halved near a full card
        del by_grid
        by_grid = _radial_order(t, d, chunk, marks, inv_h, cutoff)
    # the gate's output layer with its bias as one more row, and their gradients alike
    w_aug = torch.cat((t["w_out"].detach(), t["b_out"].detach()[None])).float()
    dw_aug = torch.zeros_like(w_aug)
    sw = gate_edge.shape[1]
    dpre_edge = gate_edge[:, 2 * h:]  # hid, then dhid, then dpre: the G numbers after 2 H
    rowptr, edge_ids, active, active_ptr = _transposed_once(t["nbr"], mm, chunk)
    chunks = triton_cdiv(n, chunk)
    inv_sqrt_dk = 1.0 / math.sqrt(d["DK"])
    if moments:
        from e2f.attention.triton import kernels as K

        tiles = _moment_split(d)
        blocks = triton_cdiv(h, tiles["HB"])
        # the displacement's gradient: per head block, for the chunk's edges and every source
        dr_part = torch.empty(blocks, chunk * kslots, 3, **f32)
        dps_part = torch.zeros(mm, blocks, 3, **f32)
        dpos_dst = torch.zeros(n, 3, **f32)
    for c in range(chunks):
        t0 = c * chunk
        nt = min(chunk, n - t0)
        rows = gate_edge[:nt * kslots]
        a0, a1 = active_ptr[c], active_ptr[c + 1]  # the sources with in-edges from the chunk
        kern["edge"][lambda meta: (triton_cdiv(nt, meta["TB"]),)](
            t["pos_dst"], t["pos_src"], t["nbr"], t["q"], t["k"], t["gate_dst"], t["gate_src"],
            radial, qk_edge, gate_edge,
            t0, t0 + nt, kslots, h, g, grid_intervals, sw, inv_h, cutoff, inv_sqrt_dk,
            DK=d["DK"], BK=d["BK"], DKP=d["DKP"], GP=d["GP"])
        # the gate outputs [g u] = [hid 1] [w_out; b_out] into the row's first 2 H numbers
        # (strided operands and output: cuBLAS reads and writes the stash in place)
        hid_one = rows[:, 2 * h:2 * h + g + 1]
        torch.mm(hid_one, w_aug, out=rows[:, :2 * h])
        kern["weight"][(nt,)](t["pos_dst"], t["pos_src"], t["nbr"], m, s, qk_edge, gate_edge, dw_edge,
                              t0, kslots, h, sw, cutoff, BK=d["BK"])
        if moments:
            # slots without an edge are no source's in-edge: their rows stay zero
            dr_part.zero_()
            if a1 > a0:
                compiled = K.bwd_moment_value_kernel[(a1 - a0, blocks)](
                    t["pos_dst"], t["pos_src"], t["v"], dout, rowptr, edge_ids, active, dw_edge, grads["v"],
                    dr_part, dps_part, a0, kslots, h, c, chunks, t0, chunk * kslots,
                    DV=d["DV"], VS=d["VS"], num_warps=1, **tiles)
                _last["bwd_moment_value"] = {**tiles, "num_warps": 1, **_compiled_stats(compiled)}
            dpos_dst[t0:t0 + nt] += dr_part[:, :nt * kslots].sum(0).view(nt, kslots, 3).sum(1)
        elif a1 > a0:
            kern["value"][lambda meta: (a1 - a0, triton_cdiv(h, meta["HB"]))](
                t["v"], dout, rowptr, edge_ids, active, dw_edge, grads["v"], a0, kslots, h, c, chunks, t0,
                DV=d["DV"], DVP=d["DVP"], VS=d["VS"])
        kern["target"][(nt,)](
            t["pos_dst"], t["pos_src"], t["nbr"], t["k"], m, s, grads["q"], dd_edge, dw_edge, qk_edge, gate_edge,
            t0, kslots, h, sw, cutoff, inv_sqrt_dk, DK=d["DK"], BK=d["BK"], DKP=d["DKP"])
        # the output layer's weights and bias: [hid 1]^T [dg du] over the chunk's edges (slots
        # without an edge hold dg = du = 0); matrix products at the gate kernels' precision
        # (_gate_precision). The bias through the ones: a column sum of the strided stash
        # (.sum(0)) took a temporary of up to 132 MiB on an H100 (10 KB an atom at N = 1,024)
        hid = rows[:, 2 * h:2 * h + g]
        dw_aug.addmm_(hid_one.t(), rows[:, :2 * h])
        # the hidden layer's gradient [dg du] w_out^T over hid (its last reader was the product
        # above; a strided output cuBLAS writes in place), then the elementwise gate backward
        torch.mm(rows[:, :2 * h], w_aug[:g].t(), out=hid)
        kern["gate"][lambda meta: (triton_cdiv(nt, meta["TB"]),)](
            t["pos_dst"], t["pos_src"], t["nbr"], t["gate_dst"], t["gate_src"], radial,
            dpre_edge, dd_edge, grads["gate_dst"], grads["pos_dst"],
            t0, t0 + nt, kslots, g, grid_intervals, sw, inv_h, cutoff, BK=d["BK"], GP=d["GP"])
        _radial_gradient(*(part[c] for part in by_grid), dpre_edge, dtable, d["GP"])
        if a1 > a0:
            kern["source"][lambda meta: (a1 - a0, triton_cdiv(h, meta["HB"]) + 1)](
                t["pos_dst"], t["pos_src"], t["q"], dd_edge, qk_edge, dpre_edge, rowptr, edge_ids, active,
                grads["k"], grads["gate_src"], grads["pos_src"], a0, kslots, h, g, sw, c, chunks, t0, cutoff,
                DK=d["DK"], DKP=d["DKP"], GP=d["GP"])
    for role in _BACKWARD:
        if not (moments and role == "value"):
            _record("bwd_" + role, kern[role])
    if moments:
        # the displacement r_ij = pos_dst[i] - pos_src[j]: its gradient to both ends
        grads["pos_dst"] += dpos_dst
        grads["pos_src"] -= dps_part.sum(1)
        del dr_part, dps_part
    _last["bwd_radial_table"] = {"BE": RADIAL_EDGE_BLOCK, "num_warps": RADIAL_WARPS}  # a fixed configuration
    _last["backward_chunks"] = chunks
    # the table's gradient to the weights after the stash is freed (its partial sums stay below it)
    grads["w_out"], grads["b_out"] = dw_aug[:g].contiguous(), dw_aug[g].contiguous()
    del dw_edge, qk_edge, gate_edge, dpre_edge, dd_edge, rows, hid, hid_one, rowptr, edge_ids, active, by_grid
    grads["w_radial"], grads["rbf_centers"] = radial_table_backward(t["rbf_centers"], t["w_radial"], gamma, cutoff,
                                                                    dtable, max_bytes=scratch)
    return grads


#: The second order (force training) recomputes target blocks through the reference formula
#: and differentiates them twice (``chunked.second_order_grads``). Each block costs a few
#: thousand launches whatever its size, so small blocks make a training step launch-bound:
#: E2Former-V2 at N = 1,000 took 2.60 s a step with 2**27-element blocks (5 a layer) and
#: 1.16 s with one block (H100, 2026-11-26, the earlier twin that also recomputed the first
#: order). Blocks are therefore as large as ``TWIN_MEMORY_FRACTION`` of the card allows at
#: ``TWIN_BYTES_PER_ELEMENT`` bytes of temporaries per element of ``chunked.block_plan``'s
#: count (measured ~16: +6.4 GiB of peak for 2**29 - 2**27 more elements at N = 4,000).
TWIN_MEMORY_FRACTION = 1 / 8
TWIN_BYTES_PER_ELEMENT = 16
#: Forces the second order's block size, in targets.
TWIN_BLOCK_ENV = "E2F_TRITON_TWIN_BLOCK"


def twin_plan(inp: CoreInputs) -> BlockPlan:
    """The target blocks the second-order pass of ``inp`` recomputes."""
    forced = os.environ.get(TWIN_BLOCK_ENV, "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"{TWIN_BLOCK_ENV} must be a positive number of targets, got {forced!r}")
        return block_plan(inp, target_block=int(forced))
    if inp.q.device.type != "cuda":
        return block_plan(inp)  # chunked's default block
    total = torch.cuda.get_device_properties(inp.q.device).total_memory
    return block_plan(inp, max_elements=int(total * TWIN_MEMORY_FRACTION / TWIN_BYTES_PER_ELEMENT))


def _first_order(tensors, m: Tensor, s: Tensor, dout: Tensor, gamma: float, cutoff: float, moments: bool) -> tuple:
    """The fused backward's gradients of every ``DIFF_NAMES`` input, each in its input's dtype."""
    t = dict(zip(TENSOR_NAMES, tensors))
    grads = _backward(t, m, s, dout.contiguous().float(), gamma, cutoff, moments)
    return tuple(grads[name].to(t[name].dtype) for name in DIFF_NAMES)


class _FusedCoreGrad(torch.autograd.Function):
    """``(m, s, dout, inputs) -> d<dout, out>/d inputs`` by the fused kernels; its own backward
    (the second order) recomputes target blocks of ``plan`` in PyTorch."""

    @staticmethod
    def forward(ctx, plan, gamma, cutoff, eps, m, s, dout, *tensors):
        ctx.plan = plan
        ctx.save_for_backward(dout, *tensors)
        return _first_order(tensors, m, s, dout, gamma, cutoff, plan.moments)

    @staticmethod
    def backward(ctx, *gg):
        dout, *tensors = ctx.saved_tensors
        t = dict(zip(TENSOR_NAMES, tensors))
        gg = dict(zip(DIFF_NAMES, gg))
        d_dout, grads = second_order_grads(ctx.plan, dout, t, gg, torch.is_grad_enabled())
        return (None, None, None, None, None, None, d_dout, *(grads.get(name) for name in TENSOR_NAMES))


class _FusedCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gamma, cutoff, eps, moments, *tensors):
        t = dict(zip(TENSOR_NAMES, tensors))
        out, m, s = _forward(t, gamma, cutoff, eps, moments)
        ctx.scalars = (gamma, cutoff, eps, moments)
        ctx.save_for_backward(*tensors, m, s)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        tensors, (m, s) = saved[:-2], saved[-2:]
        gamma, cutoff, eps, moments = ctx.scalars
        needs = ctx.needs_input_grad[4:]
        if torch.is_grad_enabled():
            # create_graph (force training): gradients that are themselves differentiable
            inp = CoreInputs(**dict(zip(TENSOR_NAMES, tensors)), rbf_gamma=gamma, cutoff=cutoff, eps=eps,
                             moments=moments)
            plan = twin_plan(inp)
            _last["twin_target_block"] = plan.target_block
            grads = _FusedCoreGrad.apply(plan, gamma, cutoff, eps, m, s, dout, *tensors)
        else:
            grads = _first_order(tensors, m, s, dout, gamma, cutoff, moments)
        got = dict(zip(DIFF_NAMES, grads))
        return (None, None, None, None, *(got.get(name) if need else None for name, need in zip(TENSOR_NAMES, needs)))


def fused_attention_core(inp: CoreInputs) -> Tensor:
    """The attention core (``e2f.attention.core``) through the fused Triton kernels.

    Call ``check(inp)`` first (the backend registry does); returns ``out [N, H, dv]``
    (``[N, H, 3 dv]`` with ``inp.moments``) in float32, differentiable with respect to every
    tensor of ``inp``.
    """
    t = inp.tensors()
    # a padded v (pad_value_rows) is read through its strides; everything else contiguous
    tensors = [t[name] if name == "v" and padded_head_stride(t[name]) else t[name].contiguous()
               for name in TENSOR_NAMES]
    return _FusedCore.apply(float(inp.rbf_gamma), float(inp.cutoff), float(inp.eps), bool(inp.moments), *tensors)
