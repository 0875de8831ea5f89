"""``scripts/gluon_agg_probe.py``: its Gluon kernel compiles for sm_90a without a GPU, with the
copies the probe is about (Gluon has no interpreter, so the GPU run is its only numeric check)."""
from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("vec,modifier", [(4, "cg"), (2, "ca")])
def test_async_walk_compiles_to_asynchronous_copies(load_script, vec, modifier):
    pytest.importorskip("triton.experimental.gluon")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = load_script("gluon_agg_probe").async_kernel
    consts = {"TR": 4, "HB": 8, "S": 4, "DV": 58, "DVP": 64, "VEC": vec, "num_warps": 1}
    signature = {"nbr": "*i64", "w": "*fp32", "v": "*fp32", "out": "*fp32", "N": "i32", "K": "i32", "H": "i32",
                 **{name: "constexpr" for name in consts}}
    # pointers and the head count divisible by 16, as Triton specialises them on the GPU
    aligned = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in ("nbr", "w", "v", "out", "H")}
    source = GluonASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                            attrs=aligned)
    try:
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1}).asm["ptx"]
    except RuntimeError as exc:  # no ptxas in this Triton build
        pytest.skip(f"cannot compile for sm_90 here: {exc}")
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
