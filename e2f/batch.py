"""AtomsBatch: the model's input (a batch of molecules and/or periodic cells)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor


@dataclass
class AtomsBatch:
    """Atoms of B systems, concatenated with systems contiguous.

    Attributes
    ----------
    pos : Tensor
        ``[N, 3]`` positions in Å.
    z : Tensor
        ``[N]`` int64 atomic numbers.
    batch : Tensor
        ``[N]`` int64 sorted system index of each atom.
    cell : Tensor
        ``[B, 3, 3]`` lattice vectors as rows (zeros for molecules).
    pbc : Tensor
        ``[B, 3]`` bool periodic directions.
    charge : Tensor
        ``[B]`` int64 total charge.
    spin : Tensor
        ``[B]`` int64 spin multiplicity (2S + 1).
    """

    pos: Tensor
    z: Tensor
    batch: Tensor
    cell: Tensor
    pbc: Tensor
    charge: Tensor
    spin: Tensor

    @property
    def num_systems(self) -> int:
        return self.cell.shape[0]

    @property
    def num_atoms(self) -> int:
        return self.pos.shape[0]

    def to(self, device=None, dtype=None) -> "AtomsBatch":
        """Move to ``device``; floating tensors (pos, cell) also to ``dtype``."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = t.to(device=device, dtype=dtype) if (dtype is not None and t.is_floating_point()) else t.to(device)
        return AtomsBatch(**out)

    def replace(self, **changes) -> "AtomsBatch":
        return replace(self, **changes)

    def validate(self, max_z: int = 118) -> None:
        """Raise ``ValueError`` for empty batches, bad shapes, non-finite values or unknown Z.

        Coincident atoms are detected by the neighbour list (they are always neighbours).
        """
        n = self.num_atoms
        if n == 0 or self.num_systems == 0:
            raise ValueError("empty batch: no atoms")
        if self.pos.shape != (n, 3):
            raise ValueError(f"pos must have shape [N, 3], got {tuple(self.pos.shape)}")
        for name in ("z", "batch"):
            t = getattr(self, name)
            if t.shape != (n,) or t.is_floating_point():
                raise ValueError(f"{name} must be an integer tensor of shape [{n}], got {t.dtype} {tuple(t.shape)}")
        if not torch.isfinite(self.pos).all():
            raise ValueError("positions contain NaN or inf")
        if not torch.isfinite(self.cell).all():
            raise ValueError("cell contains NaN or inf")
        if int(self.z.min()) < 1 or int(self.z.max()) > max_z:
            bad = self.z[(self.z < 1) | (self.z > max_z)]
            raise ValueError(f"unknown atomic numbers {sorted(set(bad.tolist()))} (valid: 1..{max_z})")
        if int(self.batch.min()) < 0 or bool((self.batch[1:] < self.batch[:-1]).any()):
            raise ValueError("batch must be sorted and non-negative (systems contiguous)")
        b = self.num_systems
        if int(self.batch.max()) >= b:
            raise ValueError(f"batch refers to system {int(self.batch.max())} but there are {b} systems")
        counts = torch.bincount(self.batch, minlength=b)
        if bool((counts == 0).any()):
            raise ValueError(f"systems {torch.nonzero(counts == 0).flatten().tolist()} have no atoms")
        for name, shape in (("cell", (b, 3, 3)), ("pbc", (b, 3)), ("charge", (b,)), ("spin", (b,))):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(getattr(self, name).shape)}")
        periodic_cells = self.cell[self.pbc.any(1)]
        if len(periodic_cells) and bool((torch.linalg.det(periodic_cells.double()).abs() < 1e-9).any()):
            raise ValueError("a periodic system has a degenerate cell")

    @classmethod
    def from_ase(cls, atoms: Any | Iterable[Any], dtype: torch.dtype | None = None, device=None) -> "AtomsBatch":
        """From one ``ase.Atoms`` or a list; ``info["charge"]`` and ``info["spin"]`` (multiplicity) if set."""
        import ase

        items = [atoms] if isinstance(atoms, ase.Atoms) else list(atoms)
        if not items:
            raise ValueError("empty batch: no systems")
        dtype = dtype or torch.get_default_dtype()
        pos = torch.tensor(np.concatenate([a.get_positions() for a in items]), dtype=dtype)
        z = torch.tensor(np.concatenate([a.get_atomic_numbers() for a in items]), dtype=torch.long)
        batch = torch.cat([torch.full((len(a),), i, dtype=torch.long) for i, a in enumerate(items)])
        cell = torch.tensor(np.stack([np.asarray(a.get_cell()[:]) for a in items]), dtype=dtype)
        pbc = torch.tensor(np.stack([a.get_pbc() for a in items]), dtype=torch.bool)
        charge = torch.tensor([int(a.info.get("charge", 0)) for a in items], dtype=torch.long)
        spin = torch.tensor([int(a.info.get("spin", 1)) for a in items], dtype=torch.long)
        return cls(pos, z, batch, cell, pbc, charge, spin).to(device)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Any, dtype: torch.dtype | None = None) -> "AtomsBatch":
        """From a torch-geometric-style dict or ``Data``: ``pos``, ``z``/``atomic_numbers``, optional
        ``batch``, ``cell`` (``[B, 3, 3]`` or ``[3, 3]``), ``pbc``, ``charge``, ``spin``."""
        get = data.get if isinstance(data, Mapping) else (lambda k, d=None: getattr(data, k, d))
        pos = torch.as_tensor(get("pos"))
        dtype = dtype or (pos.dtype if pos.is_floating_point() else torch.get_default_dtype())
        pos = pos.to(dtype)
        z = get("z")
        z = torch.as_tensor(z if z is not None else get("atomic_numbers")).long()
        batch = get("batch")
        batch = torch.zeros(len(pos), dtype=torch.long, device=pos.device) if batch is None else torch.as_tensor(batch).long()
        b = int(batch.max()) + 1 if len(batch) else 0
        cell = get("cell")
        cell = torch.zeros(b, 3, 3, dtype=dtype) if cell is None else torch.as_tensor(cell).to(dtype).reshape(-1, 3, 3)
        pbc = get("pbc")
        pbc = torch.zeros(b, 3, dtype=torch.bool) if pbc is None else torch.as_tensor(pbc).bool().reshape(-1, 3)
        if cell.shape[0] == 1 and b > 1:
            cell = cell.expand(b, 3, 3)
        if pbc.shape[0] == 1 and b > 1:
            pbc = pbc.expand(b, 3)
        charge, spin = get("charge"), get("spin")
        charge = torch.zeros(b, dtype=torch.long) if charge is None else torch.as_tensor(charge).long().reshape(-1)
        spin = torch.ones(b, dtype=torch.long) if spin is None else torch.as_tensor(spin).long().reshape(-1)
        device = pos.device
        return cls(pos, z.to(device), batch.to(device), cell.to(device), pbc.to(device), charge.to(device), spin.to(device))
