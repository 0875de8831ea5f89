"""The ``attention-core`` workload: seeded random inputs for one attention-core call.

Atoms uniform at random in a cube at a given number density (0.1 atoms/Å^3 is liquid
water's heavy-atom-plus-hydrogen density order of magnitude), neighbours from
``e2f.neighbors`` with the K nearest kept, and q/k/v/gate tensors scaled so that logits
are O(1): the softmax is neither uniform nor one-hot, as in a trained model.
"""
from __future__ import annotations

import math

import torch

from e2f.attention.core import CoreInputs
from e2f.neighbors import neighbor_list
from e2f.nn import rbf_centers_and_gamma
from e2f.ordering import spatial_order


def random_core_inputs(
    n_atoms: int,
    *,
    density: float = 0.1,
    cutoff: float = 5.0,
    max_neighbors: int | None = 32,
    num_heads: int = 128,
    head_dim: int = 8,
    dv: int = 58,
    gate_hidden: int = 128,
    num_rbf: int = 256,
    eps: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    requires_grad: bool = False,
    spatially_ordered: bool = True,
    periodic: bool = False,
    value_head_stride: int | None = None,
) -> CoreInputs:
    """Random attention-core inputs for ``n_atoms`` atoms in a cube.

    Parameters
    ----------
    n_atoms : int
        Number of atoms (targets).
    density : float
        Atoms per Å^3; the cube side is ``(n_atoms / density) ** (1/3)``.
    cutoff, max_neighbors : float, int or None
        Neighbour radius (Å) and cap K (nearest kept).
    num_heads, head_dim, dv, gate_hidden, num_rbf : int
        H, d (query/key width), value numbers per head (29 C / H), gate hidden width G, R.
    eps : float
        Softmax sink weight.
    dtype, device
        Of every floating tensor (``nbr`` is int64 on ``device``); a half dtype (bf16, fp16)
        applies to q, k and v only, the rest stays float32 (METHOD.md: positions, gates and
        accumulation stay fp32).
    seed : int
        Everything is drawn from one CPU generator seeded with it.
    requires_grad : bool
        Make every floating tensor a leaf requiring grad (``pos_src`` is its own leaf).
    spatially_ordered : bool
        Sort atoms along a Morton curve first (what the model does for the fused kernel).
    periodic : bool
        Use a periodic cube: every atom sees a bulk environment and image slots appear
        after the atoms (M > N).
    value_head_stride : int or None
        If larger than ``dv``: ``v`` is a view of zero-padded ``[M, H, value_head_stride]``
        rows (``e2f.attention.core.pad_value_rows``'s layout, the one the model gives the
        fused kernel), filled on the device without a contiguous copy of ``v`` there.

    Returns
    -------
    CoreInputs
    """
    if n_atoms < 1:
        raise ValueError(f"n_atoms must be >= 1, got {n_atoms}")
    gen = torch.Generator().manual_seed(seed)
    side = (n_atoms / density) ** (1.0 / 3.0)
    pos = torch.rand(n_atoms, 3, generator=gen, dtype=torch.float64) * side
    if spatially_ordered:
        pos = pos[spatial_order(pos)]
    cell = torch.eye(3, dtype=torch.float64) * side if periodic else None
    nl = neighbor_list(pos, cutoff, max_neighbors, cell=cell, pbc=torch.tensor([periodic] * 3))
    pos_src = nl.source_positions(pos)
    m = pos_src.shape[0]
    centers, gamma = rbf_centers_and_gamma(cutoff, num_rbf)

    # Float64 draws only for a float64 workload: at N = 1,048,576 the per-source values alone
    # are 30 GB in float32, and the GPU host has 128 GB.
    draw = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=draw) * scale

    k_atoms = randn(n_atoms, num_heads, head_dim)
    v_atoms = randn(n_atoms, num_heads, dv)
    gate_src_atoms = randn(n_atoms, gate_hidden, scale=0.5)
    # Gate g around 1 and u around 1 (bias), modulated by the radial and per-node parts:
    # logits g * q.k / sqrt(d) then have unit-order spread.
    b_out = torch.ones(2 * num_heads, dtype=draw) + randn(2 * num_heads, scale=0.1)
    tensors = dict(
        pos_dst=pos,
        pos_src=pos_src,
        nbr=nl.nbr,
        q=randn(n_atoms, num_heads, head_dim),
        k=k_atoms[nl.src_atom],
        v=v_atoms[nl.src_atom],
        gate_dst=randn(n_atoms, gate_hidden, scale=0.5),
        gate_src=gate_src_atoms[nl.src_atom],
        rbf_centers=centers,
        w_radial=randn(num_rbf, gate_hidden, scale=1.0 / math.sqrt(num_rbf) * 4.0),
        w_out=randn(gate_hidden, 2 * num_heads, scale=1.0 / math.sqrt(gate_hidden)),
        b_out=b_out,
    )
    out = {}
    for name, t in tensors.items():
        if name == "nbr":
            out[name] = t.to(device)
            continue
        low_precision = dtype in (torch.bfloat16, torch.float16)
        to = dict(device=device, dtype=dtype if not low_precision or name in ("q", "k", "v") else torch.float32)
        if name == "v" and value_head_stride is not None and value_head_stride > dv:
            t = _padded_rows(t, value_head_stride, **to)
        else:
            t = t.to(**to)
        out[name] = t.detach().requires_grad_(True) if requires_grad else t
    return CoreInputs(**out, rbf_gamma=gamma, cutoff=cutoff, eps=eps)


def _padded_rows(host: torch.Tensor, head_stride: int, *, device, dtype, rows_per_copy: int = 1 << 16):
    """``host [M, H, dv]`` on ``device`` as a view of zero-padded ``[M, H, head_stride]`` rows,
    copied in slabs (a strided copy of the whole tensor would stage a contiguous one)."""
    m, h, dv = host.shape
    padded = torch.zeros(m, h, head_stride, device=device, dtype=dtype)
    for start in range(0, m, rows_per_copy):
        padded[start:start + rows_per_copy, :, :dv] = host[start:start + rows_per_copy].to(device=device, dtype=dtype)
    return padded[..., :dv]
