import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from e2f.neighbors import neighbor_list
from e2f.ordering import spatial_order


def _edge_set(nl):
    """{(target, source atom, rounded shift)} of a NeighborList."""
    out = set()
    for i, row in enumerate(nl.nbr.tolist()):
        for slot in row:
            if slot >= 0:
                shift = tuple(np.round(nl.src_shift[slot].tolist(), 6))
                out.add((i, int(nl.src_atom[slot]), shift))
    return out


def _ase_edge_set(atoms, cutoff):
    i, j, shift = ase_neighbor_list("ijS", atoms, cutoff)
    cart = shift @ atoms.cell[:]
    return {(a, b, tuple(np.round(s, 6))) for a, b, s in zip(i, j, cart)}


def test_periodic_matches_ase_and_images_are_slots():
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 1)
    atoms.rattle(0.05, seed=3)
    pos = torch.tensor(atoms.positions)
    nl = neighbor_list(pos, 4.0, cell=torch.tensor(atoms.cell[:]), pbc=torch.tensor(atoms.pbc))
    assert _edge_set(nl) == _ase_edge_set(atoms, 4.0)
    n = len(atoms)
    assert torch.equal(nl.src_atom[:n], torch.arange(n))
    assert torch.all(nl.src_shift[:n] == 0)
    # Every image slot is used by some edge and describes a distinct (atom, shift) pair.
    used = set(nl.nbr[nl.nbr >= n].tolist())
    assert used == set(range(n, nl.src_atom.shape[0]))
    pairs = {(int(a), tuple(s)) for a, s in zip(nl.src_atom[n:], nl.src_shift[n:].tolist())}
    assert len(pairs) == nl.src_atom.shape[0] - n


def test_nearest_first_and_cap():
    gen = torch.Generator().manual_seed(0)
    pos = torch.rand(80, 3, generator=gen, dtype=torch.float64) * 8
    full = neighbor_list(pos, 4.0)
    capped = neighbor_list(pos, 4.0, 5)
    src = full.source_positions(pos)
    d = (pos[:, None] - src[full.nbr.clamp_min(0)]).norm(dim=-1)
    d = torch.where(full.nbr >= 0, d, torch.inf)
    assert torch.all(d[:, 1:] >= d[:, :-1])
    assert torch.equal(capped.num_neighbors, full.num_neighbors.clamp_max(5))
    assert capped.nbr.shape[1] == 5
    assert torch.equal(capped.nbr, full.nbr[:, :5])


def test_ties_broken_by_source_index():
    # A square: atom 0 has atoms 1 and 3 at the same distance.
    pos = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.float64)
    nl = neighbor_list(pos, 1.2, 1)
    assert nl.nbr[0, 0] == 1 and nl.nbr[2, 0] == 1


def test_batches_are_independent():
    a = torch.tensor(molecule("CH4").positions)
    b = torch.tensor(molecule("C6H6").positions)
    pos = torch.cat([a, b + 0.1])  # overlapping in space: batching must separate them
    batch = torch.tensor([0] * len(a) + [1] * len(b))
    nl = neighbor_list(pos, 3.0, batch=batch)
    na = neighbor_list(a, 3.0)
    nb = neighbor_list(b + 0.1, 3.0)
    assert torch.equal(nl.nbr[: len(a), : na.nbr.shape[1]], na.nbr)
    rows = nl.nbr[len(a):]
    assert torch.equal(torch.where(rows >= 0, rows - len(a), -1)[:, : nb.nbr.shape[1]], nb.nbr)


def test_isolated_and_single_atoms():
    pos = torch.tensor([[0.0, 0, 0], [10, 0, 0], [10.5, 0, 0]])
    nl = neighbor_list(pos, 2.0, batch=torch.tensor([0, 1, 1]))
    assert nl.num_neighbors.tolist() == [0, 1, 1]
    assert nl.nbr.dtype == torch.int64 and nl.nbr.shape == (3, 1)
    one = neighbor_list(torch.zeros(1, 3), 2.0)
    assert one.nbr.tolist() == [[-1]]


def test_small_periodic_cell_self_images():
    pos = torch.zeros(1, 3, dtype=torch.float64)
    nl = neighbor_list(pos, 3.0, cell=torch.eye(3, dtype=torch.float64) * 2.0, pbc=torch.tensor([True, True, True]))
    # The atom's own images: 6 at 2.0 and 12 at 2.83, each its own source slot.
    assert nl.num_neighbors.tolist() == [18]
    assert nl.src_atom.tolist() == [0] * 19
    d = (pos - nl.source_positions(pos)[nl.nbr[0]]).norm(dim=-1)
    assert torch.allclose(d[:6], torch.full((6,), 2.0, dtype=torch.float64))
    assert torch.all(d[6:] > 2.8) and torch.all(d < 3.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_positions(bad):
    pos = torch.zeros(2, 3)
    pos[1, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        neighbor_list(pos, 2.0)


def test_coincident_atoms():
    with pytest.raises(ValueError, match="coincide"):
        neighbor_list(torch.zeros(2, 3), 2.0)


def test_spatial_order_keeps_systems_and_is_local():
    gen = torch.Generator().manual_seed(1)
    pos = torch.rand(600, 3, generator=gen) * 20
    batch = torch.tensor([0] * 100 + [1] * 500)
    perm = spatial_order(pos, batch)
    assert sorted(perm.tolist()) == list(range(600))
    assert torch.equal(batch[perm], batch)
    step = (pos[perm][1:] - pos[perm][:-1]).norm(dim=-1).mean()
    assert step < 0.3 * (pos[1:] - pos[:-1]).norm(dim=-1).mean()
