"""Radius neighbour lists (vesin) with an optional K cap, periodic images and batches.

The attention core reads neighbours as *source slots*: the first N slots are the atoms
themselves; for periodic systems every (atom, lattice shift) pair that some kept edge uses
gets one extra slot after them, so ``pos_src = pos[src_atom] + src_shift``. Only the pairs
that occur are created, which keeps the per-source tensors (k, v, gate parts, EAAS
products) O(N).

vesin runs on the CPU: positions are copied to the host (for CUDA tensors this is a
device-to-host copy and a synchronisation, O(N) bytes) and the result is moved back to the
input's device. vesin's own distances are not used for ordering; they are recomputed in
float64 from the caller's coordinates so that the order (nearest first, ties by source
slot) does not depend on how systems are packed into one vesin call.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import vesin
from torch import Tensor


@dataclass
class NeighborList:
    """Padded per-target neighbour table over source slots.

    Attributes
    ----------
    nbr : Tensor
        ``[N, K]`` int64 source-slot indices, nearest first (ties by slot index), ``-1``
        padded. ``K = max(1, max_i num_neighbors[i])``.
    src_atom : Tensor
        ``[M]`` int64 atom of each source slot; the first N are ``arange(N)``.
    src_shift : Tensor
        ``[M, 3]`` Cartesian lattice shift of each slot (zero for the first N).
    num_neighbors : Tensor
        ``[N]`` int64 number of kept neighbours per target.
    """

    nbr: Tensor
    src_atom: Tensor
    src_shift: Tensor
    num_neighbors: Tensor

    @property
    def num_edges(self) -> int:
        return int(self.num_neighbors.sum())

    def source_positions(self, pos: Tensor) -> Tensor:
        """``pos[src_atom] + src_shift``: differentiable in ``pos``."""
        return pos[self.src_atom] + self.src_shift.to(pos.dtype)


def _as_batch_cell_pbc(pos, batch, cell, pbc):
    n = pos.shape[0]
    batch = torch.zeros(n, dtype=torch.long) if batch is None else batch.detach().cpu().long()
    if batch.shape != (n,):
        raise ValueError(f"batch must have shape [{n}], got {tuple(batch.shape)}")
    if n and (batch.min() < 0 or (batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be non-negative and sorted (systems contiguous)")
    num_systems = int(batch.max()) + 1 if n else 0
    if cell is None:
        cell = torch.zeros(num_systems, 3, 3, dtype=torch.float64)
    else:
        cell = cell.detach().cpu().double()
        if cell.shape == (3, 3):
            cell = cell.expand(num_systems, 3, 3)
        if cell.shape != (num_systems, 3, 3):
            raise ValueError(f"cell must have shape [3, 3] or [{num_systems}, 3, 3], got {tuple(cell.shape)}")
    if pbc is None:
        pbc = torch.zeros(num_systems, 3, dtype=torch.bool)
    else:
        pbc = torch.as_tensor(pbc).detach().cpu().bool()
        if pbc.shape in ((), (3,)):
            pbc = pbc.expand(num_systems, 3)
        if pbc.shape != (num_systems, 3):
            raise ValueError(f"pbc must have shape [3] or [{num_systems}, 3], got {tuple(pbc.shape)}")
    return batch.numpy(), cell.numpy(), pbc.numpy()


def _raw_pairs(pos, batch, cell, pbc, cutoff):
    """All (i, j, S) pairs with a margin on the cutoff; filtered exactly by the caller."""
    calculator = vesin.NeighborList(cutoff=cutoff * (1.0 + 1e-9) + 1e-9, full_list=True)
    num_systems = cell.shape[0]
    starts = np.searchsorted(batch, np.arange(num_systems + 1))
    periodic = pbc.any(1)
    chunks = []
    # Molecules go in one vesin call, laid out far apart along x so that no pair crosses
    # systems: one O(N) call instead of a Python loop over thousands of small systems.
    mol = np.flatnonzero(~periodic & (starts[1:] > starts[:-1]))
    if len(mol):
        idx = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in mol])
        p = pos[idx].copy()
        offset, lo_row = 0.0, 0
        for b in mol:
            rows = slice(lo_row, lo_row + starts[b + 1] - starts[b])
            lo_row = rows.stop
            lo, hi = p[rows, 0].min(), p[rows, 0].max()
            p[rows, 0] += offset - lo
            offset += hi - lo + 2.0 * cutoff + 1.0
        i, j = calculator.compute(p, np.zeros((3, 3)), False, quantities="ij")
        chunks.append((idx[i], idx[j], np.zeros((len(i), 3), dtype=np.int64)))
    for b in np.flatnonzero(periodic & (starts[1:] > starts[:-1])):
        lo = starts[b]
        p = pos[lo : starts[b + 1]]
        i, j, shift = calculator.compute(p, cell[b], [bool(x) for x in pbc[b]], quantities="ijS")
        chunks.append((i.astype(np.int64) + lo, j.astype(np.int64) + lo, shift.astype(np.int64)))
    if not chunks:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, 3), dtype=np.int64)
    return tuple(np.concatenate(parts) for parts in zip(*chunks))


def neighbor_list(
    pos: Tensor,
    cutoff: float,
    max_neighbors: int | None = None,
    *,
    batch: Tensor | None = None,
    cell: Tensor | None = None,
    pbc: Tensor | None = None,
) -> NeighborList:
    """Neighbours within ``cutoff`` of every atom, optionally the ``max_neighbors`` nearest.

    Parameters
    ----------
    pos : Tensor
        ``[N, 3]`` positions (any device; read on the host, see the module docstring).
    cutoff : float
        Radius in Å; pairs with ``d < cutoff`` are neighbours.
    max_neighbors : int, optional
        Keep the K nearest per target (ties by source slot); all if None.
    batch : Tensor, optional
        ``[N]`` sorted system index of each atom (one system if None).
    cell : Tensor, optional
        ``[3, 3]`` or ``[B, 3, 3]`` lattice vectors as rows (ASE convention).
    pbc : Tensor, optional
        ``[3]`` or ``[B, 3]`` periodic directions; a system without any is a molecule.

    Returns
    -------
    NeighborList
        On ``pos.device``. Edge (i, slot) means source ``pos_src[slot]`` is within the
        cutoff of target ``pos[i]``; ``r_ij = pos[i] - pos_src[slot]``.

    Raises
    ------
    ValueError
        Bad shapes, non-finite positions, or two atoms (or an atom and an image) at
        distance zero.
    """
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must have shape [N, 3], got {tuple(pos.shape)}")
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    if max_neighbors is not None and max_neighbors < 1:
        raise ValueError(f"max_neighbors must be >= 1 or None, got {max_neighbors}")
    n = pos.shape[0]
    host = pos.detach().cpu().double().numpy()
    if not np.isfinite(host).all():
        raise ValueError("positions contain NaN or inf")
    batch_np, cell_np, pbc_np = _as_batch_cell_pbc(pos, batch, cell, pbc)
    i, j, shift = _raw_pairs(host, batch_np, cell_np, pbc_np, cutoff)
    # Shifts of non-periodic directions are zero by construction, so the cell rows of a
    # molecule (zeros) never matter.
    shift_cart = np.einsum("ea,eab->eb", shift.astype(np.float64), cell_np[batch_np[i]]) if len(i) else np.zeros((0, 3))
    d = np.linalg.norm(host[i] - host[j] - shift_cart, axis=1)
    keep = d < cutoff
    i, j, shift, shift_cart, d = i[keep], j[keep], shift[keep], shift_cart[keep], d[keep]
    if (d <= 0.0).any():
        e = int(np.flatnonzero(d <= 0.0)[0])
        raise ValueError(f"atoms {i[e]} and {j[e]} (shift {shift[e].tolist()}) coincide")
    is_image = shift.any(1)
    order = np.lexsort((shift[:, 2], shift[:, 1], shift[:, 0], j, is_image, d, i))
    i, j, shift, shift_cart, d, is_image = (a[order] for a in (i, j, shift, shift_cart, d, is_image))
    counts = np.bincount(i, minlength=n)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(i)) - first[i]
    if max_neighbors is not None:
        keep = rank < max_neighbors
        i, j, shift, shift_cart, is_image, rank = (a[keep] for a in (i, j, shift, shift_cart, is_image, rank))
        counts = np.minimum(counts, max_neighbors)
    slot = j.copy()
    img_atom = np.zeros(0, dtype=np.int64)
    img_shift = np.zeros((0, 3))
    if is_image.any():
        keys = np.concatenate([j[is_image, None], shift[is_image]], axis=1)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        slot[is_image] = n + inverse.reshape(-1)
        img_atom = uniq[:, 0]
        first_use = np.zeros(len(uniq), dtype=np.int64)
        first_use[inverse.reshape(-1)] = np.flatnonzero(is_image)
        img_shift = shift_cart[first_use]
    width = max(1, int(counts.max()) if n else 1)
    nbr = np.full((n, width), -1, dtype=np.int64)
    nbr[i, rank] = slot
    device = pos.device
    src_atom = np.concatenate([np.arange(n), img_atom]).astype(np.int64)
    src_shift = np.concatenate([np.zeros((n, 3)), img_shift])
    return NeighborList(
        nbr=torch.from_numpy(nbr).to(device),
        src_atom=torch.from_numpy(src_atom).to(device),
        src_shift=torch.from_numpy(src_shift).to(device=device, dtype=pos.dtype),
        num_neighbors=torch.from_numpy(counts.astype(np.int64)).to(device),
    )
