"""eSCN-MD adapter: our neighbour list and lattice offsets feed fairchem's backbone correctly."""
from __future__ import annotations

import pytest
import torch

from baselines.escn import atomic_data
from baselines.registry import build_model, default_config
from tests.baselines.helpers import evaluate, make_batch, rel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CELL = torch.tensor([[6.0, 0.0, 0.0], [0.5, 6.5, 0.0], [0.3, -0.2, 7.0]], dtype=torch.float64)


def _periodic(n=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 3, generator=gen, dtype=torch.float64) @ CELL
    z = torch.randint(1, 9, (n,), generator=gen)
    return pos, z


def _batch(pos, z):
    return make_batch(pos, z, cell=CELL[None], pbc=torch.ones(1, 3, dtype=torch.bool))


def test_wrapping_atoms_by_lattice_vectors_changes_nothing():
    model = build_model("escn-md", default_config("tiny", max_neighbors=None), dtype=torch.float64).eval()
    pos, z = _periodic()
    e, f = evaluate(model, _batch(pos, z))
    wrapped = pos.clone()
    wrapped[3] += CELL[1]
    wrapped[5] -= CELL[0] + CELL[2]
    e2, f2 = evaluate(model, _batch(wrapped, z))
    assert rel(e2, e) < 1e-10
    assert rel(f2, f) < 1e-10


def test_our_graph_equals_fairchems_own_graph():
    """otf_graph=False with our vesin list == fairchem's internal radius graph (no cap)."""
    model = build_model("escn-md", default_config("tiny", max_neighbors=None), dtype=torch.float64).eval()
    pos, z = _periodic(seed=1)
    b = _batch(pos, z)
    e_ours, _ = evaluate(model, b)
    edges = model.edges(b)
    model.backbone.otf_graph = True
    data = atomic_data(b, pos.clone().requires_grad_(True), edges)
    torch.manual_seed(0)
    emb = model.backbone(data)["node_embedding"]
    e_fc = model.head(emb[:, 0, :], b.batch, 1)
    assert data.edge_index.shape[1] == edges.num_edges
    assert rel(e_fc.detach(), e_ours) < 1e-5
