"""Seeded benchmark inputs shared by the suites.

- :func:`liquid_box`: N atoms uniform at random in a cube at liquid number density
  (0.1 atoms/Å^3 by default), elements H, C, N, O drawn with water-/organic-like weights,
  optionally periodic. The workload of ``memory-scaling``, ``latency`` and ``lmax-sweep``.
- :func:`molecule_batch`: copies of a small ASE molecule, for molecule-style batches.
- :func:`core_inputs`: the ``attention-core`` workload (issue 4): delegates to
  ``e2f.attention.workload.random_core_inputs`` with the paper's sizes unless overridden.

Same arguments, same seed -> the same tensors, on any device (everything is drawn on the
CPU from one generator, then moved).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LIQUID_DENSITY = 0.1  # atoms / Å^3
# H, C, N, O with weights of an organic liquid (hydrogen-rich).
ELEMENTS = (1, 6, 7, 8)
ELEMENT_WEIGHTS = (0.5, 0.25, 0.1, 0.15)
# Closest allowed approach when drawing a box: uniform points can nearly coincide, and the
# models reject coincident atoms; resampling the few close ones keeps the density.
MIN_DISTANCE = 0.5


@dataclass(frozen=True)
class CoreSizes:
    """The ``attention-core`` workload of issue 4 (paper sizes). ``dv_moments``: the value
    numbers a head of the moments form (``CoreInputs.moments``: 9 rows x C / H = 18), whose
    sums are ``3 dv_moments`` numbers a head."""

    density: float = LIQUID_DENSITY
    cutoff: float = 5.0
    neighbors: int = 32
    heads: int = 128
    head_dim: int = 8
    dv: int = 58
    gate_hidden: int = 128
    num_rbf: int = 256
    dv_moments: int = 18


PAPER_CORE = CoreSizes()


def box_side(n_atoms: int, density: float = LIQUID_DENSITY) -> float:
    """Edge of the cube (Å) holding ``n_atoms`` at ``density`` atoms/Å^3."""
    if n_atoms < 1:
        raise ValueError(f"n_atoms must be >= 1, got {n_atoms}")
    if density <= 0:
        raise ValueError(f"density must be positive, got {density}")
    return (n_atoms / density) ** (1.0 / 3.0)


def _spread(pos: torch.Tensor, side: float, gen: torch.Generator, periodic: bool) -> torch.Tensor:
    """Redraw atoms closer than MIN_DISTANCE to an earlier one (vesin finds the pairs)."""
    import vesin

    for _ in range(20):
        cell = (torch.eye(3, dtype=torch.float64) * side).numpy()
        i, j = vesin.NeighborList(cutoff=MIN_DISTANCE, full_list=False).compute(
            points=pos.numpy(), box=cell if periodic else torch.zeros(3, 3, dtype=torch.float64).numpy(),
            periodic=periodic, quantities="ij")
        if len(i) == 0:
            return pos
        bad = torch.as_tensor(sorted(set(int(x) for x in j)), dtype=torch.long)
        pos[bad] = torch.rand(len(bad), 3, generator=gen, dtype=torch.float64) * side
    return pos


def liquid_box(n_atoms: int, *, density: float = LIQUID_DENSITY, periodic: bool = True, seed: int = 0,
               device="cpu", dtype: torch.dtype = torch.float32):
    """One liquid-density box as an ``e2f.batch.AtomsBatch`` (a single system).

    Parameters
    ----------
    n_atoms : atoms in the box.
    density : atoms per Å^3 (0.1: liquid water counting H).
    periodic : periodic cube (bulk environment everywhere) or an open cluster.
    seed : seeds positions and elements.
    """
    from e2f.batch import AtomsBatch

    side = box_side(n_atoms, density)
    gen = torch.Generator().manual_seed(seed)
    pos = torch.rand(n_atoms, 3, generator=gen, dtype=torch.float64) * side
    pos = _spread(pos, side, gen, periodic)
    weights = torch.tensor(ELEMENT_WEIGHTS, dtype=torch.float64)
    z = torch.tensor(ELEMENTS)[torch.multinomial(weights, n_atoms, replacement=True, generator=gen)]
    cell = torch.eye(3, dtype=torch.float64) * side
    return AtomsBatch(
        pos=pos.to(device=device, dtype=dtype),
        z=z.to(device),
        batch=torch.zeros(n_atoms, dtype=torch.long, device=device),
        cell=(cell if periodic else torch.zeros(3, 3, dtype=torch.float64)).unsqueeze(0).to(device=device, dtype=dtype),
        pbc=torch.tensor([[periodic] * 3], device=device),
        charge=torch.zeros(1, dtype=torch.long, device=device),
        spin=torch.ones(1, dtype=torch.long, device=device),  # multiplicity 1: a benchmark box, not chemistry
    )


def molecule_batch(name: str = "C6H6", copies: int = 1, *, seed: int = 0, device="cpu", dtype=torch.float32):
    """``copies`` randomly rotated and rattled copies of ASE molecule ``name`` as one batch."""
    from ase.build import molecule
    from e2f.batch import AtomsBatch

    gen = torch.Generator().manual_seed(seed)
    atoms_list = []
    for _ in range(copies):
        atoms = molecule(name)
        atoms.positions += (torch.randn(len(atoms), 3, generator=gen, dtype=torch.float64) * 0.05).numpy()
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
        atoms.positions = atoms.positions @ q.numpy().T
        atoms_list.append(atoms)
    return AtomsBatch.from_ase(atoms_list, device=device, dtype=dtype)


def core_inputs(n_atoms: int, *, sizes: CoreSizes = PAPER_CORE, dtype: torch.dtype = torch.float32, device="cpu",
                seed: int = 0, requires_grad: bool = False, periodic: bool = True, value_head_stride: int | None = None,
                moments: bool = False):
    """The ``attention-core`` inputs (``CoreInputs``) for ``n_atoms`` atoms at ``sizes``.

    Periodic by default so that every atom has a bulk neighbourhood (all K slots filled at
    liquid density: about 52 atoms lie within 5 Å). ``value_head_stride``: ``v`` in padded
    head rows (``Backend.prepare``'s layout for the fused kernel), drawn so on the device.
    ``moments``: the moments form, ``dv_moments`` value numbers a head.
    """
    from e2f.attention.workload import random_core_inputs

    inp = random_core_inputs(
        n_atoms, density=sizes.density, cutoff=sizes.cutoff, max_neighbors=sizes.neighbors,
        num_heads=sizes.heads, head_dim=sizes.head_dim, dv=sizes.dv_moments if moments else sizes.dv,
        gate_hidden=sizes.gate_hidden, num_rbf=sizes.num_rbf, dtype=dtype, device=device, seed=seed,
        requires_grad=requires_grad, periodic=periodic, value_head_stride=value_head_stride)
    return inp.replace(moments=moments)


def backend_value_stride(backend: str, dv: int, moments: bool = False) -> int | None:
    """Head stride of ``v`` that attention-core ``backend`` prefers (None: contiguous rows)."""
    from e2f.attention.backends import get_backend, unavailable_reason

    if unavailable_reason(backend) is not None:
        return None
    preferred = get_backend(backend).value_head_stride
    return preferred(dv, moments) if preferred is not None else None


def core_host_bytes(n_atoms: int, sizes: CoreSizes = PAPER_CORE, periodic: bool = True,
                    itemsize: int = 4) -> float:
    """Host bytes ``random_core_inputs`` needs at its peak (it draws every tensor on the CPU,
    in float64 for a float64 workload and float32 otherwise: q, k, v and the gate parts per
    atom, then k, v, gate_src per source slot; periodic images add about 6 r_c / side of the
    atoms as extra slots; the neighbour list is int64)."""
    side = box_side(n_atoms, sizes.density)
    slots = n_atoms * (1.0 + (min(1.0, 6.0 * sizes.cutoff / side) if periodic else 0.0))
    per_atom = sizes.heads * (2 * sizes.head_dim + sizes.dv) + 2 * sizes.gate_hidden
    per_slot = sizes.heads * (sizes.head_dim + sizes.dv) + sizes.gate_hidden + 3
    return itemsize * (n_atoms * per_atom + slots * per_slot) + 8.0 * n_atoms * sizes.neighbors


def host_available_bytes() -> float | None:
    """MemAvailable of this host (Linux), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        return None
    return None


# One generated workload is kept (largest cost of a big point: drawing it on the host), so
# the points of one N (backends x dtypes x modes) share it. Points are ordered N-outermost.
_CORE_CACHE: dict[tuple, object] = {}


def cached_core_inputs(n_atoms: int, *, sizes: CoreSizes, dtype: torch.dtype, device, seed: int,
                       requires_grad: bool, periodic: bool = True, backend: str | None = None, moments: bool = False):
    """:func:`core_inputs`, drawn once per (N, sizes, dtype, device, seed, moments); every call gets
    fresh leaf tensors (shared storage) with ``requires_grad`` as asked, and ``v`` in the
    layout ``backend`` prefers (:func:`backend_value_stride`): the cached ``v`` is converted
    in place of the other layout, so one copy of it stays on the device.

    Raises ``suites.core.runner.SkipPoint`` when drawing the inputs would need more host RAM
    than is available (the whole process would be killed, losing the sweep).
    """
    from suites.core.runner import SkipPoint

    key = (n_atoms, sizes, dtype, str(device), seed, periodic, moments)
    dv = sizes.dv_moments if moments else sizes.dv
    stride = backend_value_stride(backend, dv, moments) if backend is not None else None
    inp = _CORE_CACHE.get(key)
    if inp is None:
        _CORE_CACHE.clear()
        need = core_host_bytes(n_atoms, sizes, periodic, itemsize=8 if dtype == torch.float64 else 4)
        have = host_available_bytes()
        if have is not None and need > 0.8 * have:
            raise SkipPoint(f"drawing the inputs needs ~{need / 2**30:.0f} GiB of host RAM, "
                            f"{have / 2**30:.0f} GiB available (e2f.attention.workload draws the inputs on the CPU)")
        inp = core_inputs(n_atoms, sizes=sizes, dtype=dtype, device=device, seed=seed, requires_grad=False,
                          periodic=periodic, value_head_stride=stride, moments=moments)
        _CORE_CACHE[key] = inp
    if inp.v.stride(1) != (stride or dv):
        from e2f.attention.core import pad_value_rows

        inp = inp.replace(v=pad_value_rows(inp.v, stride) if stride else inp.v.contiguous())
        _CORE_CACHE[key] = inp  # the other layout is freed here
    fresh = {k: (t.detach().requires_grad_(requires_grad) if t.is_floating_point() else t) for k, t in inp.tensors().items()}
    return inp.replace(**fresh)


def clear_cache() -> None:
    """Drop the cached workload (frees its host/device memory)."""
    _CORE_CACHE.clear()


def num_edges(nbr: torch.Tensor) -> int:
    """Filled neighbour slots of a ``[N, K]`` table (-1 = empty)."""
    return int((nbr >= 0).sum())


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    """``torch.dtype`` from a record's dtype name; ValueError naming the valid ones."""
    try:
        return DTYPES[str(name).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None


# --------------------------------------------------------------------------- model workloads

# Model settings of the sweeps: the paper's on the GPU (--full), a small matched setting on
# the CPU (--quick) so that a sweep of all four models finishes in minutes on two cores.
QUICK_PRESET = "tiny"
FULL_PRESET = "paper"

# attention-core sizes of a --quick CPU sweep: the paper's geometry (density, cutoff, K)
# with fewer heads and narrower tensors, so the materialised oracle fits in a laptop's RAM.
QUICK_CORE = CoreSizes(heads=8, head_dim=8, dv=16, gate_hidden=16, num_rbf=32, dv_moments=6)


def model_config(quick: bool, lmax: int = 2, **overrides):
    """``baselines.registry.ModelConfig`` of a sweep (tiny preset when quick, paper otherwise)."""
    from baselines.registry import default_config

    return default_config(QUICK_PRESET if quick else FULL_PRESET, lmax=lmax, **overrides)


def speed_precision(cfg) -> bool:
    """Set the fp32 matmul precision of a timed point and return whether TF32 is allowed.

    On CUDA every implementation alike may use TF32 tensor-core products for fp32 inputs
    (issue 4's definition of "fp32", and what MD codes run with); the CPU keeps full fp32.
    Suites record the returned flag with each point (``tf32_matmul``).
    """
    if cfg.is_cuda:
        torch.set_float32_matmul_precision("high")
    return torch.get_float32_matmul_precision() != "highest"


def model_point(impl: str, params: dict, cfg) -> tuple:
    """``(forward, module, batch)`` of a whole-model sweep point: the sweep's preset at the
    point's ``lmax`` and ``neighbors``, on a seeded liquid box of ``n_atoms`` in ``dtype``."""
    dtype = torch_dtype(params["dtype"])
    config = model_config(cfg.quick, lmax=params.get("lmax", 2), max_neighbors=params["neighbors"])
    batch = liquid_box(params["n_atoms"], seed=cfg.seed, device=cfg.device, dtype=dtype)
    forward, module = model_call(impl, config, batch, params["mode"], device=cfg.device, dtype=dtype, seed=cfg.seed)
    return forward, module, batch


def model_call(name: str, config, batch, mode: str, *, device, dtype=torch.float32, seed: int = 0):
    """``(forward, module)`` for one whole-model measurement (energy + forces).

    ``mode='fwd'``: the module in eval mode, forces by a first-order autograd pass
    (inference / MD). ``'fwd+bwd'`` and ``'bwd'``: training mode, forces with
    ``create_graph`` so the timed backward (seeded on energy and forces) goes through the
    double backward, as a force-matching training step does.
    """
    from baselines.registry import build_model

    module = build_model(name, config, device=device, dtype=dtype, seed=seed)
    module.train(mode != "fwd")

    def forward():
        return module(batch)

    return forward, module


def layer_call(name: str, config, batch, *, device, dtype=torch.float32, seed: int = 0):
    """``(forward, layer, inputs)`` for the interaction layer of model ``name`` alone."""
    from baselines.registry import build_layer

    layer = build_layer(name, config, device=device, dtype=dtype, seed=seed)
    inputs = layer.make_inputs(batch)

    def forward():
        return layer(inputs)

    return forward, layer, inputs


def prepared_inputs(impl, inp):
    """``inp`` (leaves) in ``impl``'s preferred layout (``Backend.prepare``) as leaves again:
    the timed backward stops at the same tensors, and a padded copy counts with the inputs."""
    with torch.no_grad():
        prepared = impl.prepare(inp.replace(v=inp.v.detach()))
    if prepared.v.stride() == inp.v.stride():
        return inp
    return prepared.replace(v=prepared.v.requires_grad_(inp.v.requires_grad))


def core_call(backend: str, inp):
    """``forward`` running attention-core ``backend`` on ``inp`` (preconditions checked once)."""
    from e2f.attention.backends import get_backend

    impl = get_backend(backend)
    inp = prepared_inputs(impl, inp)
    impl.check(inp)

    def forward():
        return impl(inp)

    return forward


def core_config(backend: str) -> dict | None:
    """What the fused backend chose for its last call (``e2f.attention.triton.function.last_config``:
    configurations, target chunks of the backward), recorded with each point; None for others."""
    if backend != "triton":
        return None
    from e2f.attention.triton.function import last_config

    return last_config()


# --------------------------------------------------------------------------- timing plan

# Seconds of timed calls per point on the GPU: a slow point gets fewer repeats (never fewer
# than MIN_REPEATS) so that sweep pieces stay within minutes; fast points keep the
# harness's defaults (suites.core.measure.default_repeats).
TIME_BUDGET_S = 3.0
MIN_REPEATS = 5


def timing_plan(forward, mode: str, cfg, budget_s: float = TIME_BUDGET_S) -> tuple[int | None, int | None]:
    """``(warmup, repeats)`` for ``suites.core.measure.measure``: None (the defaults) on a
    quick sweep; on a full one, from one probe call timed with ``suites.core.timing``."""
    from suites.core.measure import default_repeats
    from suites.core.timing import benchmark, mode_callables

    if cfg.quick:
        return None, None
    warmup, repeats = default_repeats(cfg.device, cfg.quick)
    fn, setup = mode_callables(forward, mode)
    probe = benchmark(fn, device=cfg.device, warmup=1, repeats=1, setup=setup, flush_l2=False).median_ms
    if probe > 0:
        repeats = int(max(MIN_REPEATS, min(repeats, budget_s * 1e3 / probe)))
        warmup = max(1, min(warmup, repeats // 5))
    return warmup, repeats


_UNAVAILABLE: dict[str, str | None] = {}


def model_unavailable(name: str) -> str | None:
    """Why model ``name`` cannot be built here (its module or a dependency does not import),
    or None. Checked once per process by building the tiny preset on the CPU."""
    if name not in _UNAVAILABLE:
        try:
            from baselines.registry import build_model, default_config

            build_model(name, default_config(QUICK_PRESET), device="cpu")
            import e2f.batch  # noqa: F401 -- every model call takes an AtomsBatch
            _UNAVAILABLE[name] = None
        except ImportError as exc:
            _UNAVAILABLE[name] = f"{name} is not importable here ({type(exc).__name__}: {exc})"
    return _UNAVAILABLE[name]
