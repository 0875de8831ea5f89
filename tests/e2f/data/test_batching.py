"""Batching and collation of structures into an AtomsBatch with targets."""

import numpy as np
import pytest
import torch

pytest.importorskip("e2f.batch")

from e2f.data import Structure, batches, collate, reference_energy  # noqa: E402


def _structures():
    rng = np.random.default_rng(0)
    out = []
    for k, n in enumerate([3, 5, 2, 7]):
        out.append(Structure(positions=rng.normal(size=(n, 3)) * 2, numbers=rng.choice([1, 6, 8], n),
                             energy=-10.0 * n - k, forces=rng.normal(size=(n, 3)), charge=k - 1,
                             spin=1 + (k == 2), subset=f"s{k % 2}", source=str(k)))
    return out


def test_collate_concatenates_and_offsets():
    s = _structures()
    refs = {1: -1.0, 6: -5.0, 8: -7.0}
    batch, t = collate(s, dtype=torch.float64, energy_offset=refs)
    assert batch.pos.shape == (17, 3) and batch.pos.dtype == torch.float64
    assert batch.batch.tolist() == [0] * 3 + [1] * 5 + [2] * 2 + [3] * 7
    assert batch.charge.tolist() == [-1, 0, 1, 2] and batch.spin.tolist() == [1, 1, 2, 1]
    np.testing.assert_allclose(batch.pos.numpy(), np.concatenate([x.positions for x in s]))
    np.testing.assert_allclose(t.forces.numpy(), np.concatenate([x.forces for x in s]))
    want = [x.energy - reference_energy(x.numbers, refs) for x in s]
    np.testing.assert_allclose(t.energy.numpy(), want)
    assert t.natoms.tolist() == [3, 5, 2, 7] and t.subset == ["s0", "s1", "s0", "s1"]
    with pytest.raises(ValueError):
        collate([])


def test_batches_respect_atom_budget_and_cover_everything():
    s = _structures() * 5
    groups = list(batches(s, max_atoms=8, shuffle=True, seed=1))
    assert sorted(id(x) for g in groups for x in g) == sorted(id(x) for x in s)
    assert all(sum(x.num_atoms for x in g) <= 8 for g in groups)
    again = list(batches(s, max_atoms=8, shuffle=True, seed=1))
    assert [[id(x) for x in g] for g in groups] == [[id(x) for x in g] for g in again]
    assert len(list(batches(s, max_atoms=1000, max_structures=4))) == 5
