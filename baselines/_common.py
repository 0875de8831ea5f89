"""Pieces shared by the baseline wrappers: the energy head, forces by autograd, FLOP helpers."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class ScalarEnergyHead(nn.Module):
    """Per-atom MLP on the l = 0 channels, summed per system (METHOD.md section 5).

    ``Linear(C, H) -> SiLU -> Linear(H, 1)``; the same head on every per-edge baseline so
    that only the interaction layers differ.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, scalars: Tensor, batch: Tensor, num_systems: int) -> Tensor:
        per_atom = self.net(scalars).squeeze(-1)
        return torch.zeros(num_systems, dtype=per_atom.dtype, device=per_atom.device).index_add(0, batch, per_atom)

    def flops(self, n_atoms: int) -> float:
        """Matmul FLOPs: ``2 N (C H + H)``."""
        lin1, lin2 = self.net[0], self.net[2]
        return 2.0 * n_atoms * (lin1.in_features * lin1.out_features + lin2.in_features * lin2.out_features)


def positions_for_grad(pos: Tensor) -> Tensor:
    """``pos`` itself if it already requires grad (so callers can differentiate further), else a leaf that does."""
    if pos.requires_grad:
        return pos
    return pos.detach().requires_grad_(True)


def conservative_forces(energy: Tensor, pos: Tensor, create_graph: bool) -> Tensor:
    """``-dE/dpos`` of the summed energy; ``create_graph`` for force training (double backward)."""
    (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph, allow_unused=True)
    if grad is None:  # no atom has a neighbour and the head sees no position
        grad = torch.zeros_like(pos)
    return -grad


def linear_flops(rows: int, layer: nn.Linear) -> float:
    """``2 * rows * in * out``: the matmul FLOPs of ``layer`` on ``rows`` inputs (bias not counted)."""
    return 2.0 * rows * layer.in_features * layer.out_features


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
