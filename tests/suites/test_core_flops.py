"""suites.core.flops: the analytic registry, throughput math, the FlopCounterMode cross-check."""
import pytest
import torch

from suites.core import flops


def test_register_and_look_up():
    name = "test-matmul-count"

    @flops.register_flops(name)
    def count(*, m, n, k):
        """2 m n k."""
        return {"core": flops.matmul_flops(m, n, k), "total": 3.0 * m * n * k}

    try:
        assert flops.analytic_flops(name, m=2, n=3, k=4) == {"core": 48.0, "total": 72.0}
        assert name in flops.registered_flops()
        with pytest.raises(ValueError, match="already registered"):
            flops.register_flops(name)(lambda **_: 0)
    finally:
        flops._COUNTERS.pop(name, None)
    with pytest.raises(ValueError, match="no FLOP count registered"):
        flops.analytic_flops("no-such-impl")


def test_normalize_and_rates():
    assert flops.normalize_flops(10) == {"core": 10.0, "total": 10.0}
    assert flops.normalize_flops({"total": 5}) == {"total": 5.0}
    assert flops.normalize_flops(None) == {}
    with pytest.raises(ValueError):
        flops.normalize_flops({"cores": 1})
    assert flops.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert flops.tflops(1e9, 0.0) is None and flops.tflops(None, 1.0) is None
    assert flops.gbps(3e9, 500.0) == pytest.approx(6.0)
    x = torch.zeros(10, 4, dtype=torch.float64)
    assert flops.tensor_bytes(x, x[:, 0]) == 320 + 80


def test_flop_counter_cross_checks_an_analytic_matmul_count():
    a, b = torch.randn(16, 32), torch.randn(32, 8)
    counted, out = flops.counted_flops(lambda: a @ b)
    assert counted == flops.matmul_flops(16, 8, 32)
    assert out.shape == (16, 8)


def test_attention_core_count_at_the_paper_sizes():
    per_atom = flops.analytic_flops("attention-core", n_atoms=1, neighbors=32, heads=128, dk=8, dv=58,
                                    num_rbf=256, gate_hidden=128)
    assert per_atom == {"core": 573_440.0, "total": 4_767_744.0}
    twice = flops.analytic_flops("attention-core", n_atoms=2, neighbors=32, heads=128, dk=8, dv=58,
                                 num_rbf=256, gate_hidden=128)
    assert twice["total"] == 2 * per_atom["total"]  # linear in N
