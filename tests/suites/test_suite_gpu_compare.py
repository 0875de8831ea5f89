"""gpu-compare through the runner: refuses mismatched versions (error record saying why)
unless E2F_ALLOW_VERSION_MISMATCH=1."""
from __future__ import annotations

import shutil
from pathlib import Path

from suites.core.runner import SweepConfig, run_suite

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _results(tmp_path, *names):
    d = tmp_path / "results"
    d.mkdir()
    for n in names:
        shutil.copy(FIXTURES / n, d / n)
    return d


def test_refuses_then_allows_mismatched_versions(tmp_path, monkeypatch):
    data = _results(tmp_path, "results_fixture.jsonl", "results_mismatch.jsonl")
    monkeypatch.delenv("E2F_ALLOW_VERSION_MISMATCH", raising=False)
    cfg = SweepConfig(device="cpu", out_dir=tmp_path / "out", progress=False, extra={"data": str(data)})
    rec = run_suite("gpu-compare", cfg, log=lambda m: None).records[0]
    assert rec["status"] == "error" and "REFUSED" in rec["error"] and "torch" in rec["error"]
    monkeypatch.setenv("E2F_ALLOW_VERSION_MISMATCH", "1")
    rec = run_suite("gpu-compare", cfg, log=lambda m: None).records[0]
    assert rec["status"] == "ok" and rec["params"]["allow_mismatch"] is True
    assert rec["metrics"]["version_mismatches"]["torch"]
    assert Path(rec["metrics"]["table_csv"]).exists()


def test_matching_versions_compare(tmp_path, monkeypatch):
    monkeypatch.delenv("E2F_ALLOW_VERSION_MISMATCH", raising=False)
    data = _results(tmp_path, "results_fixture.jsonl")
    cfg = SweepConfig(device="cpu", out_dir=tmp_path / "out", progress=False, extra={"data": str(data)})
    rec = run_suite("gpu-compare", cfg, log=lambda m: None).records[0]
    assert rec["status"] == "ok", rec["error"]
    assert rec["metrics"]["cards"][0].startswith("NVIDIA H100")
    assert rec["metrics"]["median_speedup[NVIDIA H200]"] > 1.0
