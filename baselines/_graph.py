"""Edge lists for the per-edge baselines, built from e2f's neighbour list.

Every model in the registry sees the same neighbours: ``e2f.neighbors.neighbor_list``
with the config's cutoff and cap K. The per-edge baselines (dense TP, eSCN-MD) want an
edge list instead of the padded ``[N, K]`` table; this module flattens it.

Edge ``e`` goes from source ``src[e]`` (an atom, possibly through a periodic image
shifted by ``shift[e]``) to target ``dst[e]``. The vector used everywhere is
``vec[e] = pos[src] + shift - pos[dst]`` (source minus target: fairchem's
``edge_distance_vec`` convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EdgeList:
    src: Tensor  # [E] source atom
    dst: Tensor  # [E] target atom
    shift: Tensor  # [E, 3] Cartesian lattice shift applied to the source
    num_nodes: int

    @property
    def num_edges(self) -> int:
        return int(self.src.shape[0])

    def vectors(self, pos: Tensor) -> Tensor:
        """``pos[src] + shift - pos[dst]``, differentiable w.r.t. ``pos``."""
        return pos[self.src] + self.shift.to(pos.dtype) - pos[self.dst]


def num_systems(batch) -> int:
    """Number of systems in an ``AtomsBatch``."""
    if getattr(batch, "cell", None) is not None:
        return int(batch.cell.shape[0])
    return int(batch.batch.max().item()) + 1 if batch.batch.numel() else 0


def edge_list(batch, cutoff: float, max_neighbors: int | None) -> EdgeList:
    """Neighbours of every atom of ``batch`` (an ``e2f.batch.AtomsBatch``) as an edge list.

    Uses ``e2f.neighbors.neighbor_list`` (vesin, O(N)), so all four models share one
    definition of "neighbour": within ``cutoff``, the ``max_neighbors`` nearest kept.
    """
    from e2f.neighbors import neighbor_list

    nl = neighbor_list(
        batch.pos.detach(),
        cutoff,
        max_neighbors,
        batch=batch.batch,
        cell=getattr(batch, "cell", None),
        pbc=getattr(batch, "pbc", None),
    )
    return edge_list_from_neighbors(nl)


def edge_list_from_neighbors(nl) -> EdgeList:
    """The same flattening for an already built ``NeighborList``."""
    n, k = nl.nbr.shape
    slots = nl.nbr.reshape(-1)
    valid = slots >= 0
    dst = torch.arange(n, device=slots.device).repeat_interleave(k)[valid]
    slots = slots[valid]
    return EdgeList(src=nl.src_atom[slots], dst=dst, shift=nl.src_shift[slots], num_nodes=n)
