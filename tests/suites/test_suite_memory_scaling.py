"""memory-scaling on the CPU at tiny sizes: saved-for-backward bytes are real measurements
that separate the materialised core (per-edge tensors) from the chunked one."""
from __future__ import annotations

import pytest

from suites.core.runner import SweepConfig, run_suite
from suites.memory_scaling import MemoryScaling, kind

pytestmark = pytest.mark.usefixtures("no_triton_interpreter", "one_thread")


def test_kind_names():
    assert kind("layer:dense-tp") == ("layer", "dense-tp")
    assert kind("core:chunked") == ("core", "chunked")
    assert kind("escn-md") == ("model", "escn-md")


def test_core_saved_bytes_scale_and_separate_backends(tmp_path):
    cfg = SweepConfig(device="cpu", quick=True, sizes=(64, 128), impls=("core:materialized", "core:chunked", "core:triton"),
                      out_dir=tmp_path, progress=False)
    suite = MemoryScaling()
    suite_points = suite.points
    suite.points = lambda c: [p for p in suite_points(c) if p.params["mode"] == "fwd"]
    res = run_suite(suite, cfg, log=lambda m: None)
    ok = {(r["impl"], r["params"]["n_atoms"]): r["metrics"] for r in res.records if r["status"] == "ok"}
    assert {r["status"] for r in res.records if r["impl"] == "core:triton"} == {"skipped"}
    mat64, mat128 = ok[("core:materialized", 64)]["saved_bytes"], ok[("core:materialized", 128)]["saved_bytes"]
    assert 1.7 < mat128 / mat64 < 2.3  # linear in N (fixed K)
    assert ok[("core:chunked", 128)]["saved_bytes"] < mat128 / 4  # no [E, H, dv] tensor saved
    for m in ok.values():
        assert m["bytes_per_atom"] > 0 and m["input_bytes"] > 0 and m["n_edges"] > 0
