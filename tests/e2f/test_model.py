import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from e2f.batch import AtomsBatch
from e2f.calculator import E2FCalculator
from e2f.config import get_config
from e2f.model import E2FormerV2
from e2f.testing import (
    assert_close_rel,
    assert_forces_match_finite_differences,
    assert_rotation_translation_equivariant,
)

F64 = torch.float64


def _model(dtype=F64, seed=0, **overrides):
    torch.manual_seed(seed)
    return E2FormerV2(get_config("tiny", **overrides)).to(dtype).eval()


def _molecules(dtype=F64):
    rng = np.random.default_rng(0)
    a = molecule("CH3CH2OH")
    b = Atoms("NCO3", positions=rng.normal(size=(5, 3)) * 1.3)
    b.info.update(charge=-1, spin=2)
    return AtomsBatch.from_ase([a, b, molecule("H2O")], dtype=dtype)


def _cell(dtype=F64):
    atoms = bulk("NaCl", "rocksalt", a=4.0) * (1, 1, 2)
    atoms.rattle(0.1, seed=2)
    return AtomsBatch.from_ase([atoms], dtype=dtype)


def test_equivariance_molecules_fp64():
    assert_rotation_translation_equivariant(_model(direct_forces=True), _molecules(), 1e-9)


def test_equivariance_periodic_fp64():
    assert_rotation_translation_equivariant(_model(), _cell(), 1e-9)


def test_equivariance_fp32():
    assert_rotation_translation_equivariant(_model(torch.float32), _molecules(torch.float32), 1e-5)


def test_wrapping_by_lattice_vector_keeps_energy():
    model, batch = _model(), _cell()
    pos = batch.pos.clone()
    pos[1] += batch.cell[0, 0] - 2 * batch.cell[0, 2]
    ref, out = model(batch), model(batch.replace(pos=pos))
    assert_close_rel(out["energy"], ref["energy"], 1e-10, "energy after wrapping")
    assert_close_rel(out["forces"], ref["forces"], 1e-9, "forces after wrapping")


def test_permutation():
    model = _model()
    batch = _molecules()
    perm = torch.cat([torch.randperm(9, generator=torch.Generator().manual_seed(1)), 9 + torch.tensor([4, 2, 0, 1, 3]),
                      torch.tensor([16, 15, 14])])
    ref = model(batch)
    out = model(batch.replace(pos=batch.pos[perm], z=batch.z[perm]))
    assert_close_rel(out["energy"], ref["energy"], 1e-12, "energy")
    assert_close_rel(out["forces"], ref["forces"][perm], 1e-10, "forces")


def test_forces_finite_differences_ch4_and_pole():
    model = _model()
    ch4 = AtomsBatch.from_ase([molecule("CH4")], dtype=F64)
    assert torch.allclose(ch4.pos.mean(0), ch4.pos[0], atol=1e-12)  # carbon at the centroid
    assert_forces_match_finite_differences(model, ch4, 1e-6, atoms=[0, 2])
    # After centring, atom 0 sits exactly on the polar (y) axis.
    pole = Atoms("OHH", positions=[[0, 1.2, 0], [1.0, -0.6, 0.3], [-1.0, -0.6, -0.3]])
    assert_forces_match_finite_differences(model, AtomsBatch.from_ase([pole], dtype=F64), 1e-6, atoms=[0, 1])


def test_forces_finite_differences_periodic_materialized():
    model = _model(backend="materialized")
    assert_forces_match_finite_differences(model, _cell(), 1e-6, atoms=[3])


def test_forces_finite_differences_moments():
    model = _model(node_product="moments")
    assert_forces_match_finite_differences(model, AtomsBatch.from_ase([molecule("CH4")], dtype=F64), 1e-6, atoms=[0, 2])
    assert_forces_match_finite_differences(model, _cell(), 1e-6, atoms=[3])


def test_smooth_across_cutoff():
    model = _model()
    cutoff = model.config.cutoff

    def energy_force(d):
        atoms = Atoms("CO", positions=[[0, 0, 0], [d, 0.0, 0]])
        out = model(AtomsBatch.from_ase([atoms], dtype=F64))
        return float(out["energy"].detach()), float(out["forces"][1, 0])

    isolated, zero = energy_force(cutoff + 0.5)
    assert zero == 0.0
    assert energy_force(cutoff) == (isolated, 0.0) and energy_force(cutoff + 1e-9) == (isolated, 0.0)
    # The envelope vanishes with two derivatives at the cutoff: halving the gap divides the
    # energy change by at least ~8 (order 3) and the force by at least ~4 (order 2).
    near = [energy_force(cutoff - delta) for delta in (2e-2, 1e-2)]
    gaps = [e - isolated for e, _ in near]
    forces = [f for _, f in near]
    assert gaps[0] != 0.0 and forces[0] != 0.0
    assert abs(gaps[0] / gaps[1]) > 7.0 and abs(forces[0] / forces[1]) > 3.5, (gaps, forces)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"nan": True}, "NaN"),
        ({"coincident": True}, "coincide"),
        ({"z": 0}, "unknown atomic numbers"),
        ({"z": 150}, "unknown atomic numbers"),
    ],
)
def test_bad_inputs(changes, match):
    model = _model()
    batch = _molecules()
    pos, z = batch.pos.clone(), batch.z.clone()
    if "nan" in changes:
        pos[3, 1] = float("nan")
    if "coincident" in changes:
        pos[4] = pos[2]
    if "z" in changes:
        z[5] = changes["z"]
    with pytest.raises(ValueError, match=match):
        model(batch.replace(pos=pos, z=z))


def test_empty_batches_and_charge_range():
    model = _model()
    with pytest.raises(ValueError, match="empty"):
        AtomsBatch.from_ase([])
    with pytest.raises(ValueError, match="empty"):
        model(AtomsBatch.from_dict({"pos": torch.zeros(0, 3, dtype=F64), "z": torch.zeros(0, dtype=torch.long)}))
    batch = _molecules()
    with pytest.raises(ValueError, match="charge"):
        model(batch.replace(charge=torch.tensor([0, 50, 0])))


def test_backends_node_products_and_spatial_order_agree():
    """chunked == materialized, EAAS == dense CG (V2 == v1 nodes), Morton order is invisible."""
    for batch, ref_overrides, overrides in (
        (_molecules(), {"backend": "materialized", "node_product": "dense-cg"}, {"spatial_order": True}),
        (_cell(), {"backend": "materialized"}, {"node_product": "dense-cg", "spatial_order": True}),
        (_molecules(), {}, {"node_product": "moments"}),
        (_cell(), {"backend": "materialized"}, {"node_product": "moments"}),
    ):
        ref, out = _model(**ref_overrides)(batch), _model(**overrides)(batch)
        assert_close_rel(out["energy"], ref["energy"], 1e-10, f"energy {overrides}")
        assert_close_rel(out["forces"], ref["forces"], 1e-10, f"forces {overrides}")


def test_force_training_double_backward():
    model = _model().train()
    batch = _molecules()
    out = model(batch)
    loss = out["energy"].square().sum() + out["forces"].square().sum()
    loss.backward()
    grads = [p.grad for p in model.blocks[0].attn.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.w_radial.grad.abs().sum() > 0


def test_checkpointed_blocks_same_function_less_saved_memory():
    from e2f.testing import saved_tensor_bytes

    batch = _molecules()
    plain, ckpt = _model().train(), _model(checkpoint_blocks=True).train()
    grads = []
    for model in (plain, ckpt):
        out = model(batch)
        (out["energy"].square().sum() + out["forces"].square().sum()).backward()
        grads.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = grads
    assert_close_rel(b["energy"], a["energy"], 1e-12, "energy")
    assert_close_rel(b["forces"], a["forces"], 1e-12, "forces")
    assert len(ga) == len(gb) and all(torch.allclose(x, y, rtol=1e-9, atol=1e-12) for x, y in zip(ga, gb))

    def saved(model):
        pos = batch.pos.detach().requires_grad_(True)
        b2 = batch.replace(pos=pos)
        exclude = [pos, *model.parameters(), *model.buffers()]
        return saved_tensor_bytes(lambda: model(b2, compute_forces=False)["energy"], exclude=exclude)

    assert saved(ckpt) < 0.5 * saved(plain)


def test_from_dict_matches_from_ase():
    atoms = [molecule("H2O"), molecule("NH3")]
    ref = AtomsBatch.from_ase(atoms, dtype=F64)
    data = {"pos": ref.pos, "atomic_numbers": ref.z, "batch": ref.batch}
    out = AtomsBatch.from_dict(data)
    model = _model()
    assert_close_rel(model(out)["energy"], model(ref)["energy"], 1e-14, "energy")


def test_calculator():
    model = _model()
    atoms = molecule("CH3OH")
    atoms.calc = E2FCalculator(model)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    ref = model(AtomsBatch.from_ase([atoms], dtype=F64))
    assert energy == pytest.approx(float(ref["energy"].detach()[0]), rel=1e-12)
    np.testing.assert_allclose(forces, ref["forces"].detach().numpy(), rtol=1e-10, atol=1e-12)


def test_model_saved_bytes_per_atom_flat_in_n():
    """Whole-model activation memory is linear in N (edge embedding and core recompute)."""
    from e2f.testing import saved_tensor_bytes

    model = _model(torch.float32)
    per_atom = []
    for n in (150, 600):
        gen = torch.Generator().manual_seed(n)
        pos = (torch.rand(n, 3, generator=gen) * (n / 0.1) ** (1 / 3)).requires_grad_(True)
        batch = AtomsBatch.from_dict({"pos": pos, "z": torch.randint(1, 9, (n,), generator=gen)}).replace(pos=pos)
        exclude = [pos, *model.parameters(), *model.buffers()]
        per_atom.append(saved_tensor_bytes(lambda: model(batch, compute_forces=False)["energy"], exclude=exclude) / n)
    assert abs(per_atom[1] / per_atom[0] - 1) < 0.1, per_atom


def test_edge_embedding_block_count_is_bounded_and_its_memory_a_share():
    """At the paper's sizes: one block while the whole fits the smallest block, then at most
    ``blocks`` (host launches bounded) until a block reaches the largest, then as many as needed."""
    from e2f.model import EdgeDegreeEmbedding

    emb = EdgeDegreeEmbedding(get_config("paper"))
    per_row = 32 * 768  # K x (L + 1) C, the widest per-edge tensor
    blocks = {n: -(-n // emb.rows_per_block(n, 32)) for n in (100, 170, 1_000, 10_000, 40_000, 1_000_000)}
    assert blocks[100] == blocks[170] == 1 and 1 < blocks[1_000] < emb.blocks
    assert blocks[10_000] == blocks[40_000] == emb.blocks
    assert blocks[1_000_000] > emb.blocks
    assert emb.rows_per_block(1_000_000, 32) * per_row <= emb.max_block_elements
    assert emb.rows_per_block(40_000, 32) * emb.blocks < 40_000 + emb.blocks  # a share of the whole


def test_edge_embedding_blocks_match_per_edge_formula():
    """Geometry once + checkpointed blocks (several, with grad) against one einsum over all slots."""
    from e2f.attention.core import envelope
    from e2f.so3 import degree_of_rows, spherical_harmonics

    model, batch = _model(), _cell()
    emb = model.edge_embedding
    emb.max_block_elements = 3 * batch.num_atoms  # a few target rows per block
    pos = batch.pos.clone().requires_grad_(True)
    graph = model.build_graph(pos, batch)
    src = graph.nbr.clamp_min(0)
    vec = graph.pos[:, None] - graph.pos_src[src]
    d = vec.norm(dim=-1)
    inside = (graph.nbr >= 0) & (d < emb.cutoff)
    vec = torch.where(inside[..., None], vec, torch.ones_like(vec))
    d = torch.where(inside, d, torch.ones_like(d))
    env = torch.where(inside, envelope(d / emb.cutoff), torch.zeros_like(d))
    hidden = torch.nn.functional.silu(emb.radial(emb.rbf(d)) + emb.emb_dst(graph.z)[:, None] + emb.emb_src(graph.z_src[src]))
    radial = emb.out(hidden).reshape(*d.shape, emb.lmax + 1, emb.channels)[:, :, degree_of_rows(emb.lmax)]
    expected = torch.einsum("nk,nkr,nkrc->nrc", env, spherical_harmonics(emb.lmax, vec), radial) * emb.scale
    out = emb(graph)
    assert_close_rel(out, expected, 1e-12, "edge-degree embedding")
    (grad,) = torch.autograd.grad(out.square().sum(), pos, retain_graph=True)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), pos)
    assert_close_rel(grad, grad_expected, 1e-11, "its gradient")
