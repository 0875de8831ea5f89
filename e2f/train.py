"""Train any registered model on energies and forces: ``python -m e2f.train``.

Recipe (METHOD.md section 5): AdamW, linear warm-up then cosine decay, loss =
``energy_weight * mean_b |E_b - E_b*| / N_b + force_weight * mean_i ||F_i - F_i*||_2``
(per-atom energy MAE plus force L2-MAE), gradient-norm clipping, an exponential moving
average (EMA) of the weights that is the one evaluated and saved, per-subset validation
metrics (energy MAE in meV/atom, force MAE in meV/Å per component), checkpoints and resume.
Targets are total energies minus per-element reference energies fitted by least squares on the
train split (:mod:`e2f.data.reference`); predicting those references alone is the
"mean per element" baseline.

Devices: CPU, one GPU, or several through ``torchrun --nproc_per_node=G -m e2f.train ...``
(DDP: each rank takes every G-th batch of the same seeded sequence, gradients are averaged by
DDP, rank 0 evaluates and writes checkpoints). The DDP path was run with 2 CPU processes
(gloo backend, ``torchrun --nproc_per_node=2 -m e2f.train --device cpu ...``) and with 2
NVIDIA H200 (NCCL; ``reports/results/nvidia-h200/ddp/``). On a shared CPU set
``OMP_NUM_THREADS=1``: oversubscribed OpenMP threads made steps ~8x slower here. Run from the checkout root (the models live in ``baselines/``).

Data: ``--data`` is a SPICE HDF5, MACE-OFF extended-XYZ or OMol25 ``.aselmdb`` path (see
:mod:`e2f.data.readers`); by default the shipped GFN2-xTB set. Splits come from the file (the
shipped set) or are assigned per molecule by hash.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from e2f.data import (
    Structure,
    batches,
    collate,
    fit_reference_energies,
    load_structures,
    reference_energy,
    shipped_path,
)


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the checkpoint)."""

    model: str = "e2former-v2"
    preset: str = "small"
    model_overrides: dict = field(default_factory=dict)
    data: str | None = None  # None: the shipped set (SPICE-layout HDF5)
    subsets: list[str] | None = None
    max_train: int | None = None
    max_val: int | None = None
    steps: int = 1000
    lr: float = 4e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int | None = None  # None: 5% of steps
    weight_decay: float = 1e-3
    energy_weight: float = 1.0
    force_weight: float = 1.0
    max_atoms: int = 256
    max_structures: int = 32
    grad_clip: float = 10.0
    ema_decay: float = 0.99
    eval_every: int = 200
    checkpoint_every: int = 200
    out_dir: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    log_every: int = 50
    # Leave the loop once this much wall time has passed (a capped job keeps its result; the
    # schedule still spans `steps`, so a cut run has not decayed its learning rate).
    max_wall_s: float | None = None

    @property
    def warmup(self) -> int:
        return max(1, int(0.05 * self.steps)) if self.warmup_steps is None else self.warmup_steps


@dataclass
class TrainResult:
    config: dict
    num_params: int
    steps: int
    wall_s: float
    train_loss_first: float
    train_loss_last: float
    history: list[dict]
    val: dict  # per-subset metrics of the EMA model on the validation split
    reference_energies: dict
    model: torch.nn.Module | None = field(default=None, repr=False)  # the EMA weights
    time_budget_reached: bool = False  # stopped by `max_wall_s` before `steps`


def _out_of_time(cfg: TrainConfig, elapsed: float, world: int, device: torch.device) -> bool:
    """Whether ``max_wall_s`` has passed; under DDP every rank stops at the same step."""
    if cfg.max_wall_s is None:
        return False
    late = elapsed > cfg.max_wall_s
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([float(late)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        late = bool(flag.item())
    return late


# --------------------------------------------------------------------------- metrics
def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def loss_terms(energy, forces, targets, energy_weight, force_weight):
    """(total loss, per-atom energy MAE, force L2-MAE), all tensors."""
    e_loss = ((energy - targets.energy).abs() / targets.natoms).mean()
    f_loss = torch.linalg.vector_norm(forces - targets.forces, dim=-1).mean()
    return energy_weight * e_loss + force_weight * f_loss, e_loss, f_loss


class _Accumulator:
    """Sums of absolute errors per subset (and 'all')."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, subset, e_abs_per_atom, f_abs_sum, n_components):
        for key in (subset, "all"):
            s = self.sums.setdefault(key, [0.0, 0, 0.0, 0])
            s[0] += e_abs_per_atom
            s[1] += 1
            s[2] += f_abs_sum
            s[3] += n_components

    def result(self) -> dict:
        return {
            k: {
                "energy_mae_mev_per_atom": 1000.0 * s[0] / s[1],
                "force_mae_mev_per_A": 1000.0 * s[2] / max(1, s[3]),
                "structures": s[1],
            }
            for k, s in sorted(self.sums.items())
        }


def evaluate(model, structures, refs, *, device="cpu", dtype=torch.float32,
             max_atoms=256, max_structures=32) -> dict:
    """Per-subset energy MAE (meV/atom) and force MAE (meV/Å, per component) of ``model``."""
    was_training = model.training
    model.eval()
    acc = _Accumulator()
    try:
        for group in batches(structures, max_atoms=max_atoms, max_structures=max_structures):
            batch, t = collate(group, device=device, dtype=dtype, energy_offset=refs)
            energy, forces = model(batch)
            e_err = ((energy.detach() - t.energy).abs() / t.natoms).double().cpu().numpy()
            f_err = (forces.detach() - t.forces).abs().double().cpu()
            start = 0
            for k, s in enumerate(group):
                n = s.num_atoms
                acc.add(s.subset, float(e_err[k]), float(f_err[start:start + n].sum()), 3 * n)
                start += n
    finally:
        model.train(was_training)
    return acc.result()


def element_baseline(structures, refs) -> dict:
    """Metrics of the mean-per-element model: E = sum_i e_ref[Z_i], F = 0."""
    acc = _Accumulator()
    for s in structures:
        e = abs(s.energy - reference_energy(s.numbers, refs)) / s.num_atoms
        acc.add(s.subset, e, float(np.abs(s.forces).sum()), s.forces.size)
    return acc.result()


# --------------------------------------------------------------------------- data
def load_splits(cfg: TrainConfig):
    """(train, val, reference energies, read reports) for ``cfg``."""
    source = cfg.data if cfg.data is not None else shipped_path("h5")
    structures, report = load_structures(source, subsets=cfg.subsets)
    train = [s for s in structures if s.split == "train"]
    val = [s for s in structures if s.split == "val"]
    if cfg.max_train is not None:
        train = _subsample(train, cfg.max_train, cfg.seed)
    if cfg.max_val is not None:
        val = _subsample(val, cfg.max_val, cfg.seed + 1)
    if not train or not val:
        raise ValueError(f"{source}: need train and val structures, got {len(train)} and {len(val)}")
    refs = fit_reference_energies([s.numbers for s in train], [s.energy for s in train])
    missing = {int(z) for s in val for z in s.numbers} - set(refs)
    if missing:
        raise ValueError(f"elements {sorted(missing)} occur in val but not in train")
    return train, val, refs, report


def _subsample(items, n, seed):
    if len(items) <= n:
        return items
    idx = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[i] for i in idx]


def _batch_stream(train: list[Structure], cfg: TrainConfig, start: int, rank: int, world: int):
    """Batches ``start, start+1, ...`` of the seeded epoch sequence, this rank's share."""
    epoch, step = 0, 0
    while True:
        for k, group in enumerate(batches(train, max_atoms=cfg.max_atoms,
                                          max_structures=cfg.max_structures, shuffle=True,
                                          seed=cfg.seed * 100003 + epoch)):
            if k % world != rank:
                continue
            if step >= start:
                yield step, group
            step += 1
        epoch += 1


# --------------------------------------------------------------------------- model
def build(cfg: TrainConfig, device, dtype):
    from baselines.registry import build_model, default_config

    mcfg = default_config(cfg.preset, **cfg.model_overrides)
    return build_model(cfg.model, mcfg, device=device, dtype=dtype, seed=cfg.seed)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _ema(model, decay):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- training
def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def train(cfg: TrainConfig, *, resume: bool = False, log=print, splits=None,
          stop_at: int | None = None) -> TrainResult:
    """Train ``cfg.model`` for ``cfg.steps`` optimizer steps (continuing a checkpoint in
    ``cfg.out_dir`` when ``resume``); return the EMA model and its validation metrics.

    ``splits``: ``(train, val, reference_energies)`` already loaded (else :func:`load_splits`).
    ``stop_at``: leave after this many steps (a time-sliced job; the schedule still spans
    ``cfg.steps``), with a checkpoint to resume from.
    """
    rank, world, local_rank = _dist()
    device = torch.device(cfg.device)
    if local_rank is not None and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dtype = getattr(torch, cfg.dtype)
    say = log if rank == 0 else (lambda *a, **k: None)

    if splits is None:
        train_set, val_set, refs, report = load_splits(cfg)
        if report.num_bad or report.charge_unknown:
            say(str(report))
    else:
        train_set, val_set, refs = splits
    model = build(cfg, device, dtype)
    ema = _ema(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    step0, history, wall0 = 0, [], 0.0
    out = Path(cfg.out_dir) if cfg.out_dir else None
    ckpt = out / "checkpoint.pt" if out else None
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["config"]["model"] != cfg.model or state["config"]["preset"] != cfg.preset:
            raise ValueError(f"{ckpt} is a {state['config']['model']}/{state['config']['preset']} "
                             f"run, not {cfg.model}/{cfg.preset}")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step0, history, wall0 = state["step"], state["history"], state["wall_s"]
        torch.set_rng_state(state["torch_rng"])
        say(f"resumed {ckpt} at step {step0}")
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)

    def checkpoint(step, wall):
        if rank != 0 or ckpt is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        _save(ckpt, {
            "config": asdict(cfg), "step": step, "wall_s": wall, "history": history,
            "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(), "reference_energies": refs,
        })

    model.train()
    t0 = time.perf_counter() - wall0
    last = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    out_of_time = False
    for step, group in _batch_stream(train_set, cfg, step0, rank, world):
        if step >= last:
            break
        batch, targets = collate(group, device=device, dtype=dtype, energy_offset=refs)
        energy, forces = net(batch)
        loss, e_loss, f_loss = loss_terms(energy, forces, targets, cfg.energy_weight,
                                          cfg.force_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update_parameters(model)
        done = step + 1
        if done == 1 or done % cfg.log_every == 0 or done == last:
            loss, e_loss, f_loss = (t.detach().item() for t in (loss, e_loss, f_loss))
            history.append({"step": done, "loss": loss, "energy_mae": e_loss,
                            "force_l2mae": f_loss, "grad_norm": float(gnorm),
                            "lr": sched.get_last_lr()[0], "wall_s": time.perf_counter() - t0})
            say(f"step {done:6d}  loss {loss:.4f}  E/atom {1000 * e_loss:.1f} meV  "
                f"|dF| {1000 * f_loss:.1f} meV/A  lr {sched.get_last_lr()[0]:.2e}")
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps and rank == 0:
            m = evaluate(ema.module, val_set, refs, device=device, dtype=dtype,
                         max_atoms=cfg.max_atoms, max_structures=cfg.max_structures)
            history.append({"step": done, "val": m})
            say(f"step {done:6d}  val E {m['all']['energy_mae_mev_per_atom']:.2f} meV/atom  "
                f"F {m['all']['force_mae_mev_per_A']:.1f} meV/A")
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            checkpoint(done, time.perf_counter() - t0)
        if done < last and _out_of_time(cfg, time.perf_counter() - t0, world, device):
            out_of_time = True
            last = done
            say(f"step {done:6d}  time budget of {cfg.max_wall_s:g} s reached: stopping")
            break
    wall = time.perf_counter() - t0
    final_step = max(step0, last)  # the batch stream is endless: the loop ends at `last`
    checkpoint(final_step, wall)
    val = {}
    if rank == 0:
        val = evaluate(ema.module, val_set, refs, device=device, dtype=dtype,
                       max_atoms=cfg.max_atoms, max_structures=cfg.max_structures)
        if out is not None:
            torch.save({"config": asdict(cfg), "model": ema.module.state_dict(),
                        "reference_energies": refs}, out / "ema_final.pt")
            (out / "metrics.json").write_text(json.dumps({"val": val, "history": history}, indent=1))
    losses = [h["loss"] for h in history if "loss" in h]
    return TrainResult(
        config=asdict(cfg), num_params=num_params(model), steps=final_step, wall_s=wall,
        train_loss_first=losses[0] if losses else float("nan"),
        train_loss_last=losses[-1] if losses else float("nan"),
        history=history, val=val, reference_energies=refs, model=ema.module,
        time_budget_reached=out_of_time,
    )


def format_metrics(metrics: dict) -> str:
    rows = [f"{'subset':<20} {'n':>6} {'E MAE meV/atom':>15} {'F MAE meV/A':>12}"]
    for k, m in metrics.items():
        rows.append(f"{k:<20} {m['structures']:>6} {m['energy_mae_mev_per_atom']:>15.2f} "
                    f"{m['force_mae_mev_per_A']:>12.1f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="python -m e2f.train", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=d.model, help="a name from baselines.registry.MODEL_NAMES")
    ap.add_argument("--preset", default=d.preset, help="'tiny', 'small' or 'paper'")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="ModelConfig override, e.g. --set channels=32 (repeatable)")
    ap.add_argument("--data", default=None, help="SPICE .h5 / MACE-OFF .xyz / OMol25 .aselmdb")
    ap.add_argument("--subset", action="append", default=None, help="keep only these subsets")
    for name in ("steps", "max_train", "max_val", "warmup_steps", "max_atoms", "max_structures",
                 "eval_every", "checkpoint_every", "seed", "log_every"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("lr", "min_lr_ratio", "weight_decay", "energy_weight", "force_weight",
                 "grad_clip", "ema_decay"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=d.dtype, choices=("float32", "float64"))
    ap.add_argument("--out", default="runs/train", help="checkpoint and metrics folder")
    ap.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    ap.add_argument("--max-wall-s", type=float, default=None,
                    help="stop (and evaluate) once this much wall time has passed")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="leave after this step (checkpointed; the schedule spans --steps)")
    a = ap.parse_args(argv)
    overrides = {}
    for kv in a.set:
        key, _, value = kv.partition("=")
        overrides[key] = json.loads(value) if value not in ("None", "null") else None
    cfg = TrainConfig(
        model=a.model, preset=a.preset, model_overrides=overrides, data=a.data, subsets=a.subset,
        max_train=a.max_train, max_val=a.max_val, steps=a.steps, lr=a.lr,
        min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup_steps, weight_decay=a.weight_decay,
        energy_weight=a.energy_weight, force_weight=a.force_weight, max_atoms=a.max_atoms,
        max_structures=a.max_structures, grad_clip=a.grad_clip, ema_decay=a.ema_decay,
        eval_every=a.eval_every, checkpoint_every=a.checkpoint_every, out_dir=a.out,
        device=a.device, dtype=a.dtype, seed=a.seed, log_every=a.log_every, max_wall_s=a.max_wall_s,
    )
    try:
        res = train(cfg, resume=a.resume, stop_at=a.stop_at)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # torchrun: NCCL warns about leaks otherwise
    if res.val:
        print(f"{cfg.model}: {res.num_params} parameters, {res.steps} steps, {res.wall_s:.1f} s")
        print(format_metrics(res.val))
    return 0


if __name__ == "__main__":
    sys.exit(main())
