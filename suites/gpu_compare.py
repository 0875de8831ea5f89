"""``gpu-compare``: per-card tables and ratios from stored results of different GPUs.

It reads records, it never measures. Points are matched across cards on
(suite, implementation, every parameter); for each matched point the table holds each
card's median latency and its speed relative to the first card (``H100`` first when present):
``speedup[card] = latency[first] / latency[card]`` (> 1: faster than the first card).

**Software versions.** Timings of different cards are only comparable when the software
that produced them is the same. The environment keys in :data:`VERSION_KEYS` (torch,
triton, CUDA, e3nn, the e2f git commit) must each have one value across all the records
compared. If not, the comparison is **refused** with a message naming every differing key,
unless mismatches are allowed explicitly:

- ``python -m suites.gpu_compare RESULTS... --allow-mismatch``;
- ``E2F_ALLOW_VERSION_MISMATCH=1 python run_bench.py --suite gpu-compare [--data RESULTS]``
  (the runner has no suite-specific flags; ``--data`` names the results folder, default
  ``reports/results``);
- ``render_cli(..., allow_mismatch=True)`` / the same variable for ``--report``.

Even when allowed, the result's ``note`` (printed, and shown in reports above the figure)
lists the differences.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

VERSION_KEYS = ("torch", "triton", "cuda", "e3nn", "git_commit")
ALLOW_ENV_VAR = "E2F_ALLOW_VERSION_MISMATCH"
DEFAULT_RESULTS = "reports/results"


class VersionMismatch(ValueError):
    """Records of different cards were made with different software."""


@dataclass
class Comparison:
    cards: list[str]
    table: pd.DataFrame | None
    mismatches: dict[str, dict[str, list]] = field(default_factory=dict)
    note: str = ""

    @property
    def refused(self) -> bool:
        return self.table is None and bool(self.mismatches)


def _card_order(cards) -> list[str]:
    return sorted(cards, key=lambda c: (0 if "h100" in c.lower() else 1 if "h200" in c.lower() else 2, c))


def version_mismatches(df: pd.DataFrame, cards: Sequence[str]) -> dict[str, dict[str, list]]:
    """``{key: {card: [values]}}`` for every version key with more than one value overall."""
    out = {}
    for key in VERSION_KEYS:
        col = f"env.{key}"
        if col not in df.columns:
            continue
        per_card = {c: sorted(map(str, df.loc[df["device"] == c, col].dropna().unique())) for c in cards}
        values = {v for vs in per_card.values() for v in vs}
        if len(values) > 1:
            out[key] = per_card
    return out


def describe_mismatches(mm: dict[str, dict[str, list]]) -> str:
    return "; ".join(f"{k}: " + ", ".join(f"{c} {'/'.join(v) or '?'}" for c, v in per.items()) for k, per in mm.items())


def _param_cols(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith("params."))


def point_name(row: pd.Series, params: Sequence[str]) -> str:
    bits = []
    for c in params:
        v = row.get(c)
        if v is None or (isinstance(v, float) and pd.isna(v)):
            continue
        k = c.removeprefix("params.")
        bits.append(f"N={int(v)}" if k == "n_atoms" else str(v) if k in ("mode", "dtype") else f"{k}={v}")
    return f"{row['suite']}: {row['impl']} " + " ".join(bits)


def compare_frame(df: pd.DataFrame, *, allow_mismatch: bool = False) -> Comparison:
    """Match the ok points of every GPU in ``df`` (a ``reports.render.records_frame``)."""
    gpu = df[(df["status"] == "ok") & ~df["device"].str.startswith("CPU")] if len(df) else df
    cards = _card_order(gpu["device"].unique()) if len(gpu) else []
    if len(cards) < 2:
        return Comparison(cards, None, note=f"need results of at least two GPUs, found {len(cards)} ({', '.join(cards) or 'none'})")
    mm = version_mismatches(gpu, cards)
    if mm and not allow_mismatch:
        return Comparison(cards, None, mm, note=(
            f"REFUSED: software versions differ between the cards ({describe_mismatches(mm)}); rerun on matching "
            f"versions, or allow it with --allow-mismatch / {ALLOW_ENV_VAR}=1"))
    params = _param_cols(gpu)
    lat = gpu[gpu["metrics.latency_ms"].notna()] if "metrics.latency_ms" in gpu else gpu.iloc[0:0]
    keyed = lat.assign(_key=["|".join(map(str, row)) for row in lat[["suite", "impl", *params]].itertuples(index=False)])
    wide = keyed.pivot_table(index="_key", columns="device", values="metrics.latency_ms", aggfunc="median")
    wide = wide.reindex(columns=[c for c in cards if c in wide.columns]).dropna()
    if wide.empty:
        return Comparison(cards, pd.DataFrame(), mm, note="no point was measured on more than one card")
    first = keyed.drop_duplicates("_key").set_index("_key").loc[wide.index]
    table = first[["suite", "impl", *params]].reset_index(drop=True)
    table.insert(2, "point", [point_name(r, params) for _, r in first.iterrows()])
    base = wide[cards[0]].to_numpy()
    for c in wide.columns:
        table[f"latency_ms[{c}]"] = wide[c].to_numpy()
    for c in wide.columns:
        table[f"speedup[{c}]"] = base / wide[c].to_numpy()
    table = table.rename(columns=lambda c: c.removeprefix("params."))
    note = f"{len(table)} points matched on {', '.join(wide.columns)}; speedup relative to {cards[0]}"
    if mm:
        note = f"WARNING, compared despite different software versions (allowed): {describe_mismatches(mm)}. " + note
    return Comparison(list(wide.columns), table, mm, note)


def headline_points(table: pd.DataFrame, max_points: int = 16) -> pd.DataFrame:
    """One row per (suite, impl, mode, dtype): the largest N matched on every card."""
    t = table.copy()
    group = [c for c in ("suite", "impl", "mode", "dtype", "lmax") if c in t.columns]
    if "n_atoms" in t.columns:
        t = t.sort_values("n_atoms").groupby(group, dropna=False, sort=True).tail(1)
    order = {"latency": 0, "kernel-tflops": 1, "lmax-sweep": 2, "memory-scaling": 3}
    t = t.sort_values(["suite", "impl"], key=lambda s: s.map(order).fillna(9) if s.name == "suite" else s)
    return t.head(max_points).reset_index(drop=True)


# --------------------------------------------------------------------------- entry points


def _suite():
    """Register ``gpu-compare`` with the runner: one point that reads, matches and tabulates."""
    from suites.core.runner import Point, Suite, SweepConfig, register_suite

    @register_suite
    class GpuCompare(Suite):
        name = "gpu-compare"
        description = ("merges stored results of different GPUs into per-card tables and speed ratios "
                       "(reads records, never measures; refuses mismatched software versions unless "
                       f"{ALLOW_ENV_VAR}=1)")
        impls = ("compare",)
        metrics = ("cards", "points", "median_speedup")

        def points(self, cfg: SweepConfig) -> list[Point]:
            results = str(cfg.extra.get("data") or DEFAULT_RESULTS)
            return [Point("compare", {"results": results, "allow_mismatch": os.environ.get(ALLOW_ENV_VAR) == "1"})]

        def measure(self, point: Point, cfg: SweepConfig) -> dict:
            result = compare_paths([point.params["results"]], allow_mismatch=point.params["allow_mismatch"])
            if result.refused:
                raise VersionMismatch(result.note)
            if result.table is None or result.table.empty:
                raise ValueError(result.note)
            cfg.out_dir.mkdir(parents=True, exist_ok=True)
            csv = cfg.out_dir / "gpu-compare-table.csv"
            result.table.to_csv(csv, index=False)
            print(result.note)
            metrics = {"cards": result.cards, "points": int(len(result.table)), "table_csv": str(csv),
                       "note": result.note, "version_mismatches": result.mismatches}
            for card in result.cards[1:]:
                metrics[f"median_speedup[{card}]"] = float(result.table[f"speedup[{card}]"].median())
            return metrics

    return GpuCompare


GpuCompareSuite = _suite()


def compare_paths(paths: Sequence[str], *, allow_mismatch: bool = False) -> Comparison:
    from reports.render import records_frame
    from reports.report import load

    return compare_frame(records_frame(load(paths)), allow_mismatch=allow_mismatch)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m suites.gpu_compare",
                                 description="Per-card tables and ratios from stored results of different GPUs.")
    ap.add_argument("paths", nargs="*", default=[DEFAULT_RESULTS], help="results files or folders (default reports/results)")
    ap.add_argument("--allow-mismatch", action="store_true", help="compare even if software versions differ (said in the output)")
    ap.add_argument("--csv", help="write the table here")
    args = ap.parse_args(argv)
    allow = args.allow_mismatch or os.environ.get(ALLOW_ENV_VAR) == "1"
    result = compare_paths(args.paths, allow_mismatch=allow)
    print(result.note, file=sys.stderr if result.refused else sys.stdout)
    if result.refused:
        return 2
    if result.table is None or result.table.empty:
        return 1
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_rows", 500):
        print(result.table.drop(columns=[c for c in result.table.columns if c not in ("point",) and not c.startswith(("latency", "speedup"))]).to_string(index=False))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        result.table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
