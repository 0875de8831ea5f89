"""The batched building blocks against per-degree twins (fp64, random inputs)."""
import pytest
import torch

from e2f.nn import GatedFFN, RMSNormSH, SO3Linear, so3_linear
from e2f.testing import assert_close_rel


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _randomise(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _so3_linear_twin(x, lin):
    out = torch.cat([x[:, l * l : (l + 1) ** 2] @ lin.weight[l] for l in range(lin.lmax + 1)], dim=1)
    if lin.bias is not None:
        out = torch.cat([out[:, :1] + lin.bias, out[:, 1:]], dim=1)
    return out


@pytest.mark.parametrize("lmax", [1, 2, 4])
def test_so3_linear_matches_per_degree_matmuls(lmax):
    x = _rand(7, (lmax + 1) ** 2, 5)
    linears = [_randomise(SO3Linear(lmax, 5, c, bias=b).double(), seed=i) for i, (c, b) in enumerate([(3, False), (6, True), (4, False), (2, True)])]
    fused = so3_linear(x, linears).split([lin.weight.shape[2] for lin in linears], dim=2)
    for lin, out in zip(linears, fused):
        assert_close_rel(out, _so3_linear_twin(x, lin), 1e-14, "fused")
        assert_close_rel(lin(x), _so3_linear_twin(x, lin), 1e-14, "single")


@pytest.mark.parametrize("lmax", [1, 2, 4])
def test_rms_norm_matches_per_degree_formula(lmax):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the degree balance buffer is built in the default dtype
    try:
        norm = _randomise(RMSNormSH(lmax, 6))
    finally:
        torch.set_default_dtype(previous)
    x = _rand(5, (lmax + 1) ** 2, 6)
    l0 = x[:, :1] - x[:, :1].mean(dim=2, keepdim=True)
    centred = torch.cat([l0, x[:, 1:]], dim=1)
    ms = sum(centred[:, l * l : (l + 1) ** 2].square().mean(dim=(1, 2)) for l in range(lmax + 1)) / (lmax + 1)
    expected = torch.cat(
        [centred[:, l * l : (l + 1) ** 2] * torch.rsqrt(ms + norm.eps)[:, None, None] * norm.weight[l] for l in range(lmax + 1)], dim=1
    )
    expected = torch.cat([expected[:, :1] + norm.bias, expected[:, 1:]], dim=1)
    assert_close_rel(norm(x), expected, 1e-13, "RMSNormSH")


@pytest.mark.parametrize("lmax", [1, 2, 4])
def test_gated_ffn_matches_per_degree_gates(lmax):
    ffn = _randomise(GatedFFN(lmax, 4, 3).double())
    x = _rand(6, (lmax + 1) ** 2, 4)
    h = _so3_linear_twin(x, ffn.lin1)
    gates = torch.sigmoid(ffn.gates(x[:, 0])).reshape(-1, lmax, 3)
    parts = [torch.nn.functional.silu(h[:, :1])] + [h[:, l * l : (l + 1) ** 2] * gates[:, l - 1, None] for l in range(1, lmax + 1)]
    assert_close_rel(ffn(x), _so3_linear_twin(torch.cat(parts, dim=1), ffn.lin2), 1e-13, "GatedFFN")
