"""Registry: configs, presets, names, errors; dense-TP's product equals e3nn's TensorProduct."""
from __future__ import annotations

import pytest
import torch

from baselines.dense_tp import DenseCGTensorProduct, from_e3nn, to_e3nn, tp_paths
from baselines.registry import MODEL_NAMES, ModelConfig, build_layer, build_model, default_config, memory_model


def test_presets_and_overrides():
    paper = default_config("paper")
    assert (paper.lmax, paper.channels, paper.num_blocks, paper.num_heads, paper.head_dim) == (2, 256, 4, 128, 8)
    assert (paper.cutoff, paper.max_neighbors, paper.num_rbf) == (5.0, 32, 256)
    assert default_config("escn-md") == paper
    small = default_config("small", lmax=4)
    assert small.lmax == 4 and small.channels == 64
    assert small.ffn_hidden_channels == small.channels


@pytest.mark.parametrize(
    "kwargs",
    [dict(lmax=0), dict(lmax=7), dict(channels=100, num_heads=128), dict(cutoff=-1.0)],
)
def test_bad_configs_raise(kwargs):
    with pytest.raises(ValueError):
        ModelConfig(**kwargs)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("mace", default_config("tiny"))
    with pytest.raises(ValueError, match="unknown model"):
        build_layer("mace", default_config("tiny"))
    with pytest.raises(ValueError, match="unknown preset"):
        default_config("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        default_config("tiny", channel=3)
    assert set(MODEL_NAMES) == {"e2former-v2", "e2former-v2-moments", "e2former-v1", "escn-md", "dense-tp"}


def test_memory_model_is_linear_in_atoms_and_edges():
    cfg = default_config("small")
    for name in ("escn-md", "dense-tp"):
        a = memory_model(name, cfg, 100, 3000)
        b = memory_model(name, cfg, 200, 6000)
        assert b["bytes"] == pytest.approx(2 * a["bytes"])
        assert a["bytes"] == pytest.approx(100 * a["per_atom"] + 3000 * a["per_edge"])


def test_layout_round_trip():
    x = torch.randn(5, 16, 3)
    assert torch.equal(from_e3nn(to_e3nn(x, 3), 3, 3), x)


@pytest.mark.parametrize("lmax", [1, 2, 3])
def test_dense_cg_product_equals_e3nn_tensor_product(lmax):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tp = DenseCGTensorProduct(lmax, 3)
        ref = tp.reference()
        gen = torch.Generator().manual_seed(lmax)
        x = torch.randn(7, tp.irreps_x.dim, generator=gen)
        sh = torch.randn(7, tp.irreps_sh.dim, generator=gen)
        w = torch.randn(7, tp.weight_numel, generator=gen)
        assert ref.weight_numel == tp.weight_numel == len(tp_paths(lmax)) * 3
        assert [ins.path_weight for ins in ref.instructions] == pytest.approx(tp.path_weights)
        torch.testing.assert_close(tp(x, sh, w), ref(x, sh, w), rtol=1e-12, atol=1e-12)
    finally:
        torch.set_default_dtype(previous)
