"""The performance regression gate (suites.core.compare): decision rule, baseline file, CLI."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from suites.core import compare as cmp
from suites.core.records import append_record, make_record
from suites.core.timing import benchmark

H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "driver": "570.124.06", "sm_clock_mhz": 1980,
        "torch": "2.11.0+cu128", "triton": "3.6.0", "cuda": "12.8", "git_commit": "a" * 40}


def gpu_like_samples(rng, n, median_ms, noise=0.02, outlier_rate=0.05):
    """Repeat times the way a GPU gives them: multiplicative jitter plus rare slow outliers."""
    x = median_ms * np.exp(rng.normal(0.0, noise, n))
    slow = rng.random(n) < outlier_rate
    x[slow] *= 1.0 + rng.exponential(0.3, slow.sum())
    return x.tolist()


def record(samples, *, impl="triton", n_atoms=65536, dtype="float32", mode="fwd", env=H100, status="ok",
           tf32=True):
    """A results record as the runner writes it (``suites.core.records.make_record``)."""
    metrics = ({"latency_ms": float(np.median(samples)), "samples_ms": list(samples), "repeats": len(samples),
                "tf32_matmul": tf32} if samples else None)
    return make_record("kernel-regression", impl, {"n_atoms": n_atoms, "dtype": dtype, "mode": mode, "neighbors": 32},
                       status=status, metrics=metrics, error=None if status == "ok" else "CUDA error: boom", env=env)


def run(baseline_path, records, **kw):
    buf = io.StringIO()
    code = cmp.compare_cli(baseline_path, records, stream=buf, **kw)
    return code, buf.getvalue()


# --------------------------------------------------------------------------- decision rule


@pytest.mark.parametrize("seed", range(20))
def test_rule_flags_20pct_slowdown_and_passes_unchanged_rerun(seed):
    rng = np.random.default_rng(seed)
    base = gpu_like_samples(rng, 50, 2.0)
    slow = gpu_like_samples(rng, 50, 2.4)
    same = gpu_like_samples(rng, 50, 2.0)
    assert cmp.decide(base, slow).verdict == cmp.REGRESSION
    v = cmp.decide(base, same)
    assert v.verdict == cmp.SAME, v
    assert v.ci_low <= 1.0 <= v.ci_high or abs(v.change) < 0.05


def test_rule_needs_both_significance_and_size():
    rng = np.random.default_rng(7)
    base = gpu_like_samples(rng, 400, 2.0, noise=0.005, outlier_rate=0.0)
    drift = gpu_like_samples(rng, 400, 2.0 * 1.02, noise=0.005, outlier_rate=0.0)
    v = cmp.decide(base, drift)  # a real 2% drift: significant, but below the 5% threshold
    assert v.p_slower < 1e-6 and v.verdict == cmp.SAME
    few_b, few_c = [2.0, 2.6, 1.9], [2.5, 2.9, 2.4]  # +25% medians from three samples: not evidence
    v = cmp.decide(few_b, few_c)
    assert v.verdict == cmp.INCONCLUSIVE and "fewer than 5 samples" in v.reason
    assert cmp.min_samples_for(0.01) == 5


def test_rule_reports_improvements_and_is_deterministic():
    rng = np.random.default_rng(3)
    base, fast = gpu_like_samples(rng, 40, 2.0), gpu_like_samples(rng, 40, 1.5)
    a, b = cmp.decide(base, fast), cmp.decide(base, fast)
    assert a.verdict == cmp.IMPROVED and a.ratio < 0.8 and a.ci_high < 1.0
    assert a == b


def test_rule_rejects_bad_samples():
    with pytest.raises(ValueError, match="samples on both sides"):
        cmp.decide([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        cmp.decide([1.0, float("nan")], [1.0])
    assert cmp.decide([1.0] * 10, [1.0] * 10).verdict == cmp.SAME


def test_injected_sleep_slowdown_timed_for_real(tmp_path):
    """A real 20% slowdown (a longer sleep) timed by the harness, through save + compare."""

    def timed(ms):
        return benchmark(lambda: time.sleep(ms / 1e3), device="cpu", warmup=0, repeats=1).samples_ms

    # interleaved, so that a change in machine load between the runs hits all three alike
    base, slow, same = [], [], []
    for _ in range(30):
        base += timed(20.0)
        slow += timed(24.0)
        same += timed(20.0)
    path = tmp_path / "base.json"
    cmp.save_baseline([record(base)], path)
    code_slow, text_slow = run(path, [record(slow)])
    code_same, text_same = run(path, [record(same)])
    assert code_slow == cmp.EXIT_REGRESSION and "REGRESSION" in text_slow, text_slow
    assert code_same == cmp.EXIT_PASS and "PASS" in text_same, text_same
    # the same samples through the pure rule give the same verdicts
    assert cmp.decide(base, slow).verdict == cmp.REGRESSION
    assert cmp.decide(base, same).verdict == cmp.SAME


# --------------------------------------------------------------------------- baseline file and CLI


def test_baseline_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    recs = [record(gpu_like_samples(rng, 30, 1.0 + i), n_atoms=n, mode=m)
            for i, (n, m) in enumerate([(16384, "fwd"), (65536, "fwd"), (65536, "fwd+bwd")])]
    recs.append(record([], status="oom", n_atoms=262144))  # not timed: not saved
    path = tmp_path / "sub" / "baseline.json"
    written = cmp.save_baseline(recs, path)
    loaded = cmp.load_baseline(path)
    assert loaded == json.loads(json.dumps(written))
    assert [p["samples_ms"] for p in loaded["points"]] == [r["metrics"]["samples_ms"] for r in recs[:3]]
    assert loaded["env"]["gpu_name"] == H100["gpu_name"] and loaded["format"] == cmp.BASELINE_FORMAT
    code, text = run(path, recs)  # the run against its own baseline
    assert code == cmp.EXIT_PASS and "PASS: 3 same" in text, text
    # a results file on disk works as the candidate too
    results = tmp_path / "results.jsonl"
    for r in recs:
        append_record(results, r)
    assert run(path, str(results))[0] == cmp.EXIT_PASS
    assert run(path, str(tmp_path))[0] == cmp.EXIT_PASS  # a folder of results files


def test_save_baseline_refuses_untimed_or_mixed_runs(tmp_path):
    with pytest.raises(ValueError, match="no timed points"):
        cmp.save_baseline([record([], status="skipped")], tmp_path / "b.json")
    h200 = dict(H100, gpu_name="NVIDIA H200")
    with pytest.raises(ValueError, match="different GPUs"):
        cmp.save_baseline([record([1.0, 1.1]), record([1.0, 1.2], env=h200, n_atoms=7)], tmp_path / "b.json")


def test_gpu_mismatch_refused_unless_allowed(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "b.json"
    cmp.save_baseline([record(gpu_like_samples(rng, 30, 2.0))], path)
    other = [record(gpu_like_samples(rng, 30, 2.0), env=dict(H100, gpu_name="NVIDIA H200", driver="580.1"))]
    code, text = run(path, other)
    assert code == cmp.EXIT_REFUSED
    assert "GPU MISMATCH" in text and "refusing" in text and "--allow-mismatch" in text
    code, text = run(path, other, allow_mismatch=True)
    assert code == cmp.EXIT_PASS and "[differs] driver: '570.124.06' -> '580.1'" in text


def test_software_and_clock_differences_shown_not_refused(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "b.json"
    cmp.save_baseline([record(gpu_like_samples(rng, 30, 2.0))], path)
    env = dict(H100, torch="2.13.0+cu130", sm_clock_mhz=1755, git_commit="b" * 40)
    code, text = run(path, [record(gpu_like_samples(rng, 30, 2.0), env=env)])
    assert code == cmp.EXIT_PASS
    assert "[differs] torch" in text and "[differs] sm_clock_mhz: 1980 -> 1755" in text and "[info] git_commit" in text


def test_failed_missing_new_and_disjoint_points(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "b.json"
    cmp.save_baseline([record(gpu_like_samples(rng, 30, 2.0), n_atoms=n) for n in (1024, 4096)], path)
    # a point that ran in the baseline and errors now fails the gate
    code, text = run(path, [record(gpu_like_samples(rng, 30, 2.0), n_atoms=1024), record([], status="error", n_atoms=4096)])
    assert code == cmp.EXIT_REGRESSION and "failed: status error" in text
    # a missing point is reported, a new one listed; neither fails
    code, text = run(path, [record(gpu_like_samples(rng, 30, 2.0), n_atoms=1024),
                            record(gpu_like_samples(rng, 30, 2.0), n_atoms=9999)])
    assert code == cmp.EXIT_PASS and "missing" in text and "new" in text
    # nothing in common: refused rather than a vacuous pass
    code, text = run(path, [record(gpu_like_samples(rng, 30, 2.0), n_atoms=9999)])
    assert code == cmp.EXIT_REFUSED and "no point of this run matches" in text


def test_precision_mismatch_fails_instead_of_a_verdict(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "b.json"
    cmp.save_baseline([record(gpu_like_samples(rng, 30, 2.0), tf32=False)], path)
    code, text = run(path, [record(gpu_like_samples(rng, 30, 2.0), tf32=False)])
    assert code == cmp.EXIT_PASS
    # an 8x "speed-up" from TF32 is not a verdict: nothing comparable is left, so refused
    code, text = run(path, [record(gpu_like_samples(rng, 30, 0.25), tf32=True)])
    assert code == cmp.EXIT_REFUSED and "matmul precision differs" in text


def test_unusable_baseline_or_results(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    assert run(tmp_path / "absent.json", [])[0] == cmp.EXIT_REFUSED
    code, text = run(bad, [])
    assert code == cmp.EXIT_REFUSED and "not an e2f baseline" in text
    good = tmp_path / "b.json"
    cmp.save_baseline([record([1.0, 1.1, 1.2])], good)
    code, text = run(good, str(tmp_path / "no-such-results.jsonl"))
    assert code == cmp.EXIT_REFUSED and "no results file" in text


def test_table_prints_both_figures_per_point(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "b.json"
    cmp.save_baseline([record(gpu_like_samples(rng, 30, 2.0))], path)
    code, text = run(path, [record(gpu_like_samples(rng, 30, 2.4))])
    assert code == cmp.EXIT_REGRESSION
    header = next(line for line in text.splitlines() if line.startswith("point"))
    for col in ("base ms", "cand ms", "change", "99% CI of ratio", "p slower", "verdict"):
        assert col in header
    row = next(line for line in text.splitlines() if line.startswith("triton"))
    assert "REGRESSION" in row and "+" in row


# --------------------------------------------------------------------------- confirmation in fresh processes


class Reruns:
    """A ``compare.Rerun`` that hands back prepared records, one list a call, and notes what it was asked."""

    def __init__(self, *rounds):
        self.rounds, self.asked = list(rounds), []

    def __call__(self, records):
        self.asked.append([r["params"]["n_atoms"] for r in records])
        return self.rounds.pop(0)


def test_a_flagged_point_fails_only_if_the_rerun_regresses_too(tmp_path):
    rng = np.random.default_rng(11)
    path = tmp_path / "b.json"
    cmp.save_baseline([record(gpu_like_samples(rng, 30, 2.0), n_atoms=n) for n in (1024, 4096)], path)
    first = [record(gpu_like_samples(rng, 30, 2.4), n_atoms=1024), record(gpu_like_samples(rng, 30, 2.0), n_atoms=4096)]

    # the slowdown comes back in a fresh process: a confirmed regression
    again = Reruns([record(gpu_like_samples(rng, 30, 2.4), n_atoms=1024)])
    code, text = run(path, first, rerun=again, rounds=1)
    assert code == cmp.EXIT_REGRESSION and again.asked == [[1024]]  # only the flagged point measured again
    assert "confirming 1 flagged point(s)" in text
    row = [line for line in text.splitlines() if line.startswith("triton")][-2]
    assert "REGRESSION (rerun 1 +" in row and "REGRESSION)" in row, text
    assert "FAIL: 1 REGRESSION, 1 same" in text

    # it does not: the first run's figures stay in the table, the point passes
    gone = Reruns([record(gpu_like_samples(rng, 30, 2.0), n_atoms=1024)])
    code, text = run(path, first, rerun=gone, rounds=1)
    assert code == cmp.EXIT_PASS, text
    row = [line for line in text.splitlines() if line.startswith("triton")][-2]
    assert "not reproduced (rerun 1 " in row and "same)" in row and "+2" in row, text
    assert "PASS: 1 not reproduced, 1 same" in text


def test_confirmation_rounds_stop_at_the_first_rerun_that_disagrees(tmp_path):
    rng = np.random.default_rng(12)
    cmp.save_baseline([record(gpu_like_samples(rng, 30, 2.0))], tmp_path / "b.json")
    base = cmp.load_baseline(tmp_path / "b.json")
    first = [record(gpu_like_samples(rng, 30, 2.5))]
    results = cmp.compare(base, first)
    assert [r.status for r in results] == [cmp.REGRESSION]

    slow, fast = record(gpu_like_samples(rng, 30, 2.5)), record(gpu_like_samples(rng, 30, 2.0))
    reruns = Reruns([slow], [fast], [slow])
    out = cmp.confirm(base, results, first, reruns, rounds=3)
    assert out[0].status == cmp.NOT_REPRODUCED and len(reruns.asked) == 2  # the third round was not needed
    assert "rerun 1 +" in out[0].confirmation and "rerun 2 " in out[0].confirmation
    assert out[0].verdict == results[0].verdict  # the first run's figures

    every = cmp.confirm(base, results, first, Reruns([slow], [slow]), rounds=2)
    assert every[0].status == cmp.REGRESSION and every[0].confirmation.count("REGRESSION") == 2
    # a rerun that fails or does not measure the point confirms it: the gate cannot pass on no evidence
    for broken in ([record([], status="error")], []):
        assert cmp.confirm(base, results, first, Reruns(broken), rounds=1)[0].status == cmp.REGRESSION
    assert cmp.confirm(base, results, first, Reruns(), rounds=0) == results  # no reruns asked
