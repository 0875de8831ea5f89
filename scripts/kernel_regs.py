"""Registers and spills of the fused kernels on sm_90a, compiled on a machine without a GPU.

Triton lowers to PTX and runs its bundled ``ptxas`` without a device, so the main risk of a
forward-kernel change, register pressure, can be checked before spending GPU time::

    PYTHONPATH=. python scripts/kernel_regs.py "TB=1,vs=64" "GROUPS=2,vs=64" "TB=4,num_warps=8,qkv=bf16"

Each argument is a forward configuration in ``E2F_TRITON_FWD_CONFIG`` syntax (keys left out
keep their ``FWD_BASE`` values), optionally with ``vs=64`` (padded value rows, as the library
passes them), ``qkv=bf16`` or ``qkv=fp16``, and ``kernel=edge``, ``kernel=value``,
``kernel=target``, ``kernel=gate``, ``kernel=grid`` (the edges' grid positions), ``kernel=radial`` (the radial table's gradient) or
``kernel=source`` for a backward pass, ``kernel=table`` for the radial table's build,
``kernel=table-grad`` for its gradient to the weights and centres, ``kernel=logits`` or ``kernel=aggregate`` for the split
forward's two kernels (their meta-parameters given as ``KEY=INT``: ``HC`` for the target pass,
``HC``, ``TB`` for the edge pass and the logits kernel, ``TB`` for the gate backward and the grid positions, ``HB``, ``BKS`` for
the source pass, ``HB`` for the value pass and the aggregation, ``BE`` for the radial table's
gradient, ``BP``, ``BG``, ``RC`` for its build, ``BR``, ``BG``, ``BP`` for that gradient, and ``num_warps``, ``maxnreg``; ``DEFAULT_META`` for the ones left out). Shapes
are the paper sizes (K = 32, H = 128, dk = 8, dv = 58, G = 128, R = 256) with TF32 gate
products, and the arguments specialised as Triton does on the GPU (pointers and sizes
divisible by 16). Besides
registers and spills it prints barrier, shared-memory and shuffle counts (PTX) and the SASS
size of the longest loop (``nvdisasm``; in the forward, one head chunk). The numbers depend on
the Triton version: run it with the GPU box's (3.6), e.g. from a virtual environment made with
``--system-site-packages`` that installs ``triton==3.6.0``.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # before any kernel module import: compile, not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from e2f.attention.triton import kernels  # noqa: E402
from e2f.attention.triton.function import _gate_stash_width, parse_fwd_config  # noqa: E402

SIZES = dict(N=16384, K=32, H=128, G=128, R=256, SW=_gate_stash_width(128, 128), T0=0, NT=2048, A0=0, C=0,
             NC=11, P=1531, PB=192)
# row counts and offsets the kernels do not specialise on (``do_not_specialize``, or, as the table's
# 1,531 grid points, not divisible by 16): no divisibility hint
UNSPECIALISED = ("N", "T0", "NT", "A0", "C", "NC", "P")
KERNELS = {"fwd": "fwd_kernel", "edge": "bwd_edge_kernel", "weight": "bwd_weight_kernel", "value": "bwd_value_kernel",
           "target": "bwd_target_kernel", "gate": "bwd_gate_kernel", "grid": "bwd_grid_kernel",
           "source": "bwd_source_kernel", "logits": "fwd_logit_kernel", "aggregate": "fwd_aggregate_kernel", "radial": "bwd_radial_table_kernel", "table": "radial_table_kernel",
           "table-grad": "radial_table_backward_kernel"}
# meta-parameters of a kernel= argument that does not name them (the library's first fp32 configurations)
DEFAULT_META = {"weight": {"HC": 32, "num_warps": 8}, "value": {"HB": 32, "num_warps": 1},
                "source": {"HB": 128, "BKS": 16, "num_warps": 4},
                "edge": {"HC": 16, "TB": 1, "num_warps": 4}, "target": {"HC": 8, "num_warps": 4},
                "logits": {"HC": 32, "TB": 4, "num_warps": 8}, "aggregate": {"HB": 32, "num_warps": 1},
                "gate": {"TB": 1, "num_warps": 16}, "grid": {"TB": 4, "num_warps": 4}, "radial": {"BE": 32, "num_warps": 4},
                "table": {"BP": 32, "BG": 64, "RC": 16, "num_warps": 4},
                "table-grad": {"BR": 16, "BG": 64, "BP": 32, "num_warps": 4}}
INDEX_POINTERS = ("nbr", "rowptr", "edge_ids")
INT32_POINTERS = ("active", "order", "bounds")
FLOAT64_POINTERS = ("dw_part", "dc_part")
PADDED = dict(DK=8, DV=58, BK=32, DKP=8, DVP=64, GP=128)
FLOATS = ("gamma", "cutoff", "eps", "inv_sqrt_dk", "inv_h", "gamma_hi", "gamma_lo", "h_hi", "h_lo")
DIVISIBLE = [["tt.divisibility", 16]]
# what the layout of a tile costs, counted in the PTX: barriers, shared-memory round trips, shuffles
SYNC_AND_SHARED = {"bar.sync": r"\bbar\.sync\b", "ld.shared": r"\bld\.shared", "st.shared": r"\bst\.shared",
                   "shfl": r"\bshfl\.sync", "ld.global.v4": r"\bld\.global(?:\.\w+)*\.v4"}


def compile_fwd(config, qkv: str = "fp32", arch: int = 90, vs: int = 0, kernel: str = "fwd"):
    """The compiled kernel (``KERNELS``: the forward, a backward pass, a split-forward kernel) of one ``triton.Config`` (its
    PTX and metadata); ``vs``: the value head stride (0: contiguous rows, 64: the padded rows
    the library passes)."""
    fn = getattr(kernels, KERNELS[kernel])
    signature, attrs = {}, {}
    constants = {**PADDED, "PREC": "tf32", "VS": vs, **config.kwargs}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants.setdefault(name, param.default)
        elif name in FLOATS:
            signature[name] = "fp32"
        elif name in SIZES:
            signature[name] = "i32"
            if name not in UNSPECIALISED:
                attrs[(index,)] = DIVISIBLE
        else:
            signature[name] = ("*i64" if name in INDEX_POINTERS else "*i32" if name in INT32_POINTERS
                               else "*fp64" if name in FLOAT64_POINTERS
                               else f"*{qkv}" if name in ("q", "k", "v") else "*fp32")
            attrs[(index,)] = DIVISIBLE
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()
                                                  if k in fn.arg_names},
                       attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resources(ptx: str, arch: int = 90) -> dict:
    """``ptxas -v`` on the PTX: registers, spill stores / loads (bytes a thread)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", path, "-o",
                                 os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    found = {key: re.search(pattern, report) for key, pattern in (
        ("registers", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"))}
    return {key: int(m.group(1)) if m else None for key, m in found.items()}


def parse_config(text: str):
    """``(config, qkv, vs, kernel)`` from one command-line argument (module docstring)."""
    from triton import Config

    items = [item.strip() for item in text.split(",") if item.strip()]
    extra = dict(item.split("=", 1) for item in items if item.startswith(("qkv=", "vs=", "kernel=")))
    rest = [item for item in items if not item.startswith(("qkv=", "vs=", "kernel="))]
    kernel = extra.get("kernel", "fwd")
    if kernel not in KERNELS:
        raise SystemExit(f"kernel= must be one of {sorted(KERNELS)}, got {kernel!r}")
    if kernel == "fwd":
        config = parse_fwd_config(",".join(rest))
    else:
        meta = dict(DEFAULT_META.get(kernel, {"HC": 16, "num_warps": 8}))
        meta.update((key, int(value)) for key, value in (item.split("=", 1) for item in rest))
        warps, maxnreg = meta.pop("num_warps"), meta.pop("maxnreg", None)
        config = Config(meta, num_warps=warps, num_stages=1, maxnreg=maxnreg)
    return config, extra.get("qkv", "fp32"), int(extra.get("vs", 0)), kernel


def largest_loop(cubin: bytes, arch: int = 90) -> int:
    """SASS instructions in the longest loop body (``nvdisasm``; for the forward that is one
    head chunk, so it approximates the instructions a thread issues per chunk)."""
    nvdisasm = os.path.join(os.path.dirname(get_ptxas(arch).path), "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    labels, body = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(body)
        elif re.match(r"\s+/\*[0-9a-f]{4}\*/", line):
            body.append(line)
    sizes = [i + 1 - labels[m.group(1)] for i, line in enumerate(body)
             if (m := re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)) and labels.get(m.group(1), len(body)) <= i]
    return max(sizes, default=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help='e.g. "TB=2,num_warps=8" or "TB=2,num_warps=8,qkv=bf16"')
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90a")
    for text in args.configs:
        config, qkv, vs, kernel = parse_config(text)
        start = time.perf_counter()
        compiled = compile_fwd(config, qkv, vs=vs, kernel=kernel)
        seconds = time.perf_counter() - start
        ptx = compiled.asm["ptx"]
        counts = {name: len(re.findall(pattern, ptx)) for name, pattern in SYNC_AND_SHARED.items()}
        print(f"{text:45s} {resources(ptx)}  shared {compiled.metadata.shared} B  {counts}  "
              f"loop {largest_loop(compiled.asm['cubin'])} SASS  compile {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
