"""The ``accuracy`` suite: energy and force errors of every model, trained alike.

Each model of ``baselines.registry.MODEL_NAMES`` is trained with :func:`e2f.train.train` on
the same data, for the same number of optimizer steps, with the same recipe, at a matched
parameter count (each baseline's ``channels`` is the one whose parameter count is closest to
E2Former-V2's at the suite's base config), and evaluated with its EMA weights on the test
split: energy MAE (meV/atom) and force MAE (meV/Å per component), per subset and overall, plus
training wall time. Two more points:

- ``element-mean``: the mean-per-element baseline (E = sum of per-element reference energies
  fitted by least squares on the train split, F = 0): what a model must beat;
- ``e2former-v2-backends``: E2Former-V2 with the same weights (the trained ones when this run
  trained it) under every attention backend available on the device (``materialized``,
  ``chunked``, ``triton``), fp64: the largest energy/force differences to ``materialized``.
  A difference above 1e-8 is an error record.

Data: the shipped GFN2-xTB set (``e2f/data/shipped``), or ``--data PATH`` (a SPICE HDF5,
MACE-OFF extended XYZ or OMol25 ``.aselmdb``; ``SweepConfig.extra['data']``). ``--quick``: a
small model, a few hundred steps on the CPU (minutes); ``--full``: a larger model and budget
for a GPU. The MAE table is printed after the last point.
"""

from __future__ import annotations

import sys
import time

from suites.core.runner import Point, SkipPoint, Suite, SweepConfig, register_suite

MODELS = ("e2former-v2", "e2former-v1", "escn-md", "dense-tp")
BASELINE = "element-mean"
BACKENDS_POINT = "e2former-v2-backends"
BACKEND_TOL = {"float64": 1e-8, "float32": 1e-4}  # max |diff| in eV and eV/Å

# Budgets. quick: CPU minutes in all; full: a GPU run.
QUICK = dict(base=dict(lmax=2, channels=16, num_blocks=2, num_heads=4, head_dim=8, num_rbf=32,
                       radial_hidden=32, max_neighbors=16, cutoff=5.0),
             steps=600, max_train=None, max_test=None, max_atoms=64, lr=3e-3, max_read=20000)
FULL = dict(base=dict(lmax=2, channels=128, num_blocks=4, num_heads=16, head_dim=8, num_rbf=64,
                      radial_hidden=64, max_neighbors=32, cutoff=5.0),
            steps=5000, max_train=None, max_test=None, max_atoms=512, lr=4e-4, max_read=None)


def _budget(cfg: SweepConfig) -> dict:
    """The budget of this run; ``cfg.extra`` may override ``steps``, ``max_train``,
    ``max_test``, ``lr``, ``max_atoms`` and ModelConfig fields of the base config (``base``)."""
    b = dict(QUICK if cfg.quick else FULL)
    for key in ("steps", "max_train", "max_test", "lr", "max_atoms", "max_read"):
        if key in cfg.extra:
            b[key] = cfg.extra[key]
    b["base"] = {**b["base"], **cfg.extra.get("base", {})}
    return b


def _count_params(name, config) -> int:
    from baselines.registry import build_model

    model = build_model(name, config, seed=0)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_channels(name: str, base: dict, target: int) -> tuple[int, int]:
    """(channels, params) of ``name`` closest to ``target`` parameters, other knobs as ``base``.

    Channels run over multiples of ``num_heads`` (the E2Former constraint, kept for all models
    so that the configs stay comparable); the parameter count grows monotonically with C, so
    the search stops once it passes the target.
    """
    from baselines.registry import ModelConfig

    step = base["num_heads"]
    best = None
    c = step
    while c <= 16 * base["channels"]:
        n = _count_params(name, ModelConfig(**{**base, "channels": c}))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (c, n)
        if n > target:
            break
        c += step
    return best


@register_suite
class AccuracySuite(Suite):
    name = "accuracy"
    description = ("train E2Former-V2 and the baselines alike (matched parameters and steps); "
                   "energy/force MAE per subset vs a mean-per-element baseline; backend agreement")
    impls = (BASELINE, *MODELS, BACKENDS_POINT)
    metrics = ("energy_mae_mev_per_atom", "force_mae_mev_per_A", "wall_s", "num_params",
               "per_subset", "factor_vs_element_mean")

    def __init__(self):
        self._data = None
        self._trained = {}
        self._rows = {}

    # ------------------------------------------------------------------ data
    def _splits(self, cfg: SweepConfig):
        if self._data is None:
            from e2f.data import fit_reference_energies, load_structures, shipped_path

            b = _budget(cfg)
            source = cfg.extra.get("data") or shipped_path("h5")
            # --data files can hold millions of conformers: --quick reads the first max_read
            structures, report = load_structures(
                source, limit=b["max_read"] if cfg.extra.get("data") else None)
            if report.num_bad or report.charge_unknown:
                print(report, file=sys.stderr)
            split = {k: [s for s in structures if s.split == k] for k in ("train", "val", "test")}
            if not split["train"] or not split["test"]:
                raise ValueError(f"{source}: no train or test structures")
            if not split["val"]:
                split["val"] = split["test"]
            from e2f.train import _subsample

            if b["max_train"]:
                split["train"] = _subsample(split["train"], b["max_train"], cfg.seed)
            if b["max_test"]:
                split["test"] = _subsample(split["test"], b["max_test"], cfg.seed + 2)
                split["val"] = _subsample(split["val"], b["max_test"], cfg.seed + 1)
            refs = fit_reference_energies([s.numbers for s in split["train"]],
                                          [s.energy for s in split["train"]])
            self._data = (str(source), split, refs)
        return self._data

    # ------------------------------------------------------------------ points
    def points(self, cfg: SweepConfig) -> list[Point]:
        b = _budget(cfg)
        data = str(cfg.extra.get("data") or "shipped:xtb_organic")
        common = {"data": data, "steps": b["steps"], "lmax": b["base"]["lmax"],
                  "dtype": "float32", "mode": "train"}
        pts = [Point(BASELINE, {"data": data, "mode": "fit"})]
        pts += [Point(m, dict(common)) for m in MODELS]
        pts.append(Point(BACKENDS_POINT, {"data": data, "lmax": b["base"]["lmax"],
                                          "dtype": "float64", "mode": "fwd"}))
        return pts

    def unavailable(self, impl: str, cfg: SweepConfig) -> str | None:
        if impl in MODELS:
            try:
                from baselines.registry import MODEL_NAMES
            except ImportError as err:
                return f"baselines.registry not importable: {err}"
            if impl not in MODEL_NAMES:
                return f"{impl} is not in baselines.registry.MODEL_NAMES"
        return None

    def measure(self, point: Point, cfg: SweepConfig) -> dict:
        try:
            if point.impl == BASELINE:
                m = self._baseline(cfg)
            elif point.impl == BACKENDS_POINT:
                m = self._backends(cfg)
            else:
                m = self._train(point.impl, cfg)
            self._rows[point.impl] = m
            return m
        finally:
            wanted = [p for p in self.points(cfg) if cfg.wants(p.impl)]
            if wanted and point == wanted[-1]:
                print(self.table(), flush=True)

    def _baseline(self, cfg):
        from e2f.train import element_baseline

        _, split, refs = self._splits(cfg)
        t0 = time.perf_counter()
        per = element_baseline(split["test"], refs)
        return _flat(per, wall_s=time.perf_counter() - t0, num_params=len(refs),
                     reference_energies_eV={str(k): v for k, v in refs.items()})

    def _train(self, name, cfg):
        import torch

        from e2f.train import TrainConfig, evaluate, train

        source, split, refs = self._splits(cfg)
        b = _budget(cfg)
        base = dict(b["base"])
        target = _count_params("e2former-v2", _model_config(base))
        channels, n_params = (base["channels"], target) if name == "e2former-v2" else \
            matched_channels(name, base, target)
        tcfg = TrainConfig(
            model=name, preset="paper", model_overrides={**base, "channels": channels},
            data=source, steps=b["steps"], lr=b["lr"], max_atoms=b["max_atoms"],
            max_structures=64, eval_every=0, checkpoint_every=0, log_every=max(1, b["steps"] // 6),
            device=cfg.device, seed=cfg.seed, max_wall_s=cfg.extra.get("time_budget_s"),
        )
        t0 = time.perf_counter()
        res = train(tcfg, splits=(split["train"], split["val"], refs),
                    log=lambda msg: print(f"  [{name}] {msg}", file=sys.stderr, flush=True))
        wall = time.perf_counter() - t0
        per = evaluate(res.model, split["test"], refs, device=cfg.device, dtype=torch.float32,
                       max_atoms=b["max_atoms"])
        self._trained[name] = res.model
        out = _flat(per, wall_s=wall, num_params=res.num_params, channels=channels,
                    params_target=target, steps=res.steps, time_budget_reached=res.time_budget_reached,
                    train_loss_first=res.train_loss_first,
                    train_loss_last=res.train_loss_last, val=res.val)
        base_row = self._rows.get(BASELINE)
        if base_row:
            out["factor_vs_element_mean"] = {
                "energy": base_row["energy_mae_mev_per_atom"] / out["energy_mae_mev_per_atom"],
                "force": base_row["force_mae_mev_per_A"] / out["force_mae_mev_per_A"],
            }
        return out

    def _backends(self, cfg):
        import torch

        from baselines.registry import build_model
        from e2f.attention.backends import available_backends
        from e2f.data import batches, collate

        _, split, refs = self._splits(cfg)
        b = _budget(cfg)
        device = torch.device(cfg.device)
        have = available_backends(device)
        # Triton on a CPU would be its interpreter (minutes): compared on GPUs only.
        names = [n for n in ("materialized", "chunked", "triton") if n in have
                 and (n != "triton" or device.type == "cuda")]
        if "materialized" not in names or len(names) < 2:
            raise SkipPoint(f"need materialized and another backend, have {names}")
        group = next(iter(batches(split["test"], max_atoms=b["max_atoms"])))
        trained = self._trained.get("e2former-v2")
        out = {"backends": names, "weights": "trained" if trained is not None else "seeded init",
               "structures": len(group), "tolerance": dict(BACKEND_TOL)}
        preds = {}

        def predict(backend, dtype):
            if (backend, dtype) not in preds:
                batch, _ = collate(group, device=cfg.device, dtype=dtype, energy_offset=refs)
                model = build_model(
                    "e2former-v2", _model_config({**b["base"], "attention_backend": backend}),
                    device=cfg.device, dtype=dtype, seed=cfg.seed)
                if trained is not None:
                    model.load_state_dict(trained.state_dict())
                model.eval()
                energy, forces = model(batch)
                preds[(backend, dtype)] = (energy.detach(), forces.detach())
            return preds[(backend, dtype)]

        failures = []
        for backend in names[1:]:
            # Triton's core takes fp32/bf16/fp16 only: it is compared in fp32, the others in fp64.
            dtype = torch.float32 if backend == "triton" else torch.float64
            key = "float32" if dtype == torch.float32 else "float64"
            e_ref, f_ref = predict("materialized", dtype)
            e, f = predict(backend, dtype)
            de = float((e - e_ref).abs().max())
            df = float((f - f_ref).abs().max())
            out[f"{backend}_{key}_energy_max_abs_diff_eV"] = de
            out[f"{backend}_{key}_force_max_abs_diff_eV_per_A"] = df
            if max(de, df) > BACKEND_TOL[key]:
                failures.append(f"{backend} ({key}): {max(de, df):.3e} > {BACKEND_TOL[key]:g}")
        out["max_abs_diff"] = max(v for k, v in out.items() if k.endswith(("_eV", "_per_A")))
        if failures:
            raise AssertionError(f"attention backends disagree: {'; '.join(failures)}: {out}")
        return out

    # ------------------------------------------------------------------ table
    def table(self) -> str:
        """The MAE table of the points measured so far (test split)."""
        rows = [r for r in (BASELINE, *MODELS) if r in self._rows]
        subsets = sorted({k for r in rows for k in self._rows[r]["per_subset"]} - {"all"})
        lines = ["accuracy (test split): energy MAE meV/atom | force MAE meV/Å",
                 f"{'model':<14} {'params':>8} {'wall s':>7} {'E all':>8} {'F all':>8} "
                 f"{'xE':>6} {'xF':>6}  " + "  ".join(f"{s[:16]:>16}" for s in subsets)]
        for r in rows:
            m = self._rows[r]
            fac = m.get("factor_vs_element_mean", {})
            cells = "  ".join(
                f"{m['per_subset'][s]['energy_mae_mev_per_atom']:>7.1f}|"
                f"{m['per_subset'][s]['force_mae_mev_per_A']:<8.0f}" if s in m["per_subset"] else f"{'-':>16}"
                for s in subsets)
            lines.append(
                f"{r:<14} {m.get('num_params', 0):>8} {m['wall_s']:>7.1f} "
                f"{m['energy_mae_mev_per_atom']:>8.2f} {m['force_mae_mev_per_A']:>8.1f} "
                f"{fac.get('energy', float('nan')):>6.1f} {fac.get('force', float('nan')):>6.1f}  "
                + cells)
        lines.append("xE, xF: element-mean MAE / model MAE (higher is better)")
        if BACKENDS_POINT in self._rows:
            m = self._rows[BACKENDS_POINT]
            lines.append(f"backends {m['backends']} ({m['weights']} weights): "
                         f"max |diff| vs materialized = {m['max_abs_diff']:.2e}")
        return "\n".join(lines)


def _model_config(base: dict):
    from baselines.registry import ModelConfig

    return ModelConfig(**base)


def _flat(per: dict, **extra) -> dict:
    return {
        "energy_mae_mev_per_atom": per["all"]["energy_mae_mev_per_atom"],
        "force_mae_mev_per_A": per["all"]["force_mae_mev_per_A"],
        "structures": per["all"]["structures"],
        "per_subset": per,
        **extra,
    }
