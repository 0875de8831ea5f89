"""suites.core.measure: the standard metrics dict of one callable."""
import pytest
import torch

from suites.core.measure import autotune_config, measure


def test_measure_fwd_bwd_metrics():
    a = torch.randn(32, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(32, 32, dtype=torch.float64, requires_grad=True)
    m = measure(lambda: (a @ b).exp(), mode="fwd+bwd", device="cpu", n_atoms=32, flops={"core": 6 * 32**3},
                dtype="float64", warmup=1, repeats=3, count_flops=True)
    assert m["repeats"] == 3 and len(m["samples_ms"]) == 3 and m["latency_ms"] > 0
    assert m["peak_bytes"] is None and m["memory_source"] == "saved"
    assert m["saved_bytes"] == 3 * 32 * 32 * 8  # a, b and exp's result
    assert m["bytes_per_atom"] == m["saved_bytes"] / 32 == m["saved_bytes_per_atom"]
    assert m["tflops_core"] == pytest.approx(6 * 32**3 / (m["latency_ms"] * 1e-3) / 1e12)
    assert "tflops_total" not in m
    assert m["roof_fraction"] is None  # no roof for a CPU
    assert m["flops_counted"] == 6 * 32**3  # forward mm + two backward mms
    assert m["rss_delta_bytes"] >= 0


def test_measure_fwd_without_memory():
    x = torch.randn(8)
    m = measure(lambda: x.sin(), mode="fwd", device="cpu", memory_metrics=False, warmup=0, repeats=2)
    assert set(m) == {"latency_ms", "latency_iqr_ms", "repeats", "samples_ms"}


def test_autotune_config_is_recorded():
    class Kernel:
        best_config = type("Config", (), {"all_kwargs": lambda self: {"BLOCK_M": 64, "num_warps": 4}})()

    class WithConfig:
        kernel = Kernel()

        def __call__(self):
            return torch.ones(2)

    fwd = WithConfig()
    assert autotune_config(fwd) == {"BLOCK_M": 64, "num_warps": 4}
    m = measure(fwd, mode="fwd", device="cpu", memory_metrics=False, warmup=0, repeats=1)
    assert m["config"] == {"BLOCK_M": 64, "num_warps": 4}

    def plain():
        return torch.ones(2)

    plain.autotune_config = lambda: "BLOCK=32"
    assert measure(plain, mode="fwd", device="cpu", memory_metrics=False, warmup=0, repeats=1)["config"] == "BLOCK=32"
    assert autotune_config(lambda: None) is None
