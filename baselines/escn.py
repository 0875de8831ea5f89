"""eSCN through fairchem-core: the eSCN-MD backbone (UMA / eSEN) fed with our neighbour list.

fairchem-core is a real dependency here (``pip install e2f[escn]``), not a copy: the
backbone is ``fairchem.core.models.uma.escn_md.eSCNMDBackbone`` built with
``otf_graph=False``, so it takes the graph we give it (``edge_index``, ``cell_offsets``)
and computes edge vectors ``pos[src] - pos[dst] + offsets @ cell`` itself, differentiably.
The original eSCN (arXiv 2302.03655) lives only in fairchem-core 1.x (torch 2.4);
eSCN-MD is its descendant with the same per-edge rotation + SO(2) convolution.

Matched settings (``ModelConfig`` -> backbone argument):
``channels -> sphere_channels``, ``ffn_hidden -> hidden_channels``, ``lmax -> lmax``,
``escn_mmax -> mmax`` (default ``min(lmax, 2)``, as in the eSCN paper and UMA),
``num_blocks -> num_layers``, ``cutoff -> cutoff``, ``num_rbf -> num_distance_basis``
(fairchem's Gaussians on [0, cutoff]), ``radial_hidden -> edge_channels``; the neighbour
cap K is applied by our neighbour list (fairchem's own ``max_neighbors`` is unused when
``otf_graph=False``). fairchem defaults kept: RMS norm over SH, gate activation, grid
feed-forward, sin/cos charge and spin embeddings, no dataset embedding.

Energy: ``ScalarEnergyHead`` (the per-atom MLP on l = 0 that every baseline uses) on the
backbone's final ``node_embedding[:, 0, :]``, summed per system. Forces: ``-dE/dr`` by
autograd through the backbone (``direct_forces=False``), with ``create_graph`` in training.

Equivariance: fairchem builds edge frames from quaternions in the working dtype; energies
are rotation invariant to ~1e-6 relative even in fp64 (tests use 1e-5).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import ScalarEnergyHead, conservative_forces, count_parameters, positions_for_grad
from ._graph import EdgeList, edge_list, num_systems


def _import_fairchem():
    try:
        from fairchem.core.datasets.atomic_data import AtomicData
        from fairchem.core.models.uma.escn_md import eSCNMDBackbone
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "the escn-md baseline needs fairchem-core (pip install 'e2f[escn]'; on a machine "
            "with another torch see baselines/README.md for the --no-deps wheel install)"
        ) from exc
    return AtomicData, eSCNMDBackbone


def escn_mmax(config) -> int:
    """mmax of the SO(2) convolutions: ``config.escn_mmax``, default ``min(lmax, 2)``."""
    return min(config.lmax, 2 if config.escn_mmax is None else config.escn_mmax)


def build_backbone(config):
    """The fairchem backbone with the matched settings of ``config`` (see module docstring)."""
    _, eSCNMDBackbone = _import_fairchem()
    if config.lmax > 8:
        raise ValueError(f"escn-md supports lmax up to 8 (fairchem's Wigner tables), got {config.lmax}")
    if config.channels % 2:
        raise ValueError("escn-md needs an even channel count (fairchem's sin/cos charge embedding)")
    # Build in float64 so fairchem's fixed tables (SO(3) grids, Wigner coefficients) are
    # exact before the caller casts the module to its working dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _backbone(eSCNMDBackbone, config)
    finally:
        torch.set_default_dtype(previous)


def _backbone(eSCNMDBackbone, config):
    return eSCNMDBackbone(
        max_num_elements=config.max_num_elements,
        sphere_channels=config.channels,
        lmax=config.lmax,
        mmax=escn_mmax(config),
        otf_graph=False,
        max_neighbors=config.max_neighbors or 10_000,
        cutoff=config.cutoff,
        edge_channels=config.radial_hidden,
        distance_function="gaussian",
        num_distance_basis=config.num_rbf,
        direct_forces=False,
        regress_forces=True,
        num_layers=config.num_blocks,
        hidden_channels=config.ffn_hidden_channels,
        norm_type="rms_norm_sh",
        act_type="gate",
        ff_type="grid",
        use_dataset_embedding=False,
        always_use_pbc=False,
    )


def atomic_data(batch, pos: Tensor, edges: EdgeList):
    """fairchem ``AtomicData`` for ``batch`` with our edges (``edge_index[0]`` = source)."""
    AtomicData, _ = _import_fairchem()
    b = num_systems(batch)
    dtype, device = pos.dtype, pos.device
    cell = batch.cell.to(dtype) if getattr(batch, "cell", None) is not None else torch.zeros(b, 3, 3, dtype=dtype, device=device)
    pbc = batch.pbc.bool() if getattr(batch, "pbc", None) is not None else torch.zeros(b, 3, dtype=torch.bool, device=device)
    src, dst, shift = edges.src, edges.dst, edges.shift.to(dtype)
    edge_sys = batch.batch[dst]
    if b > 1:  # fairchem expands the cell per edge by system: edges must be grouped by system
        order = torch.argsort(edge_sys, stable=True)
        src, dst, shift, edge_sys = src[order], dst[order], shift[order], edge_sys[order]
    # Integer lattice offsets n with shift = n @ cell (only image edges have a shift).
    offsets = torch.zeros_like(shift)
    image = shift.abs().sum(-1) > 0
    if bool(image.any()):
        c = cell[edge_sys[image]]
        offsets[image] = torch.linalg.solve(c.transpose(-1, -2), shift[image].unsqueeze(-1)).squeeze(-1).round()
    n = pos.shape[0]
    zeros_long = torch.zeros(n, dtype=torch.long, device=device)
    charge = getattr(batch, "charge", None)
    spin = getattr(batch, "spin", None)
    return AtomicData(
        pos=pos,
        atomic_numbers=batch.z.long(),
        cell=cell,
        pbc=pbc,
        natoms=torch.bincount(batch.batch, minlength=b),
        edge_index=torch.stack([src, dst]).long(),
        cell_offsets=offsets,
        nedges=torch.bincount(edge_sys, minlength=b),
        charge=(charge.long() if charge is not None else torch.zeros(b, dtype=torch.long, device=device)),
        spin=(spin.long() if spin is not None else torch.zeros(b, dtype=torch.long, device=device)),
        fixed=zeros_long,
        tags=zeros_long,
        batch=batch.batch.long(),
        sid=[""] * b,
    )


class ESCNMDModel(nn.Module):
    """eSCN-MD energy/force model; ``forward(batch) -> (energy [B], forces [N, 3])``."""

    name = "escn-md"

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.head = ScalarEnergyHead(config.channels, config.ffn_hidden_channels)

    def edges(self, batch) -> EdgeList:
        return edge_list(batch, self.config.cutoff, self.config.max_neighbors)

    def energy(self, batch, pos: Tensor, edges: EdgeList | None = None) -> Tensor:
        edges = self.edges(batch) if edges is None else edges
        data = atomic_data(batch, pos, edges)
        emb = self.backbone(data)["node_embedding"]
        return self.head(emb[:, 0, :], batch.batch, num_systems(batch))

    def forward(self, batch) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            pos = positions_for_grad(batch.pos)
            energy = self.energy(batch, pos)
            forces = conservative_forces(energy, pos, create_graph=self.training)
        return (energy if self.training else energy.detach()), forces

    def flops(self, batch) -> dict[str, float]:
        e = self.edges(batch)
        return escn_flops(self.config, batch.pos.shape[0], e.num_edges, num_systems(batch))

    def memory_model(self, n_atoms: int, n_edges: int, itemsize: int = 4) -> dict[str, float]:
        return escn_memory(self.config, n_atoms, n_edges, itemsize)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self)


def _reduced_sizes(lmax: int, mmax: int) -> tuple[int, int]:
    """(m0, M): coefficients with m = 0, and all kept coefficients (|m| <= mmax)."""
    m0 = lmax + 1
    return m0, m0 + 2 * sum(lmax - m + 1 for m in range(1, mmax + 1))


def escn_flops(config, n_atoms: int, n_edges: int, n_systems: int = 1) -> dict[str, float]:
    """Analytic matmul FLOPs of one eSCN-MD energy forward (forces cost about 2x more).

    With E edges, N atoms, C = channels, H = hidden (``ffn_hidden``), G = ``radial_hidden``,
    R = ``num_rbf``, L = lmax, S = (L+1)^2, m0 = L+1 coefficients with m = 0,
    M = m0 + 2 sum_{m=1..mmax} (L-m+1) kept coefficients, P = 2(L+1)(2L+3) grid points,
    and I = R + 2G the edge-scalar input width (RBF + source and target embeddings):

    - edge frames (``wigner_frames_flops``): fairchem's hybrid quaternion Wigner-D per edge,
      the m-major reordering 2 x 2E M^2 S (einsum with ``to_m``), and the lattice shifts
      ``offsets @ cell``, 18E;
    - edge-degree embedding: radial MLP 2E(I G + G^2 + G m0 C), rotation 2E S m0 C;
    - per block (``core``, the Edgewise message):
        radial MLP 2E(I G + G^2 + G * 2C * M'), with M' = m0 + sum_m (L-m+1),
        rotate in 2E M S 2C, SO(2) conv 1: 2E * 2C m0 (H m0 + L H) + sum_m 2 * 2E (2C)(L-m+1) 2H(L-m+1),
        SO(2) conv 2: 2E H m0 C m0 + sum_m 2 * 2E H(L-m+1) 2C(L-m+1), rotate out 2E S M C;
    - per block feed-forward on the grid: 2 * 2N P S C + 2N P (C H + H H + H C);
    - equivariant RMS norms (2 per block + 1 final), 2N S C each;
    - head 2N(C H + H); charge/spin mixing 2B (2C) C.
    Elementwise work (norms, gates, envelopes, Wigner polynomials) is not counted, as
    ``FlopCounterMode`` does not count it either.
    """
    L, C, H, G, R = config.lmax, config.channels, config.ffn_hidden_channels, config.radial_hidden, config.num_rbf
    mmax = escn_mmax(config)
    S = (L + 1) ** 2
    m0, M = _reduced_sizes(L, mmax)
    P = 2 * (L + 1) * (2 * L + 3)
    I = R + 2 * G
    E, N = float(n_edges), float(n_atoms)
    m_rows = [(L - m + 1) for m in range(1, mmax + 1)]
    frames = E * (wigner_frames_flops(L) + 2 * (2 * M * M * S) + 18)
    norms = (2 * config.num_blocks + 1) * 2 * N * S * C
    edge_degree = 2 * E * (I * G + G * G + G * m0 * C) + 2 * E * S * m0 * C
    rad_out = 2 * C * (m0 + sum(m_rows))
    conv1 = 2 * E * (2 * C * m0) * (H * m0 + L * H) + sum(2 * 2 * E * (2 * C * r) * (2 * H * r) for r in m_rows)
    conv2 = 2 * E * (H * m0) * (C * m0) + sum(2 * 2 * E * (H * r) * (2 * C * r) for r in m_rows)
    core_block = 2 * E * (I * G + G * G + G * rad_out) + 2 * E * M * S * 2 * C + conv1 + conv2 + 2 * E * S * M * C
    ffn_block = 2 * 2 * N * P * S * C + 2 * N * P * (C * H + H * H + H * C)
    head = 2 * N * (C * H + H) + 2 * n_systems * 2 * C * C
    core = config.num_blocks * core_block
    return {"core": core, "total": core + config.num_blocks * ffn_block + frames + edge_degree + norms + head}


def wigner_frames_flops(lmax: int) -> float:
    """Matmul FLOPs per edge of ``axis_angle_wigner_hybrid`` (fairchem 2.2x) up to ``lmax``.

    l = 1 is a closed form (0); l = 2 contracts the quartic form of the quaternion with a
    [4, 4, 4, 4, 5, 5] table, 2 * 4^4 * 5^2; l = 3 alone evaluates the 84 degree-6
    monomials, 2 * 84 * 7^2; l = 3 and 4 together share the 165 degree-8 monomials,
    2 * 165 * (7^2 + 9^2); every l >= 5 uses the Ra/Rb polynomial path, 12 (2l+1)^3.
    """
    f = 0.0
    if lmax >= 2:
        f += 2 * 4**4 * 5**2
    if lmax == 3:
        f += 2 * 84 * 7**2
    if lmax >= 4:
        f += 2 * 165 * (7**2 + 9**2)
    f += sum(12 * (2 * l + 1) ** 3 for l in range(5, lmax + 1))
    return f


def escn_memory(config, n_atoms: int, n_edges: int, itemsize: int = 4) -> dict[str, float]:
    """Estimated activation bytes kept for backward by one energy forward (general backend).

    Counted from the tensors fairchem's modules save (checked against
    ``saved_tensors_hooks`` in the tests), in numbers per edge / per atom, with the
    symbols of :func:`escn_flops` and M' = m0 + sum_{m>=1} (L-m+1):

    - per block and edge: rotated message 2C M, gate inputs 2(M-1)H + L H, conv-2 output
      C M, rotated back C S, radial MLP 6G, SO(2) conv inputs 2C m0 + H m0 +
      (4C + 2H)(M'-m0), radial pieces 2C (M'-m0), and a few scalars (4);
    - per block and atom: grid MLP 4 P H + P C, norms and residuals 4 S C;
    - once per edge: gathered edge-degree features C S, Wigner matrices S^2 + 2 M S,
      edge-degree radial MLP 6G, edge scalars I + 2R, m0 C, ~91 scalars (distances,
      envelopes, quaternions);
    - once per atom: 2 S C + 2H + C.
    ``bytes = itemsize * (per_atom N + per_edge E)``.
    """
    L, C, H, G, R = config.lmax, config.channels, config.ffn_hidden_channels, config.radial_hidden, config.num_rbf
    mmax = escn_mmax(config)
    S = (L + 1) ** 2
    m0, M = _reduced_sizes(L, mmax)
    Mp = m0 + sum(L - m + 1 for m in range(1, mmax + 1))
    P = 2 * (L + 1) * (2 * L + 3)
    I = R + 2 * G
    per_edge_block = (
        2 * C * M + 2 * (M - 1) * H + L * H + C * M + C * S + 6 * G
        + 2 * C * m0 + H * m0 + (4 * C + 2 * H) * (Mp - m0) + 2 * C * (Mp - m0) + 4
    )
    per_node_block = 4 * P * H + P * C + 4 * S * C + 4
    per_edge = config.num_blocks * per_edge_block + C * S + S * S + 2 * M * S + 6 * G + I + 2 * R + m0 * C + 91
    per_node = config.num_blocks * per_node_block + 2 * S * C + 2 * H + C + 5
    total = itemsize * (per_node * n_atoms + per_edge * n_edges)
    return {"bytes": float(total), "per_atom": float(itemsize * per_node), "per_edge": float(itemsize * per_edge)}


class ESCNLayer:
    """Layer-level benchmark: one eSCN-MD Edgewise message (rotate, SO(2) convs, rotate back, scatter).

    ``make_inputs(batch)`` precomputes what the backbone feeds a block (edge scalars,
    Wigner matrices with the envelope folded in, edge index) and random node features
    ``x`` [N, S, C] that require grad; ``layer(inputs)`` returns the message [N, S, C].
    """

    name = "escn-md"

    def __init__(self, config, *, device=None, dtype=torch.float32) -> None:
        self.config = config
        self.backbone = build_backbone(config).to(device=device, dtype=dtype)
        self.module = self.backbone.blocks[0].edge_wise
        self.device, self.dtype = device, dtype

    def make_inputs(self, batch, seed: int = 0) -> dict:
        bb = self.backbone
        pos = batch.pos.to(device=self.device, dtype=self.dtype)
        edges = edge_list(batch, self.config.cutoff, self.config.max_neighbors)
        data = atomic_data(batch, pos, edges)
        data["atomic_numbers_full"] = data["atomic_numbers"]
        data["batch_full"] = data["batch"]
        with torch.no_grad():
            graph = bb._generate_graph(data)
            wigner, wigner_inv = bb._get_rotmat_and_wigner(graph["edge_distance_vec"])
            coefficient_index = bb.coefficient_index if bb.mmax != bb.lmax else None
            wigner, wigner_inv = bb.backend.prepare_wigner(wigner, wigner_inv, bb.mappingReduced, coefficient_index)
            env = bb.envelope(graph["edge_distance"] / bb.cutoff).reshape(-1, 1, 1)
            x_edge = torch.cat(
                (
                    bb.distance_expansion(graph["edge_distance"]),
                    bb.source_embedding(data["atomic_numbers"][graph["edge_index"][0]]),
                    bb.target_embedding(data["atomic_numbers"][graph["edge_index"][1]]),
                ),
                dim=1,
            )
        gen = torch.Generator(device="cpu").manual_seed(seed)
        n = pos.shape[0]
        x = torch.randn(n, (self.config.lmax + 1) ** 2, self.config.channels, generator=gen, dtype=self.dtype)
        return {
            "x": x.to(self.device).requires_grad_(True),
            "x_edge": x_edge,
            "edge_index": graph["edge_index"],
            "wigner": wigner,
            "wigner_inv_envelope": wigner_inv * env,
            "scatter_target": data["scatter_target"],
        }

    def __call__(self, inputs: dict) -> Tensor:
        x = inputs["x"]
        return self.module(
            x,
            inputs["x_edge"],
            inputs["edge_index"],
            inputs["wigner"],
            inputs["wigner_inv_envelope"],
            total_atoms_across_gp_ranks=x.shape[0],
            scatter_target=inputs["scatter_target"],
        )

    def flops(self, inputs: dict) -> dict[str, float]:
        """The ``core`` term of :func:`escn_flops` for one block (total = core here)."""
        cfg = self.config
        one = type(cfg)(**{**cfg.__dict__, "num_blocks": 1})
        core = escn_flops(one, inputs["x"].shape[0], inputs["edge_index"].shape[1])["core"]
        return {"core": core, "total": core}

    def parameters(self):
        return self.module.parameters()
