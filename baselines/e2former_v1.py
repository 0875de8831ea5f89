"""E2Former v1 (arXiv 2501.19216) and E2Former-V2 behind the registry interface.

Both are ``e2f.model.E2FormerV2`` with the same skeleton (edge-degree + atom-type + charge/
spin embeddings, pre-norm attention + gated-FFN blocks, energy head) and differ only in
the attention layer's node products and aggregation:

- ``e2former-v2``: EAAS node products (``node_product='eaas'``) and the streaming
  ``chunked`` core on CPU, the fused ``triton`` core on CUDA (``attention_backend``
  overrides): node-level FLOPs, O(N) activation memory.
- ``e2former-v2-moments``: E2Former-V2 with ``node_product='moments'``: the core moves each
  source's 9-row value weighted by the displacement and every target contracts its moments
  with the CG table once (``e2f.attention.layer``), on the same backends: 3.2x fewer value
  bytes an edge than V2's 29 rows, no source-side products.
- ``e2former-v1``: the Wigner-6j rewrite (METHOD.md eq. 2) with dense e3nn CG products at
  the nodes (``node_product='dense-cg'``) and the ``materialized`` core, which gathers the
  value rows on every edge ([E, H, dv] tensors): node-level FLOPs, edge-level memory.
With shared weights all three compute the same function (tested to 1e-10 in fp64).

Matched settings: ``ModelConfig`` -> ``E2FormerConfig`` field by field
(``radial_hidden`` -> ``gate_hidden`` and ``edge_hidden``; ``max_num_elements`` ->
``max_z + 1``; ``qk_channels`` default ``max(1, C // 4)``, the paper's 64 at C = 256).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ._common import count_parameters
from ._graph import edge_list_from_neighbors


#: E2Former versions: the registry's model ``e2former-<version>``, and V2's node products.
VERSIONS = {"v1": "dense-cg", "v2": "eaas", "v2-moments": "moments"}


def e2f_config(config, version: str, device=None):
    """The ``E2FormerConfig`` of ``config`` for ``version`` (``VERSIONS``; V2's default backend
    depends on ``device``)."""
    from e2f.config import E2FormerConfig

    if version not in VERSIONS:
        raise ValueError(f"version must be one of {sorted(VERSIONS)}, got {version!r}")
    node_product = VERSIONS[version]
    backend = "materialized" if version == "v1" else config.attention_backend or default_v2_backend(device)
    return E2FormerConfig(
        lmax=config.lmax,
        channels=config.channels,
        num_blocks=config.num_blocks,
        num_heads=config.num_heads,
        head_dim=config.head_dim,
        cutoff=config.cutoff,
        max_neighbors=config.max_neighbors,
        num_rbf=config.num_rbf,
        gate_hidden=config.radial_hidden,
        edge_hidden=config.radial_hidden,
        qk_channels=config.qk_channels or max(1, config.channels // 4),
        ffn_hidden=config.ffn_hidden,
        max_z=config.max_num_elements - 1,
        backend=backend,
        node_product=node_product,
        checkpoint_blocks=config.checkpoint_blocks,
    )


def default_v2_backend(device=None) -> str:
    """``triton`` on a CUDA device where it can run, else ``chunked`` (the CPU default)."""
    from e2f.attention.backends import available_backends

    device = torch.device(device) if device is not None else torch.device("cpu")
    return "triton" if device.type == "cuda" and "triton" in available_backends(device) else "chunked"


class E2FormerModel(nn.Module):
    """``E2FormerV2`` wrapped as ``forward(batch) -> (energy [B], forces [N, 3])``."""

    def __init__(self, config, version: str = "v2", device=None) -> None:
        super().__init__()
        from e2f.model import E2FormerV2

        self.config, self.version = config, version
        self.name = f"e2former-{version}"
        self.e2f_config = e2f_config(config, version, device)
        self.model = E2FormerV2(self.e2f_config)

    def forward(self, batch) -> tuple[Tensor, Tensor]:
        out = self.model(batch, compute_forces=True, create_graph=self.training)
        energy = out["energy"] if self.training else out["energy"].detach()
        return energy, out["forces"]

    def energy(self, batch, pos: Tensor, edges=None) -> Tensor:
        """Energies only (for FLOP counting and memory measurements); ``edges`` is unused."""
        return self.model(batch.replace(pos=pos), compute_forces=False)["energy"]

    def neighbors(self, batch):
        from e2f.neighbors import neighbor_list

        c = self.e2f_config
        return neighbor_list(batch.pos.detach(), c.cutoff, c.max_neighbors, batch=batch.batch, cell=batch.cell, pbc=batch.pbc)

    def edges(self, batch):
        return edge_list_from_neighbors(self.neighbors(batch))

    def flops(self, batch) -> dict[str, float]:
        nl = self.neighbors(batch)
        t = e2former_flop_terms(
            self.config, self.version, batch.pos.shape[0], nl.src_atom.shape[0], nl.nbr.shape[1], nl.num_edges, self.e2f_config.backend
        )
        return {"core": t["core"], "total": t["total"]}

    def flop_terms(self, batch) -> dict[str, float]:
        """Every term of :func:`e2former_flop_terms` for ``batch``."""
        nl = self.neighbors(batch)
        return e2former_flop_terms(
            self.config, self.version, batch.pos.shape[0], nl.src_atom.shape[0], nl.nbr.shape[1], nl.num_edges, self.e2f_config.backend
        )

    def memory_model(self, n_atoms: int, n_edges: int, itemsize: int = 4) -> dict[str, float]:
        return e2former_memory(self.config, n_atoms, n_edges, itemsize, version=self.version)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self)


def _paths(lmax: int) -> list[tuple[int, int]]:
    """(l1, l3) of every first-order path, as ``e2f.eaas`` orders them."""
    from e2f.eaas import paths_for

    return list(paths_for(lmax))


def e2former_flop_terms(config, version: str, n_atoms: int, n_sources: int, k_slots: int, n_edges: int, backend: str | None = None) -> dict[str, float]:
    """Analytic FLOPs of one E2Former energy forward, term by term.

    N atoms, M source slots (N plus periodic images), K neighbour slots per target (the
    padded table the core walks; N K >= E filled edges), S = (L+1)^2, C, H heads, d = head
    width, dv = (rows_out + S) C / H values per head, R Gaussians, G = gate/edge hidden,
    q = ``qk_channels``, F = ``ffn_hidden``, P = number of (l1, 1, l3) paths,
    rows_out = sum_paths (2 l3 + 1):

    - ``core`` (attention core per block, the function of ``e2f.attention.core``):
      ``N K (2 R G + 2 G 2H)`` gate matmuls + ``N K H (2 d + 2 dv + 8)`` logits, softmax
      and aggregation (elementwise in the PyTorch backends, so ``FlopCounterMode`` sees
      only the gate matmuls: ``core_matmul``);
    - per block, node level: q and k projections ``2 x [2 x 2N S C q + 2N((L+1) q Hd + (Hd)^2)]``,
      value and output SO3-linears ``2 x 2N S C^2``, node products on the M sources and
      the N targets (``node_products``: EAAS rotates into and out of the polar frame,
      ``2n C (sum_l (2l+1)^2 + sum_paths (2 l3+1)^2)``; dense CG contracts the full
      [rows_out, S, 3] table with r, then with v, ``2n rows_out S (3 + C)``), per-l3 mixing ``2N sum_l3 (2 l3+1) n_l3 C^2``, the
      gated FFN ``2N (2 S C F + C L F)`` and two RMS norms ``2 x 2N S C``;
    - ``v2-moments``: the core sums ``3 S C / H`` numbers a head (the moments of
      ``S C / H`` values, ``N K H (2 d + 6 S C / H + 3 + 8)``) and the only node product is
      each target's contraction of its moments with the [rows_out, S, 3] table,
      ``2N rows_out 3 S C``;
    - once: edge-degree embedding ``N K (2 R G + 2 G (L+1) C + 2 S C)``, a final norm
      ``2N S C`` and the head ``2N (C^2 + C)``.
    ``total`` is the sum. What ``FlopCounterMode`` sees of the core depends on the backend
    (``core_counted``): ``materialized`` only the gate matmuls; ``chunked`` also the
    aggregation einsum ``2 N K H dv``; ``triton`` nothing. ``total_counted`` = ``total`` -
    ``core`` + ``core_counted``.
    """
    L, C, H, d = config.lmax, config.channels, config.num_heads, config.head_dim
    R, G = config.num_rbf, config.radial_hidden
    q = config.qk_channels or max(1, C // 4)
    F = config.ffn_hidden_channels
    S = (L + 1) ** 2
    paths = _paths(L)
    rows_out = sum(2 * l3 + 1 for _, l3 in paths)
    moments = version == "v2-moments"
    # numbers a head the core sums
    dv = 3 * S * C // H if moments else (rows_out + S) * C // H
    N, M, NK = float(n_atoms), float(n_sources), float(n_atoms * k_slots)
    core_matmul = NK * (2 * R * G + 2 * G * 2 * H)
    core_elementwise = NK * H * (2 * d + 2 * dv + 8 + (3 if moments else 0))
    qk = 2 * (2 * 2 * N * S * C * q + 2 * N * ((L + 1) * q * H * d + (H * d) ** 2))
    linears = 2 * 2 * N * S * C * C
    if moments:  # the targets' contractions only
        node_products = N * 2 * rows_out * 3 * S * C
    elif version == "v1":
        node_products = (M + N) * 2 * rows_out * S * (3 + C)
    else:
        node_products = (M + N) * 2 * C * (sum((2 * l + 1) ** 2 for l in range(L + 1))
                                           + sum((2 * l3 + 1) ** 2 for _, l3 in paths))
    n_l3 = [sum(1 for _, l in paths if l == l3) for l3 in range(L + 1)]
    mixing = 2 * N * sum((2 * l3 + 1) * n_l3[l3] * C * C for l3 in range(L + 1))
    ffn = 2 * N * (2 * S * C * F + C * L * F)
    norms = 2 * 2 * N * S * C
    block_node = qk + linears + node_products + mixing + ffn + norms
    edge_embedding = NK * (2 * R * G + 2 * G * (L + 1) * C + 2 * S * C)
    once = edge_embedding + 2 * N * S * C + 2 * N * (C * C + C)
    nb = config.num_blocks
    core = nb * (core_matmul + core_elementwise)
    total = core + nb * block_node + once
    if backend is None:
        backend = "materialized" if version == "v1" else (config.attention_backend or "chunked")
    visible = {"materialized": core_matmul, "chunked": core_matmul + NK * 2 * H * dv}.get(backend, 0.0)
    return {
        "core": core,
        "total": total,
        "core_matmul": nb * core_matmul,
        "core_elementwise": nb * core_elementwise,
        "core_counted": nb * visible,
        "total_counted": total - core + nb * visible,
        "qk": nb * qk,
        "linears": nb * linears,
        "node_products": nb * node_products,
        "mixing": nb * mixing,
        "ffn": nb * ffn,
        "norms": nb * norms + 2 * N * S * C,
        "edge_embedding": edge_embedding,
        "head": 2 * N * (C * C + C),
    }


def e2former_memory(config, n_atoms: int, n_edges: int, itemsize: int = 4, version: str = "v2") -> dict[str, float]:
    """Estimated activation bytes kept for backward by one energy forward.

    Counted from the tensors the layers save (checked against ``saved_tensors_hooks`` in
    the tests). Per block and atom, both versions: the inputs of the seven SO3-linears with
    C inputs (value, output, q/k left and right, FFN in) 7 S C, norms and residuals 4 S C,
    the per-l3 mixing inputs rows_out C, FFN 2 S F, q/k invariants 4 S q + 2 (L+1) q, the
    q/k MLPs 2 H d, gate parts 2 G. V2 (``chunked``) adds the node values and aggregated
    output 2 (rows_out + S) C and the EAAS products 2 S C, and keeps *no* per-edge tensor
    (the core recomputes in backward); ``v2-moments`` instead the node values S C and their
    moments 3 S C. V1 adds its dense-CG tables 2 S rows_out and 2 S C,
    and per edge and block the gathered values [E, H, dv] = (rows_out + S) C, the gate
    activations 2G, RBF 2R, q/k products 2 H d and ~7 [E, H] softmax terms (+19 scalars).
    Once per atom: 2 S C + 3C + 40. The edge-degree embedding is checkpointed per target
    block (node-level in both).
    """
    L, C, H, d, G, R = config.lmax, config.channels, config.num_heads, config.head_dim, config.radial_hidden, config.num_rbf
    q = config.qk_channels or max(1, C // 4)
    F = config.ffn_hidden_channels
    S = (L + 1) ** 2
    rows_out = sum(2 * l3 + 1 for _, l3 in _paths(L))
    common = 11 * S * C + rows_out * C + 2 * S * F + 4 * S * q + 2 * (L + 1) * q + 2 * H * d + 2 * G
    if version == "v1":
        per_node_block = common + 2 * S * rows_out + 2 * S * C
        per_edge = config.num_blocks * ((rows_out + S) * C + 2 * G + 2 * R + 2 * H * d + 7 * H + 19)
    elif version == "v2-moments":
        per_node_block = common + 4 * S * C
        per_edge = 0.0
    else:
        per_node_block = common + 2 * (rows_out + S) * C + 2 * S * C
        per_edge = 0.0
    per_node = config.num_blocks * per_node_block + 2 * S * C + 3 * C + 40
    total = itemsize * (per_node * n_atoms + per_edge * n_edges)
    return {"bytes": float(total), "per_atom": float(itemsize * per_node), "per_edge": float(itemsize * per_edge)}


class E2FormerLayer:
    """Layer-level benchmark: one ``E2Attention`` (V2: EAAS + chunked/triton; v1: dense CG + materialized).

    ``make_inputs(batch)`` builds the model's ``Graph`` (neighbours, centred positions) and
    random ``x`` [N, S, C] (requires grad); ``layer(inputs)`` returns the message.
    """

    def __init__(self, config, version: str = "v2", *, device=None, dtype=torch.float32) -> None:
        from e2f.model import E2FormerBlock, E2FormerV2

        self._build_graph = E2FormerV2.build_graph
        self.config, self.version = config, version
        self.name = f"e2former-{version}"
        self.e2f_config = e2f_config(config, version, device)
        self.module = E2FormerBlock(self.e2f_config).attn.to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype

    def make_inputs(self, batch, seed: int = 0) -> dict:
        b = batch.to(device=self.device, dtype=self.dtype)
        # build_graph reads only ``self.config``: the model's own graph without building the model.
        graph = self._build_graph(SimpleNamespace(config=self.e2f_config), b.pos, b)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(b.pos.shape[0], (self.config.lmax + 1) ** 2, self.config.channels, generator=gen, dtype=self.dtype)
        return {"x": x.to(self.device).requires_grad_(True), "graph": graph}

    def __call__(self, inputs: dict) -> Tensor:
        return self.module(inputs["x"], inputs["graph"])

    def flops(self, inputs: dict) -> dict[str, float]:
        """One block's attention terms of :func:`e2former_flop_terms` (no FFN or norms)."""
        g = inputs["graph"]
        one = type(self.config)(**{**self.config.__dict__, "num_blocks": 1})
        n = g.pos.shape[0]
        t = e2former_flop_terms(one, self.version, n, g.src_atom.shape[0], g.nbr.shape[1], int((g.nbr >= 0).sum()), self.e2f_config.backend)
        total = t["core"] + t["qk"] + t["linears"] + t["node_products"] + t["mixing"]
        return {"core": t["core"], "total": total, "total_counted": total - t["core"] + t["core_counted"]}

    def parameters(self):
        return self.module.parameters()
