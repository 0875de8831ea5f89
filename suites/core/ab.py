"""Same-machine A/B of two source trees: the regression gate without a stored baseline.

A stored baseline (``run_bench.py --compare``) was measured on another machine, often on
another day; on the lent H100s two machines read the same kernels up to ~5 % apart, enough to
flag an unchanged kernel (perf-notes section 25). This runs one ``run_bench.py`` command in an
old tree and in this one, alternating fresh processes on the same machine (old, new, old, new,
...), pools each side's timed repeats per point, and applies the gate's rule
(``suites.core.compare``: > ``threshold`` and a one-sided Mann-Whitney U below ``alpha``) to
the pools. Alternating processes spreads slow drift (clocks, temperature) over both sides.

Make the old tree with ``scripts/ab_tree.sh COMMIT`` (``git archive`` into ``_ab/COMMIT``,
ignored by git), then, on the machine that measures::

    python -m suites.core.ab --base-tree _ab/5516880 --rounds 2 --out bench-out/ab -- \\
        --suite kernel-regression --impl triton --device cuda

Everything after ``--`` goes to both trees' ``run_bench.py`` (``--out``, ``--no-report`` and
``--no-progress`` are added here). Results: ``<out>/base-<r>/`` and ``<out>/candidate-<r>/``
(each round's records), ``<out>/base-pooled.json`` (the old tree's pooled points as a
baseline file) and ``<out>/candidate-pooled.jsonl``. Exit codes as ``compare_cli``: 0 pass,
1 a regression or a point that failed, 2 nothing compared; 3 a process that did not finish.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from suites.core.compare import (DEFAULT_ALPHA, DEFAULT_THRESHOLD, EXIT_REFUSED, _samples, compare_cli, point_key,
                                 point_label, save_baseline)
from suites.core.env import GIT_COMMIT_ENV
from suites.core.records import load_all

REPO = Path(__file__).resolve().parents[2]
#: Options of run_bench.py that this tool sets itself.
OWNED_OPTIONS = ("--out", "--resume", "--compare", "--save-baseline", "--report")
EXIT_RUN_FAILED = 3
#: The file of an old tree that names its commit (written by ``scripts/ab_tree.sh``).
TREE_COMMIT_FILE = "COMMIT"


def run_side(tree: Path, bench_args: Sequence[str], out: Path) -> int:
    """``run_bench.py`` of ``tree`` with ``bench_args`` in a fresh process, records into ``out``.

    The script's folder comes first on ``sys.path``, so ``tree``'s ``e2f`` and ``suites`` are
    the ones imported; ``PYTHONPATH`` keeps what the caller set (site folders of wheels) after it.
    A tree other than this repository's has no git of its own (``git`` would name the
    enclosing repository's commit): its records name the commit in its ``COMMIT`` file
    (``scripts/ab_tree.sh`` writes it), or ``unknown``.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if tree != REPO:
        stamp = tree / TREE_COMMIT_FILE
        env[GIT_COMMIT_ENV] = stamp.read_text(encoding="utf-8").strip() if stamp.is_file() else "unknown"
    cmd = [sys.executable, str(tree / "run_bench.py"), *bench_args, "--out", str(out), "--no-report", "--no-progress"]
    print(f"== {tree.name or tree}: {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd, cwd=tree, env=env).returncode


def pool(runs: Sequence[list[dict]]) -> list[dict]:
    """One record per point from several runs of the same command: the timed repeats of every
    run in one ``samples_ms`` (median as ``latency_ms``); a point that did not end ``ok`` in
    some run keeps that run's record, so the gate sees the failure."""
    pooled: dict[str, dict] = {}
    for records in runs:
        latest = {point_key(r): r for r in records}  # a resumed file may repeat a point: the last wins
        for key, r in latest.items():
            have = pooled.get(key)
            if have is None or (have.get("status") == "ok" and r.get("status") != "ok"):
                pooled[key] = copy.deepcopy(r)
            elif have.get("status") == "ok" and _samples(r):
                samples = _samples(have) + _samples(r)
                have["metrics"]["samples_ms"] = samples
                have["metrics"]["latency_ms"] = statistics.median(samples)
                have["metrics"]["repeats"] = len(samples)
    return list(pooled.values())


def process_medians(label: str, runs: Sequence[list[dict]]) -> dict[str, list[float]]:
    """Each point's median in each run of one side (to show process-to-process spread)."""
    out: dict[str, list[float]] = {}
    for records in runs:
        for r in records:
            if r.get("status") == "ok" and _samples(r):
                out.setdefault(point_label(r), []).append(statistics.median(_samples(r)))
    return {f"{label} {k}": v for k, v in out.items()}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, bench_args = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(prog="python -m suites.core.ab", description=__doc__.splitlines()[0],
                                 epilog="run_bench.py arguments follow a lone --")
    ap.add_argument("--base-tree", required=True, type=Path, help="the old source tree (scripts/ab_tree.sh COMMIT)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per side, alternating (default 2)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/ab"), help="results folder (default bench-out/ab)")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="practical threshold (default 0.05)")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="significance level (default 0.01)")
    args = ap.parse_args(argv)
    base = args.base_tree.resolve()
    if not (base / "run_bench.py").is_file():
        ap.error(f"--base-tree {args.base_tree}: no run_bench.py there (make one with scripts/ab_tree.sh COMMIT)")
    if not bench_args:
        ap.error("give the run_bench.py arguments after --, e.g. -- --suite kernel-regression --device cuda")
    owned = [a for a in bench_args if a.split("=", 1)[0] in OWNED_OPTIONS]
    if owned:
        ap.error(f"{', '.join(owned)}: set by this tool (use --out before --)")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    out = args.out.resolve()
    sides = {"base": (base, []), "candidate": (REPO, [])}
    used = [f for f in (out / f"{name}-{r}" for r in range(1, args.rounds + 1) for name in sides)
            if f.exists() and any(f.iterdir())]
    if used:
        print(f"error: {used[0]} is not empty: give a new --out", file=sys.stderr)
        return EXIT_RUN_FAILED
    for r in range(1, args.rounds + 1):
        for name, (tree, runs) in sides.items():
            folder = out / f"{name}-{r}"
            rc = run_side(tree, bench_args, folder)
            if rc != 0:
                print(f"error: the {name} tree's run {r} exited with {rc} (records kept in {folder})", file=sys.stderr)
                return EXIT_RUN_FAILED
            runs.append(load_all([folder]))
    for name, (_, runs) in sides.items():
        for label, medians in process_medians(name, runs).items():
            print(f"{label}: " + ", ".join(f"{m:.4g}" for m in medians) + " ms (median of each process)")
    base_pooled, cand_pooled = pool(sides["base"][1]), pool(sides["candidate"][1])
    baseline_path = out / "base-pooled.json"
    try:
        save_baseline(base_pooled, baseline_path)
    except ValueError as exc:
        print(f"error: the base tree gave no timed point: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    with open(out / "candidate-pooled.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in cand_pooled)
    return compare_cli(baseline_path, cand_pooled, args.threshold, alpha=args.alpha)


if __name__ == "__main__":
    sys.exit(main())
