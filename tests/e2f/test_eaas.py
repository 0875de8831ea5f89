import pytest
import torch

from e2f.eaas import dense_cg_moments, dense_cg_product, eaas_adjoint, eaas_product, eaas_table
from e2f.so3 import PolarFrames, spherical_harmonics, wigner_d_from_matrix
from e2f.testing import assert_close_rel


def _vectors(n, gen):
    r = torch.randn(n, 3, generator=gen, dtype=torch.float64) * 3
    r[0] = 0.0  # the origin
    r[1] = torch.tensor([0.0, 2.0, 0.0])  # north pole
    r[2] = torch.tensor([0.0, -1.5, 0.0])  # south pole
    r[3] = torch.tensor([1e-9, 1.0, -1e-9])  # next to a pole
    return r


@pytest.mark.parametrize("lmax", [1, 2, 3, 4, 5, 6])
def test_eaas_equals_dense_cg_every_path(lmax):
    gen = torch.Generator().manual_seed(lmax)
    table = eaas_table(lmax)
    v = torch.randn(9, (lmax + 1) ** 2, 4, generator=gen, dtype=torch.float64)
    r = _vectors(9, gen)
    fast, dense = eaas_product(v, r, lmax), dense_cg_product(v, r, lmax)
    row = 0
    for l1, l3 in table.paths:
        rows = slice(row, row + 2 * l3 + 1)
        assert_close_rel(fast[:, rows], dense[:, rows], 1e-12, f"path ({l1},1,{l3})")
        row = rows.stop
    g = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
    adjoint_dense = torch.einsum("noc,oia,na->nic", g, table.dense, r)
    assert_close_rel(eaas_adjoint(g, r, lmax), adjoint_dense, 1e-12, "adjoint")
    assert torch.all(fast[0] == 0)


@pytest.mark.parametrize("lmax", [1, 2, 4])
def test_dense_cg_of_moments_is_the_sum_of_products(lmax):
    gen = torch.Generator().manual_seed(10 + lmax)
    v = torch.randn(2, 5, (lmax + 1) ** 2, 3, generator=gen, dtype=torch.float64)
    r = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    w = torch.rand(2, 5, 1, 1, generator=gen, dtype=torch.float64)
    summed = (w * dense_cg_product(v.flatten(0, 1), r.flatten(0, 1), lmax).unflatten(0, (2, 5))).sum(1)
    moments = torch.einsum("nj,nja,njic->naic", w[..., 0, 0], r, v)
    assert_close_rel(dense_cg_moments(moments, lmax), summed, 1e-12)


def test_table_structure_lmax2():
    table = eaas_table(2)
    assert table.paths == ((1, 0), (0, 1), (1, 1), (2, 1), (1, 2), (2, 2))
    assert table.rows_out == 20
    # Odd paths (l1 + 1 + l3 odd) read m -> -m and have m3 = 0 zero; even paths copy m.
    row = 0
    for l1, l3 in table.paths:
        for m3 in range(-l3, l3 + 1):
            c = float(table.coef[row + l3 + m3])
            src = int(table.source_row[row + l3 + m3]) - l1 * l1 - l1
            if abs(m3) > l1 or ((l1 + l3) % 2 == 0 and m3 == 0):
                assert c == 0.0
            elif (l1 + 1 + l3) % 2 == 0:
                assert src == m3 and c != 0.0
            else:
                assert src == -m3 and c != 0.0
        row += 2 * l3 + 1


def test_dense_cg_matches_e3nn_tensor_product_with_solid_harmonic():
    """The dense twin itself is e3nn's component-normalised CG product with R^1 = sqrt(3) r."""
    from e3nn import o3

    gen = torch.Generator().manual_seed(7)
    v = torch.randn(5, 9, 1, generator=gen, dtype=torch.float64)
    r = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    sh1 = spherical_harmonics(1, r, normalize=False)[:, 1:]
    out = dense_cg_product(v, r, 2)[..., 0]
    row = 0
    for l1, l3 in eaas_table(2).paths:
        w = o3.wigner_3j(l1, 1, l3, dtype=torch.float64) * (2 * l3 + 1) ** 0.5
        expected = torch.einsum("iaj,ni,na->nj", w, v[:, l1 * l1 : (l1 + 1) ** 2, 0], sh1)
        assert_close_rel(out[:, row : row + 2 * l3 + 1], expected, 1e-13, f"path ({l1},{l3})")
        row += 2 * l3 + 1


def test_equivariance_and_frames():
    gen = torch.Generator().manual_seed(3)
    rot = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0]
    rot = rot * torch.linalg.det(rot)
    v = torch.randn(6, 9, 2, generator=gen, dtype=torch.float64)
    r = _vectors(6, gen)
    d_in = wigner_d_from_matrix(2, rot)
    out = eaas_product(v, r, 2)
    rotated = eaas_product(torch.einsum("ij,njc->nic", d_in, v), r @ rot.T, 2)
    table = eaas_table(2)
    d_out = torch.block_diag(*[wigner_d_from_matrix(l3, rot)[l3 * l3 :, l3 * l3 :] for l3 in table.out_degrees])
    assert_close_rel(rotated, torch.einsum("ij,njc->nic", d_out, out), 1e-12, "equivariance")
    frames = PolarFrames.from_vectors(r, 2)
    y = torch.einsum("nij,nj->ni", frames.blocks[1], r)
    assert_close_rel(y, torch.stack([torch.zeros(6), r.norm(dim=1), torch.zeros(6)], 1).double(), 1e-14, "r -> |r| y")


def test_gradients_polynomial_at_origin_and_poles():
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(6, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    r = _vectors(6, gen).requires_grad_(True)
    fast, dense = eaas_product(v, r, 2), dense_cg_product(v, r, 2)
    w = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
    g_fast = torch.autograd.grad((fast * w).sum(), [v, r], create_graph=True)
    g_dense = torch.autograd.grad((dense * w).sum(), [v, r], create_graph=True)
    for name, a, b in zip("vr", g_fast, g_dense):
        assert_close_rel(a, b, 1e-12, f"d/d{name}")
    h_fast = torch.autograd.grad(sum((g**2).sum() for g in g_fast), [v, r])
    h_dense = torch.autograd.grad(sum((g**2).sum() for g in g_dense), [v, r])
    for name, a, b in zip("vr", h_fast, h_dense):
        assert_close_rel(a, b, 1e-12, f"d2/d{name}")


def test_lmax_zero_rejected():
    with pytest.raises(ValueError):
        eaas_table(0)
