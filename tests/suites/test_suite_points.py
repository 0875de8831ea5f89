"""The declared sweeps: --quick lists are small, --full lists carry the issue's sizes."""
from __future__ import annotations

from suites.core.runner import SweepConfig, get_suite

SUITES = ("memory-scaling", "kernel-tflops", "lmax-sweep", "latency", "gpu-compare")


def _points(name, **kw):
    return get_suite(name).points(SweepConfig(**kw))


def test_quick_point_lists_are_small():
    for name in SUITES:
        pts = _points(name, quick=True)
        assert 0 < len(pts) <= 70, (name, len(pts))
        assert len({(p.impl, tuple(sorted(p.params.items()))) for p in pts}) == len(pts), f"{name}: duplicate points"
        for p in pts:
            assert p.params.get("n_atoms", 0) <= 1024 or name == "gpu-compare"


def test_full_sweeps_have_the_issue_sizes():
    ms = _points("memory-scaling", quick=False, device="cuda")
    model_n = {p.params["n_atoms"] for p in ms if p.impl == "e2former-v2"}
    assert min(model_n) == 100 and max(model_n) == 1_000_000
    assert {p.params["mode"] for p in ms} == {"fwd", "fwd+bwd"}
    assert {p.impl for p in ms} >= {"e2former-v2", "e2former-v1", "escn-md", "dense-tp", "layer:e2former-v2",
                                    "core:materialized", "core:chunked", "core:triton"}
    kt = _points("kernel-tflops", quick=False, device="cuda")
    assert {p.params["n_atoms"] for p in kt} == {1024, 4096, 16384, 65536, 262144, 1048576}
    assert {p.params["dtype"] for p in kt} == {"float32", "bfloat16"}
    assert {p.impl for p in kt} == {"materialized", "chunked", "triton", "sdpa-dense", "materialized-moments",
                                    "chunked-moments", "triton-moments"}
    p = kt[0].params
    assert (p["neighbors"], p["heads"], p["head_dim"], p["dv"], p["gate_hidden"], p["num_rbf"], p["density"], p["cutoff"]) \
        == (32, 128, 8, 58, 128, 256, 0.1, 5.0)
    assert {p.params["dv"] for p in kt if p.impl.endswith("-moments")} == {18}  # 9 rows x C / H
    lm = _points("lmax-sweep", quick=False, device="cuda")
    assert {p.params["lmax"] for p in lm} == {1, 2, 3, 4, 5, 6}
    lat = _points("latency", quick=False, device="cuda")
    assert {p.impl for p in lat} == {"e2former-v2", "e2former-v2-moments", "e2former-v1", "escn-md", "dense-tp"}


def test_command_line_subsets_split_a_sweep():
    pts = _points("kernel-tflops", quick=False, sizes=(65536,), dtypes=("bfloat16",))
    assert {p.params["n_atoms"] for p in pts} == {65536} and {p.params["dtype"] for p in pts} == {"bfloat16"}
    pts = _points("lmax-sweep", quick=False, lmax=(5, 6))
    assert {p.params["lmax"] for p in pts} == {5, 6}
