"""suites.core.memory: exact saved-for-backward bytes on small known graphs, CPU fallbacks."""
import numpy as np
import pytest
import torch

from suites.core import memory


def test_saved_tensor_bytes_exact_for_a_known_graph():
    x = torch.randn(10, 20, requires_grad=True)  # fp32: 800 B
    w = torch.randn(20, 30, requires_grad=True)  # 2400 B
    # mm saves both operands (each needed for the other's gradient), exp saves its
    # [10, 30] result (1200 B), sum saves nothing but sizes.
    assert memory.saved_tensor_bytes(lambda: (x @ w).exp().sum()) == 800 + 2400 + 1200


def test_saved_tensor_bytes_dedups_by_storage():
    x = torch.randn(10, 20, dtype=torch.float64, requires_grad=True)
    assert memory.saved_tensor_bytes(lambda: x * x) == 10 * 20 * 8  # x saved twice, counted once
    # Two views of one storage count once, at the storage's size.
    saved, _ = memory.saved_tensors(lambda: x[:5] * x[5:])
    assert [s.nbytes for s in saved] == [10 * 20 * 8]


def test_saved_tensor_bytes_zero_without_grad():
    x = torch.randn(10, 20, requires_grad=True)
    with torch.no_grad():
        assert memory.saved_tensor_bytes(lambda: (x @ x.T).exp()) == 0
    y = torch.randn(10, 20)
    assert memory.saved_tensor_bytes(lambda: (y @ y.T).exp()) == 0


def test_saved_tensors_lists_shapes():
    x = torch.randn(7, 3, requires_grad=True)
    saved, out = memory.saved_tensors(lambda: x.sin())
    assert out.shape == (7, 3)
    assert saved == [memory.SavedTensor(shape=(7, 3), dtype="float32", device="cpu", nbytes=84)]


def test_peak_bytes_is_none_on_cpu_but_runs_fn():
    ran = []
    assert memory.peak_bytes_above_inputs(lambda: ran.append(1), device="cpu") is None
    assert memory.peak_bytes_above_inputs(lambda s: ran.append(s), device="cpu", setup=lambda: 2) is None
    assert ran == [1, 2]


def test_rss_figures():
    assert memory.rss_bytes() > 0
    grown = memory.peak_rss_delta(lambda: np.ones(64 * 1024 * 1024 // 8).sum())  # touches 64 MiB
    assert grown >= 32 * 1024 * 1024


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_bytes_above_inputs_cuda():
    x = torch.randn(1024, 1024, device="cuda")  # 4 MiB input, not counted
    peak = memory.peak_bytes_above_inputs(lambda: x * 2, device="cuda")
    assert 4 * 1024**2 <= peak < 8 * 1024**2


_KEPT: dict = {}


def test_holder_chain_names_what_keeps_a_tensor_alive():
    import sys

    def fail():
        big = torch.ones(5)  # noqa: F841 -- kept alive by the traceback below
        raise RuntimeError("out of memory")

    try:
        fail()
    except RuntimeError as exc:
        _KEPT["exc"] = exc  # the mistake the chain must reveal: a stored exception
    leaked = next(o for o in memory.gc.get_objects() if isinstance(o, torch.Tensor) and o.shape == (5,))
    chain = memory.holder_chain(leaked, ignore={id(sys._getframe())})
    assert chain.startswith("frame fail (test_core_memory.py:")
    assert "traceback" in chain and "exception RuntimeError" in chain
    _KEPT.clear()
    kept = torch.zeros(2)
    _KEPT["list"] = [kept]
    assert memory.holder_chain(kept, ignore={id(sys._getframe())}).startswith("list <- dict")
