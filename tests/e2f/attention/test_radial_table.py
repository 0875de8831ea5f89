"""The radial table of the fused kernels' logits and edge passes interpolates the exact basis.

``function.radial_table`` samples ``rbf(d) @ w_radial`` and ``h`` times its derivative on a
uniform grid; the kernels (``kernels._radial_from_table``) evaluate its cubic Hermite
interpolation. Here the same formula in float64 PyTorch is compared with the exact Gaussians,
for the suites' basis and for a small one like the CPU tests'.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from e2f.attention.triton import function as F  # noqa: E402
from e2f.nn import rbf_centers_and_gamma  # noqa: E402


def _exact(d, centers, gamma, w):
    return torch.exp(-gamma * (d[:, None] - centers[None, :]) ** 2) @ w


def _hermite(d, table, inv_h):
    """``kernels._radial_from_table``'s formula: value and ``h`` times the derivative at the two
    grid points around each ``d``."""
    nt = table.shape[0] - 1
    x = torch.clamp(d * inv_h, max=float(nt))
    i = torch.clamp(x.floor().long(), max=nt - 1)
    t = (x - i)[:, None]
    t2, t3 = t * t, t * t * t
    return ((2 * t3 - 3 * t2 + 1) * table[i, 0] + (t3 - 2 * t2 + t) * table[i, 1]
            + (3 * t2 - 2 * t3) * table[i + 1, 0] + (t3 - t2) * table[i + 1, 1])


@pytest.mark.parametrize("cutoff, num_rbf, g", [(5.0, 256, 128), (3.0, 7, 10), (6.0, 64, 32)])
def test_table_interpolates_the_exact_basis(cutoff, num_rbf, g):
    gen = torch.Generator().manual_seed(num_rbf)
    centers, gamma = rbf_centers_and_gamma(cutoff, num_rbf)
    w = torch.randn(num_rbf, g, generator=gen, dtype=torch.float64) * 4.0 / math.sqrt(num_rbf)
    table, inv_h = F.radial_table(centers, w, gamma, cutoff)
    assert table.dtype == torch.float32 and table.shape == (F.radial_intervals(gamma, cutoff) + 1, 2, g)
    d = torch.cat([torch.rand(20000, generator=gen, dtype=torch.float64) * cutoff,
                   torch.tensor([0.0, cutoff * (1 - 1e-12), cutoff], dtype=torch.float64)])
    exact = _exact(d, centers, gamma, w)
    got = _hermite(d, table.double(), inv_h)
    # float32 table entries (6e-8) plus the interpolation (~1e-7 at 16 points a basis width)
    assert float((got - exact).abs().max() / exact.abs().max()) < 5e-7


def test_table_size_follows_the_basis_width():
    centers, gamma = rbf_centers_and_gamma(5.0, 256)
    sigma = math.sqrt(0.5 / gamma)
    assert F.radial_intervals(gamma, 5.0) == math.ceil(F.RADIAL_POINTS_PER_SIGMA * 5.0 / sigma)
    assert F.radial_intervals(0.0, 5.0) == 16  # a constant basis
    table, _ = F.radial_table(torch.zeros(3, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64), 0.0, 5.0)
    assert torch.equal(table[:, 0], torch.full((17, 2), 3.0)) and torch.equal(table[:, 1], torch.zeros(17, 2))


def test_too_narrow_a_basis_is_refused():
    from e2f.attention.core import CoreInputs

    n, h, g, r = 2, 1, 2, 3
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    zeros = lambda *shape: torch.zeros(*shape, device=dev)  # noqa: E731
    inp = CoreInputs(pos_dst=zeros(n, 3), pos_src=zeros(n, 3) + 1, nbr=torch.tensor([[1], [0]], device=dev),
                     q=zeros(n, h, 2), k=zeros(n, h, 2), v=zeros(n, h, 2), gate_dst=zeros(n, g),
                     gate_src=zeros(n, g), rbf_centers=zeros(r), w_radial=zeros(r, g), w_out=zeros(g, 2 * h),
                     b_out=zeros(2 * h), rbf_gamma=1e9, cutoff=5.0, eps=1e-3)
    with pytest.raises(ValueError, match="too narrow"):
        F.check(inp)
