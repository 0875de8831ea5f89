import torch

from e2f.attention.layer import E2Attention, Graph, degree_invariants, heads_to_rows, rows_to_heads
from e2f.eaas import eaas_product
from e2f.neighbors import neighbor_list
from e2f.so3 import PolarFrames, wigner_d_from_matrix
from e2f.testing import assert_close_rel, random_rotation, saved_tensor_bytes

F64 = torch.float64


def _layer(backend="chunked", node_product="eaas", dtype=F64, seed=0):
    torch.manual_seed(seed)
    layer = E2Attention(lmax=2, channels=8, num_heads=4, head_dim=4, num_rbf=16, gate_hidden=8, cutoff=5.0, eps=1e-3,
                        qk_channels=4, num_elements=10, backend=backend, node_product=node_product)
    return layer.to(dtype)


def _graph(n, k=16, seed=0, dtype=F64, density=0.1):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 3, generator=gen, dtype=F64) * (n / density) ** (1 / 3)
    pos = (pos - pos.mean(0)).to(dtype)
    nl = neighbor_list(pos, 5.0, k)
    z = torch.randint(1, 10, (n,), generator=gen)
    return Graph(pos=pos, z=z, nbr=nl.nbr, src_atom=nl.src_atom, pos_src=nl.source_positions(pos))


def test_head_layout_round_trip():
    x = torch.arange(2 * 29 * 8.0).reshape(2, 29, 8)
    heads = rows_to_heads(x, 4)
    assert heads.shape == (2, 4, 29 * 2)
    assert torch.equal(heads[0, 1, :2], x[0, 0, [1, 5]])  # head 1 owns channels 1 and 5
    assert torch.equal(heads_to_rows(heads, 29), x)


def test_layer_equivariant_and_backends_agree():
    graph = _graph(30, density=0.05)
    x = torch.randn(30, 9, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    out = _layer()(x, graph)
    for backend, product in (("materialized", "eaas"), ("chunked", "dense-cg"), ("chunked", "moments"),
                             ("materialized", "moments")):
        assert_close_rel(_layer(backend, product)(x, graph), out, 1e-11, f"{backend}/{product}")
    rot = random_rotation(3)
    d = wigner_d_from_matrix(2, rot)
    rotated = Graph(pos=graph.pos @ rot.T, z=graph.z, nbr=graph.nbr, src_atom=graph.src_atom, pos_src=graph.pos_src @ rot.T)
    assert_close_rel(_layer()(torch.einsum("ij,njc->nic", d, x), rotated), torch.einsum("ij,njc->nic", d, out), 1e-11,
                     "layer equivariance")


def test_moments_form_same_gradients_and_no_cancellation():
    """The moments form differentiates like EAAS (positions included), and far from the origin
    it keeps fp32's relative accuracy where [S_r(v); v] subtracts two terms of size |r|."""
    graph = _graph(24, density=0.05)
    x = torch.randn(24, 9, 8, dtype=F64, generator=torch.Generator().manual_seed(2))

    def grads(product, pos=graph.pos, dtype=F64):
        pos = pos.to(dtype).requires_grad_(True)
        g = Graph(pos=pos, z=graph.z, nbr=graph.nbr, src_atom=graph.src_atom, pos_src=pos[graph.src_atom])
        xx = x.to(dtype).requires_grad_(True)
        out = _layer("chunked", product, dtype)(xx, g)
        return (out, *torch.autograd.grad((out * torch.sin(out)).sum(), [pos, xx]))

    for a, b, what in zip(grads("moments"), grads("eaas"), ("out", "d/dpos", "d/dx")):
        assert_close_rel(a, b, 1e-11, what)
    # positions ~300 Å from the origin, exactly representable in fp32: the errors are the compute's
    far = (graph.pos + torch.tensor([300.0, -200.0, 100.0], dtype=F64)).float().double()
    exact = grads("moments", far)[0].detach()
    err = {p: float((grads(p, far, torch.float32)[0].detach().double() - exact).norm() / exact.norm())
           for p in ("moments", "eaas")}
    assert err["moments"] < 1e-6 and err["eaas"] > 10 * err["moments"], err


def _saved_per_atom(n, backend, k=16):
    layer = _layer(backend, dtype=torch.float32)
    graph = _graph(n, k, seed=n, dtype=torch.float32)
    x = torch.randn(n, 9, 8, requires_grad=True)
    exclude = [x, graph.pos, graph.pos_src, graph.nbr, graph.src_atom, graph.z, *layer.parameters(), *layer.buffers()]
    return saved_tensor_bytes(lambda: layer(x, graph), exclude=exclude) / n


def test_layer_saved_bytes_per_atom():
    small, large = _saved_per_atom(200, "chunked"), _saved_per_atom(2000, "chunked")
    assert abs(large / small - 1) < 0.1, (small, large)
    k8, k32 = _saved_per_atom(400, "chunked", 8), _saved_per_atom(400, "chunked", 32)
    assert abs(k32 / k8 - 1) < 0.1, (k8, k32)
    m8, m32 = _saved_per_atom(400, "materialized", 8), _saved_per_atom(400, "materialized", 32)
    assert m32 > 2.5 * m8 and m8 > k8, (m8, m32, k8)


def test_mix_and_invariants_match_per_degree_twins():
    """The batched path mixing and per-degree invariants against per-l3 / per-degree loops."""
    layer = _layer()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mix in layer.mix:
            mix.weight.copy_(torch.randn(mix.weight.shape, generator=gen, dtype=F64))
    message = torch.randn(6, layer.table.rows_out, 8, generator=gen, dtype=F64)
    degrees = layer.table.out_degrees
    starts = [sum(2 * d + 1 for d in degrees[:p]) for p in range(len(degrees))]
    mixed = []
    for l3, mix in enumerate(layer.mix):
        paths = [message[:, s : s + 2 * l3 + 1] for s, d in zip(starts, degrees) if d == l3]
        mixed.append(mix(torch.cat(paths, dim=2)))
    assert_close_rel(layer._mix(message), torch.cat(mixed, dim=1), 1e-14, "mix")
    a, b = torch.randn(2, 6, 9, 3, generator=gen, dtype=F64)
    expected = torch.stack([(a[:, l * l : (l + 1) ** 2] * b[:, l * l : (l + 1) ** 2]).sum(1) for l in range(3)], dim=1)
    assert_close_rel(degree_invariants(a, b, layer.value.degree, 2), expected, 1e-14, "invariants")


def test_split_frames_match_their_own():
    """Targets and sources share one frames object; each part equals frames built on its own."""
    graph = _graph(20)
    dst, src = graph.frames(2)
    for part, r in ((dst, graph.pos), (src, graph.pos_src)):
        own = PolarFrames.from_vectors(r, 2)
        for a, b in zip(part.blocks_as(torch.float32), own.blocks_as(torch.float32)):
            assert torch.equal(a, b)
        v = torch.randn(r.shape[0], 9, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
        assert_close_rel(eaas_product(v, r, 2, part), eaas_product(v, r, 2, own), 1e-14, "product with split frames")
