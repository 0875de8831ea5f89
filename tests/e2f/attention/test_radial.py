"""The radial table every backend interpolates (``e2f.attention.radial``): close to the exact
Gaussians, the fused kernels' formula, smooth in the weights, and what the core computes."""
from __future__ import annotations

import math

import pytest
import torch

from e2f.attention import radial
from e2f.attention.core import attention_core_reference
from e2f.attention.workload import random_core_inputs
from e2f.nn import rbf_centers_and_gamma


def _basis(cutoff, num_rbf, g, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    centers, gamma = rbf_centers_and_gamma(cutoff, num_rbf)
    w = torch.randn(num_rbf, g, generator=gen, dtype=torch.float64) * 4.0 / math.sqrt(num_rbf)
    return centers.to(dtype), w.to(dtype), gamma, gen


@pytest.mark.parametrize("cutoff, num_rbf, g", [(5.0, 256, 16), (3.0, 7, 10)])
def test_interpolant_follows_the_exact_function_and_its_derivative(cutoff, num_rbf, g):
    centers, w, gamma, gen = _basis(cutoff, num_rbf, g, seed=num_rbf)
    table, inv_h = radial.build_table(centers, w, gamma, cutoff)
    assert table.dtype == torch.float64 and table.shape == (radial.radial_intervals(gamma, cutoff) + 1, 2, g)
    d = torch.cat([torch.rand(5000, generator=gen, dtype=torch.float64) * cutoff,
                   torch.tensor([0.0, cutoff], dtype=torch.float64)]).requires_grad_(True)
    got = radial.interpolate(d, table, inv_h)
    diff = d.detach()[:, None] - centers[None, :]
    rbf = torch.exp(-gamma * diff * diff)
    exact, slope = rbf @ w, (rbf * (-2.0 * gamma) * diff) @ w
    assert float((got.detach() - exact).abs().max() / exact.abs().max()) < 1e-6
    # the derivative autograd takes is the interpolant's, within ~2e-5 of the exact one
    probe = torch.randn(g, generator=gen, dtype=torch.float64)
    (dd,) = torch.autograd.grad((got * probe).sum(), d)
    assert float((dd - slope @ probe).abs().max() / (slope @ probe).abs().max()) < 5e-5


def test_table_is_float64_and_smooth_in_the_weights():
    # whatever the weights' dtype, a float64 table (the kernels keep a float32 copy), twice
    # differentiable with respect to the weights, the centres and the distances; the values
    # come back in the distances' dtype
    centers, w, gamma, _ = _basis(4.0, 12, 5, seed=1)
    t32, inv_h = radial.build_table(centers.float(), w.float(), gamma, 4.0)
    grid, h = radial.radial_grid(gamma, 4.0, "cpu")
    assert t32.dtype == torch.float64 and inv_h == 1.0 / h
    assert torch.equal(t32, radial.radial_rows(grid, centers.float().double(), w.float().double(), gamma, h))
    assert radial.interpolate(torch.tensor([1.0, 2.0]), t32, inv_h).dtype == torch.float32
    c, ww = centers[:4].clone().requires_grad_(True), w[:4, :3].clone().requires_grad_(True)
    d = torch.tensor([0.3, 1.7, 2.2, 3.9], dtype=torch.float64, requires_grad=True)
    fn = lambda c, ww, d: radial.interpolate(d, *radial.build_table(c, ww, gamma, 4.0))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (c, ww, d))
    assert torch.autograd.gradgradcheck(fn, (c, ww, d))


def test_interpolation_reads_the_grid_exactly_and_holds_at_its_end():
    centers, w, gamma, _ = _basis(3.0, 7, 4, seed=2)
    table, inv_h = radial.build_table(centers, w, gamma, 3.0)
    nt = table.shape[0] - 1
    points = torch.arange(nt + 1, dtype=torch.float64) / inv_h
    assert torch.allclose(radial.interpolate(points, table, inv_h), table[:, 0], rtol=0, atol=1e-12)
    beyond = radial.interpolate(torch.tensor([3.0, 3.5], dtype=torch.float64), table, inv_h)
    assert torch.allclose(beyond, table[nt, 0].expand(2, -1), rtol=0, atol=1e-12)


def test_core_computes_the_tabulated_function(monkeypatch):
    # the reference's gate reads the table: with the exact Gaussians in its place the output
    # moves, by no more than the interpolation error
    import e2f.attention.core as core

    inp = random_core_inputs(40, num_heads=4, head_dim=4, dv=6, gate_hidden=8, num_rbf=16, seed=3,
                             dtype=torch.float64)
    out = attention_core_reference(inp)

    def exact(d, table, inv_h):
        diff = d[:, None] - inp.rbf_centers[None, :].to(d.dtype)
        return torch.exp(-inp.rbf_gamma * diff * diff) @ inp.w_radial.to(d.dtype)

    monkeypatch.setattr(core, "interpolate", exact)
    err = float((attention_core_reference(inp) - out).abs().max()) / float(out.abs().max())
    assert 0.0 < err < 1e-6, err
