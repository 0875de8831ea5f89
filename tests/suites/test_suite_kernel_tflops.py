"""kernel-tflops: the FLOP/byte formulas, a tiny real sweep, and a raising implementation
that leaves the other points of the sweep intact."""
from __future__ import annotations

import pytest
import torch

from suites import kernel_tflops, workloads
from suites.core.runner import SweepConfig, run_suite

pytestmark = pytest.mark.usefixtures("no_triton_interpreter", "one_thread")


def test_flop_formula_matches_the_issue():
    s = workloads.PAPER_CORE
    per_atom = kernel_tflops.core_flops(1, s, "fwd")  # one atom, K = 32 slots
    assert per_atom["core"] == 2 * 32 * 128 * 8 + 2 * 32 * 128 * 58 + 8 * 32 * 128 == 573_440
    assert per_atom["total"] == per_atom["core"] + 2 * 32 * (256 * 128 + 128 * 2 * 128) == 4_767_744
    assert kernel_tflops.core_flops(1, s, "fwd+bwd")["core"] == 3 * per_atom["core"]
    assert kernel_tflops.elementwise_flops(32, s, "fwd") == 32 * (4 * 256 + 6 * 128 + 2 * 128 + 18)
    assert kernel_tflops.dense_flops(10, s, "fwd") == 2 * 100 * 128 * (8 + 58)


def _cfg(tmp_path, impls, **kw):
    return SweepConfig(device="cpu", quick=True, sizes=(48,), impls=impls, out_dir=tmp_path, progress=False, **kw)


def test_raising_implementation_keeps_the_other_points(tmp_path, monkeypatch):
    real = workloads.core_call

    def broken(backend, inp):
        if backend == "chunked":
            raise RuntimeError("chunked exploded on purpose")
        return real(backend, inp)

    monkeypatch.setattr(workloads, "core_call", broken)
    res = run_suite("kernel-tflops", _cfg(tmp_path, ("materialized", "chunked", "triton", "sdpa-dense")), log=lambda m: None)
    by = {}
    for r in res.records:
        by.setdefault(r["impl"], set()).add(r["status"])
    assert by["chunked"] == {"error"}
    assert by["materialized"] == {"ok"} and by["sdpa-dense"] == {"ok"}
    assert by["triton"] == {"skipped"}  # no CUDA here: recorded with the reason, never silent
    err = next(r for r in res.records if r["impl"] == "chunked")
    assert "exploded on purpose" in err["error"]
    ok = next(r for r in res.records if r["impl"] == "materialized" and r["params"]["mode"] == "fwd")["metrics"]
    assert ok["latency_ms"] > 0 and ok["tflops_core"] > 0 and ok["gbps"] > 0 and ok["n_edges"] > 0
    assert ok["flops_total"] > ok["flops_core"]
    dense = next(r for r in res.records if r["impl"] == "sdpa-dense")["metrics"]
    assert dense["sdpa_backend"] and dense["flops_executed"] >= dense["flops_core"]
    # Stored on disk too, one line per point.
    assert len(res.path.read_text().splitlines()) == len(res.records)


def test_dense_reference_is_capped(tmp_path):
    cfg = SweepConfig(device="cpu", quick=True, sizes=(8192,), impls=("sdpa-dense",), dtypes=("float32",), out_dir=tmp_path,
                      progress=False)
    res = run_suite("kernel-tflops", cfg, log=lambda m: None)
    assert {r["status"] for r in res.records} == {"skipped"}
    assert "cap" in res.records[0]["error"]


def test_cached_core_inputs_give_each_backend_its_value_layout(monkeypatch):
    import dataclasses

    from suites import workloads

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the triton backend counts as available on the CPU
    workloads.clear_cache()
    sizes = dataclasses.replace(workloads.QUICK_CORE, dv=6)
    common = dict(sizes=sizes, dtype=torch.float32, device="cpu", seed=0, requires_grad=True)
    fused = workloads.cached_core_inputs(40, backend="triton", **common)
    plain = workloads.cached_core_inputs(40, backend="materialized", **common)
    again = workloads.cached_core_inputs(40, backend="triton", **common)
    assert fused.v.stride(1) == again.v.stride(1) == 16 and plain.v.is_contiguous()
    assert fused.v.is_leaf and fused.v.requires_grad
    assert torch.equal(fused.v, plain.v) and torch.equal(again.v, plain.v)
    workloads.clear_cache()
