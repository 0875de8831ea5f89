"""Building blocks: Gaussian radial basis, SO(3)-linear maps, RMSNormSH, gated FFN."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from e2f.so3 import degree_of_rows

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
        self.register_buffer("degree", degree_of_rows(lmax), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return so3_linear(x, [self])


def so3_linear(x: Tensor, linears: list[SO3Linear]) -> Tensor:
    """Several :class:`SO3Linear` (same L and C_in) of one input ``x [N, (L+1)^2, C_in]`` as one batched matmul.

    Each row is multiplied by its degree's weight (the weights of ``linears`` side by side),
    with the rows as the batch: a handful of launches for any L and any number of maps,
    the same FLOPs as one matmul per degree and map.

    Returns
    -------
    Tensor
        ``[N, (L+1)^2, sum C_out]``, the outputs side by side in the order of ``linears``
        (a transposed view of a contiguous ``[(L+1)^2, N, sum C_out]``).
    """
    lmax = linears[0].lmax
    rows = (lmax + 1) ** 2
    weight = torch.cat([lin.weight for lin in linears], dim=2) if len(linears) > 1 else linears[0].weight
    rows_weight = weight[linears[0].degree]
    total, start = weight.shape[2], 0
    bias = None
    for lin in linears:
        width = lin.weight.shape[2]
        if lin.bias is not None:
            # [rows, 1, total]: this map's bias on row 0, zero on l > 0 and for the other maps.
            b = F.pad(lin.bias.view(1, 1, width), (start, total - start - width, 0, 0, 0, rows - 1))
            bias = b if bias is None else bias + b
        start += width
    xt = x.transpose(0, 1)
    out = torch.bmm(xt, rows_weight) if bias is None else torch.baddbmm(bias, xt, rows_weight)
    return out.transpose(0, 1)


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
        self.register_buffer("degree", degree_of_rows(lmax), persistent=False)
        balance = torch.cat([torch.full((2 * l + 1,), 1.0 / ((2 * l + 1) * (lmax + 1))) for l in range(lmax + 1)])
        # The degree balance and the mean over channels as one weight per (row, channel):
        # the mean square is then one matrix-vector product.
        per_entry = (balance[:, None] / channels).expand(-1, channels).reshape(-1)
        self.register_buffer("balance", per_entry.to(torch.get_default_dtype()), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[1]
        x = x - F.pad(x[:, :1].mean(dim=2, keepdim=True), (0, 0, 0, rows - 1))
        ms = torch.mv((x * x).reshape(x.shape[0], -1), self.balance.to(x.dtype))
        scaled = x * torch.rsqrt(ms + self.eps)[:, None, None]
        return torch.addcmul(F.pad(self.bias[None], (0, 0, 0, rows - 1)), scaled, self.weight[self.degree])


class GatedFFN(torch.nn.Module):
    """SO3-linear, gate (SiLU on l = 0; sigmoid gates from the input's l = 0 for l > 0), SO3-linear."""

    def __init__(self, lmax: int, channels: int, hidden: int):
        super().__init__()
        self.lmax, self.hidden = lmax, hidden
        self.lin1 = SO3Linear(lmax, channels, hidden)
        self.gates = torch.nn.Linear(channels, lmax * hidden)
        self.lin2 = SO3Linear(lmax, hidden, channels)
        # Gate of each row l > 0: index l - 1 of the gate layer's degrees.
        self.register_buffer("gate_of_row", degree_of_rows(lmax)[1:] - 1, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin1(x)
        gates = torch.sigmoid(self.gates(x[:, 0])).reshape(-1, self.lmax, self.hidden)
        scalar, rest = h.split([1, h.shape[1] - 1], dim=1)
        gated = torch.cat([F.silu(scalar), rest * gates[:, self.gate_of_row]], dim=1)
        return self.lin2(gated)


class ScalarMLP(torch.nn.Sequential):
    """``Linear -> SiLU -> Linear``."""

    def __init__(self, c_in: int, hidden: int, c_out: int):
        super().__init__(torch.nn.Linear(c_in, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, c_out))
