"""E2FormerV2: energies and forces of molecules and periodic cells."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from e2f.attention.backends import get_backend
from e2f.attention.core import envelope
from e2f.attention.layer import E2Attention, Graph
from e2f.batch import AtomsBatch
from e2f.config import E2FormerConfig
from e2f.neighbors import neighbor_list
from e2f.nn import GatedFFN, GaussianRBF, RMSNormSH, ScalarMLP
from e2f.ordering import spatial_order
from e2f.so3 import spherical_harmonics

#: Total charges accepted by the charge embedding: -MAX_CHARGE..MAX_CHARGE.
MAX_CHARGE = 10
#: Spin multiplicities accepted by the spin embedding: 1..MAX_SPIN.
MAX_SPIN = 11


class EdgeDegreeEmbedding(torch.nn.Module):
    """``x_i,l = (1/avg) sum_j env(d_ij) Y_l(r_ij) MLP_l([RBF(d_ij), emb(Z_i), emb(Z_j)])``.

    The MLP's first layer is factorised (radial part + per-node parts, as in the gates).
    The channel-free edge geometry (distances, envelope, harmonics: ``[N, K, (L+1)^2]``
    at most) is computed once; the radial MLP and the neighbour sum run in checkpointed
    target blocks, so no ``[E, C]``-sized tensor outlives its block (O(N) memory in
    forward and backward).

    A block's rows: ``1 / blocks`` of the targets, but its largest tensor at least
    ``min_block_elements`` numbers (all rows if fewer) and at most ``max_block_elements``.
    So from small systems up to ``blocks x max_block_elements`` numbers, a block's memory
    is a fixed share of the whole ``[E, (L+1) C]`` (flat per atom: ~12 KB an atom a
    tensor at the paper's sizes) and the host runs at most ``blocks`` of them: each costs
    ~1.3 ms of host time (H100 box, perf-notes section 37), and fixed 4M-number blocks
    made 59 of them at 10,000 atoms, most of a host-bound call.
    """

    def __init__(self, config: E2FormerConfig, blocks: int = 8, min_block_elements: int = 1 << 22,
                 max_block_elements: int = 1 << 27):
        super().__init__()
        c, lmax = config.channels, config.lmax
        self.lmax, self.channels, self.cutoff = lmax, c, config.cutoff
        self.scale = 1.0 / config.avg_num_neighbors
        self.blocks, self.min_block_elements, self.max_block_elements = blocks, min_block_elements, max_block_elements
        self.rbf = GaussianRBF(config.cutoff, config.num_rbf)
        self.radial = torch.nn.Linear(config.num_rbf, config.edge_hidden)
        self.emb_dst = torch.nn.Embedding(config.max_z + 1, config.edge_hidden)
        self.emb_src = torch.nn.Embedding(config.max_z + 1, config.edge_hidden)
        self.out = torch.nn.Linear(config.edge_hidden, (lmax + 1) * c)

    def rows_per_block(self, n: int, k: int) -> int:
        """Target rows a block for ``n`` targets of ``k`` slots (see the class docstring)."""
        per_row = max(1, k * max(self.rbf.centers.shape[0], self.radial.out_features, self.out.out_features))
        share = -(-n // self.blocks)
        return max(1, min(max(share, self.min_block_elements // per_row), self.max_block_elements // per_row))

    def _geometry(self, graph: Graph) -> tuple[Tensor, Tensor, Tensor]:
        """``(src, d, weight)``: source slot, distance and ``env * Y / avg`` ``[N, K, (L+1)^2]`` per slot."""
        src = graph.nbr.clamp_min(0)
        vec = graph.pos[:, None] - graph.pos_src[src]
        d = vec.square().sum(-1).clamp_min(1e-30).sqrt()
        inside = (graph.nbr >= 0) & (d < self.cutoff)
        # Off-edge slots get a harmless direction and distance; their envelope is 0.
        vec = torch.where(inside[..., None], vec, torch.ones_like(vec))
        d = torch.where(inside, d, torch.ones_like(d))
        env = torch.where(inside, envelope(d / self.cutoff), torch.zeros_like(d))
        return src, d, spherical_harmonics(self.lmax, vec) * (env * self.scale)[..., None]

    def _block(self, d: Tensor, weight: Tensor, hidden_dst: Tensor, hidden_src: Tensor, src: Tensor) -> Tensor:
        rows, k = d.shape
        hidden = torch.nn.functional.silu(self.radial(self.rbf(d)) + hidden_dst[:, None] + hidden_src[src])
        radial = self.out(hidden).view(rows, k, self.lmax + 1, self.channels).unbind(2)
        # Per degree, sum over neighbours of weight [rows, K, 2l+1] times radial [rows, K, C]
        # (split and unbind: one backward op each rather than one per degree).
        per_degree = weight.split([2 * l + 1 for l in range(self.lmax + 1)], dim=2)
        return torch.cat([torch.bmm(w.transpose(1, 2), r) for w, r in zip(per_degree, radial)], dim=1)

    def forward(self, graph: Graph) -> Tensor:
        src, d, weight = self._geometry(graph)
        hidden_dst, hidden_src = self.emb_dst(graph.z), self.emb_src(graph.z_src)
        rows_per_block = self.rows_per_block(*graph.nbr.shape)
        blocks = []
        # Splits, not slices: one backward op per tensor rather than one per block.
        for d_b, weight_b, dst_b, src_b in zip(*(t.split(rows_per_block) for t in (d, weight, hidden_dst, src))):
            args = (d_b, weight_b, dst_b, hidden_src, src_b)
            if torch.is_grad_enabled():
                blocks.append(checkpoint(self._block, *args, use_reentrant=False))
            else:
                blocks.append(self._block(*args))
        return torch.cat(blocks, dim=0) if len(blocks) > 1 else blocks[0]


class E2FormerBlock(torch.nn.Module):
    """``x += Attn(RMSNormSH(x)); x += FFN(RMSNormSH(x))``."""

    def __init__(self, config: E2FormerConfig):
        super().__init__()
        c, lmax = config.channels, config.lmax
        self.norm_attn = RMSNormSH(lmax, c)
        self.attn = E2Attention(
            lmax=lmax,
            channels=c,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            num_rbf=config.num_rbf,
            gate_hidden=config.gate_hidden,
            cutoff=config.cutoff,
            eps=config.eps,
            qk_channels=config.qk_channels,
            num_elements=config.max_z + 1,
            backend=config.backend,
            node_product=config.node_product,
        )
        self.norm_ffn = RMSNormSH(lmax, c)
        self.ffn = GatedFFN(lmax, c, config.ffn_hidden or c)

    def forward(self, x: Tensor, graph: Graph) -> Tensor:
        x = x + self.attn(self.norm_attn(x), graph)
        return x + self.ffn(self.norm_ffn(x))


class E2FormerV2(torch.nn.Module):
    """E2Former-V2: energy per system and conservative forces.

    ``model(batch)`` returns ``{"energy": [B], "forces": [N, 3]}`` (``"direct_forces"`` too
    if ``config.direct_forces``), in the caller's atom order. Positions are centred per
    system before any product with them; when the attention backend benefits (``triton``),
    atoms are sorted once along a Morton curve and the outputs mapped back.
    """

    def __init__(self, config: E2FormerConfig):
        super().__init__()
        if config.lmax < 1:
            raise ValueError(f"lmax must be >= 1, got {config.lmax}")
        self.config = config
        c = config.channels
        self.edge_embedding = EdgeDegreeEmbedding(config)
        self.atom_embedding = torch.nn.Embedding(config.max_z + 1, c)
        if config.use_charge_spin:
            self.charge_embedding = torch.nn.Embedding(2 * MAX_CHARGE + 1, c)
            self.spin_embedding = torch.nn.Embedding(MAX_SPIN + 1, c)
        self.blocks = torch.nn.ModuleList(E2FormerBlock(config) for _ in range(config.num_blocks))
        self.final_norm = RMSNormSH(config.lmax, c)
        self.energy_head = ScalarMLP(c, c, 1)
        self.force_head = torch.nn.Linear(c, 1, bias=False) if config.direct_forces else None

    def build_graph(self, pos: Tensor, batch: AtomsBatch) -> Graph:
        """Neighbour list and per-system centred positions (differentiable in ``pos``)."""
        cfg = self.config
        nl = neighbor_list(pos, cfg.cutoff, cfg.max_neighbors, batch=batch.batch, cell=batch.cell, pbc=batch.pbc)
        counts = torch.bincount(batch.batch, minlength=batch.num_systems).to(pos.dtype)
        centre = torch.zeros(batch.num_systems, 3, dtype=pos.dtype, device=pos.device).index_add(0, batch.batch, pos)
        centred = pos - (centre / counts[:, None])[batch.batch]
        pos_src = centred[nl.src_atom] + nl.src_shift.to(pos.dtype)
        return Graph(pos=centred, z=batch.z, nbr=nl.nbr, src_atom=nl.src_atom, pos_src=pos_src)

    def _check_charge_spin(self, batch: AtomsBatch) -> None:
        if not self.config.use_charge_spin:
            return
        if int(batch.charge.abs().max()) > MAX_CHARGE:
            raise ValueError(f"total charge must lie in [-{MAX_CHARGE}, {MAX_CHARGE}], got {batch.charge.tolist()}")
        if int(batch.spin.min()) < 1 or int(batch.spin.max()) > MAX_SPIN:
            raise ValueError(f"spin multiplicity must lie in [1, {MAX_SPIN}], got {batch.spin.tolist()}")

    def forward(self, batch: AtomsBatch, compute_forces: bool = True, create_graph: bool | None = None) -> dict[str, Tensor]:
        """Energies ``[B]`` and forces ``[N, 3]``.

        Parameters
        ----------
        batch : AtomsBatch
            Validated here (``ValueError`` on bad input).
        compute_forces : bool
            Return ``forces = -dE/dpos`` by autograd.
        create_graph : bool, optional
            Keep the graph of the force computation (force training); defaults to
            ``self.training``.
        """
        batch.validate(self.config.max_z)
        self._check_charge_spin(batch)
        create_graph = self.training if create_graph is None else create_graph
        pos = batch.pos
        if compute_forces and not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        perm = None
        ordered = self.config.spatial_order
        if ordered is None:
            ordered = get_backend(self.config.backend).uses_spatial_order
        if ordered and batch.num_atoms > 1:
            perm = spatial_order(pos.detach(), batch.batch)
            batch = batch.replace(pos=pos[perm], z=batch.z[perm])
        else:
            batch = batch.replace(pos=pos)
        with torch.enable_grad() if compute_forces else contextlib.nullcontext():
            energy, x = self._energy(batch)
        out = {"energy": energy}
        if compute_forces:
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
            out["forces"] = -grad
        if self.force_head is not None:
            direct = self.force_head(x[:, 1:4]).squeeze(-1)
            if perm is not None:
                direct = torch.empty_like(direct).index_copy(0, perm, direct)
            out["direct_forces"] = direct
        return out

    def _energy(self, batch: AtomsBatch) -> tuple[Tensor, Tensor]:
        graph = self.build_graph(batch.pos, batch)
        x = self.edge_embedding(graph)
        scalars = self.atom_embedding(batch.z)
        if self.config.use_charge_spin:
            per_system = self.charge_embedding(batch.charge + MAX_CHARGE) + self.spin_embedding(batch.spin)
            scalars = scalars + per_system[batch.batch]
        x = x + F.pad(scalars[:, None], (0, 0, 0, x.shape[1] - 1))
        for block in self.blocks:
            if self.config.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, graph, use_reentrant=False)
            else:
                x = block(x, graph)
        x = self.final_norm(x)
        per_atom = self.energy_head(x[:, 0]).squeeze(-1)
        energy = per_atom.new_zeros(batch.num_systems).index_add(0, batch.batch, per_atom)
        return energy, x
