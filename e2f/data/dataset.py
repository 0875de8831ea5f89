"""The shipped set, split selection, batching and collation into ``e2f.batch.AtomsBatch``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .readers import ReadReport, Structure, open_dataset

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
SHIPPED_STEM = "xtb_organic"


def shipped_path(fmt: str = "h5") -> Path:
    """Path of the shipped set in ``fmt``: 'h5' (SPICE layout) or 'aselmdb' (OMol25 layout)."""
    if fmt not in ("h5", "aselmdb"):
        raise ValueError(f"unknown shipped format {fmt!r}; valid: 'h5', 'aselmdb'")
    p = SHIPPED_DIR / f"{SHIPPED_STEM}.{fmt}"
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: run `python -m e2f.data.make_shipped`")
    return p


def shipped_manifest() -> dict:
    """Counts, splits, per-element reference energies (eV) and checksums of the shipped set."""
    return json.loads((SHIPPED_DIR / f"{SHIPPED_STEM}.json").read_text())


def shipped_reference_energies() -> dict[int, float]:
    """Per-element energies (eV) fitted on the shipped train split."""
    return {int(z): float(e) for z, e in shipped_manifest()["reference_energies_eV"].items()}


def load_structures(
    source, *, splits: Iterable[str] | None = None, subsets: Iterable[str] | None = None,
    limit: int | None = None,
) -> tuple[list[Structure], ReadReport]:
    """Read structures from a path (any :func:`open_dataset` format) or a reader.

    Only ``splits`` (e.g. ``{"train"}``) and ``subsets`` are kept; ``limit`` stops early.
    Returns the list and the reader's report (bad records counted, never dropped silently).
    """
    reader = open_dataset(source) if isinstance(source, (str, Path)) else source
    if subsets is not None:
        reader.subsets = set(subsets)
    splits = None if splits is None else set(splits)
    out = []
    for s in reader:
        if splits is None or s.split in splits:
            out.append(s)
            if limit is not None and len(out) >= limit:
                break
    return out, reader.report


@dataclass
class Targets:
    """Labels of a collated batch (same device/dtype as the batch positions)."""

    energy: torch.Tensor  # [B] eV
    forces: torch.Tensor  # [N, 3] eV/Å
    natoms: torch.Tensor  # [B]
    subset: list[str]


def collate(
    structures: Sequence[Structure], *, device=None, dtype=None,
    energy_offset: dict[int, float] | None = None,
):
    """Concatenate structures into one ``AtomsBatch`` and its :class:`Targets`.

    ``energy_offset``: per-element reference energies subtracted from the target energies
    (the model then learns the interaction energy). ``dtype``: float32 unless given.
    """
    import torch

    from e2f.batch import AtomsBatch

    dtype = torch.float32 if dtype is None else dtype

    if len(structures) == 0:
        raise ValueError("cannot collate an empty list of structures")
    natoms = [s.num_atoms for s in structures]
    pos = torch.as_tensor(np.concatenate([s.positions for s in structures]), dtype=torch.float64)
    z = torch.as_tensor(np.concatenate([s.numbers for s in structures]), dtype=torch.long)
    batch = torch.repeat_interleave(torch.arange(len(structures)), torch.as_tensor(natoms))
    b = len(structures)
    energy = torch.tensor([s.energy for s in structures], dtype=torch.float64)
    if energy_offset is not None:
        from .reference import reference_energy

        energy = energy - torch.tensor(
            [reference_energy(s.numbers, energy_offset) for s in structures], dtype=torch.float64)
    forces = torch.as_tensor(np.concatenate([s.forces for s in structures]), dtype=torch.float64)
    ab = AtomsBatch(
        pos=pos.to(device=device, dtype=dtype),
        z=z.to(device),
        batch=batch.to(device),
        cell=torch.zeros(b, 3, 3, dtype=dtype, device=device),
        pbc=torch.zeros(b, 3, dtype=torch.bool, device=device),
        charge=torch.tensor([s.charge for s in structures], dtype=torch.long, device=device),
        spin=torch.tensor([s.spin for s in structures], dtype=torch.long, device=device),
    )
    targets = Targets(
        energy=energy.to(device=device, dtype=dtype),
        forces=forces.to(device=device, dtype=dtype),
        natoms=torch.tensor(natoms, device=device),
        subset=[s.subset for s in structures],
    )
    return ab, targets


def batches(
    structures: Sequence[Structure], *, max_atoms: int = 256, max_structures: int = 64,
    shuffle: bool = False, seed: int = 0,
) -> Iterator[list[Structure]]:
    """Consecutive groups of structures with at most ``max_atoms`` atoms (a structure larger
    than that is a batch of its own) and at most ``max_structures`` structures."""
    order = np.arange(len(structures))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(structures))
    cur, n = [], 0
    for i in order:
        s = structures[int(i)]
        if cur and (n + s.num_atoms > max_atoms or len(cur) >= max_structures):
            yield cur
            cur, n = [], 0
        cur.append(s)
        n += s.num_atoms
    if cur:
        yield cur
