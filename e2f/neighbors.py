"""Radius neighbour lists (vesin) with an optional K cap, periodic images and batches.

The attention core reads neighbours as *source slots*: the first N slots are the atoms
themselves; for periodic systems every (atom, lattice shift) pair that some kept edge uses
gets one extra slot after them, so ``pos_src = pos[src_atom] + src_shift``. Only the pairs
that occur are created, which keeps the per-source tensors (k, v, gate parts, EAAS
products) O(N).

vesin runs on the CPU: positions are copied to the host (for CUDA tensors this is a
device-to-host copy and a synchronisation, O(N) bytes). For CUDA tensors its pairs then move
to the device, which orders them and builds the table (``_table_torch``); on the CPU the
host does (``_table_numpy``), with the same result bit for bit. Molecules share one vesin
call (packed apart along x), so their distances are recomputed in float64 from the caller's
coordinates: the order (nearest first, ties by source slot) does not depend on the packing.
Each periodic system has a call of its own and keeps vesin's distances.
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
    """All (i, j, S, d) pairs with a margin on the cutoff; filtered exactly by the caller.

    Distances of periodic systems are vesin's (one call a system, from the caller's
    coordinates); those of molecules are recomputed from the caller's coordinates, since the
    packing below moves them.
    """
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
        i, j = idx[i], idx[j]
        r = pos[i] - pos[j]
        d = np.sqrt(r[:, 0] * r[:, 0] + r[:, 1] * r[:, 1] + r[:, 2] * r[:, 2])
        chunks.append((i, j, np.zeros((len(i), 3), dtype=np.int64), d))
    for b in np.flatnonzero(periodic & (starts[1:] > starts[:-1])):
        lo = starts[b]
        p = pos[lo : starts[b + 1]]
        i, j, shift, d = calculator.compute(p, cell[b], [bool(x) for x in pbc[b]], quantities="ijSd")
        chunks.append((i.astype(np.int64) + lo, j.astype(np.int64) + lo, shift.astype(np.int64), d))
    if not chunks:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, 3), dtype=np.int64), np.zeros(0)
    if len(chunks) == 1:  # one system: its arrays are the caller's already (no copy)
        return chunks[0]
    return tuple(np.concatenate(parts) for parts in zip(*chunks))


def _source_codes(j, shift):
    """One int64 per (source atom, lattice shift), increasing in the tuple's lexicographic
    order; None if they would not fit 62 bits."""
    reach = int(abs(shift).max()) if len(shift) else 0
    base = 2 * reach + 1
    if (int(j.max()) + 1 if len(j) else 1) * base**3 >= 2**62:
        return None
    s = shift + reach
    return ((j * base + s[:, 0]) * base + s[:, 1]) * base + s[:, 2]


def _tie_keys(j, shift):
    """Sort keys, least significant first, ordering pairs by: the atom itself before its
    images, then (atom, shift) (numpy arrays or tensors)."""
    is_image = shift.any(1) * 1  # as int64, for arrays and tensors alike
    code = _source_codes(j, shift)
    if code is None:
        return shift[:, 2], shift[:, 1], shift[:, 0], j, is_image
    return (code + (is_image << 62),)


def _by_target(i, n):
    """Stable argsort of the pairs' targets ``i`` (all in ``[0, n)``) in 16-bit radix passes:
    numpy's stable sort is a radix sort for 16-bit integers and a timsort for wider ones
    (~6x slower for 0.5 M pairs)."""
    if n <= 1 << 16:
        return np.argsort(i.astype(np.uint16), kind="stable")
    if n > 1 << 32:
        return np.argsort(i, kind="stable")
    order = np.argsort((i & 0xFFFF).astype(np.uint16), kind="stable")
    return order[np.argsort((i[order] >> 16).astype(np.uint16), kind="stable")]


def _nearest_first(i, d, j, shift, n, max_neighbors):
    """The kept pairs in table order: ``(order, rank, counts)`` with pair ``order[e]`` in slot
    ``rank[e]`` of its target and ``counts`` kept pairs a target.

    Table order: target, then distance, then the atom itself before its images, then
    (atom, shift). A global lexsort of the pairs costs O(E log E) on float keys; instead each
    target's pairs are sorted by distance alone in a padded ``[N, width]`` table, and only
    targets with two equal distances are re-sorted with the tie-breaking keys.
    """
    by_target = _by_target(i, n)
    counts = np.bincount(i, minlength=n)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    width = int(counts.max()) if len(i) else 0
    row = i[by_target]
    cell = row * width + np.arange(len(i)) - first[row]
    dist = np.full(n * width, np.inf)
    dist[cell] = d[by_target]
    dist = dist.reshape(n, width)
    cols = np.argsort(dist, axis=1)
    sorted_dist = np.take_along_axis(dist, cols, axis=1)
    equal = (sorted_dist[:, 1:] == sorted_dist[:, :-1]) & np.isfinite(sorted_dist[:, 1:])
    tied = np.flatnonzero(equal.any(1))
    if len(tied):
        in_tied = np.zeros(n, dtype=bool)
        in_tied[tied] = True
        sel = in_tied[row]  # the pairs of the tied targets, in by_target order
        pairs = by_target[sel]
        tables = []
        for key in _tie_keys(j[pairs], shift[pairs]):
            table = np.full(n * width, np.iinfo(np.int64).max)
            table[cell[sel]] = key
            tables.append(table.reshape(n, width)[tied])
        cols[tied] = np.lexsort((*tables, dist[tied]), axis=1)
    keep = counts if max_neighbors is None else np.minimum(counts, max_neighbors)
    ranks = np.arange(width)
    taken = ranks[None, :] < keep[:, None]
    order = by_target[(first[:, None] + cols)[taken]]
    return order, np.broadcast_to(ranks, (n, width))[taken], keep


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
    i, j, shift, d = _raw_pairs(host, batch_np, cell_np, pbc_np, cutoff)
    keep = d < cutoff
    if not keep.all():
        i, j, shift, d = i[keep], j[keep], shift[keep], d[keep]
    if (d <= 0.0).any():
        e = int(np.flatnonzero(d <= 0.0)[0])
        raise ValueError(f"atoms {i[e]} and {j[e]} (shift {shift[e].tolist()}) coincide")
    if pos.device.type in DEVICE_TABLES:
        nbr, src_atom, src_shift, counts = _table_torch(i, j, shift, d, n, max_neighbors, batch_np, cell_np,
                                                        pos.device)
    else:
        nbr, src_atom, src_shift, counts = (torch.from_numpy(a) for a in
                                            _table_numpy(i, j, shift, d, n, max_neighbors, batch_np, cell_np))
    return NeighborList(
        nbr=nbr.to(pos.device),
        src_atom=src_atom.to(pos.device),
        src_shift=src_shift.to(device=pos.device, dtype=pos.dtype),
        num_neighbors=counts.to(pos.device),
    )


def _table_numpy(i, j, shift, d, n, max_neighbors, batch_np, cell_np):
    """``(nbr, src_atom, src_shift, counts)`` from the pairs, on the host (``_nearest_first``'s
    sorts, which avoid a global sort of the pairs)."""
    order, rank, counts = _nearest_first(i, d, j, shift, n, max_neighbors)
    i, j, shift = i[order], j[order], shift[order]
    is_image = shift.any(1)
    slot = j.copy()
    img_atom = np.zeros(0, dtype=np.int64)
    img_shift = np.zeros((0, 3))
    if is_image.any():
        img_j, img_s = j[is_image], shift[is_image]
        code = _source_codes(img_j, img_s)
        if code is None:
            keys = np.concatenate([img_j[:, None], img_s], axis=1)
            _, first_use, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        else:
            _, first_use, inverse = np.unique(code, return_index=True, return_inverse=True)
        slot[is_image] = n + inverse.reshape(-1)
        img_atom = img_j[first_use]
        img_shift = _cartesian(img_s[first_use].astype(np.float64), cell_np[batch_np[img_atom]])
    width = max(1, int(counts.max()) if n else 1)
    nbr = np.full((n, width), -1, dtype=np.int64)
    nbr[i, rank] = slot
    src_atom = np.concatenate([np.arange(n), img_atom]).astype(np.int64)
    src_shift = np.concatenate([np.zeros((n, 3)), img_shift])
    return nbr, src_atom, src_shift, counts.astype(np.int64)


def _cartesian(s, cell):
    """An image's Cartesian shift ``S @ cell`` of its system, summed in a fixed order (numpy
    arrays or tensors alike, so that both table builders give the same bits)."""
    return s[:, 0, None] * cell[:, 0] + s[:, 1, None] * cell[:, 1] + s[:, 2, None] * cell[:, 2]


#: Device types whose neighbour tables are built by torch on the device (``_table_torch``):
#: there a global sort of the pairs takes a few launches, where the host's
#: ``_nearest_first`` took ~40 % of a 10,000-atom neighbour list (perf-notes 37).
DEVICE_TABLES = {"cuda"}


def _table_torch(i, j, shift, d, n, max_neighbors, batch_np, cell_np, device):
    """``_table_numpy`` on ``device``: the pairs moved there once, ordered by stable sorts on
    every key (least significant first), image slots numbered by ``torch.unique``."""
    i, j, shift, d = (torch.from_numpy(a).to(device) for a in (i, j, shift, d))
    order = torch.arange(len(i), device=device)
    for key in (*_tie_keys(j, shift), d, i):
        order = order[torch.sort(key[order], stable=True).indices]
    counts = torch.bincount(i, minlength=n)
    rank = torch.arange(len(i), device=device) - (torch.cumsum(counts, 0) - counts)[i[order]]
    if max_neighbors is not None:
        counts = counts.clamp(max=max_neighbors)
        taken = rank < max_neighbors
        order, rank = order[taken], rank[taken]
    i, j, shift = i[order], j[order], shift[order]
    is_image = shift.any(1)
    slot = j.clone()
    img_atom = torch.zeros(0, dtype=torch.int64, device=device)
    img_shift = torch.zeros(0, 3, dtype=torch.float64, device=device)
    if bool(is_image.any()):
        img_j, img_s = j[is_image], shift[is_image]
        code = _source_codes(img_j, img_s)
        keys = torch.cat([img_j[:, None], img_s], 1) if code is None else code
        unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
        slot[is_image] = n + inverse
        # any use of an image names it: the pairs that share a key share (atom, shift)
        use = torch.empty(len(unique), dtype=torch.int64, device=device).scatter_(
            0, inverse, torch.arange(len(inverse), device=device))
        img_atom = img_j[use]
        cell = torch.from_numpy(cell_np).to(device)[torch.from_numpy(batch_np).to(device)[img_atom]]
        img_shift = _cartesian(img_s[use].double(), cell)
    width = max(1, int(counts.max()) if n else 1)
    nbr = torch.full((n, width), -1, dtype=torch.int64, device=device)
    nbr[i, rank] = slot
    src_atom = torch.cat([torch.arange(n, device=device), img_atom])
    src_shift = torch.cat([torch.zeros(n, 3, dtype=torch.float64, device=device), img_shift])
    return nbr, src_atom, src_shift, counts
