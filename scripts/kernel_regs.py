"""Registers and spills of the forward kernel on sm_90a, compiled on a machine without a GPU.

Triton lowers to PTX and runs its bundled ``ptxas`` without a device, so the main risk of a
forward-kernel change, register pressure, can be checked before spending GPU time::

    PYTHONPATH=. python scripts/kernel_regs.py "TB=1,vs=64" "GROUPS=2,vs=64" "TB=4,num_warps=8,qkv=bf16"

Each argument is a forward configuration in ``E2F_TRITON_FWD_CONFIG`` syntax (keys left out
keep the first autotune configuration's values), optionally with ``vs=64`` (padded value rows,
as the library passes them) and ``qkv=bf16`` or ``qkv=fp16``. Shapes are the paper sizes (K = 32, H = 128, dk = 8, dv = 58, G = 128,
R = 256) with TF32 gate products, and the arguments specialised as Triton does on the GPU
(pointers and sizes divisible by 16). The numbers depend on the Triton version: run it with
the GPU box's (3.6), e.g. from a virtual environment made with ``--system-site-packages``
that installs ``triton==3.6.0``.
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
from e2f.attention.triton.function import parse_fwd_config  # noqa: E402

SIZES = dict(N=16384, K=32, H=128, G=128, R=256)
PADDED = dict(DK=8, DV=58, BK=32, DKP=8, DVP=64, GP=128)
FLOATS = ("gamma", "cutoff", "eps", "inv_sqrt_dk")
DIVISIBLE = [["tt.divisibility", 16]]
# what the layout of a tile costs, counted in the PTX: barriers, shared-memory round trips, shuffles
SYNC_AND_SHARED = {"bar.sync": r"\bbar\.sync\b", "ld.shared": r"\bld\.shared", "st.shared": r"\bst\.shared",
                   "shfl": r"\bshfl\.sync", "ld.global.v4": r"\bld\.global(?:\.\w+)*\.v4"}


def compile_fwd(config, qkv: str = "fp32", arch: int = 90, vs: int = 0):
    """The compiled forward kernel of one ``triton.Config`` (its PTX and metadata); ``vs``: the
    value head stride (0: contiguous rows, 64: the padded rows the library passes)."""
    fn = kernels.fwd_kernel
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
            attrs[(index,)] = DIVISIBLE
        else:
            signature[name] = "*i64" if name == "nbr" else f"*{qkv}" if name in ("q", "k", "v") else "*fp32"
            attrs[(index,)] = DIVISIBLE
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help='e.g. "TB=2,num_warps=8" or "TB=2,num_warps=8,qkv=bf16"')
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90a")
    for text in args.configs:
        items = [item.strip() for item in text.split(",")]
        extra = dict(item.split("=", 1) for item in items if item.startswith(("qkv=", "vs=")))
        config = parse_fwd_config(",".join(item for item in items if not item.startswith(("qkv=", "vs="))))
        start = time.perf_counter()
        compiled = compile_fwd(config, extra.get("qkv", "fp32"), vs=int(extra.get("vs", 0)))
        seconds = time.perf_counter() - start
        ptx = compiled.asm["ptx"]
        counts = {name: len(re.findall(pattern, ptx)) for name, pattern in SYNC_AND_SHARED.items()}
        print(f"{text:45s} {resources(ptx)}  shared {compiled.metadata.shared} B  {counts}  "
              f"compile {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
