"""Spatial (Morton / Z-order) ordering of atoms.

A fused attention kernel walks the neighbours of a block of consecutive targets; when
consecutive atoms are close in space their neighbour sets overlap and the source rows are
reused from SRAM/L2. Sorting atoms along a Z-order curve gives that locality in O(N log N).
"""
from __future__ import annotations

import torch
from torch import Tensor

_BITS = 21  # 3 * 21 = 63 bits: the key fits a signed int64


def _spread_bits(x: Tensor) -> Tensor:
    """Insert two zero bits between the low 21 bits of ``x`` (int64)."""
    x = x & 0x1FFFFF
    x = (x | (x << 32)) & 0x1F00000000FFFF
    x = (x | (x << 16)) & 0x1F0000FF0000FF
    x = (x | (x << 8)) & 0x100F00F00F00F00F
    x = (x | (x << 4)) & 0x10C30C30C30C30C3
    x = (x | (x << 2)) & 0x1249249249249249
    return x


def morton_codes(pos: Tensor, batch: Tensor | None = None) -> Tensor:
    """Z-order key of each atom, quantised on its own system's bounding box.

    Parameters
    ----------
    pos : Tensor
        ``[N, 3]`` positions.
    batch : Tensor, optional
        ``[N]`` system index of each atom.

    Returns
    -------
    Tensor
        ``[N]`` int64 codes in ``[0, 2**63)``.
    """
    pos = pos.detach().double()
    if batch is None:
        batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    num_systems = int(batch.max()) + 1 if pos.shape[0] else 0
    idx = batch.long()[:, None].expand(-1, 3)
    lo = torch.full((num_systems, 3), torch.inf, dtype=pos.dtype, device=pos.device).scatter_reduce(0, idx, pos, "amin")
    hi = torch.full((num_systems, 3), -torch.inf, dtype=pos.dtype, device=pos.device).scatter_reduce(0, idx, pos, "amax")
    # One scale for all three axes keeps the cells cubic, so the curve's locality holds
    # for elongated systems too.
    span = (hi - lo).amax(1, keepdim=True).clamp_min(1e-12)
    scaled = (pos - lo[batch]) / span[batch] * ((1 << _BITS) - 1)
    grid = scaled.round().long().clamp(0, (1 << _BITS) - 1)
    return _spread_bits(grid[:, 0]) | (_spread_bits(grid[:, 1]) << 1) | (_spread_bits(grid[:, 2]) << 2)


def spatial_order(pos: Tensor, batch: Tensor | None = None) -> Tensor:
    """Permutation that sorts atoms along a Z-order curve within each system.

    Systems stay contiguous and in their original order, so ``batch[perm]`` is still
    sorted. Deterministic: equal codes keep their input order.

    Parameters
    ----------
    pos : Tensor
        ``[N, 3]`` positions.
    batch : Tensor, optional
        ``[N]`` sorted system index of each atom.

    Returns
    -------
    Tensor
        ``[N]`` int64 permutation: ``pos[perm]`` is the ordered set; the inverse is
        ``torch.argsort(perm)``.
    """
    codes = morton_codes(pos, batch)
    perm = torch.sort(codes, stable=True).indices
    if batch is not None:
        perm = perm[torch.sort(batch.long()[perm], stable=True).indices]
    return perm
