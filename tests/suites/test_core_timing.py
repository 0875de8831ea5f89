"""suites.core.timing: sample counts, untimed setup, statistics, and the three modes."""
import time

import pytest
import torch

from suites.core import timing


def test_timing_result_statistics():
    r = timing.TimingResult.from_samples([1.0, 2.0, 3.0, 4.0, 100.0])
    assert r.median_ms == 3.0
    assert r.iqr_ms == pytest.approx(4.0 - 2.0)
    assert r.repeats == 5
    assert r.as_metrics()["samples_ms"] == [1.0, 2.0, 3.0, 4.0, 100.0]
    assert timing.TimingResult.from_samples([2.5]).iqr_ms == 0.0
    with pytest.raises(ValueError):
        timing.TimingResult.from_samples([])


def test_benchmark_calls_warmup_plus_repeats_and_setup_is_untimed():
    calls, setups = [], []

    def setup():
        setups.append(1)
        time.sleep(0.03)
        return len(setups)

    def fn(state):
        calls.append(state)

    r = timing.benchmark(fn, device="cpu", warmup=2, repeats=4, setup=setup)
    assert len(calls) == 6 and len(setups) == 6
    assert calls == [1, 2, 3, 4, 5, 6]  # fn receives what setup returned
    assert r.repeats == 4 and len(r.samples_ms) == 4
    assert r.median_ms < 25.0  # the 30 ms setup sleep is not in the samples


def test_benchmark_measures_the_work():
    r = timing.benchmark(lambda: time.sleep(0.02), device="cpu", warmup=0, repeats=3)
    assert r.median_ms >= 19.0


def test_benchmark_rejects_bad_counts():
    with pytest.raises(ValueError):
        timing.benchmark(lambda: None, device="cpu", repeats=0)
    with pytest.raises(ValueError):
        timing.benchmark(lambda: None, device="cpu", warmup=-1)


def _forward():
    a = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    return a, b, (lambda: {"y": (a @ b).tanh(), "ignored": torch.arange(3)})


@pytest.mark.parametrize("mode", ["bwd", "fwd+bwd"])
def test_backward_modes_reset_grads_between_calls(mode):
    a, b, forward = _forward()
    timing.time_mode(forward, mode, device="cpu", warmup=2, repeats=3)
    # One backward's gradient, not five accumulated ones.
    ref_a, ref_b = torch.autograd.grad(forward()["y"].sum(), (a, b))
    torch.testing.assert_close(a.grad, ref_a)
    torch.testing.assert_close(b.grad, ref_b)


def test_fwd_mode_runs_no_backward():
    a, b, forward = _forward()
    r = timing.time_mode(forward, "fwd", device="cpu", warmup=1, repeats=2)
    assert r.repeats == 2 and a.grad is None and b.grad is None


def test_bwd_mode_times_backward_alone():
    slow_forward_s = 0.03
    x = torch.randn(4, requires_grad=True)

    def forward():
        time.sleep(slow_forward_s)
        return (x * 2).sum()

    r = timing.time_mode(forward, "bwd", device="cpu", warmup=1, repeats=3)
    assert r.median_ms < slow_forward_s * 1e3 * 0.8
    r_fb = timing.time_mode(forward, "fwd+bwd", device="cpu", warmup=1, repeats=3)
    assert r_fb.median_ms >= slow_forward_s * 1e3 * 0.9


def test_mode_errors():
    with pytest.raises(ValueError, match="valid modes"):
        timing.mode_callables(lambda: torch.ones(2), "backward")
    with pytest.raises(ValueError, match="requires grad"):
        timing.mode_callables(lambda: torch.ones(2), "bwd")


def test_graph_leaves_finds_inputs_and_parameters():
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3, requires_grad=True)
    leaves = timing.graph_leaves([lin(x).sum()])
    ids = {id(t) for t in leaves}
    assert ids == {id(x), id(lin.weight), id(lin.bias)}
