"""``scripts/union_agg_probe.py``'s block unions: every edge found once, at its own slot."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def probe(load_script):
    pytest.importorskip("triton")
    return load_script("union_agg_probe")


@pytest.mark.parametrize("n,kslots,tb", [(37, 5, 8), (64, 7, 16), (5, 3, 16)])
def test_block_unions_hold_every_edge_once(probe, n, kslots, tb):
    gen = torch.Generator().manual_seed(n)
    m = n + 9  # sources beyond the targets, as periodic images are
    nbr = torch.stack([torch.randperm(m, generator=gen)[:kslots] for _ in range(n)])
    nbr[torch.rand(n, kslots, generator=gen) < 0.25] = -1
    uptr, usrc, uslot = probe.block_unions(nbr, tb)
    blocks = (n + tb - 1) // tb
    assert uptr.shape == (blocks + 1,) and int(uptr[-1]) == usrc.numel() == uslot.shape[0]
    seen = torch.zeros(n, kslots, dtype=torch.long)
    for b in range(blocks):
        rows = range(int(uptr[b]), int(uptr[b + 1]))
        block = nbr[b * tb: (b + 1) * tb]
        expected = torch.unique(block[block >= 0])
        assert torch.equal(usrc[int(uptr[b]): int(uptr[b + 1])].long(), expected)  # sorted and distinct
        for u in rows:
            for t in range(tb):
                slot = int(uslot[u, t])
                if slot >= 0:
                    assert int(nbr[b * tb + t, slot]) == int(usrc[u])
                    seen[b * tb + t, slot] += 1
    assert torch.equal(seen, (nbr >= 0).long())
