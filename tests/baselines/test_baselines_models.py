"""Every registered model: symmetry, forces = -dE/dr, lmax 1..4, a few training steps (fp64, tiny configs)."""
from __future__ import annotations

import pytest
import torch

from baselines.registry import MODEL_NAMES, build_model, default_config
from tests.baselines.helpers import TOLERANCES, evaluate, fd_forces, molecules, random_rotation, rel, replace_pos, make_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model(name, **overrides):
    return build_model(name, default_config("tiny", **overrides), dtype=torch.float64).eval()


@pytest.fixture(scope="module", params=MODEL_NAMES)
def name(request):
    return request.param


def test_rotation_translation_invariance(name):
    model = _model(name)
    b = molecules()
    e, f = evaluate(model, b)
    rot = random_rotation(3)
    e2, f2 = evaluate(model, replace_pos(b, b.pos @ rot.T + torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)), seed=1)
    tol = TOLERANCES[name]
    assert rel(e2, e) < tol["energy"]
    assert rel(f2, f @ rot.T) < tol["forces"]
    assert e.shape == (2,) and f.shape == b.pos.shape


def test_permutation_equivariance(name):
    model = _model(name)
    b = molecules(sizes=(6,))
    e, f = evaluate(model, b)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(5))
    e2, f2 = evaluate(model, make_batch(b.pos[perm], b.z[perm]), seed=2)
    tol = TOLERANCES[name]
    assert rel(e2, e) < tol["energy"]
    assert rel(f2, f[perm]) < tol["forces"]


def test_batch_matches_single_systems(name):
    model = _model(name)
    b = molecules(sizes=(5, 7))
    e, f = evaluate(model, b)
    e0, f0 = evaluate(model, make_batch(b.pos[:5], b.z[:5]))
    tol = TOLERANCES[name]
    assert rel(e[:1], e0) < tol["energy"]
    assert rel(f[:5], f0) < tol["forces"]


def test_forces_match_finite_differences(name):
    model = _model(name)
    b = molecules(sizes=(6,))
    _, f = evaluate(model, b)
    fd = fd_forces(model, b, atoms=(0, 3), h=1e-4)
    assert rel(f[[0, 3]], fd) < 1e-6


@pytest.mark.parametrize("lmax", [1, 3, 4])
def test_runs_at_lmax(name, lmax):
    model = _model(name, lmax=lmax)
    b = molecules(sizes=(5,))
    e, f = evaluate(model, b)
    assert torch.isfinite(e).all() and torch.isfinite(f).all()
    assert f.abs().sum() > 0


def test_training_steps_reduce_loss(name):
    model = build_model(name, default_config("tiny"), dtype=torch.float64, seed=1).train()
    b = molecules(sizes=(5, 6), seed=4)
    target_e = torch.tensor([-3.0, -4.0], dtype=torch.float64)
    target_f = torch.zeros_like(b.pos)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for step in range(6):
        torch.manual_seed(step)
        e, f = model(b)
        loss = (e - target_e).square().mean() + (f - target_f).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_isolated_atom_and_single_atom_system(name):
    """An atom without neighbours is valid: finite energy, zero force on it."""
    model = _model(name)
    pos = torch.cat([molecules(sizes=(5,)).pos, torch.tensor([[40.0, 40.0, 40.0]], dtype=torch.float64)])
    z = torch.tensor([1, 6, 8, 1, 7, 6])
    b = make_batch(pos, z, torch.tensor([0, 0, 0, 0, 0, 1]))
    e, f = evaluate(model, b)
    assert torch.isfinite(e).all() and torch.isfinite(f).all()
    assert f[5].abs().max() == 0
    e1, _ = evaluate(model, make_batch(pos[5:], z[5:]))
    assert rel(e1, e[1:]) < TOLERANCES[name]["energy"]
