import pytest
import torch

from e2f import so3


@pytest.mark.parametrize("l", range(7))
def test_wigner_d_closed_form_matches_matrix_exponentials(l):
    # The slow, obviously-right twin: e3nn's definition, three matrix exponentials.
    gen = torch.Generator().manual_seed(l)
    alpha, beta, gamma = (torch.rand(40, generator=gen, dtype=torch.float64) * 20 - 10 for _ in range(3))
    j = so3._so3_generators(l)
    rot_y = lambda a: torch.matrix_exp(a[:, None, None] * j[1])  # noqa: E731
    expected = rot_y(alpha) @ torch.matrix_exp(beta[:, None, None] * j[0])
    torch.testing.assert_close(so3.wigner_d(l, alpha, beta), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(so3.wigner_d(l, alpha, beta, gamma), expected @ rot_y(gamma), rtol=0, atol=1e-12)
    # float32 angles are evaluated in float64 too
    torch.testing.assert_close(so3.wigner_d(l, alpha.float(), beta.float()), so3.wigner_d(l, alpha.float().double(), beta.float().double()))
