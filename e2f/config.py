"""E2FormerConfig and named presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class E2FormerConfig:
    """Hyper-parameters of :class:`e2f.model.E2FormerV2` (defaults: the paper's setting).

    Attributes
    ----------
    lmax, channels, num_blocks : int
        L, C and the number of (attention + FFN) blocks.
    num_heads, head_dim : int
        H (``channels % num_heads == 0``) and the query/key width d.
    cutoff : float
        Neighbour radius in Å.
    max_neighbors : int or None
        Keep the K nearest neighbours (None: all within the cutoff).
    num_rbf, gate_hidden : int
        Gaussians of the radial basis and the hidden width of the gate MLP.
    eps : float
        Softmax sink weight.
    qk_channels : int
        Width of the SO3-linears feeding the invariant queries/keys.
    ffn_hidden : int or None
        Hidden channels of the gated FFN (``channels`` if None).
    edge_hidden : int
        Hidden width of the edge-degree embedding's radial MLP.
    avg_num_neighbors : float
        Normaliser of the edge-degree embedding's neighbour sum.
    max_z : int
        Largest atomic number accepted.
    use_charge_spin : bool
        Add total-charge and spin-multiplicity embeddings to l = 0.
    direct_forces : bool
        Also predict forces with a linear head on l = 1 (``"direct_forces"`` output).
    backend : str
        Attention-core backend: ``materialized`` | ``chunked`` | ``triton``.
    node_product : str
        ``eaas`` (V2), ``dense-cg`` (E2Former v1's node products) or ``moments`` (the core
        aggregates displacement-weighted values, 9 rows an edge instead of 29 for L = 2, and
        no product cancels two terms of size |r|: ``e2f.attention.layer``); every backend.
    spatial_order : bool or None
        Sort atoms along a Morton curve inside the model (outputs keep the caller's
        order); None: only when the backend benefits (``triton``).
    checkpoint_blocks : bool
        Recompute each block's activations in backward instead of keeping them (activation
        checkpointing): less memory for forces and training at the cost of one more
        forward per block. Same function either way.
    """

    lmax: int = 2
    channels: int = 256
    num_blocks: int = 4
    num_heads: int = 128
    head_dim: int = 8
    cutoff: float = 5.0
    max_neighbors: int | None = 32
    num_rbf: int = 256
    gate_hidden: int = 128
    eps: float = 1e-3
    qk_channels: int = 64
    ffn_hidden: int | None = None
    edge_hidden: int = 128
    avg_num_neighbors: float = 20.0
    max_z: int = 100
    use_charge_spin: bool = True
    direct_forces: bool = False
    backend: str = "chunked"
    node_product: str = "eaas"
    spatial_order: bool | None = None
    checkpoint_blocks: bool = False

    def replace(self, **changes) -> "E2FormerConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, E2FormerConfig] = {
    "paper": E2FormerConfig(),
    # Minutes of CPU training on small molecules.
    "small": E2FormerConfig(channels=64, num_blocks=2, num_heads=8, head_dim=8, num_rbf=64, gate_hidden=32,
                            qk_channels=16, edge_hidden=32, max_neighbors=24),
    # Unit tests: fp64 equivariance and finite differences in seconds.
    "tiny": E2FormerConfig(channels=8, num_blocks=2, num_heads=4, head_dim=4, num_rbf=16, gate_hidden=8,
                           qk_channels=4, edge_hidden=8, max_neighbors=16, avg_num_neighbors=8.0),
}


def get_config(name: str, **overrides) -> E2FormerConfig:
    """Preset ``name`` with ``overrides`` applied (ValueError naming the presets if unknown)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
