"""E2Former v1 is the dense-CG / materialized twin of E2Former-V2: same function, edge-level memory."""
from __future__ import annotations

import pytest
import torch

from baselines.registry import build_model, default_config
from e2f.testing import saved_tensor_bytes
from tests.baselines.helpers import make_batch, molecules, random_positions, rel


@pytest.mark.parametrize("lmax", [1, 2, 3])
def test_v1_equals_v2_with_shared_weights(lmax):
    cfg = default_config("tiny", lmax=lmax)
    v2 = build_model("e2former-v2", cfg, dtype=torch.float64, seed=0).eval()
    v1 = build_model("e2former-v1", cfg, dtype=torch.float64, seed=1).eval()
    assert v1.e2f_config.node_product == "dense-cg" and v1.e2f_config.backend == "materialized"
    assert v2.e2f_config.node_product == "eaas"
    v1.load_state_dict(v2.state_dict())
    b = molecules(sizes=(6, 9), seed=lmax)
    e2, f2 = v2(b)
    e1, f1 = v1(b)
    assert rel(e1, e2) < 1e-10
    assert rel(f1, f2) < 1e-10


def test_v2_moments_equals_v2_with_shared_weights():
    cfg = default_config("tiny", lmax=2)
    v2 = build_model("e2former-v2", cfg, dtype=torch.float64, seed=0).eval()
    moments = build_model("e2former-v2-moments", cfg, dtype=torch.float64, seed=1).eval()
    assert moments.e2f_config.node_product == "moments" and moments.name == "e2former-v2-moments"
    moments.load_state_dict(v2.state_dict())
    b = molecules(sizes=(6, 9), seed=7)
    (e2, f2), (em, fm) = v2(b), moments(b)
    assert rel(em, e2) < 1e-10 and rel(fm, f2) < 1e-10


def _saved(model, n, k=None):
    gen = torch.Generator().manual_seed(n)
    b = make_batch(random_positions(n, n, torch.float32), torch.randint(1, 10, (n,), generator=gen))
    pos = b.pos.clone().requires_grad_(True)
    measured = saved_tensor_bytes(lambda: model.energy(b, pos), exclude=[pos, *model.parameters(), *model.buffers()])
    return measured, model.memory_model(n, model.edges(b).num_edges, 4)["bytes"]


@pytest.mark.parametrize("name", ["e2former-v1", "e2former-v2", "e2former-v2-moments"])
def test_memory_model_tracks_saved_bytes(name):
    cfg = default_config("small", channels=16, num_heads=4, num_rbf=16, radial_hidden=16)
    model = build_model(name, cfg)
    for n in (27, 64):
        measured, est = _saved(model, n)
        assert 0.65 * measured <= est <= 1.35 * measured, (n, est, measured)
