"""``suites.core.ab``: two source trees timed in alternating processes, pooled, and gated."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from suites.core import ab
from suites.core.compare import load_baseline

REPO = Path(__file__).resolve().parents[2]


def _record(n, status="ok", samples=(1.0, 2.0, 3.0)):
    return {"suite": "smoke", "impl": "matmul", "params": {"n": n}, "status": status, "error": None,
            "metrics": {"samples_ms": list(samples), "latency_ms": 2.0, "repeats": len(samples)}, "env": {}}


def test_pool_joins_every_runs_repeats_and_keeps_a_failure():
    pooled = {r["params"]["n"]: r for r in ab.pool([
        [_record(1), _record(2), _record(3, samples=(9.0,))],
        [_record(1, samples=(4.0, 5.0)), _record(2, status="oom", samples=()), _record(3, samples=(1.0,)),
         _record(3, samples=(7.0,))],
    ])}
    assert pooled[1]["metrics"]["samples_ms"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert pooled[1]["metrics"]["latency_ms"] == 3.0 and pooled[1]["metrics"]["repeats"] == 5
    assert pooled[2]["status"] == "oom"  # the gate must see that the point stopped running
    assert pooled[3]["metrics"]["samples_ms"] == [9.0, 7.0]  # a repeated point: its last record


def test_refuses_options_it_owns_and_a_tree_without_run_bench(tmp_path):
    with pytest.raises(SystemExit):
        ab.main(["--base-tree", str(REPO), "--", "--suite", "smoke", "--out", "x"])
    with pytest.raises(SystemExit):
        ab.main(["--base-tree", str(tmp_path), "--", "--suite", "smoke"])
    with pytest.raises(SystemExit):
        ab.main(["--base-tree", str(REPO)])


def test_two_trees_on_this_machine(tmp_path, capsys, monkeypatch):
    # a copy of this tree as the "old" one: the smoke suite's matmul points, one process a side;
    # a threshold no timing noise reaches, so the verdicts are "same" (or too few samples).
    # Each side's records name its own commit: the old tree's from its COMMIT file, this
    # tree's from E2F_GIT_COMMIT (set for the run), which the old tree must not inherit
    base = tmp_path / "base"
    ignore = shutil.ignore_patterns("__pycache__", "shipped")
    for name in ("e2f", "suites", "baselines"):
        shutil.copytree(REPO / name, base / name, ignore=ignore)
    shutil.copy(REPO / "run_bench.py", base)
    (base / ab.TREE_COMMIT_FILE).write_text("0123abcd\n")
    monkeypatch.setenv("E2F_GIT_COMMIT", "4567cdef")
    out = tmp_path / "ab"
    rc = ab.main(["--base-tree", str(base), "--rounds", "1", "--out", str(out), "--threshold", "100",
                  "--", "--suite", "smoke", "--impl", "matmul", "--device", "cpu"])
    assert rc == 0
    baseline = load_baseline(out / "base-pooled.json")
    cand = [json.loads(line) for line in (out / "candidate-pooled.jsonl").read_text().splitlines()]
    assert {p["key"] for p in baseline["points"]} == {ab.point_key(r) for r in cand} and len(cand) == 4
    assert all(str(REPO / "run_bench.py") in r["env"]["command"] for r in cand)
    base_run = [json.loads(line) for line in (out / "base-1" / "smoke.jsonl").read_text().splitlines()]
    assert all(str(base / "run_bench.py") in r["env"]["command"] for r in base_run)
    assert {r["env"]["git_commit"] for r in base_run} == {"0123abcd"}
    assert {r["env"]["git_commit"] for r in cand} == {"4567cdef"}
    assert "PASS" in capsys.readouterr().out
    assert ab.main(["--base-tree", str(base), "--rounds", "1", "--out", str(out), "--", "--suite", "smoke"]) == 3


def test_each_tree_names_its_own_commit(tmp_path, monkeypatch):
    # an old tree's records name its COMMIT file's hash, or "unknown" without one (git there
    # would name the enclosing repository's commit); this tree keeps the caller's setting
    from types import SimpleNamespace

    seen = []
    monkeypatch.setattr(ab.subprocess, "run", lambda cmd, cwd, env: seen.append(env.get("E2F_GIT_COMMIT"))
                        or SimpleNamespace(returncode=0))
    monkeypatch.setenv("E2F_GIT_COMMIT", "4567cdef")
    ab.run_side(tmp_path, ["--suite", "smoke"], tmp_path / "out")
    (tmp_path / ab.TREE_COMMIT_FILE).write_text("89ab\n")
    ab.run_side(tmp_path, ["--suite", "smoke"], tmp_path / "out")
    ab.run_side(ab.REPO, ["--suite", "smoke"], tmp_path / "out")
    assert seen == ["unknown", "89ab", "4567cdef"]
