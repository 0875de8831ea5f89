"""On a CUDA machine: every model runs forward + forces at paper size, N = 1,000 (skipped on CPU)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from baselines.registry import MODEL_NAMES, build_layer, build_model, default_config
from tests.baselines.helpers import make_batch, random_positions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _box(n=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # ~0.1 atoms / A^3 (liquid water density): a grid of spacing 2.15 A, jittered.
    pos = random_positions(n, seed, torch.float32, spacing=2.15)
    return make_batch(pos, torch.randint(1, 10, (n,), generator=gen)).to(device="cuda")


def _skip_missing(name):
    if name == "escn-md" and importlib.util.find_spec("fairchem") is None:
        pytest.skip("fairchem-core not installed (see baselines/README.md for the wheel install)")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_paper_size_forward_and_forces(name):
    _skip_missing(name)
    model = build_model(name, default_config("paper"), device="cuda", dtype=torch.float32)
    b = _box()
    e, f = model(b)
    torch.cuda.synchronize()
    assert e.shape == (1,) and f.shape == (1000, 3)
    assert torch.isfinite(e).all() and torch.isfinite(f).all()
    assert model.flops(b)["total"] > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_paper_size_layer(name):
    _skip_missing(name)
    layer = build_layer(name, default_config("paper"), device="cuda", dtype=torch.float32)
    inputs = layer.make_inputs(_box())
    out = layer(inputs)
    out.square().mean().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(inputs["x"].grad).all()
