"""``scripts/gluon_agg_probe.py``: its Gluon kernel compiles for sm_90a without a GPU, with the
copies the probe is about (Gluon has no interpreter, so the GPU run is its only numeric check)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: exit status of this file run as a script when this Triton build cannot compile for sm_90
NO_SM90 = 3


def _async_walk_ptx(vec: int) -> str:
    """The probe's asynchronous walk compiled for sm_90a (``VEC``-number copies), as PTX.

    Compiled in a fresh process (this file run as a script): Triton 3.9's interpreter can leave
    ``triton.language.core`` patched after an interpreted kernel (a launch restores its patches
    since triton-lang/triton#8735, but a device function it calls patches the language again and
    restores nothing), and a compilation in such a process runs through the interpreter's builder
    and fails (seen in CI, after the radial-table tests had run).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, str(vec)], env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode == NO_SM90:
        pytest.skip(f"cannot compile for sm_90 here: {done.stdout.strip()}")
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.parametrize("vec,modifier", [(4, "cg"), (2, "ca")])
def test_async_walk_compiles_to_asynchronous_copies(vec, modifier):
    pytest.importorskip("triton.experimental.gluon")
    ptx = _async_walk_ptx(vec)
    sizes = {int(b, 16) for b in re.findall(rf"cp\.async\.{modifier}\.shared\.global[^;]*, 0x([0-9a-f]+)", ptx)}
    assert 4 * vec in sizes  # the value slabs, in VEC-number pieces
    assert "cp.async.wait_group" in ptx and "bar.sync" in ptx


def test_value_pass_twin_matches_its_reference(load_script):
    """The probe's Triton value walk (run by the interpreter here) against the PyTorch sums
    ``value_workload`` checks every GPU variant with: ``dv`` on sampled sources and ``dw``."""
    pytest.importorskip("triton.experimental.gluon")
    import torch

    probe = load_script("gluon_agg_probe")
    agg = load_script("agg_order_probe")
    nbr, v, w, _, _, _ = agg.workload(40, "cpu", "float32")
    rowptr, edge_ids, dout, vz, rows, ref_dv = probe.value_workload(nbr, v, w)
    m, heads, dvp = vz.shape
    kslots, dv_dim = nbr.shape[1], dout.shape[2]
    assert dvp == 64 and torch.all(vz[..., dv_dim:] == 0) and int(rowptr[-1]) == int((nbr >= 0).sum())
    dv = torch.zeros(m, heads, dv_dim)
    dw = torch.zeros(nbr.numel(), heads)
    probe.value_edge_kernel[(m, heads // 32)](rowptr, edge_ids, w, vz, dout, dv, dw, kslots, heads, HB=32,
                                              DV=dv_dim, DVP=dvp, num_warps=1)
    torch.testing.assert_close(dv[rows], ref_dv, rtol=1e-5, atol=1e-5)
    ref_dw = (dout[edge_ids // kslots] * vz[nbr.reshape(-1)[edge_ids]][..., :dv_dim]).sum(-1)
    torch.testing.assert_close(dw[edge_ids], ref_dw, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sys.path[:0] = [str(Path(__file__).parent), str(ROOT)]
    from conftest import load_module

    fn = load_module("gluon_agg_probe").async_kernel
    consts = {"TR": 4, "HB": 8, "S": 4, "DV": 58, "DVP": 64, "VEC": int(sys.argv[1]), "num_warps": 1}
    signature = {"nbr": "*i64", "w": "*fp32", "v": "*fp32", "out": "*fp32", "N": "i32", "K": "i32", "H": "i32",
                 **{name: "constexpr" for name in consts}}
    # pointers and the head count divisible by 16, as Triton specialises them on the GPU
    aligned = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in ("nbr", "w", "v", "out", "H")}
    source = GluonASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                            attrs=aligned)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    except RuntimeError as exc:  # no ptxas in this Triton build
        print(exc)
        sys.exit(NO_SM90)
    print(compiled.asm["ptx"])
