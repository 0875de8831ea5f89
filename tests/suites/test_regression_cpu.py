"""CPU-side regression checks of the fused attention core against the committed invariants.

Run in CI (no GPU): analytic FLOPs/bytes, bytes saved for backward (no edge-sized tensor,
independent of K), kernel launches of one forward+backward (Triton interpreter) and
correctness against the oracle; planted changes that save or allocate an [E, ...] tensor
in the fused path must be flagged. ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` on
machines without CUDA before any kernel is imported; elsewhere the Triton checks skip.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from suites import kernel_regression as kr

BACKENDS = kr.CHECKED_BACKENDS


@pytest.fixture(scope="module")
def committed():
    return kr.load_invariants()


def backend_or_skip(name):
    if name.startswith("triton") and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU checks run the Triton kernels in the interpreter: TRITON_INTERPRET=1 is not set "
                    "(tests/conftest.py sets it on machines without CUDA)")
    try:
        return kr.resolve_backend(name)
    except kr.BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def figures():
    cache = {}

    def get(name):
        if name not in cache:
            backend_or_skip(name)
            cache[name] = kr.backend_figures(name)
        return cache[name]

    return get


# --------------------------------------------------------------------------- FLOPs and bytes


def test_registered_flops_follow_the_issue_formula():
    from suites.core.flops import analytic_flops

    k, h, dk, dv, r, g = 32, 128, 8, 58, 256, 128
    core = 2 * k * h * dk + 2 * k * h * dv + 8 * k * h
    assert core == 573_440
    total = core + 2 * k * (r * g + g * 2 * h)
    assert total == 4_767_744
    got = analytic_flops("attention-core", n_atoms=65536, neighbors=k, heads=h, dk=dk, dv=dv, num_rbf=r, gate_hidden=g)
    assert got["core"] == 65536 * core and got["total"] == 65536 * total


def test_config_figures_match_committed(committed):
    assert kr.check_configs(committed) == []
    paper = committed["configs"]["paper-K32-float32"]
    assert paper["flops_core_per_atom"] == 573_440
    # bf16 q/k/v move fewer bytes than fp32, and FLOPs do not depend on the dtype
    bf16 = committed["configs"]["paper-K32-bfloat16"]
    assert bf16["bytes_fwd_per_atom"] < paper["bytes_fwd_per_atom"] and bf16["flops_total_per_atom"] == paper["flops_total_per_atom"]


def test_config_check_catches_a_changed_count(committed, monkeypatch):
    from suites.core import flops

    original = flops._COUNTERS["attention-core"]
    monkeypatch.setitem(flops._COUNTERS, "attention-core",
                        lambda **p: {k: v * 1.5 if k == "total" else v for k, v in original(**p).items()})
    problems = kr.check_configs(committed)
    assert problems and all("flops_total_per_atom" in p for p in problems)


# --------------------------------------------------------------------------- backends against the committed values


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_matches_committed_invariants(name, committed, figures):
    figs = figures(name)
    assert kr.check_backend(name, committed, figs) == []
    assert figs["saved"]["problems"] == [] and figs["correctness"]["problems"] == []
    if name.startswith("triton"):
        # the radial table's build (forward and backward), the forward's kernels (the fused one,
        # or the split form's two for the probe's one chunk), the edges' grid positions (once a
        # backward), the backward's seven passes, then the table's gradient to the weights and
        # centres (one launch)
        forward = {"fwd_kernel"} if name == "triton" else {"fwd_logit_kernel", "fwd_aggregate_kernel"}
        assert set(figs["launches"]["triton"]) == forward | {"radial_table_kernel", "bwd_edge_kernel",
                                                             "bwd_weight_kernel", "bwd_value_kernel",
                                                             "bwd_target_kernel", "bwd_gate_kernel",
                                                             "bwd_radial_table_kernel", "bwd_source_kernel",
                                                             "radial_table_backward_kernel",
                                                             "bwd_grid_kernel"}
        assert figs["launches"]["triton"]["radial_table_kernel"] == 2
        assert figs["launches"]["triton"]["bwd_grid_kernel"] == 1
        assert figs["launches"]["triton"]["radial_table_backward_kernel"] == 1


@pytest.mark.parametrize("name", BACKENDS)
def test_saved_bytes_are_per_atom(name, figures):
    saved = figures(name)["saved"]
    assert saved["activation_bytes_per_atom"] == saved["activation_bytes_per_atom_alt_k"]
    assert all("E" not in t["symbolic"] for t in saved["tensors"] if not t["input"])


def test_materialized_oracle_is_flagged():
    """The oracle saves [E, ...] tensors by design: the checker must see them."""
    saved = kr.saved_summary(kr.resolve_backend("materialized"))
    assert any("edge-sized tensor ['E', 'H', 'dv']" in p for p in saved["problems"])
    assert any("grow with K" in p for p in saved["problems"])


def test_check_backend_reports_changed_launches(committed, figures):
    name = "triton"
    figs = figures(name)
    launches = dict(figs["launches"], triton=dict(figs["launches"]["triton"], extra_kernel=1),
                    torch_ops=figs["launches"]["torch_ops"] + 2)
    problems = kr.check_backend(name, committed, dict(figs, launches=launches))
    assert any("Triton launches" in p for p in problems) and any("PyTorch operator calls" in p for p in problems)


# --------------------------------------------------------------------------- planted changes in the fused path


def _edge_tensor(tensors: dict) -> torch.Tensor:
    """An [E, H] per-edge tensor (q.k of every neighbour slot): what a fused path must not keep."""
    nbr = tensors["nbr"]
    src = nbr.clamp_min(0).reshape(-1).long()
    dst = torch.arange(nbr.shape[0]).repeat_interleave(nbr.shape[1])
    return (tensors["q"][dst].float() * tensors["k"][src].float()).sum(-1)


def _function_class(name):
    if name.startswith("triton"):
        from e2f.attention.triton import function

        return function._FusedCore, function.TENSOR_NAMES, 4
    from e2f.attention import chunked

    return chunked._Core, chunked._FIELDS, 1


def _plant(monkeypatch, name, how):
    """Wrap the backend's autograd Function so its forward also keeps an [E, H] tensor."""
    backend_or_skip(name)
    cls, names, skip = _function_class(name)
    original = cls.forward

    def forward(ctx, *args):
        out = original(ctx, *args)
        tensors = dict(zip(names, args[skip:]))
        edge = _edge_tensor(tensors)
        if how == "saved":
            ctx.save_for_backward(*ctx.to_save, edge)
        else:
            ctx.edge_cache = edge
        return out

    monkeypatch.setattr(cls, "forward", staticmethod(forward))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("how", ["saved", "ctx attribute"])
def test_planted_edge_tensor_is_flagged(name, how, monkeypatch, committed):
    _plant(monkeypatch, name, how)
    saved = kr.saved_summary(kr.resolve_backend(name))
    assert any(f"edge-sized tensor ['E', 'H'] (float32, {how}" in p for p in saved["problems"]), saved["problems"]
    assert any("grow with K" in p for p in saved["problems"])
    # and the committed comparison fails too (a new saved tensor, more bytes per atom)
    want = committed["backends"][name]["saved"]
    assert saved["activation_bytes_per_atom"] > want["activation_bytes_per_atom"]


def test_planted_edge_allocation_in_backward_is_flagged(monkeypatch, committed):
    """A backward that materialises the per-edge values (an [E, H, dv] tensor, not saved, only
    allocated) fails the launch check. (Its chunk-bounded per-edge stash, [E, H] and [E, G] at the
    probe's one chunk, is committed.)"""
    backend_or_skip("triton")
    from e2f.attention.triton import function

    original = function._backward

    def backward(t, *args):
        grads = original(t, *args)
        gathered = t["v"][t["nbr"].clamp_min(0).reshape(-1).long()].float()
        grads["q"] = grads["q"] + 0.0 * gathered.sum()
        return grads

    monkeypatch.setattr(function, "_backward", backward)
    fn = kr.resolve_backend("triton")
    launches = kr.launch_summary(fn, warmup=False)
    want = committed["backends"]["triton"]["launches"]
    new = [a for a in launches["edge_allocations"] if a not in want["edge_allocations"]]
    assert [["E", "H", "dv"], "float32"] in new
    assert launches["torch_ops"] > want["torch_ops"]


# --------------------------------------------------------------------------- the launch counter itself


def test_launch_counter_counts_triton_launches():
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x + offs, tl.load(x + offs, mask=offs < n) + 1.0, mask=offs < n)

    x = torch.zeros(10)
    with kr.count_launches() as c:
        add_one[(3,)](x, 10, BLOCK=4)
        add_one[(3,)](x, 10, BLOCK=4)
        y = x * 2
    assert c["triton"] == {"add_one": 2}
    assert c["torch"]["mul"] == 1 and sum(c["torch"].values()) == 1  # the interpreter's own copies are not counted
    assert torch.equal(y, torch.full((10,), 4.0))


def test_invariants_file_is_refreshable(tmp_path, committed):
    """The refresh CLI writes a file the checker accepts (configs and one backend)."""
    path = tmp_path / "inv.json"
    assert kr.main(["--refresh-invariants", "--backend", "chunked", "--path", str(path)]) == 0
    fresh = kr.load_invariants(path)
    assert set(fresh["backends"]) == {"chunked"}
    assert fresh["configs"] == committed["configs"]
    assert fresh["backends"]["chunked"]["saved"] == committed["backends"]["chunked"]["saved"]
    assert kr.main(["--backend", "chunked", "--path", str(path)]) == 0
    assert math.isclose(fresh["correctness_rtol"], kr.CORRECTNESS_RTOL)


# --------------------------------------------------------------------------- the suite


def test_suite_points_are_fixed_and_cover_the_gate():
    from suites.core.runner import SweepConfig

    suite = kr.KernelRegression()
    pts = suite.points(SweepConfig(device="cuda", quick=True))
    assert pts == suite.points(SweepConfig(device="cuda", quick=False))  # a baseline matches any later run
    timed = [(p.impl, p.params["n_atoms"], p.params["dtype"], p.params["mode"]) for p in pts if "mode" in p.params]
    assert len(timed) == 10 and len(set(timed)) == 10
    assert {t[2] for t in timed if t[0] == "triton"} == {"float32", "bfloat16"}
    assert {t[3] for t in timed} == {"fwd", "fwd+bwd"} and {t[1] for t in timed} == {16384, 65536}
    assert [p.params for p in pts if "check" in p.params] == [{"check": "cpu-invariants"}] * len(kr.CHECKED_BACKENDS)


def test_suite_skips_timing_on_cpu_with_a_reason():
    from suites.core.runner import SkipPoint, SweepConfig

    suite = kr.KernelRegression()
    cfg = SweepConfig(device="cpu")
    point = next(p for p in suite.points(cfg) if "mode" in p.params)
    with pytest.raises(SkipPoint, match="need a CUDA GPU"):
        suite.measure(point, cfg)


def test_timed_path_gives_the_samples_the_gate_needs(monkeypatch):
    """The GPU measurement code, run on the CPU with the chunked backend at toy sizes."""
    import dataclasses

    from suites import workloads
    from suites.core.runner import SweepConfig

    toy = dataclasses.replace(workloads.PAPER_CORE, heads=2, dv=4, gate_hidden=8, num_rbf=8)
    monkeypatch.setattr(workloads, "PAPER_CORE", toy)
    monkeypatch.setattr(kr, "WARMUP", 1)
    monkeypatch.setattr(kr, "REPEATS", 5)
    suite = kr.KernelRegression()
    cfg = SweepConfig(device="cpu", sizes=(24,))
    points = [p for p in suite.points(cfg) if p.impl == "chunked" and "mode" in p.params]
    assert [p.params["mode"] for p in points] == ["fwd", "fwd+bwd"] and points[0].params["heads"] == 2
    per_atom = 2 * 32 * 2 * 8 + 2 * 32 * 2 * 4 + 8 * 32 * 2  # 2KHd + 2KH dv + 8KH
    for point in points:
        metrics = suite._time(point, cfg)
        assert len(metrics["samples_ms"]) == 5 and metrics["latency_ms"] > 0
        assert metrics["flops_core"] == (1 if point.params["mode"] == "fwd" else 3) * 24 * per_atom
