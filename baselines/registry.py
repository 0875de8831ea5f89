"""One interface for the models the suites compare: four architectures, E2Former-V2 in two forms.

``build_model(name, config)`` returns an ``nn.Module`` whose call on an
``e2f.batch.AtomsBatch`` gives ``(energy [B], forces [N, 3])`` with conservative forces
``-dE/dr`` (autograd; ``create_graph`` while the module is in training mode, so a force
loss can be trained). Every model also has

- ``module.flops(batch) -> {"core": float, "total": float}``: analytic matmul FLOPs of one
  energy forward (formula in each model's docstring; elementwise work is not counted,
  like ``torch.utils.flop_counter.FlopCounterMode``). ``core`` is the message/attention
  part of the blocks, ``total`` the whole forward. Forward+backward for forces costs about
  3x ``total``.
- ``module.memory_model(n_atoms, n_edges, itemsize) -> {"bytes", "per_atom", "per_edge"}``:
  a documented estimate of the activation bytes kept for backward, linear in N and E.

``build_layer(name, config)`` gives a layer-level benchmark object: ``make_inputs(batch)``
(the interaction layer's inputs, node features requiring grad), ``layer(inputs) -> Tensor``
and ``layer.flops(inputs)``.

Matched settings: ``ModelConfig`` holds one value per shared knob (lmax, channels, blocks,
cutoff, neighbour cap K, heads, head width, radial basis size, radial MLP width); each
model's module docstring says how it maps them. All four use the same neighbour list
(``e2f.neighbors``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

MODEL_NAMES = ("e2former-v2", "e2former-v2-moments", "e2former-v1", "escn-md", "dense-tp")


@dataclass
class ModelConfig:
    """Settings shared by all four models (defaults: the paper's E2Former-V2 setting).

    Attributes
    ----------
    lmax : highest degree L of the node features (1..6).
    channels : C, channels per degree.
    num_blocks : interaction blocks.
    cutoff : neighbour cutoff in Angstrom.
    max_neighbors : K, nearest neighbours kept (None: all within the cutoff).
    num_heads, head_dim : attention heads H and query/key width d (E2Former only).
    num_rbf : Gaussian radial basis functions on [0, cutoff].
    radial_hidden : hidden width of the radial MLPs (E2Former gates, dense-TP weights,
        eSCN-MD ``edge_channels``).
    ffn_hidden : hidden width of feed-forward blocks and energy head (None: ``channels``).
    qk_channels : E2Former's q/k SO3-linear width (None: ``max(1, channels // 4)``).
    max_num_elements : size of the atom-type embedding tables.
    escn_mmax : eSCN-MD's mmax (None: ``min(lmax, 2)``).
    attention_backend : E2Former attention-core backend (None: the model's default;
        E2Former v1 always uses ``materialized``).
    checkpoint_blocks : E2Former models only: recompute each block in backward (activation
        checkpointing) instead of keeping its activations.
    """

    lmax: int = 2
    channels: int = 256
    num_blocks: int = 4
    cutoff: float = 5.0
    max_neighbors: int | None = 32
    num_heads: int = 128
    head_dim: int = 8
    num_rbf: int = 256
    radial_hidden: int = 128
    ffn_hidden: int | None = None
    qk_channels: int | None = None
    max_num_elements: int = 100
    escn_mmax: int | None = None
    attention_backend: str | None = None
    checkpoint_blocks: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.lmax <= 6:
            raise ValueError(f"lmax must be in 1..6, got {self.lmax}")
        if self.channels <= 0 or self.num_blocks <= 0:
            raise ValueError("channels and num_blocks must be positive")
        if self.channels % self.num_heads:
            raise ValueError(f"channels ({self.channels}) must be a multiple of num_heads ({self.num_heads})")
        if self.cutoff <= 0:
            raise ValueError("cutoff must be positive")

    @property
    def ffn_hidden_channels(self) -> int:
        return self.channels if self.ffn_hidden is None else self.ffn_hidden

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    # METHOD.md section 5: L = 2, C = 256, 4 blocks, H = 128, d = 8, 5 A, K = 32, 256 Gaussians.
    "paper": {},
    # CPU benchmarks in minutes.
    "small": dict(channels=64, num_blocks=2, num_heads=8, head_dim=8, num_rbf=64, radial_hidden=64),
    # Tests: seconds per forward/backward on 2 cores.
    "tiny": dict(channels=8, num_blocks=1, num_heads=2, head_dim=4, num_rbf=8, radial_hidden=8, max_neighbors=16),
}


def default_config(preset: str = "paper", **overrides) -> ModelConfig:
    """A ``ModelConfig`` from a preset name ('paper', 'small', 'tiny') or a model name.

    A model name gives the paper preset (all four models are compared at matched
    settings). Keyword overrides win, e.g. ``default_config('small', lmax=4)``.
    """
    if preset in MODEL_NAMES:
        preset = "paper"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {sorted(PRESETS)} or a model name {MODEL_NAMES}")
    valid = {f.name for f in fields(ModelConfig)}
    bad = set(overrides) - valid
    if bad:
        raise ValueError(f"unknown ModelConfig fields {sorted(bad)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid: {MODEL_NAMES}")


def build_model(name: str, config: ModelConfig | None = None, *, device=None, dtype=torch.float32, seed: int | None = 0) -> torch.nn.Module:
    """Build model ``name`` at ``config`` on ``device``/``dtype`` (parameters seeded with ``seed``).

    The module's call on an ``AtomsBatch`` returns ``(energy [B], forces [N, 3])``.
    """
    _check_name(name)
    config = default_config() if config is None else config
    if seed is not None:
        torch.manual_seed(seed)
    if name == "escn-md":
        from .escn import ESCNMDModel

        model = ESCNMDModel(config)
    elif name == "dense-tp":
        from .dense_tp import DenseTPModel

        model = DenseTPModel(config)
    else:
        from .e2former_v1 import E2FormerModel

        model = E2FormerModel(config, version=name.removeprefix("e2former-"), device=device)
    return model.to(device=device, dtype=dtype)


def build_layer(name: str, config: ModelConfig | None = None, *, device=None, dtype=torch.float32, seed: int | None = 0):
    """Layer-level benchmark object for ``name``: one interaction/attention layer and its inputs.

    ``inputs = layer.make_inputs(batch)``; ``out = layer(inputs)`` ([N, (L+1)^2, C]);
    ``layer.flops(inputs)``; ``layer.parameters()``.
    """
    _check_name(name)
    config = default_config() if config is None else config
    if seed is not None:
        torch.manual_seed(seed)
    if name == "escn-md":
        from .escn import ESCNLayer

        return ESCNLayer(config, device=device, dtype=dtype)
    if name == "dense-tp":
        from .dense_tp import DenseTPLayer

        return DenseTPLayer(config, device=device, dtype=dtype)
    from .e2former_v1 import E2FormerLayer

    return E2FormerLayer(config, version=name.removeprefix("e2former-"), device=device, dtype=dtype)


def memory_model(name: str, config: ModelConfig, n_atoms: int, n_edges: int, itemsize: int = 4) -> dict[str, float]:
    """Estimated activation bytes kept for backward by one energy forward of ``name`` (see each model)."""
    _check_name(name)
    if name == "escn-md":
        from .escn import escn_memory

        return escn_memory(config, n_atoms, n_edges, itemsize)
    if name == "dense-tp":
        from .dense_tp import dense_tp_memory

        return dense_tp_memory(config, n_atoms, n_edges, itemsize)
    from .e2former_v1 import e2former_memory

    return e2former_memory(config, n_atoms, n_edges, itemsize, version=name.removeprefix("e2former-"))
