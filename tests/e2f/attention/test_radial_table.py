"""The radial table of the fused kernels interpolates the exact basis, and its gradient is right.

``function.radial_table`` samples ``rbf(d) @ w_radial`` and ``h`` times its derivative on a
uniform grid; the kernels (``kernels._radial_from_table``) evaluate its cubic Hermite
interpolation, the gate backward its derivative (``_radial_slope_dot``) and the gradient of
the interpolant with respect to the table (``bwd_radial_table_kernel``), which
``radial_table_backward`` takes to ``w_radial`` and the centres. Here the same formulas in
float64 PyTorch are compared with the exact Gaussians, for the suites' basis and for a small
one like the CPU tests', and the kernels (the table's build and its gradient) with their
PyTorch twins.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from e2f.attention import radial  # noqa: E402
from e2f.attention.triton import function as F  # noqa: E402
from e2f.nn import rbf_centers_and_gamma  # noqa: E402


def _table(centers, w, gamma, cutoff):
    """``function.radial_table`` on ``DEVICE`` (a kernel), back on the CPU."""
    table, inv_h = F.radial_table(centers.to(DEVICE), w.to(DEVICE), gamma, cutoff)
    return table.cpu(), inv_h


def _exact(d, centers, gamma, w):
    return torch.exp(-gamma * (d[:, None] - centers[None, :]) ** 2) @ w


def _exact_slope(d, centers, gamma, w):
    diff = d[:, None] - centers[None, :]
    return (torch.exp(-gamma * diff * diff) * (-2.0 * gamma) * diff) @ w


def _point(d, nt, inv_h):
    """``kernels._table_point``: grid interval and position in it."""
    x = torch.clamp(d * inv_h, max=float(nt))
    i = torch.clamp(x.floor().long(), max=nt - 1)
    return i, (x - i)[:, None]


def _weights(t):
    """The cubic Hermite weights of the value and ``h``-scaled derivative at the interval's left
    and right grid points."""
    t2, t3 = t * t, t * t * t
    return (2 * t3 - 3 * t2 + 1, t3 - 2 * t2 + t, 3 * t2 - 2 * t3, t3 - t2)


def _hermite(d, table, inv_h):
    """``kernels._radial_from_table``'s formula: value and ``h`` times the derivative at the two
    grid points around each ``d``."""
    i, t = _point(d, table.shape[0] - 1, inv_h)
    a, b, c, e = _weights(t)
    return a * table[i, 0] + b * table[i, 1] + c * table[i + 1, 0] + e * table[i + 1, 1]


def _hermite_slope(d, table, inv_h):
    """``kernels._radial_slope_dot``'s derivative of the interpolant (before the sum with dpre)."""
    i, t = _point(d, table.shape[0] - 1, inv_h)
    t2 = t * t
    return ((6 * t - 6 * t2) * (table[i + 1, 0] - table[i, 0]) + (3 * t2 - 4 * t + 1) * table[i, 1]
            + (3 * t2 - 2 * t) * table[i + 1, 1]) * inv_h


def _table_gradient(d, dpre, nt, inv_h):
    """The twin of ``bwd_radial_table_kernel``: every edge's Hermite weights times its ``dpre``
    added to the four table rows it reads (index_add; ``d`` only of edges inside the cutoff)."""
    i, t = _point(d, nt, inv_h)
    a, b, c, e = _weights(t)
    grad = torch.zeros(nt + 1, 2, dpre.shape[1], dtype=torch.float64)
    for rows, col, weight in ((i, 0, a), (i, 1, b), (i + 1, 0, c), (i + 1, 1, e)):
        grad[:, col].index_add_(0, rows, weight * dpre.double())
    return grad


@pytest.mark.parametrize("cutoff, num_rbf, g", [(5.0, 256, 128), (3.0, 7, 10), (6.0, 64, 32)])
def test_table_interpolates_the_exact_basis(cutoff, num_rbf, g):
    gen = torch.Generator().manual_seed(num_rbf)
    centers, gamma = rbf_centers_and_gamma(cutoff, num_rbf)
    w = torch.randn(num_rbf, g, generator=gen, dtype=torch.float64) * 4.0 / math.sqrt(num_rbf)
    table, inv_h = _table(centers, w, gamma, cutoff)
    assert table.dtype == torch.float32 and table.shape == (radial.radial_intervals(gamma, cutoff) + 1, 2, g)
    d = torch.cat([torch.rand(20000, generator=gen, dtype=torch.float64) * cutoff,
                   torch.tensor([0.0, cutoff * (1 - 1e-12), cutoff], dtype=torch.float64)])
    exact = _exact(d, centers, gamma, w)
    got = _hermite(d, table.double(), inv_h)
    # float32 table entries (6e-8) plus the interpolation (~3e-7 at 12 points a basis width)
    assert float((got - exact).abs().max() / exact.abs().max()) < 1e-6


def test_table_size_follows_the_basis_width():
    centers, gamma = rbf_centers_and_gamma(5.0, 256)
    sigma = math.sqrt(0.5 / gamma)
    assert radial.radial_intervals(gamma, 5.0) == math.ceil(radial.RADIAL_POINTS_PER_SIGMA * 5.0 / sigma)
    assert radial.radial_intervals(0.0, 5.0) == 16  # a constant basis
    table, _ = _table(torch.zeros(3, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64), 0.0, 5.0)
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


@pytest.mark.parametrize("cutoff, num_rbf, g", [(5.0, 256, 128), (3.0, 7, 10)])
def test_slope_of_the_interpolant_follows_the_exact_derivative(cutoff, num_rbf, g):
    # the gate backward's radial part of dL/dd is the exact derivative of the interpolated
    # function (forces of the energy the table defines); it is within ~2e-5 of the exact
    # basis's at 12 points a basis width (the cubic's O(h^3) derivative error and the float32
    # table's rounding over h)
    gen = torch.Generator().manual_seed(7)
    centers, gamma = rbf_centers_and_gamma(cutoff, num_rbf)
    w = torch.randn(num_rbf, g, generator=gen, dtype=torch.float64) * 4.0 / math.sqrt(num_rbf)
    table, inv_h = _table(centers, w, gamma, cutoff)
    d = torch.rand(20000, generator=gen, dtype=torch.float64) * cutoff
    exact = _exact_slope(d, centers, gamma, w)
    got = _hermite_slope(d, table.double(), inv_h)
    assert float((got - exact).abs().max() / exact.abs().max()) < 5e-5
    # and it is the derivative of _hermite (central differences away from grid points)
    step = 1e-7
    fd = (_hermite(d + step, table.double(), inv_h) - _hermite(d - step, table.double(), inv_h)) / (2 * step)
    inner = ((d * inv_h) % 1.0 > 1e-3) & ((d * inv_h) % 1.0 < 1 - 1e-3) & (d + step < cutoff)
    assert torch.allclose(got[inner], fd[inner], rtol=1e-6, atol=1e-6 * float(exact.abs().max()))


def test_table_gradient_gives_the_exact_basis_gradients():
    # the gate backward's weight and centre gradients go through the table: the gradient with
    # respect to the table rows, then radial_table_backward, equal the exact basis's
    gen = torch.Generator().manual_seed(11)
    cutoff, num_rbf, g = 5.0, 64, 16
    centers, gamma = rbf_centers_and_gamma(cutoff, num_rbf)
    centers = centers.double()
    w = torch.randn(num_rbf, g, generator=gen, dtype=torch.float64) / math.sqrt(num_rbf)
    table, inv_h = _table(centers, w, gamma, cutoff)
    d = torch.rand(5000, generator=gen, dtype=torch.float64) * cutoff
    dpre = torch.randn(5000, g, generator=gen, dtype=torch.float64)
    dtable = _table_gradient(d, dpre, table.shape[0] - 1, inv_h)
    dw, dc = (x.cpu() for x in F.radial_table_backward(centers.to(DEVICE), w.to(DEVICE), gamma, cutoff,
                                                        dtable.to(DEVICE)))
    c, ww = centers.clone().requires_grad_(True), w.clone().requires_grad_(True)
    exact_c, exact_w = torch.autograd.grad((_exact(d, c, gamma, ww) * dpre).sum(), (c, ww))
    assert dw.dtype == torch.float32 and dw.shape == w.shape and dc.shape == centers.shape
    assert float((dw.double() - exact_w).norm() / exact_w.norm()) < 1e-6
    assert float((dc.double() - exact_c).norm() / exact_c.norm()) < 1e-5
    with pytest.raises(ValueError, match="grid points"):
        F.radial_table_backward(centers.to(DEVICE), w.to(DEVICE), gamma, cutoff, torch.zeros(3, 2, g, device=DEVICE))


@pytest.mark.parametrize("edges", [0, 1, 300])
def test_table_gradient_kernel_against_its_twin(edges):
    # the kernel against index_add: positions anywhere on the grid, on grid points, at its end
    # (x = NT), outside the cutoff (+inf, no contribution), intervals with more edges than a
    # step, empty intervals; dpre rows strided in a wider stash row; the sum is added to dtable
    gen = torch.Generator().manual_seed(edges)
    nt, g, sw = 20, 10, 23
    x = torch.rand(edges, generator=gen) * nt
    if edges > 1:
        x[:3] = torch.tensor([0.0, float(nt), 7.0])
        x[3:80] = 4.0 + torch.rand(77, generator=gen) * 0.5  # one interval: several steps of edges
        x[-5:] = float("inf")
    gate_edge = torch.randn(edges, sw, generator=gen)
    start = torch.randn(nt + 1, 2, g, generator=gen)
    # a second row (another chunk) sorted in the same call must not change the first's
    rows = torch.stack((x, torch.rand(edges, generator=gen) * nt)).to(DEVICE)
    x_sorted, order, bounds = F._radial_sort(rows, F._radial_marks(nt, DEVICE))
    assert order.dtype == bounds.dtype == torch.int32 and bounds.shape == (2, nt + 1)
    dtable = start.clone().to(DEVICE)
    F._radial_gradient(x_sorted[0], order[0], bounds[0], gate_edge.to(DEVICE), dtable, 16)
    live = torch.isfinite(x)
    twin = start.double() + _table_gradient(x[live].double(), gate_edge[live, :g], nt, 1.0)
    assert torch.allclose(dtable.cpu().double(), twin, rtol=1e-5, atol=1e-5)
    again = start.clone().to(DEVICE)
    F._radial_gradient(*F._radial_sort(x.to(DEVICE), F._radial_marks(nt, DEVICE)), gate_edge.to(DEVICE), again, 16)
    assert torch.equal(again, dtable)  # the same order of sums


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cutoff, num_rbf, g", [(5.0, 256, 128), (4.7, 13, 130), (3.3, 7, 10)])
def test_table_kernel_against_its_twin(cutoff, num_rbf, g, dtype):
    # radial_table_kernel's float64 sums against _radial_rows: fresh weights and centres off
    # the basis's grid, widths and cutoffs that float32 does not hold exactly (the kernel takes
    # gamma and h as float32 pairs), hidden sizes beyond one column block; rounded alike to
    # float32, the two tables differ by at most one float32 step of the largest entry
    gen = torch.Generator().manual_seed(num_rbf + g)
    centers, gamma = rbf_centers_and_gamma(cutoff, num_rbf)
    centers = (centers.double() + 0.1 * torch.rand(num_rbf, generator=gen, dtype=torch.float64)).to(dtype)
    gamma *= 1.0 + 1e-3 * math.pi
    w = (torch.randn(num_rbf, g, generator=gen, dtype=torch.float64) * 4.0 / math.sqrt(num_rbf)).to(dtype)
    table, inv_h = _table(centers, w, gamma, cutoff)
    grid, h = radial.radial_grid(gamma, cutoff, "cpu")
    twin = radial.radial_rows(grid, centers.double(), w.double(), gamma, h)
    assert table.dtype == torch.float32 and table.shape == twin.shape and inv_h == 1.0 / h
    scale = float(twin.abs().max())
    assert float((table.double() - twin).abs().max()) <= scale * 2.0 ** -23


def test_float_pair_carries_a_float64_scalar():
    for x in (math.pi, 1.0 / 3.0, 5.0 / 3061, 163.84, 1e-9):
        hi, lo = F._float_pair(x)
        assert hi == float(torch.tensor(hi, dtype=torch.float32)) and lo == float(torch.tensor(lo, dtype=torch.float32))
        assert abs((hi + lo) - x) <= 1e-14 * abs(x)


@pytest.mark.parametrize("cutoff, num_rbf, g", [(5.0, 256, 128), (4.7, 13, 130), (3.3, 7, 10)])
def test_table_gradient_kernel_against_autograd(cutoff, num_rbf, g):
    # radial_table_backward_kernel against autograd through radial.build_table: fresh centres
    # off the basis's grid, a width float32 does not hold, basis and hidden sizes off the
    # kernel's blocks, a float32 table gradient (the backward's) and a float64 one; any number
    # of blocks of grid points (a memory budget) gives the same sums, and two runs are identical
    gen = torch.Generator().manual_seed(num_rbf * g)
    centers, gamma = rbf_centers_and_gamma(cutoff, num_rbf)
    centers = centers.double() + 0.1 * torch.rand(num_rbf, generator=gen, dtype=torch.float64)
    gamma *= 1.0 + 1e-3 * math.pi
    w = torch.randn(num_rbf, g, generator=gen, dtype=torch.float64) / math.sqrt(num_rbf)
    centers, w = centers.float().double(), w.float().double()  # the kernel's inputs are float32
    points = radial.radial_intervals(gamma, cutoff) + 1
    for dtype in (torch.float32, torch.float64):
        dtable = torch.randn(points, 2, g, generator=gen, dtype=dtype)
        c, ww = centers.clone().requires_grad_(True), w.clone().requires_grad_(True)
        table, _ = radial.build_table(c, ww, gamma, cutoff)
        twin_c, twin_w = torch.autograd.grad((table * dtable.double()).sum(), (c, ww))
        dev = lambda x: x.float().to(DEVICE)  # noqa: E731
        runs = [F.radial_table_backward(dev(centers), dev(w), gamma, cutoff, dtable.to(DEVICE), max_bytes=budget)
                for budget in (None, None, 2 * num_rbf * g * 8)]
        assert F.last_config()["radial_table_backward"]["parts"] <= 2
        dw, dc = runs[0]
        assert dw.dtype == torch.float32 and dw.shape == w.shape and dc.shape == centers.shape
        assert float((dw.cpu().double() - twin_w).norm() / twin_w.norm()) < 1e-6
        assert float((dc.cpu().double() - twin_c).norm() / twin_c.norm()) < 1e-6
        assert torch.equal(runs[1][0], dw) and torch.equal(runs[1][1], dc)
        assert torch.allclose(runs[2][0], dw, rtol=1e-6, atol=1e-7 * float(dw.abs().max()))
        assert torch.allclose(runs[2][1], dc, rtol=1e-6, atol=1e-7 * float(dc.abs().max()))


@pytest.mark.skipif(DEVICE != "cuda", reason="peak bytes are measured on a GPU")
def test_table_and_its_gradient_allocate_only_their_outputs_and_partial_sums():
    # the build allocates its table and nothing else; the gradient its float64 partial sums
    # (as many blocks as ``max_bytes`` holds), their float64 total and its two outputs
    centers, gamma = rbf_centers_and_gamma(5.0, 256)
    centers = centers.float().to(DEVICE)
    w = torch.randn(256, 128, device=DEVICE)
    points = radial.radial_intervals(gamma, 5.0) + 1
    table, _ = F.radial_table(centers, w, gamma, 5.0)
    dtable = torch.randn_like(table)
    budget = 3 * 256 * 128 * 8
    outputs = (256 * 128 + 256) * 4
    for run, limit in ((lambda: F.radial_table(centers, w, gamma, 5.0), points * 2 * 128 * 4),
                       (lambda: F.radial_table_backward(centers, w, gamma, 5.0, dtable, max_bytes=budget),
                        budget + 256 * 128 * 8 + outputs + (1 << 16))):
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        assert peak <= limit, (peak, limit)
