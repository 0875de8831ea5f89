"""Small systems and checks shared by the baseline tests."""
from __future__ import annotations

import math

import torch

# Per-model fp64 tolerances (relative). fairchem's eSCN-MD draws a random roll angle for
# every edge frame and evaluates a pointwise MLP on a finite S2 grid, so it is invariant
# only to ~1e-6 (energy) at lmax 2 even in fp64; the others are exact up to round-off.
TOLERANCES = {
    "e2former-v2": {"energy": 1e-9, "forces": 1e-8},
    "e2former-v2-moments": {"energy": 1e-9, "forces": 1e-8},
    "e2former-v1": {"energy": 1e-9, "forces": 1e-8},
    "dense-tp": {"energy": 1e-10, "forces": 1e-9},
    "escn-md": {"energy": 1e-5, "forces": 1e-4},
}


def make_batch(pos, z, batch=None, cell=None, pbc=None):
    from e2f.batch import AtomsBatch

    return AtomsBatch.from_dict({"pos": pos, "z": z, "batch": batch, "cell": cell, "pbc": pbc})


def replace_pos(b, pos):
    return make_batch(pos, b.z, b.batch, getattr(b, "cell", None), getattr(b, "pbc", None))


def random_positions(n: int, seed: int, dtype=torch.float64, spacing: float = 1.1) -> torch.Tensor:
    """``n`` atoms in a compact blob with no pair closer than ~0.8 A."""
    gen = torch.Generator().manual_seed(seed)
    side = math.ceil(n ** (1 / 3))
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    jitter = (torch.rand(n, 3, generator=gen) - 0.5) * 0.4
    return ((grid + jitter) * spacing).to(dtype)


def molecules(sizes=(5, 7), seed: int = 0, dtype=torch.float64):
    """A batch of small molecules (each its own system)."""
    gen = torch.Generator().manual_seed(seed + 100)
    pos, z, batch = [], [], []
    for i, n in enumerate(sizes):
        pos.append(random_positions(n, seed + i, dtype) + 10.0 * i)
        z.append(torch.randint(1, 10, (n,), generator=gen))
        batch.append(torch.full((n,), i, dtype=torch.long))
    return make_batch(torch.cat(pos), torch.cat(z), torch.cat(batch))


def random_rotation(seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def evaluate(model, b, seed: int = 0):
    """(energy, forces) with the global RNG seeded (eSCN-MD draws random edge-frame rolls)."""
    torch.manual_seed(seed)
    return model(b)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fd_forces(model, b, atoms=(0, 1), h: float = 1e-4):
    """Central differences of the energy for a few atoms: ``[len(atoms), 3]``."""
    out = torch.zeros(len(atoms), 3, dtype=b.pos.dtype)
    for a_i, a in enumerate(atoms):
        for k in range(3):
            e = []
            for sgn in (1.0, -1.0):
                pos = b.pos.clone()
                pos[a, k] += sgn * h
                e.append(evaluate(model, replace_pos(b, pos))[0].sum())
            out[a_i, k] = -(e[0] - e[1]) / (2 * h)
    return out
