"""Analytic FLOPs vs FlopCounterMode, memory models vs bytes saved for backward, layer objects."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from baselines.registry import MODEL_NAMES, build_layer, build_model, default_config, memory_model
from e2f.testing import saved_tensor_bytes
from tests.baselines.helpers import make_batch, molecules, random_positions

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _blob(n=27, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return make_batch(random_positions(n, seed, torch.float32), torch.randint(1, 10, (n,), generator=gen))


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("lmax", [1, 2, 4])
def test_model_flops_match_counter(name, lmax):
    """PyTorch paths: every matmul the forward runs is in the formula.

    For E2Former the core's logits, softmax and (materialized) aggregation are elementwise
    in PyTorch and invisible to the counter: ``flop_terms`` names exactly which core terms
    the backend runs as matmuls (``total_counted``), the difference being ``core`` -
    ``core_counted``.
    """
    cfg = default_config("tiny", lmax=lmax, num_blocks=2, channels=16, num_heads=4)
    model = build_model(name, cfg)
    b = molecules(sizes=(9, 11), dtype=torch.float32)
    pos = b.pos.clone().requires_grad_(True)
    counted = _counted(lambda: model.energy(b, pos))
    analytic = model.flops(b)
    assert analytic["core"] <= analytic["total"]
    expected = analytic["total"]
    if name.startswith("e2former"):
        terms = model.flop_terms(b)
        assert terms["total"] == analytic["total"]
        expected = terms["total_counted"]
        assert expected == pytest.approx(analytic["total"] - analytic["core"] + terms["core_counted"])
    assert abs(expected - counted) <= 0.10 * counted, (analytic, counted)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_layer_object(name):
    cfg = default_config("tiny", lmax=2, channels=16, num_heads=4)
    layer = build_layer(name, cfg)
    b = _blob()
    inputs = layer.make_inputs(b)
    out = layer(inputs)
    s = (cfg.lmax + 1) ** 2
    assert out.shape == (27, s, cfg.channels)
    out.square().sum().backward()
    assert inputs["x"].grad is not None and torch.isfinite(inputs["x"].grad).all()
    counted = _counted(lambda: layer(inputs))
    f = layer.flops(inputs)
    assert abs(f.get("total_counted", f["total"]) - counted) <= 0.10 * counted, (f, counted)
    assert sum(p.numel() for p in layer.parameters()) > 0


@pytest.mark.parametrize("name", ["escn-md", "dense-tp"])
@pytest.mark.parametrize("lmax", [2, 4])
def test_memory_model_tracks_saved_bytes(name, lmax):
    """The estimate is within 35 % of what autograd saves (fp32), at two sizes."""
    cfg = default_config("small", lmax=lmax, channels=16, num_heads=4, num_rbf=16, radial_hidden=16)
    model = build_model(name, cfg)
    for n in (27, 64):
        b = _blob(n)
        edges = model.edges(b)
        pos = b.pos.clone().requires_grad_(True)
        measured = saved_tensor_bytes(lambda: model.energy(b, pos, edges), exclude=[pos, *model.parameters(), *model.buffers()])
        est = model.memory_model(n, edges.num_edges, 4)
        assert est == memory_model(name, cfg, n, edges.num_edges, 4)
        assert 0.65 * measured <= est["bytes"] <= 1.35 * measured, (n, est, measured)
