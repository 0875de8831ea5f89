"""Dense tensor-product baseline: the standard per-edge e3nn convolution (NequIP / Equiformer style).

Per block, for every edge j -> i (``r_ij = r_j + shift - r_i``, ``d = |r_ij|``)::

    h_j   = o3.Linear(x_j)                                          node level, per degree
    w_ij  = MLP(RBF(d_ij))                      [E, P * C]           per-edge TP weights
    t_ij  = TP_w(h_j, Y(r_ij / d_ij))            [E, sum_p (2 l3 + 1) C]   e3nn, mode 'uvu'
    m_i   = (1 / sqrt(K)) sum_j env(d_ij / r_c) t_ij                 scatter-sum
    x_i  += o3.Linear(m_i)                      paths of each l3 -> C channels

with ``Y`` the e3nn spherical harmonics of degrees 0..L and one path ``(l1, l2, l3)`` for
every triangle-allowed triple with all degrees <= L (P paths). The TP is the function of
``e3nn.o3.TensorProduct`` (mode 'uvu', per-edge weights; e3nn's Wigner-3j and path
weights), computed by :class:`DenseCGTensorProduct` with a fixed contraction order and
tested equal to the e3nn module: the dense Clebsch-Gordan contraction on every edge,
O(E L^6 C) work and [E, ...] activations. All irreps carry
even parity so every SO(3) path is allowed (E2Former is SO(3)-, not O(3)-equivariant).

Around it the same skeleton as E2Former: atom-type plus system charge and spin embeddings
on l = 0, pre-norm blocks
``x += Conv(RMSNormSH(x)); x += FFN(RMSNormSH(x))`` with e2f's RMSNormSH and gated FFN,
a final norm and the shared per-atom energy head on l = 0.

Matched settings: ``lmax``, ``channels``, ``num_blocks``, ``cutoff``, ``max_neighbors``,
``num_rbf`` (e2f's Gaussians), ``radial_hidden`` (radial MLP width), ``ffn_hidden``.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import Tensor, nn

from ._common import (
    ScalarEnergyHead,
    conservative_forces,
    count_parameters,
    linear_flops,
    positions_for_grad,
)
from ._graph import EdgeList, edge_list, num_systems


def to_e3nn(x: Tensor, lmax: int) -> Tensor:
    """``[N, (L+1)^2, C]`` (m-major) -> e3nn's ``[N, sum_l C (2l+1)]`` (channel-major per l)."""
    n, _, c = x.shape
    return torch.cat([x[:, l * l : (l + 1) ** 2, :].transpose(1, 2).reshape(n, c * (2 * l + 1)) for l in range(lmax + 1)], dim=1)


def from_e3nn(y: Tensor, lmax: int, channels: int) -> Tensor:
    """Inverse of :func:`to_e3nn`."""
    n = y.shape[0]
    out, start = [], 0
    for l in range(lmax + 1):
        size = channels * (2 * l + 1)
        out.append(y[:, start : start + size].reshape(n, channels, 2 * l + 1).transpose(1, 2))
        start += size
    return torch.cat(out, dim=1)


def tp_paths(lmax: int) -> list[tuple[int, int, int]]:
    """Every (l1, l2, l3) with l1, l2, l3 <= lmax and |l1 - l2| <= l3 <= l1 + l2."""
    return [(l1, l2, l3) for l1 in range(lmax + 1) for l2 in range(lmax + 1) for l3 in range(abs(l1 - l2), min(l1 + l2, lmax) + 1)]


class DenseCGTensorProduct(nn.Module):
    """``e3nn.o3.TensorProduct(x, Y, mode 'uvu', per-edge weights)`` written as two contractions per path.

    For path p = (l1, l2, l3): ``A = Y_l2 . W3j(l1, l2, l3)`` ([E, 2l1+1, 2l3+1]), then
    ``t[e, u, :] = alpha_p * w[e, p, u] * x_l1[e, u, :] @ A[e]`` with e3nn's Wigner-3j and path
    weights ``alpha_p`` (component irrep normalisation, element path normalisation). Same
    function, weight layout and output layout as the e3nn module (``reference()`` builds it;
    the tests compare them), but with a fixed contraction order whose matmul FLOPs are
    ``2 (2l1+1)(2l2+1)(2l3+1) + 2 C (2l1+1)(2l3+1)`` per edge and path. e3nn's generic
    code instead forms the outer product x (x) Y first and lets opt_einsum order the rest.
    """

    def __init__(self, lmax: int, channels: int) -> None:
        super().__init__()
        self.lmax, self.channels = lmax, channels
        self.irreps_x = o3.Irreps([(channels, (l, 1)) for l in range(lmax + 1)])
        self.irreps_sh = o3.Irreps([(1, (l, 1)) for l in range(lmax + 1)])
        self.paths = tp_paths(lmax)
        self.irreps_out = o3.Irreps([(channels, (l3, 1)) for _, _, l3 in self.paths])
        self.weight_numel = len(self.paths) * channels
        # e3nn's path weight for 'uvu' with component irrep and element path normalisation,
        # each path owning its output block: sqrt(2 l3 + 1).
        self.path_weights = [math.sqrt(2 * l3 + 1) for _, _, l3 in self.paths]
        for k, (l1, l2, l3) in enumerate(self.paths):
            w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64).to(torch.get_default_dtype())
            self.register_buffer(f"w3j_{k}", w3j, persistent=False)
        self._x_slices = [self.irreps_x.slices()[l] for l in range(lmax + 1)]
        self._sh_slices = [self.irreps_sh.slices()[l] for l in range(lmax + 1)]

    def reference(self) -> o3.TensorProduct:
        """The e3nn module this one reimplements."""
        instructions = [(l1, l2, k, "uvu", True) for k, (l1, l2, _) in enumerate(self.paths)]
        return o3.TensorProduct(self.irreps_x, self.irreps_sh, self.irreps_out, instructions, shared_weights=False, internal_weights=False)

    def forward(self, x: Tensor, sh: Tensor, weight: Tensor) -> Tensor:
        e, c = x.shape[0], self.channels
        w = weight.reshape(e, len(self.paths), c)
        outs = []
        for k, (l1, l2, l3) in enumerate(self.paths):
            d1, d2, d3 = 2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1
            w3j = getattr(self, f"w3j_{k}")
            a = (sh[:, self._sh_slices[l2]] @ w3j.permute(1, 0, 2).reshape(d2, d1 * d3)).reshape(e, d1, d3)
            xl = x[:, self._x_slices[l1]].reshape(e, c, d1)
            t = torch.bmm(xl, a) * (self.path_weights[k] * w[:, k, :, None])
            outs.append(t.reshape(e, c * d3))
        return torch.cat(outs, dim=1)

    def flops(self, n_edges: int) -> float:
        return n_edges * sum(_tp_path_flops(l1, l2, l3, self.channels) for l1, l2, l3 in self.paths)


class DenseTPConv(nn.Module):
    """The per-edge interaction: SO3Linear -> dense CG TP with radial weights -> scatter -> o3.Linear."""

    def __init__(self, lmax: int, channels: int, num_rbf: int, radial_hidden: int, cutoff: float, max_neighbors: int | None) -> None:
        super().__init__()
        from e2f.nn import rbf_centers_and_gamma

        self.lmax, self.channels, self.cutoff = lmax, channels, cutoff
        self.tp = DenseCGTensorProduct(lmax, channels)
        self.irreps_sh = self.tp.irreps_sh
        self.linear_in = o3.Linear(self.tp.irreps_x, self.tp.irreps_x)
        self.radial = nn.Sequential(nn.Linear(num_rbf, radial_hidden), nn.SiLU(), nn.Linear(radial_hidden, self.tp.weight_numel))
        self.linear_out = o3.Linear(self.tp.irreps_out, self.tp.irreps_x)
        centers, gamma = rbf_centers_and_gamma(cutoff, num_rbf)
        self.register_buffer("rbf_centers", centers.to(torch.get_default_dtype()))
        self.rbf_gamma = gamma
        self.norm_const = 1.0 / math.sqrt(max_neighbors or 32)

    def edge_geometry(self, vec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(spherical harmonics [E, (L+1)^2] of the unit vectors, RBF [E, R], envelope [E])."""
        from e2f.attention.core import envelope

        d = vec.norm(dim=-1)
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        rbf = torch.exp(-self.rbf_gamma * (d[:, None] - self.rbf_centers) ** 2)
        env = envelope((d / self.cutoff).clamp(max=1.0))
        return sh, rbf, env

    def forward(self, x: Tensor, edges: EdgeList, vec: Tensor) -> Tensor:
        """``x`` [N, (L+1)^2, C], ``vec`` [E, 3] = source - target -> message [N, (L+1)^2, C]."""
        sh, rbf, env = self.edge_geometry(vec)
        h = self.linear_in(to_e3nn(x, self.lmax))
        w = self.radial(rbf)
        t = self.tp(h[edges.src], sh, w) * (env * self.norm_const)[:, None]
        m = torch.zeros(x.shape[0], t.shape[1], dtype=t.dtype, device=t.device).index_add(0, edges.dst, t)
        return from_e3nn(self.linear_out(m), self.lmax, self.channels)

    def flops(self, n_atoms: int, n_edges: int) -> dict[str, float]:
        """Matmul FLOPs: see :func:`dense_tp_conv_flops`."""
        return dense_tp_conv_flops(self.lmax, self.channels, self.radial, n_atoms, n_edges)


def _tp_path_flops(l1: int, l2: int, l3: int, c: int) -> float:
    """Matmul FLOPs of one path of :class:`DenseCGTensorProduct` per edge: the SH contracted
    with the Wigner-3j, ``2 (2l1+1)(2l2+1)(2l3+1)``, then the features with the result,
    ``2 C (2l1+1)(2l3+1)``; the per-edge weight product is elementwise."""
    d1, d2, d3 = 2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1
    return 2.0 * d1 * d2 * d3 + 2.0 * c * d1 * d3


def dense_tp_conv_flops(lmax: int, c: int, radial: nn.Module, n_atoms: int, n_edges: int) -> dict[str, float]:
    """Matmul FLOPs of one :class:`DenseTPConv`.

    ``core`` = E * sum_paths tp_path (see ``_tp_path_flops``); plus the radial MLP
    ``2E (R G + G P C)``, the node-level ``linear_in`` ``2N sum_l C^2 (2l+1)`` and
    ``linear_out`` ``2N sum_paths C^2 (2 l3 + 1)``.
    """
    paths = tp_paths(lmax)
    core = n_edges * sum(_tp_path_flops(l1, l2, l3, c) for l1, l2, l3 in paths)
    rad = sum(linear_flops(n_edges, m) for m in radial.modules() if isinstance(m, nn.Linear))
    lin_in = 2.0 * n_atoms * sum(c * c * (2 * l + 1) for l in range(lmax + 1))
    lin_out = 2.0 * n_atoms * sum(c * c * (2 * l3 + 1) for _, _, l3 in paths)
    return {"core": core, "total": core + rad + lin_in + lin_out}


def _e2f_blocks():
    from e2f.nn import GatedFFN, RMSNormSH

    return RMSNormSH, GatedFFN


def _charge_spin_ranges() -> tuple[int, int]:
    from e2f.model import MAX_CHARGE, MAX_SPIN

    return MAX_CHARGE, MAX_SPIN


class DenseTPBlock(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        RMSNormSH, GatedFFN = _e2f_blocks()
        L, C = config.lmax, config.channels
        self.norm_1 = RMSNormSH(L, C)
        self.conv = DenseTPConv(L, C, config.num_rbf, config.radial_hidden, config.cutoff, config.max_neighbors)
        self.norm_2 = RMSNormSH(L, C)
        self.ffn = GatedFFN(L, C, config.ffn_hidden_channels)

    def forward(self, x: Tensor, edges: EdgeList, vec: Tensor) -> Tensor:
        x = x + self.conv(self.norm_1(x), edges, vec)
        return x + self.ffn(self.norm_2(x))


class DenseTPModel(nn.Module):
    """Energy/force model with dense e3nn tensor-product convolutions; ``forward(batch) -> (energy, forces)``."""

    name = "dense-tp"

    def __init__(self, config) -> None:
        super().__init__()
        RMSNormSH, _ = _e2f_blocks()
        MAX_CHARGE, MAX_SPIN = _charge_spin_ranges()
        self.config = config
        self.embedding = nn.Embedding(config.max_num_elements, config.channels)
        # System charge and spin multiplicity summed into l = 0, with E2Former's ranges.
        self.charge_embedding = nn.Embedding(2 * MAX_CHARGE + 1, config.channels)
        self.spin_embedding = nn.Embedding(MAX_SPIN + 1, config.channels)
        self.blocks = nn.ModuleList(DenseTPBlock(config) for _ in range(config.num_blocks))
        self.norm = RMSNormSH(config.lmax, config.channels)
        self.head = ScalarEnergyHead(config.channels, config.ffn_hidden_channels)

    def edges(self, batch) -> EdgeList:
        return edge_list(batch, self.config.cutoff, self.config.max_neighbors)

    def energy(self, batch, pos: Tensor, edges: EdgeList | None = None) -> Tensor:
        edges = self.edges(batch) if edges is None else edges
        if bool((batch.z < 0).any()) or bool((batch.z >= self.config.max_num_elements).any()):
            raise ValueError(f"atomic numbers must be in [0, {self.config.max_num_elements})")
        vec = edges.vectors(pos)
        n, s = pos.shape[0], (self.config.lmax + 1) ** 2
        x = torch.zeros(n, s, self.config.channels, dtype=pos.dtype, device=pos.device)
        x0 = self.embedding(batch.z.long()) + self._system_embedding(batch)[batch.batch]
        x = torch.cat([x0.unsqueeze(1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x, edges, vec)
        x = self.norm(x)
        return self.head(x[:, 0, :], batch.batch, num_systems(batch))

    def _system_embedding(self, batch) -> Tensor:
        MAX_CHARGE, MAX_SPIN = _charge_spin_ranges()
        b = num_systems(batch)
        device = batch.z.device
        charge = getattr(batch, "charge", None)
        spin = getattr(batch, "spin", None)
        charge = torch.zeros(b, dtype=torch.long, device=device) if charge is None else charge.long()
        spin = torch.ones(b, dtype=torch.long, device=device) if spin is None else spin.long()
        if bool(((charge.abs() > MAX_CHARGE) | (spin < 0) | (spin > MAX_SPIN)).any()):
            raise ValueError(f"charge must lie in [-{MAX_CHARGE}, {MAX_CHARGE}] and spin multiplicity in [0, {MAX_SPIN}]")
        return self.charge_embedding(charge + MAX_CHARGE) + self.spin_embedding(spin)

    def forward(self, batch) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            pos = positions_for_grad(batch.pos)
            energy = self.energy(batch, pos)
            forces = conservative_forces(energy, pos, create_graph=self.training)
        return (energy if self.training else energy.detach()), forces

    def flops(self, batch) -> dict[str, float]:
        """Per block: :func:`dense_tp_conv_flops` (``core`` = the TP products) plus the gated
        FFN, ``2N S C H + 2N C L H + 2N S H C`` (two SO3-linears and the gate layer), and two
        RMS norms, ``2N S C`` each (their per-degree weighting is an einsum); a final norm
        and the head ``2N (C H + H)``. S = (L+1)^2, H = ``ffn_hidden``."""
        e = self.edges(batch)
        n = batch.pos.shape[0]
        L, C, H = self.config.lmax, self.config.channels, self.config.ffn_hidden_channels
        S = (L + 1) ** 2
        ffn = 2.0 * n * (S * C * H + C * L * H + S * H * C)
        norm = 2.0 * n * S * C
        core = total = 0.0
        for block in self.blocks:
            f = block.conv.flops(n, e.num_edges)
            core += f["core"]
            total += f["total"] + ffn + 2 * norm
        return {"core": core, "total": total + norm + self.head.flops(n)}

    def memory_model(self, n_atoms: int, n_edges: int, itemsize: int = 4) -> dict[str, float]:
        return dense_tp_memory(self.config, n_atoms, n_edges, itemsize)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self)


def dense_tp_memory(config, n_atoms: int, n_edges: int, itemsize: int = 4) -> dict[str, float]:
    """Estimated activation bytes kept for backward by one energy forward.

    Per block and edge: the gathered features [E, S C], the SH [E, S] and RBF [E, R], the
    radial MLP hidden [E, 2G] and weights [E, P C], e3nn's per-path intermediates
    (Wigner-3j x SH, [E, sum_p (2l1+1)(2l3+1)]) and the TP output [E, sum_p (2 l3 + 1) C]
    twice (before and after the envelope). Per block and node: about 8 [N, S C] (norms,
    linears, FFN, residuals) and the aggregated message [N, sum_p (2l3+1) C].
    """
    L, C, G, R = config.lmax, config.channels, config.radial_hidden, config.num_rbf
    S = (L + 1) ** 2
    paths = tp_paths(L)
    P = len(paths)
    mid = sum((2 * l3 + 1) for _, _, l3 in paths) * C
    per_edge_block = S * C + S + R + 2 * G + P * C + sum((2 * l1 + 1) * (2 * l3 + 1) for l1, _, l3 in paths) + 2 * mid
    per_node_block = 8 * S * C + mid
    per_edge = config.num_blocks * per_edge_block
    per_node = config.num_blocks * per_node_block + 2 * C
    return {
        "bytes": float(itemsize * (per_node * n_atoms + per_edge * n_edges)),
        "per_atom": float(itemsize * per_node),
        "per_edge": float(itemsize * per_edge),
    }


class DenseTPLayer:
    """Layer-level benchmark: one :class:`DenseTPConv` on random node features.

    ``make_inputs(batch)`` builds the edge list and edge vectors and random ``x``
    [N, (L+1)^2, C] (requires grad); ``layer(inputs)`` returns the message.
    """

    name = "dense-tp"

    def __init__(self, config, *, device=None, dtype=torch.float32) -> None:
        self.config = config
        self.module = DenseTPConv(config.lmax, config.channels, config.num_rbf, config.radial_hidden, config.cutoff, config.max_neighbors).to(
            device=device, dtype=dtype
        )
        self.device, self.dtype = device, dtype

    def make_inputs(self, batch, seed: int = 0) -> dict:
        edges = edge_list(batch, self.config.cutoff, self.config.max_neighbors)
        pos = batch.pos.to(device=self.device, dtype=self.dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(pos.shape[0], (self.config.lmax + 1) ** 2, self.config.channels, generator=gen, dtype=self.dtype)
        return {"x": x.to(self.device).requires_grad_(True), "edges": edges, "vec": edges.vectors(pos)}

    def __call__(self, inputs: dict) -> Tensor:
        return self.module(inputs["x"], inputs["edges"], inputs["vec"])

    def flops(self, inputs: dict) -> dict[str, float]:
        return self.module.flops(inputs["x"].shape[0], inputs["edges"].num_edges)

    def parameters(self):
        return self.module.parameters()
