"""latency: MD rates and the model sweep definition."""
from __future__ import annotations

import pytest

from suites.latency import md_rates

pytestmark = pytest.mark.usefixtures("one_thread")


def test_md_rates_at_one_femtosecond():
    r = md_rates(1000, latency_ms=1.0)
    assert r["atoms_per_s"] == pytest.approx(1e6)
    assert r["ns_per_day"] == pytest.approx(86.4)  # 86.4 million 1-fs steps a day
    assert md_rates(1000, 2.0)["ns_per_day"] == pytest.approx(43.2)


def _one_point(suite_name, impl, tmp_path, **params):
    from suites.core.runner import SweepConfig, get_suite, run_suite

    suite = get_suite(suite_name)
    cfg = SweepConfig(device="cpu", quick=True, sizes=(16,), lmax=(1,), impls=(impl,), out_dir=tmp_path, progress=False)
    every = suite.points(cfg)
    suite.points = lambda c: [p for p in every if p.impl == impl and all(p.params.get(k) == v for k, v in params.items())][:1]
    return run_suite(suite, cfg, log=lambda m: None).records[0]


def test_latency_point_of_a_real_model(tmp_path):
    r = _one_point("latency", "dense-tp", tmp_path, mode="fwd")
    if r["status"] == "skipped":
        pytest.skip(r["error"])
    assert r["status"] == "ok", r["error"]
    m = r["metrics"]
    assert m["latency_ms"] > 0 and m["atoms_per_s"] == pytest.approx(16 / (m["latency_ms"] * 1e-3))
    assert m["ns_per_day"] > 0 and m["flops_energy_total"] > 0


def test_lmax_point_records_flops_and_memory(tmp_path):
    r = _one_point("lmax-sweep", "dense-tp", tmp_path, mode="fwd+bwd")
    if r["status"] == "skipped":
        pytest.skip(r["error"])
    assert r["status"] == "ok", r["error"]
    m = r["metrics"]
    assert r["params"]["lmax"] == 1 and m["flops_total"] > 0 and m["saved_bytes"] > 0 and m["parameters"] > 0
