"""The accuracy suite end to end on the shipped set, with tiny models and budgets."""

import pytest

pytest.importorskip("baselines.registry")

from suites.core.runner import SweepConfig, get_suite, run_suite  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(lmax=1, channels=8, num_blocks=1, num_heads=2, head_dim=4, num_rbf=8,
            radial_hidden=8, max_neighbors=8)


def test_matched_channels_is_closest_to_target():
    from suites.accuracy import _count_params, matched_channels

    base = dict(TINY, cutoff=5.0)
    from baselines.registry import ModelConfig

    target = _count_params("e2former-v2", ModelConfig(**{**base, "channels": 16}))
    c, n = matched_channels("dense-tp", base, target)
    below = _count_params("dense-tp", ModelConfig(**{**base, "channels": max(2, c - 2)}))
    above = _count_params("dense-tp", ModelConfig(**{**base, "channels": c + 2}))
    assert abs(n - target) <= abs(below - target) and abs(n - target) <= abs(above - target)


def test_suite_runs_and_reports(tmp_path, capsys):
    suite = get_suite("accuracy")
    cfg = SweepConfig(
        device="cpu", quick=True, out_dir=tmp_path, progress=False,
        impls=("element-mean", "e2former-v2", "dense-tp", "e2former-v2-backends"),
        extra={"steps": 6, "max_train": 48, "max_test": 24, "max_atoms": 64, "base": TINY},
    )
    res = run_suite(suite, cfg, env={"test": True}, log=lambda m: None)
    by = {r["impl"]: r for r in res.records}
    assert set(by) == set(cfg.impls)
    for impl in ("element-mean", "e2former-v2", "dense-tp"):
        r = by[impl]
        assert r["status"] == "ok", r["error"]
        m = r["metrics"]
        assert m["energy_mae_mev_per_atom"] > 0 and m["force_mae_mev_per_A"] > 0
        assert m["structures"] == 24 and "all" in m["per_subset"]
    assert by["e2former-v2"]["metrics"]["steps"] == 6
    assert "factor_vs_element_mean" in by["dense-tp"]["metrics"]
    # element-mean forces are zero: its force MAE is the mean |F| component of the test set
    assert by["element-mean"]["metrics"]["force_mae_mev_per_A"] > 300
    b = by["e2former-v2-backends"]
    assert b["status"] in ("ok", "skipped"), b["error"]
    if b["status"] == "ok":
        assert b["metrics"]["weights"] == "trained" and b["metrics"]["max_abs_diff"] <= 1e-8
        assert b["metrics"]["backends"][:2] == ["materialized", "chunked"]
    out = capsys.readouterr().out
    assert "accuracy (test split)" in out and "e2former-v2" in out


def test_time_budget_is_recorded_not_lost(tmp_path):
    cfg = SweepConfig(
        device="cpu", quick=True, out_dir=tmp_path, progress=False, impls=("e2former-v2",),
        extra={"steps": 50, "max_train": 48, "max_test": 24, "max_atoms": 64, "base": TINY, "time_budget_s": 0.0},
    )
    res = run_suite(get_suite("accuracy"), cfg, env={"test": True}, log=lambda m: None)
    (rec,) = res.records
    assert rec["status"] == "ok", rec["error"]
    assert rec["metrics"]["time_budget_reached"] and rec["metrics"]["steps"] == 1
    assert rec["params"]["steps"] == 50  # the planned budget stays the point's identity
