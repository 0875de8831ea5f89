"""Building blocks: Gaussian radial basis, SO(3)-linear maps, RMSNormSH, gated FFN."""
from __future__ import annotations

import math

import torch
from torch import Tensor

#: Gaussian width in units of the centre spacing (EquiformerV2's ``basis_width_scalar``):
#: neighbouring Gaussians overlap enough for the radial MLP to interpolate smoothly.
RBF_WIDTH_SCALE = 2.0


def rbf_centers_and_gamma(cutoff: float, num_rbf: int) -> tuple[Tensor, float]:
    """Centres ``linspace(0, cutoff, num_rbf)`` and ``gamma = 1 / (2 sigma^2)``.

    ``sigma = RBF_WIDTH_SCALE * cutoff / (num_rbf - 1)``; the basis is
    ``exp(-gamma (d - mu_k)^2)``, the same formula as in ``e2f.attention.core``.
    """
    if num_rbf < 2:
        raise ValueError(f"num_rbf must be >= 2, got {num_rbf}")
    centers = torch.linspace(0.0, cutoff, num_rbf, dtype=torch.float64)
    sigma = RBF_WIDTH_SCALE * cutoff / (num_rbf - 1)
    return centers, 0.5 / sigma**2


class GaussianRBF(torch.nn.Module):
    """``exp(-gamma (d - mu_k)^2)`` on ``num_rbf`` centres over ``[0, cutoff]`` (see above)."""

    def __init__(self, cutoff: float, num_rbf: int):
        super().__init__()
        centers, gamma = rbf_centers_and_gamma(cutoff, num_rbf)
        self.register_buffer("centers", centers.to(torch.get_default_dtype()))
        self.gamma = gamma

    def forward(self, d: Tensor) -> Tensor:
        return torch.exp(-self.gamma * (d[..., None] - self.centers) ** 2)


class SO3Linear(torch.nn.Module):
    """Per-degree linear map of ``[N, (L+1)^2, C_in] -> [N, (L+1)^2, C_out]``; bias on l = 0 only.

    One weight per degree shared over m: commutes with every Wigner-D.
    """

    def __init__(self, lmax: int, c_in: int, c_out: int, bias: bool = True):
        super().__init__()
        self.lmax = lmax
        self.weight = torch.nn.Parameter(torch.randn(lmax + 1, c_in, c_out) / math.sqrt(c_in))
        self.bias = torch.nn.Parameter(torch.zeros(c_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        out = torch.cat([x[:, l * l : (l + 1) ** 2] @ self.weight[l] for l in range(self.lmax + 1)], dim=1)
        if self.bias is not None:
            out = torch.cat([out[:, :1] + self.bias, out[:, 1:]], dim=1)
        return out


class RMSNormSH(torch.nn.Module):
    """EquiformerV2's equivariant RMS norm over spherical-harmonic features.

    The l = 0 part is centred over channels; the RMS runs over (l, m, c) with every degree
    weighted equally (each m of degree l counts ``1 / ((2l+1)(L+1))``); then an affine
    scale per (l, c) and a bias on l = 0.
    """

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.lmax, self.eps = lmax, eps
        self.weight = torch.nn.Parameter(torch.ones(lmax + 1, channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))
        degree = torch.cat([torch.full((2 * l + 1,), l) for l in range(lmax + 1)])
        self.register_buffer("degree", degree, persistent=False)
        balance = torch.cat([torch.full((2 * l + 1,), 1.0 / ((2 * l + 1) * (lmax + 1))) for l in range(lmax + 1)])
        self.register_buffer("balance", balance.to(torch.get_default_dtype()), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        l0 = x[:, :1] - x[:, :1].mean(dim=2, keepdim=True)
        x = torch.cat([l0, x[:, 1:]], dim=1)
        ms = torch.einsum("nrc,r->nc", x * x, self.balance.to(x.dtype)).mean(dim=1)
        x = x * torch.rsqrt(ms + self.eps)[:, None, None] * self.weight[self.degree]
        return torch.cat([x[:, :1] + self.bias, x[:, 1:]], dim=1)


class GatedFFN(torch.nn.Module):
    """SO3-linear, gate (SiLU on l = 0; sigmoid gates from the input's l = 0 for l > 0), SO3-linear."""

    def __init__(self, lmax: int, channels: int, hidden: int):
        super().__init__()
        self.lmax, self.hidden = lmax, hidden
        self.lin1 = SO3Linear(lmax, channels, hidden)
        self.gates = torch.nn.Linear(channels, lmax * hidden)
        self.lin2 = SO3Linear(lmax, hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin1(x)
        gates = torch.sigmoid(self.gates(x[:, 0])).reshape(-1, self.lmax, self.hidden)
        parts = [torch.nn.functional.silu(h[:, :1])]
        for l in range(1, self.lmax + 1):
            parts.append(h[:, l * l : (l + 1) ** 2] * gates[:, l - 1, None])
        return self.lin2(torch.cat(parts, dim=1))


class ScalarMLP(torch.nn.Sequential):
    """``Linear -> SiLU -> Linear``."""

    def __init__(self, c_in: int, hidden: int, c_out: int):
        super().__init__(torch.nn.Linear(c_in, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, c_out))
