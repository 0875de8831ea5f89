"""Training: the loss goes down, a resumed run equals an uninterrupted one, the schedule."""

import math

import pytest
import torch

pytest.importorskip("baselines.registry")

from e2f.data import load_structures, shipped_path  # noqa: E402
from e2f.train import TrainConfig, build, evaluate, loss_terms, lr_factor, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(lmax=1, channels=8, num_blocks=1, num_heads=2, head_dim=4, num_rbf=8,
            radial_hidden=8, max_neighbors=8)


@pytest.fixture(scope="module")
def splits():
    from e2f.data import fit_reference_energies

    structures, _ = load_structures(shipped_path("h5"), subsets={"g2-neutral"}, limit=400)
    train_set = [s for s in structures if s.split == "train" and s.num_atoms <= 8][:8]
    val_set = [s for s in structures if s.split == "val"][:8]
    refs = fit_reference_energies([s.numbers for s in structures], [s.energy for s in structures])
    return train_set, val_set, refs


def _cfg(tmp_path, **kw):
    base = dict(model="e2former-v2", preset="tiny", model_overrides=TINY, steps=10, lr=3e-3,
                max_atoms=64, max_structures=8, eval_every=0, checkpoint_every=0, log_every=5,
                ema_decay=0.0, out_dir=str(tmp_path / "run"), seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.01) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.01) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.01) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.01) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 10, 100, 0.01) == pytest.approx(0.01)


def test_loss_terms_are_per_atom_energy_and_force_l2_mae():
    class T:
        energy = torch.tensor([1.0, 2.0])
        forces = torch.zeros(3, 3)
        natoms = torch.tensor([1, 2])

    loss, e, f = loss_terms(torch.tensor([2.0, 0.0]), torch.tensor([[3.0, 4.0, 0.0]] * 3), T, 1.0, 2.0)
    assert float(e) == pytest.approx((1.0 + 1.0) / 2)
    assert float(f) == pytest.approx(5.0)
    assert float(loss) == pytest.approx(1.0 + 10.0)


def test_training_lowers_the_loss(tmp_path, splits):
    train_set, _, refs = splits
    assert sum(s.num_atoms for s in train_set) <= 64  # one batch: every step sees the same data
    cfg = _cfg(tmp_path, steps=15, log_every=1)
    before = evaluate(build(cfg, "cpu", torch.float32), train_set, refs)["all"]
    res = train(cfg, splits=(train_set, train_set, refs), log=lambda *a: None)
    after = evaluate(res.model, train_set, refs)["all"]
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert res.steps == 15 and len(losses) == 15
    assert losses[-1] < 0.95 * losses[0]
    assert after["energy_mae_mev_per_atom"] < 0.9 * before["energy_mae_mev_per_atom"]
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert (tmp_path / "run" / "metrics.json").exists()


def test_resume_equals_uninterrupted_run(tmp_path, splits):
    train_set, val_set, refs = splits
    quiet = dict(log=lambda *a: None, splits=(train_set, val_set, refs))
    straight = train(_cfg(tmp_path / "a", steps=8), **quiet)
    first = train(_cfg(tmp_path / "b", steps=8), stop_at=5, **quiet)
    assert first.steps == 5
    resumed = train(_cfg(tmp_path / "b", steps=8), resume=True, **quiet)
    assert resumed.steps == 8
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="is a"):
        train(_cfg(tmp_path / "b", model="dense-tp", steps=9), resume=True, **quiet)


def test_time_budget_stops_early_and_keeps_the_result(tmp_path, splits):
    train_set, val_set, refs = splits
    res = train(_cfg(tmp_path, steps=50, max_wall_s=0.0), splits=(train_set, val_set, refs), log=lambda *a: None)
    assert res.time_budget_reached and res.steps == 1
    assert res.val["all"]["structures"] == len(val_set)  # evaluated, not lost
    full = train(_cfg(tmp_path / "b", steps=2, max_wall_s=3600.0), splits=(train_set, val_set, refs),
                 log=lambda *a: None)
    assert not full.time_budget_reached and full.steps == 2
