"""Reusable assertions and measurements for tests: closeness, saved bytes, equivariance, forces."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


def max_rel_error(actual: Tensor, expected: Tensor) -> float:
    """``max|actual - expected| / max|expected|`` (absolute when ``expected`` is all zero)."""
    if not expected.numel():
        return 0.0
    scale = float(expected.detach().abs().max()) or 1.0
    return float((actual.detach() - expected.detach()).abs().max()) / scale


def assert_close_rel(actual: Tensor, expected: Tensor, tol: float, what: str = "") -> None:
    """Assert ``max_rel_error(actual, expected) < tol`` with a message naming ``what``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = max_rel_error(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs.

    Counted once per storage (views and repeated saves of one tensor are free), skipping
    the storages of ``exclude`` (typically the inputs, which exist anyway).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    del result
    return sum(seen.values())


def random_rotation(seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """A proper rotation matrix drawn from a seeded generator (QR of a Gaussian matrix)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return (q * torch.linalg.det(q)).to(dtype)


def assert_rotation_translation_equivariant(model, batch, tol: float, seed: int = 0) -> None:
    """Rotating (cell too) and translating the input leaves energies and rotates forces.

    Errors are relative to the largest energy / force magnitude.
    """
    rot = random_rotation(seed, batch.pos.dtype)
    shift = torch.tensor([0.7, -1.3, 2.1], dtype=batch.pos.dtype)
    ref = model(batch)
    moved = batch.replace(pos=batch.pos @ rot.T + shift, cell=batch.cell @ rot.T)
    out = model(moved)
    assert_close_rel(out["energy"], ref["energy"], tol, "energy under rotation + translation")
    assert_close_rel(out["forces"], ref["forces"] @ rot.T, tol, "forces under rotation + translation")
    if "direct_forces" in ref:
        assert_close_rel(out["direct_forces"], ref["direct_forces"] @ rot.T, tol, "direct forces under rotation")


def assert_forces_match_finite_differences(model, batch, tol: float, step: float = 1e-4, atoms=None) -> None:
    """Forces equal ``-dE/dr`` by central differences (relative to the largest force)."""
    forces = model(batch)["forces"].detach()
    atoms = range(batch.num_atoms) if atoms is None else atoms
    fd = torch.zeros_like(forces)
    with torch.no_grad():
        for i in atoms:
            for a in range(3):
                energies = []
                for sign in (1.0, -1.0):
                    pos = batch.pos.detach().clone()
                    pos[i, a] += sign * step
                    energies.append(model(batch.replace(pos=pos), compute_forces=False)["energy"].sum())
                fd[i, a] = -(energies[0] - energies[1]) / (2 * step)
    idx = torch.as_tensor(list(atoms))
    assert_close_rel(forces[idx], fd[idx], tol, "forces vs -dE/dr (central differences)")
