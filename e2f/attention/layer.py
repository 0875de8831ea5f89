"""The E2Former-V2 attention layer (METHOD.md sections 2-4).

Per node: invariant queries and keys, the per-node parts of the first gate layer, the value
``v = SO3Linear(x)`` and its source-side product ``b = S_{r_j}(v)``. The attention core
(any backend) aggregates ``V = [b; v]`` per head with ``w_ij = alpha_ij / d_ij``; the target
side forms ``m_i = S_{r_i}(A_v) - A_b = sum_j w_ij v_j (x) R^1(r_i - r_j)``, mixes the paths
of each l3 back to C channels and projects.

``node_product`` selects how the products with R^1 are computed: ``"eaas"`` (V2),
``"dense-cg"`` (the dense e3nn CG twin, E2Former v1) or ``"moments"``: no source-side
product; the core moves ``v`` weighted by the displacement ``r_i - r_j``
(``CoreInputs.moments``) and each target contracts its ``[3, (L+1)^2, C]`` moments with the
CG coefficients once (``e2f.eaas.dense_cg_moments``). A source then moves ``(L+1)^2`` rows
an edge instead of ``rows_out + (L+1)^2`` (9 against 29 for L = 2), and the message never
subtracts two terms that grow with ``|r|``. With the same weights all three compute the same
function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from e2f.attention.backends import get_backend
from e2f.attention.core import CoreInputs
from e2f.eaas import dense_cg_moments, dense_cg_product, eaas_product, eaas_table
from e2f.nn import ScalarMLP, SO3Linear, rbf_centers_and_gamma, so3_linear
from e2f.so3 import PolarFrames

NODE_PRODUCTS = ("eaas", "dense-cg", "moments")


@dataclass
class Graph:
    """What a layer needs to know about the structure (built once per forward by the model).

    Attributes
    ----------
    pos : Tensor
        ``[N, 3]`` positions, centred per system.
    z : Tensor
        ``[N]`` atomic numbers.
    nbr : Tensor
        ``[N, K]`` source slots (see ``e2f.neighbors``).
    src_atom : Tensor
        ``[M]`` atom of each source slot.
    pos_src : Tensor
        ``[M, 3]`` source positions ``pos[src_atom] + shift``.
    """

    pos: Tensor
    z: Tensor
    nbr: Tensor
    src_atom: Tensor
    pos_src: Tensor
    _frames: dict | None = None
    _z_src: Tensor | None = None

    @property
    def z_src(self) -> Tensor:
        """``[M]`` atomic number of each source slot (gathered once per graph)."""
        if self._z_src is None:
            self._z_src = self.z[self.src_atom]
        return self._z_src

    def frames(self, lmax: int) -> tuple[PolarFrames, PolarFrames]:
        """Polar frames of the targets and of the source slots, computed once per ``lmax``."""
        if self._frames is None:
            self._frames = {}
        if lmax not in self._frames:
            # One frames object for both: one launch per step of building them and their casts.
            both = PolarFrames.from_vectors(torch.cat([self.pos, self.pos_src]).detach(), lmax)
            self._frames[lmax] = both.split(self.pos.shape[0])
        return self._frames[lmax]


def rows_to_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[n, rows, C] -> [n, H, rows * C/H]``: head h owns the channels ``c % H == h``."""
    n, rows, c = x.shape
    return x.reshape(n, rows, c // num_heads, num_heads).permute(0, 3, 1, 2).reshape(n, num_heads, rows * (c // num_heads))


def heads_to_rows(x: Tensor, rows: int) -> Tensor:
    """Inverse of :func:`rows_to_heads`: ``[n, H, rows * C/H] -> [n, rows, C]``."""
    n, h, dv = x.shape
    return x.reshape(n, h, rows, dv // rows).permute(0, 2, 3, 1).reshape(n, rows, h * (dv // rows))


class InvariantProjection(torch.nn.Module):
    """Invariant per-head vectors from x: per-degree m-wise products of two SO3-linears, then an MLP.

    The layer runs ``left`` and ``right`` inside its one stacked SO3-linear of x and sums
    the products per degree (:func:`degree_invariants`); this module maps the invariants.
    """

    def __init__(self, lmax: int, channels: int, inner: int, num_heads: int, head_dim: int):
        super().__init__()
        self.lmax, self.num_heads, self.head_dim = lmax, num_heads, head_dim
        self.left = SO3Linear(lmax, channels, inner, bias=False)
        self.right = SO3Linear(lmax, channels, inner, bias=False)
        self.mlp = ScalarMLP((lmax + 1) * inner, num_heads * head_dim, num_heads * head_dim)

    def forward(self, invariants: Tensor) -> Tensor:
        """``[N, L+1, inner]`` per-degree invariants -> ``[N, H, d]``."""
        return self.mlp(invariants.reshape(invariants.shape[0], -1)).reshape(-1, self.num_heads, self.head_dim)


def degree_invariants(a: Tensor, b: Tensor, degree: Tensor, lmax: int) -> Tensor:
    """``sum_m a_lm b_lm`` per degree: ``[N, (L+1)^2, C]`` twice -> ``[N, L+1, C]``.

    ``degree`` is the degree of each row; one scatter-add instead of a sum per degree.
    """
    n, _, c = a.shape
    return a.new_zeros(n, lmax + 1, c).index_add(1, degree, a * b)


class E2Attention(torch.nn.Module):
    """One E2Former-V2 attention layer: ``x [N, (L+1)^2, C] -> [N, (L+1)^2, C]``.

    Parameters
    ----------
    lmax, channels, num_heads, head_dim : int
        L, C, H (``C % H == 0``) and the query/key width d.
    num_rbf, gate_hidden : int
        Radial Gaussians R and the gate MLP hidden width G.
    cutoff, eps : float
        Neighbour radius (Å) and the softmax sink weight.
    qk_channels : int
        Channels of the two SO3-linears whose m-wise products make the q/k invariants.
    num_elements : int
        Size of the per-layer element embeddings of the gate's per-node parts.
    backend : str
        Attention-core backend (``e2f.attention.backends``).
    node_product : str
        ``"eaas"``, ``"dense-cg"`` or ``"moments"`` (see the module docstring).
    """

    def __init__(
        self,
        lmax: int,
        channels: int,
        num_heads: int,
        head_dim: int,
        num_rbf: int,
        gate_hidden: int,
        cutoff: float,
        eps: float,
        qk_channels: int,
        num_elements: int,
        backend: str = "chunked",
        node_product: str = "eaas",
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        if node_product not in NODE_PRODUCTS:
            raise ValueError(f"node_product must be one of {NODE_PRODUCTS}, got {node_product!r}")
        get_backend(backend)
        self.lmax, self.channels, self.num_heads = lmax, channels, num_heads
        self.cutoff, self.eps = cutoff, eps
        self.backend, self.node_product = backend, node_product
        self.table = eaas_table(lmax)
        self.query = InvariantProjection(lmax, channels, qk_channels, num_heads, head_dim)
        self.key = InvariantProjection(lmax, channels, qk_channels, num_heads, head_dim)
        self.value = SO3Linear(lmax, channels, channels, bias=True)
        centers, gamma = rbf_centers_and_gamma(cutoff, num_rbf)
        self.register_buffer("rbf_centers", centers.to(torch.get_default_dtype()))
        self.rbf_gamma = gamma
        self.gate_dst = torch.nn.Embedding(num_elements, gate_hidden)
        self.gate_src = torch.nn.Embedding(num_elements, gate_hidden)
        self.w_radial = torch.nn.Parameter(torch.randn(num_rbf, gate_hidden) * (2.0 / num_rbf) ** 0.5)
        self.w_out = torch.nn.Parameter(torch.randn(gate_hidden, 2 * num_heads) / gate_hidden**0.5)
        # g starts near 1 (logits of order q.k) and u near 1 (weights near the softmax's).
        self.b_out = torch.nn.Parameter(torch.ones(2 * num_heads))
        with torch.no_grad():
            self.gate_dst.weight.mul_(0.1)
            self.gate_src.weight.mul_(0.1)
        self.mix = torch.nn.ModuleList(
            torch.nn.Linear(count * channels, channels, bias=False) for count in self.table.paths_per_degree)
        self.output = SO3Linear(lmax, channels, channels, bias=True)
        # Message row -> its path (paths ordered by l3, then l1, as the table and mix columns are).
        path_of_row = torch.cat([torch.full((2 * l3 + 1,), p) for p, l3 in enumerate(self.table.out_degrees)])
        self.register_buffer("path_of_row", path_of_row, persistent=False)

    def _product(self, v: Tensor, r: Tensor, frames: PolarFrames) -> Tensor:
        if self.node_product == "eaas":
            return eaas_product(v, r, self.lmax, frames)
        return dense_cg_product(v, r, self.lmax)

    def core_inputs(self, x: Tensor, graph: Graph) -> CoreInputs:
        """The attention-core inputs of this layer for features ``x`` (also used by benchmarks)."""
        inner = self.query.left.weight.shape[2]
        # Value and the four q/k SO3-linears read the same x: one stacked matmul.
        stacked = [self.value, self.query.left, self.key.left, self.query.right, self.key.right]
        v, left, right = so3_linear(x, stacked).split([self.channels, 2 * inner, 2 * inner], dim=2)
        q_inv, k_inv = degree_invariants(left, right, self.value.degree, self.lmax).split(inner, dim=2)
        v_src = v[graph.src_atom]
        moments = self.node_product == "moments"
        if not moments:
            v_src = torch.cat([self._product(v_src, graph.pos_src, graph.frames(self.lmax)[1]), v_src], dim=1)
        values = rows_to_heads(v_src, self.num_heads)
        # Contiguous rows: the fused kernel's precondition (a no-op for the other backends).
        return CoreInputs(
            pos_dst=graph.pos.contiguous(),
            pos_src=graph.pos_src.contiguous(),
            nbr=graph.nbr,
            q=self.query(q_inv).contiguous(),
            k=self.key(k_inv)[graph.src_atom].contiguous(),
            v=values.contiguous(),
            gate_dst=self.gate_dst(graph.z).contiguous(),
            gate_src=self.gate_src(graph.z_src).contiguous(),
            rbf_centers=self.rbf_centers,
            w_radial=self.w_radial,
            w_out=self.w_out,
            b_out=self.b_out,
            rbf_gamma=self.rbf_gamma,
            cutoff=self.cutoff,
            eps=self.eps,
            moments=moments,
        )

    def _mix(self, message: Tensor) -> Tensor:
        """Per l3, the paths into l3 mixed back to C channels: ``[N, rows_out, C] -> [N, (L+1)^2, C]``.

        One batched matmul over the message rows (each with its path's block of the mix
        weight), then the paths of each l3 summed.
        """
        blocks = [mix.weight.view(self.channels, -1, self.channels).permute(1, 2, 0) for mix in self.mix]
        weight = torch.cat(blocks)[self.path_of_row]  # [rows_out, C_in, C_out]
        per_row = torch.bmm(message.transpose(0, 1), weight)
        counts = self.table.paths_per_degree
        groups = per_row.split([count * (2 * l3 + 1) for l3, count in enumerate(counts)])
        parts = [g if count == 1 else g.view(count, -1, *g.shape[1:]).sum(0) for g, count in zip(groups, counts)]
        return torch.cat(parts).transpose(0, 1)

    def forward(self, x: Tensor, graph: Graph) -> Tensor:
        backend = get_backend(self.backend)
        inp = backend.prepare(self.core_inputs(x, graph))
        backend.check(inp)
        out = backend(inp)
        if self.node_product == "moments":
            # [N, H, (x, y, z) x rows_in C/H] -> [N, 3, rows_in, C]
            n, h, _ = out.shape
            per_axis = out.reshape(n, h, 3, -1).transpose(1, 2).reshape(3 * n, h, -1)
            moments = heads_to_rows(per_axis, self.table.rows_in).reshape(n, 3, self.table.rows_in, self.channels)
            message = dense_cg_moments(moments, self.lmax)
        else:
            agg = heads_to_rows(out, self.table.rows_out + self.table.rows_in)
            agg_b, agg_v = agg.split([self.table.rows_out, self.table.rows_in], dim=1)
            message = self._product(agg_v, graph.pos, graph.frames(self.lmax)[0]) - agg_b
        return self.output(self._mix(message))
