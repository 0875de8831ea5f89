"""memory-scaling on the CPU at tiny sizes: saved-for-backward bytes are real measurements
that separate the materialised core (per-edge tensors) from the chunked one."""
from __future__ import annotations

import pytest
import torch

from suites.core.runner import SweepConfig, run_suite
from suites.memory_scaling import MemoryScaling, kind


@pytest.fixture(autouse=True)
def _no_triton_interpreter(monkeypatch):
    """Other test modules set TRITON_INTERPRET=1 for the kernels' CPU tests; here triton must be
    what it is on a CPU machine: unavailable (and recorded as skipped), not interpreted for minutes."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core CI box, OpenMP spin-waiting of two threads
    makes these small measurements 10-20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
