import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from e2f import neighbors
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


def test_periodic_matches_ase_and_images_are_slots(table_builder):
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


def test_nearest_first_and_cap(table_builder):
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


def test_ties_broken_by_source_index(table_builder):
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


def test_isolated_and_single_atoms(table_builder):
    pos = torch.tensor([[0.0, 0, 0], [10, 0, 0], [10.5, 0, 0]])
    nl = neighbor_list(pos, 2.0, batch=torch.tensor([0, 1, 1]))
    assert nl.num_neighbors.tolist() == [0, 1, 1]
    assert nl.nbr.dtype == torch.int64 and nl.nbr.shape == (3, 1)
    one = neighbor_list(torch.zeros(1, 3), 2.0)
    assert one.nbr.tolist() == [[-1]]
    none = neighbor_list(torch.zeros(0, 3), 2.0)
    assert none.nbr.shape == (0, 1) and none.src_atom.shape == (0,) and none.num_neighbors.shape == (0,)


def test_small_periodic_cell_self_images(table_builder):
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
    # periodic systems use vesin's distances: an atom on another's image is caught too
    cell, pbc = torch.eye(3, dtype=torch.float64) * 8.0, torch.tensor([True, True, True])
    with pytest.raises(ValueError, match=r"shift \[-1, 0, 0\]\) coincide"):
        neighbor_list(torch.tensor([[0.0, 0, 0], [8.0, 0, 0]], dtype=torch.float64), 3.0, cell=cell, pbc=pbc)


def test_spatial_order_keeps_systems_and_is_local():
    gen = torch.Generator().manual_seed(1)
    pos = torch.rand(600, 3, generator=gen) * 20
    batch = torch.tensor([0] * 100 + [1] * 500)
    perm = spatial_order(pos, batch)
    assert sorted(perm.tolist()) == list(range(600))
    assert torch.equal(batch[perm], batch)
    step = (pos[perm][1:] - pos[perm][:-1]).norm(dim=-1).mean()
    assert step < 0.3 * (pos[1:] - pos[:-1]).norm(dim=-1).mean()


def _brute_force(pos, cutoff, max_neighbors, batch, cell, pbc, reach=3):
    """Every (target, source atom, lattice shift within ``reach``) pair by plain loops, in
    the documented order (distance, the atom before its images, then (atom, shift)), image
    slots numbered in the (atom, shift) order of the images that kept edges use."""
    n = len(pos)
    rows, used = [], set()
    for i in range(n):
        b = batch[i]
        shifts = [(a, c, e) for a in range(-reach, reach + 1) for c in range(-reach, reach + 1)
                  for e in range(-reach, reach + 1)
                  if all(pbc[b][k] or s == 0 for k, s in enumerate((a, c, e)))]
        cands = []
        for j in range(n):
            if batch[j] != b:
                continue
            for s in shifts:
                d = np.linalg.norm(pos[i] - pos[j] - np.asarray(s, dtype=np.float64) @ cell[b])
                if d < cutoff and not (j == i and s == (0, 0, 0)):
                    cands.append((d, s != (0, 0, 0), j, s))
        cands.sort()
        kept = cands[:max_neighbors]
        used.update((j, s) for _, image, j, s in kept if image)
        rows.append(kept)
    image_slot = {key: n + k for k, key in enumerate(sorted(used))}
    width = max([1] + [len(r) for r in rows])
    nbr = np.full((n, width), -1)
    for i, kept in enumerate(rows):
        for k, (_, image, j, s) in enumerate(kept):
            nbr[i, k] = image_slot[(j, s)] if image else j
    src_atom = list(range(n)) + [j for j, _ in sorted(used)]
    src_shift = [(0, 0, 0)] * n + [s for _, s in sorted(used)]
    return nbr, np.asarray(src_atom), np.asarray(src_shift, dtype=np.float64)


@pytest.fixture(params=["host", "torch"])
def table_builder(request, monkeypatch):
    """Each test that takes it runs with the host's table builder and with the one CUDA
    inputs take (``_table_torch``), here on the CPU."""
    if request.param == "torch":
        monkeypatch.setattr(neighbors, "DEVICE_TABLES", {"cpu", "cuda"})
    return request.param


@pytest.mark.parametrize("packed_keys", [True, False])
@pytest.mark.parametrize("rattle", [0.0, 0.3])
def test_matches_brute_force_with_ties_images_and_molecules(rattle, packed_keys, table_builder, monkeypatch):
    # A simple-cubic crystal in a cell of side 3 (exact ties among images: every distance is
    # computed exactly when unrattled), a slab periodic in x and y, and a molecule, in one batch.
    gen = np.random.default_rng(0)
    grid = np.array([[x, y, z] for x in (0.0, 1.5) for y in (0.0, 1.5) for z in (0.0, 1.5)])
    slab = gen.uniform(0, 4, size=(6, 3))
    mol = gen.uniform(0, 3, size=(5, 3))
    pos = np.concatenate([grid + rattle * gen.uniform(-1, 1, grid.shape), slab, mol])
    batch = [0] * 8 + [1] * 6 + [2] * 5
    cell = np.stack([3.0 * np.eye(3), np.diag([4.0, 4.0, 0.0]), np.zeros((3, 3))])
    pbc = [(True, True, True), (True, True, False), (False, False, False)]
    if not packed_keys:  # the path for (atom, shift) codes too wide for 62 bits
        monkeypatch.setattr(neighbors, "_source_codes", lambda j, shift: None)
    for max_neighbors in (None, 9):
        nl = neighbor_list(torch.tensor(pos), 3.4, max_neighbors, batch=torch.tensor(batch),
                           cell=torch.tensor(cell), pbc=torch.tensor(pbc))
        nbr, src_atom, src_shift = _brute_force(pos, 3.4, max_neighbors, batch, cell, pbc)
        assert np.array_equal(nl.nbr.numpy(), nbr)
        assert np.array_equal(nl.src_atom.numpy(), src_atom)
        expected_shift = np.einsum("ma,mab->mb", src_shift, cell[np.asarray(batch)[src_atom]])
        assert np.allclose(nl.src_shift.numpy(), expected_shift, atol=1e-12)
        assert np.array_equal(nl.num_neighbors.numpy(), (nbr >= 0).sum(1))


@pytest.mark.parametrize("n", [1, 300, 1 << 16, (1 << 16) + 1, 200_000])
def test_target_order_is_the_stable_argsort(n):
    i = np.random.default_rng(n).integers(0, n, size=50_000)
    assert np.array_equal(neighbors._by_target(i, n), np.argsort(i, kind="stable"))


@pytest.mark.parametrize("max_neighbors", [None, 7])
@pytest.mark.parametrize("packed_keys", [True, False])
def test_device_table_equals_host_table(max_neighbors, packed_keys, monkeypatch):
    # a periodic liquid (images), a skewed periodic cell, a slab, two molecules (one of a
    # single atom) and an isolated pair, in one batch: both builders give the same bits
    gen = np.random.default_rng(7)
    liquid = gen.uniform(0, 9.0, size=(80, 3))
    skewed = gen.uniform(0, 5.0, size=(20, 3))
    slab = gen.uniform(0, 6.0, size=(25, 3))
    mols = [gen.uniform(0, 4.0, size=(12, 3)), np.zeros((1, 3)), np.array([[0, 0, 0], [50.0, 0, 0]])]
    pos = np.concatenate([liquid, skewed, slab, *mols])
    sizes = [80, 20, 25, 12, 1, 2]
    batch = torch.tensor(np.repeat(np.arange(len(sizes)), sizes))
    cell = np.zeros((len(sizes), 3, 3))
    cell[0], cell[2] = 9.0 * np.eye(3), np.diag([6.0, 6.0, 0.0])
    cell[1] = [[5.0, 0, 0], [1.7, 4.6, 0], [0.9, 1.1, 4.8]]
    pbc = torch.tensor([[True] * 3, [True] * 3, [True, True, False]] + [[False] * 3] * 3)
    if not packed_keys:
        monkeypatch.setattr(neighbors, "_source_codes", lambda j, shift: None)
    args = (torch.tensor(pos), 3.1, max_neighbors)
    kwargs = dict(batch=batch, cell=torch.tensor(cell), pbc=pbc)
    host = neighbor_list(*args, **kwargs)
    monkeypatch.setattr(neighbors, "DEVICE_TABLES", {"cpu", "cuda"})
    dev = neighbor_list(*args, **kwargs)
    assert (host.nbr >= 0).sum() > 500 and len(host.src_atom) > len(pos)  # images were used
    for name in ("nbr", "src_atom", "src_shift", "num_neighbors"):
        a, b = getattr(host, name), getattr(dev, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
