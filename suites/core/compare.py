"""The performance regression gate: compare a run against a saved baseline.

A point *regresses* only when its slowdown is both

- **statistically real**: a one-sided Mann-Whitney U test on the raw repeat samples
  (``metrics.samples_ms``) says the candidate is slower with p < ``alpha`` (0.01), and
- **practically large**: the candidate's median is more than ``threshold`` (5 %) above
  the baseline's median.

Either alone is not enough: with hundreds of repeats a 1 % clock drift between two runs
is "significant", and with a handful of noisy repeats a 10 % gap in medians can be chance.
An *improvement* is the mirror image (faster with p < alpha and by more than the
threshold). Each point also carries a bootstrap confidence interval (level 1 - alpha) of
the median ratio candidate / baseline, printed beside the test.

**Confirmation.** The repeats of one run share one process, and some points differ by more
than the threshold from process to process with unchanged code (the attention core's bf16
forward at N = 16,384 on an H100 by up to 8 %: its repeats agree with each other, so the test
is confident about a difference that a new process does not keep). ``confirm`` therefore
measures each flagged point again in ``rounds`` fresh processes (``rerun``); it stays a
REGRESSION only if every rerun regresses too (or fails), and is otherwise reported as
*not reproduced*, with each rerun's change, and passes.

Baseline file (``save_baseline``; JSON, one object)::

    {
      "format": "e2f-perf-baseline", "version": 1,
      "created": "2026-11-25T20:00:00+00:00",       # ISO-8601 UTC
      "env": {...},                                   # the run's environment record
      "points": [
        {"key": "<suite>|<impl>|<params as sorted JSON>",
         "suite": str, "impl": str, "point_id": str | null, "params": {...},
         "samples_ms": [float, ...],                  # every timed repeat, as measured
         "latency_ms": float,                         # median of samples_ms
         "metrics": {...}}                            # the record's other scalar metrics
      ]
    }

Points are matched on ``key`` (suite, implementation and parameters), so a baseline made
by one checkout compares against a run of another. Exit codes of ``compare_cli``: 0 pass,
1 a regression or a point that no longer runs (status oom/error), 2 refused (different
GPU without ``allow_mismatch``, unusable baseline or candidate).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy.stats import mannwhitneyu

BASELINE_FORMAT = "e2f-perf-baseline"
BASELINE_VERSION = 1
DEFAULT_THRESHOLD = 0.05
DEFAULT_ALPHA = 0.01
DEFAULT_BOOTSTRAP = 2000

EXIT_PASS, EXIT_REGRESSION, EXIT_REFUSED = 0, 1, 2

# Environment keys whose difference makes timings incomparable: refused unless allowed.
HARD_ENV_KEYS = ("gpu_name",)
# Keys expected to differ between any two runs; shown apart, never a warning.
INFO_ENV_KEYS = ("git_commit", "git_dirty", "command", "timestamp", "hostname", "pid")

REGRESSION, IMPROVED, SAME, INCONCLUSIVE = "REGRESSION", "improved", "same", "inconclusive"
NOT_REPRODUCED = "not reproduced"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The decision for one point, with every figure it rests on."""

    verdict: str  # REGRESSION | improved | same | inconclusive
    base_median_ms: float
    cand_median_ms: float
    ratio: float  # cand median / base median
    ci_low: float  # bootstrap CI (level 1 - alpha) of the median ratio
    ci_high: float
    p_slower: float  # one-sided Mann-Whitney U: candidate stochastically greater
    p_faster: float
    n_base: int
    n_cand: int
    reason: str

    @property
    def change(self) -> float:
        return self.ratio - 1.0


def min_samples_for(alpha: float) -> int:
    """Smallest equal sample size at which a one-sided exact Mann-Whitney U can reach alpha.

    With n samples per side the smallest attainable p is 1 / C(2n, n).
    """
    n = 1
    while 1.0 / math.comb(2 * n, n) >= alpha:
        n += 1
    return n


def bootstrap_ratio_ci(base: np.ndarray, cand: np.ndarray, level: float, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of median(cand) / median(base), both sides resampled."""
    rng = np.random.default_rng(seed)
    b = np.median(rng.choice(base, size=(n_boot, base.size), replace=True), axis=1)
    c = np.median(rng.choice(cand, size=(n_boot, cand.size), replace=True), axis=1)
    ratios = c / b
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(ratios, [tail, 1.0 - tail])
    return float(lo), float(hi)


def decide(
    base_samples: Sequence[float],
    cand_samples: Sequence[float],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> Verdict:
    """The decision rule for one point (pure: same samples, same verdict).

    Parameters
    ----------
    base_samples, cand_samples
        Raw per-repeat times (ms) of the baseline and the candidate.
    threshold
        Practical threshold: a change smaller than this fraction of the baseline median
        is never a regression or an improvement.
    alpha
        Significance level of the one-sided Mann-Whitney U tests (and 1 - level of the
        bootstrap interval).
    """
    base = np.asarray(base_samples, dtype=float)
    cand = np.asarray(cand_samples, dtype=float)
    if base.size == 0 or cand.size == 0:
        raise ValueError(f"need samples on both sides (baseline {base.size}, candidate {cand.size})")
    if not (np.all(np.isfinite(base)) and np.all(np.isfinite(cand))):
        raise ValueError("samples must be finite")
    if threshold < 0 or not 0 < alpha < 1:
        raise ValueError(f"threshold must be >= 0 and alpha in (0, 1), got {threshold}, {alpha}")
    mb, mc = float(np.median(base)), float(np.median(cand))
    ratio = mc / mb
    if np.ptp(np.concatenate([base, cand])) == 0.0:
        p_slower = p_faster = 1.0  # identical constant samples: no evidence either way
    else:
        p_slower = float(mannwhitneyu(cand, base, alternative="greater").pvalue)
        p_faster = float(mannwhitneyu(cand, base, alternative="less").pvalue)
    ci_low, ci_high = bootstrap_ratio_ci(base, cand, 1.0 - alpha, n_boot, seed)
    slower, faster = ratio > 1.0 + threshold, ratio < 1.0 - threshold
    if slower and p_slower < alpha:
        verdict, reason = REGRESSION, f"median +{ratio - 1:.1%} > {threshold:.0%} and p={p_slower:.2g} < {alpha:g}"
    elif faster and p_faster < alpha:
        verdict, reason = IMPROVED, f"median {ratio - 1:.1%} beyond -{threshold:.0%} and p={p_faster:.2g} < {alpha:g}"
    elif slower or faster:
        verdict = INCONCLUSIVE
        p = p_slower if slower else p_faster
        reason = f"median {ratio - 1:+.1%} beyond the threshold but p={p:.2g} >= {alpha:g}"
        need = min_samples_for(alpha)
        if min(base.size, cand.size) < need:
            reason += f" (fewer than {need} samples a side can never reach p < {alpha:g})"
    else:
        verdict, reason = SAME, f"median {ratio - 1:+.1%} within +-{threshold:.0%}"
    return Verdict(verdict, mb, mc, ratio, ci_low, ci_high, p_slower, p_faster, base.size, cand.size, reason)


# --------------------------------------------------------------------------- records


def _as_dict(record: Any) -> dict:
    if isinstance(record, dict):
        return record
    if dataclasses.is_dataclass(record):
        return dataclasses.asdict(record)
    for attr in ("to_dict", "as_dict"):
        if hasattr(record, attr):
            return getattr(record, attr)()
    raise TypeError(f"cannot read a results record from {type(record).__name__}")


def point_key(record: dict) -> str:
    """The identity of a measured point across runs: suite, implementation, parameters."""
    params = json.dumps(record.get("params") or {}, sort_keys=True, separators=(",", ":"), default=str)
    return f"{record.get('suite', '')}|{record.get('impl', '')}|{params}"


def point_label(record: dict) -> str:
    """Short human name of a point for the table."""
    p = dict(record.get("params") or {})
    first = ("dtype", "mode", "n_atoms", "neighbors")
    parts = [f"{p.pop(k)}" if k in ("dtype", "mode") else f"{k.replace('n_atoms', 'N').replace('neighbors', 'K')}={p.pop(k)}"
             for k in first if k in p]
    parts += [f"{k}={v}" for k, v in sorted(p.items()) if not isinstance(v, (dict, list))]
    return f"{record.get('impl', '?')} " + " ".join(parts)


def _normalise(candidate_records: Iterable[Any] | str | os.PathLike) -> list[dict]:
    """Records as dicts, from objects or from a results file / folder (``suites.core.records``)."""
    if isinstance(candidate_records, (str, os.PathLike)):
        from suites.core.records import load_all

        return load_all([candidate_records])
    return [_as_dict(r) for r in candidate_records]


def _samples(record: dict) -> list[float]:
    return [float(x) for x in ((record.get("metrics") or {}).get("samples_ms") or [])]


def _precision(record: dict):
    """``metrics.tf32_matmul`` of a record or baseline point (None where not recorded)."""
    return (record.get("metrics") or {}).get("tf32_matmul")


def _run_env(records: list[dict]) -> dict:
    for r in records:
        if r.get("env"):
            return dict(r["env"])
    return {}


def save_baseline(records: Iterable[Any] | str | os.PathLike, path: str | os.PathLike) -> dict:
    """Write the timed points of a run (status ok, with samples) as a baseline file.

    Returns the baseline object. Raises ``ValueError`` if no record has samples or if the
    records come from different GPUs.
    """
    recs = _normalise(records)
    timed = [r for r in recs if r.get("status") == "ok" and _samples(r)]
    if not timed:
        statuses = sorted({str(r.get("status")) for r in recs}) or ["no records"]
        raise ValueError(f"no timed points to save (statuses seen: {', '.join(statuses)}); "
                         "a baseline needs status 'ok' records with metrics.samples_ms (a GPU run)")
    gpus = {str((r.get("env") or {}).get("gpu_name")) for r in timed}
    if len(gpus) > 1:
        raise ValueError(f"records come from different GPUs ({sorted(gpus)}): save one baseline per GPU")
    points, seen = [], set()
    for r in timed:
        key = point_key(r)
        if key in seen:
            raise ValueError(f"point measured twice in these records: {point_label(r)}")
        seen.add(key)
        samples = _samples(r)
        metrics = {k: v for k, v in (r.get("metrics") or {}).items()
                   if k != "samples_ms" and (v is None or isinstance(v, (int, float, str, bool)))}
        points.append({"key": key, "suite": r.get("suite"), "impl": r.get("impl"), "point_id": r.get("point_id"),
                       "params": r.get("params") or {}, "samples_ms": samples,
                       "latency_ms": float(np.median(samples)), "metrics": metrics})
    baseline = {"format": BASELINE_FORMAT, "version": BASELINE_VERSION,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "env": _run_env(timed), "points": points}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(baseline, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return baseline


def load_baseline(path: str | os.PathLike) -> dict:
    """Read and validate a baseline file (``ValueError`` with the reason if unusable)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"baseline file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"baseline {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise ValueError(f"{path} is not an e2f baseline (format {BASELINE_FORMAT!r} expected)")
    if data.get("version") != BASELINE_VERSION:
        raise ValueError(f"{path}: baseline version {data.get('version')} not supported (want {BASELINE_VERSION})")
    for p in data.get("points", []):
        if not p.get("samples_ms"):
            raise ValueError(f"{path}: point {p.get('key')} has no samples")
    return data


# --------------------------------------------------------------------------- environment


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def env_differences(base_env: dict, cand_env: dict) -> list[tuple[str, Any, Any, str]]:
    """Differing environment entries as ``(key, baseline, candidate, severity)``.

    Severity is ``refuse`` (different GPU), ``warn`` (driver, clocks, power limit,
    software versions, ...: shown because they move timings) or ``info`` (commit, command).
    """
    b, c = _flatten(base_env), _flatten(cand_env)
    diffs = []
    for key in sorted(set(b) | set(c)):
        if b.get(key) == c.get(key):
            continue
        leaf = key.rsplit(".", 1)[-1]
        severity = "refuse" if key in HARD_ENV_KEYS else "info" if leaf in INFO_ENV_KEYS else "warn"
        diffs.append((key, b.get(key), c.get(key), severity))
    return diffs


# --------------------------------------------------------------------------- comparison


@dataclasses.dataclass
class PointResult:
    key: str
    label: str
    status: str  # a Verdict.verdict, 'not reproduced', or 'failed' / 'missing' / 'new' / 'no-samples'
    verdict: Verdict | None = None
    note: str = ""
    confirmation: str = ""  # the reruns' changes, for a point flagged and measured again (``confirm``)


def compare(baseline: dict, candidate_records: Iterable[Any], *, threshold: float = DEFAULT_THRESHOLD,
            alpha: float = DEFAULT_ALPHA, n_boot: int = DEFAULT_BOOTSTRAP) -> list[PointResult]:
    """Match candidate records to baseline points and decide each (pure; no printing)."""
    cand = {}
    for r in _normalise(candidate_records):
        cand[point_key(r)] = r  # a resumed run may repeat a point: the last record wins
    results = []
    for bp in baseline["points"]:
        label = point_label(bp)
        r = cand.pop(bp["key"], None)
        if r is None:
            results.append(PointResult(bp["key"], label, "missing", note="not in this run"))
        elif r.get("status") != "ok":
            results.append(PointResult(bp["key"], label, "failed",
                                       note=f"status {r.get('status')}: {r.get('error') or ''}".strip()))
        elif not _samples(r):
            results.append(PointResult(bp["key"], label, "no-samples", note="record has no metrics.samples_ms"))
        elif _precision(bp) != _precision(r):
            # TF32 vs IEEE gate products differ ~8x in the fused backward: never a verdict
            results.append(PointResult(bp["key"], label, "failed",
                                       note=f"matmul precision differs (baseline tf32_matmul={_precision(bp)}, "
                                            f"this run {_precision(r)}): save a new baseline"))
        else:
            seed = zlib.crc32(bp["key"].encode())  # fixed per point: a rerun reproduces its verdict
            v = decide(bp["samples_ms"], _samples(r), threshold=threshold, alpha=alpha, n_boot=n_boot, seed=seed)
            results.append(PointResult(bp["key"], label, v.verdict, v, v.reason))
    for key, r in cand.items():
        if r.get("status") == "ok" and _samples(r):
            results.append(PointResult(key, point_label(r), "new", note="not in the baseline"))
    return results


#: Measures the given candidate records' points again in a fresh process and returns the
#: new records (``run_bench.py`` passes one that runs itself with ``--point``).
Rerun = Callable[[list[dict]], Iterable[Any]]


def confirm(baseline: dict, results: list[PointResult], candidate_records: Iterable[Any], rerun: Rerun, *,
            rounds: int = 1, threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA,
            n_boot: int = DEFAULT_BOOTSTRAP) -> list[PointResult]:
    """``results`` with every REGRESSION measured again ``rounds`` times by ``rerun``.

    A flagged point stays a REGRESSION if each rerun is a REGRESSION too or fails (status
    oom/error, or the rerun did not measure it); as soon as one rerun decides otherwise it
    becomes ``NOT_REPRODUCED`` (the first run's figures kept, each rerun's change in
    ``confirmation``) and no longer fails the gate.
    """
    pending = dict.fromkeys(r.key for r in results if r.status == REGRESSION)
    if not pending or rounds < 1:
        return results
    by_key = {point_key(c): c for c in _normalise(candidate_records)}
    points = {bp["key"]: bp for bp in baseline["points"]}
    reruns: dict[str, list[str]] = {key: [] for key in pending}
    for round_no in range(1, rounds + 1):
        if not pending:
            break
        fresh = compare({"points": [points[key] for key in pending]},
                        rerun([by_key[key] for key in pending]), threshold=threshold, alpha=alpha, n_boot=n_boot)
        for again in fresh:
            if again.key not in pending:
                continue  # a point the rerun measured beyond the ones asked for
            v = again.verdict
            reruns[again.key].append(f"rerun {round_no} " + (f"{v.change:+.1%} {v.verdict}" if v is not None
                                                              else f"{again.status}: {again.note}"))
            if again.status not in (REGRESSION, "failed", "missing", "no-samples"):
                pending.pop(again.key)
    return [r if r.key not in reruns else
            dataclasses.replace(r, status=r.status if r.key in pending else NOT_REPRODUCED,
                                confirmation=", ".join(reruns[r.key]))
            for r in results]


def gate_exit_code(results: list[PointResult]) -> int:
    """0 unless a point regressed or a baseline point no longer runs; 2 if nothing was compared."""
    if not any(r.verdict is not None for r in results):
        return EXIT_REFUSED
    if any(r.status in (REGRESSION, "failed") for r in results):
        return EXIT_REGRESSION
    return EXIT_PASS


def format_table(results: list[PointResult], threshold: float, alpha: float) -> str:
    level = f"{1 - alpha:.0%}"
    head = ["point", "base ms", "cand ms", "change", f"{level} CI of ratio", "p slower", "p faster", "n b/c", "verdict"]
    rows = []
    for r in results:
        v = r.verdict
        if v is None:
            rows.append([r.label, "", "", "", "", "", "", "", f"{r.status}: {r.note}"])
            continue
        verdict = f"{r.status} ({r.confirmation})" if r.confirmation else r.status
        rows.append([r.label, f"{v.base_median_ms:.4g}", f"{v.cand_median_ms:.4g}", f"{v.change:+.1%}",
                     f"[{v.ci_low:.3f}, {v.ci_high:.3f}]", f"{v.p_slower:.2g}", f"{v.p_faster:.2g}",
                     f"{v.n_base}/{v.n_cand}", verdict])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(head), line(["-" * w for w in widths])] + [line(row) for row in rows]
    out.append(f"rule: REGRESSION = median slower by > {threshold:.0%} AND one-sided Mann-Whitney U p < {alpha:g} "
               f"on the raw repeats (improved: the mirror image)")
    return "\n".join(out)


def format_env(diffs: list[tuple[str, Any, Any, str]]) -> str:
    if not diffs:
        return "environment: identical to the baseline's"
    lines = ["environment differences (baseline -> candidate):"]
    for key, b, c, sev in diffs:
        tag = {"refuse": "GPU MISMATCH", "warn": "differs", "info": "info"}[sev]
        lines.append(f"  [{tag}] {key}: {b!r} -> {c!r}")
    return "\n".join(lines)


def compare_cli(baseline_path: str | os.PathLike, candidate_records: Iterable[Any] | str | os.PathLike,
                threshold: float = DEFAULT_THRESHOLD, allow_mismatch: bool = False, *,
                alpha: float = DEFAULT_ALPHA, stream=None, rerun: Rerun | None = None, rounds: int = 1) -> int:
    """Compare a run (records, or a results file/folder) with a baseline file; print; return the exit code.

    0: no regression. 1: at least one point regressed (confirmed by ``rounds`` reruns when
    ``rerun`` is given, see ``confirm``), or failed (oom/error) where the baseline ran.
    2: refused: a different GPU (unless ``allow_mismatch``), an unusable baseline, or no
    point in common.
    """
    out = stream or sys.stdout
    try:
        baseline = load_baseline(baseline_path)
    except ValueError as e:
        print(f"error: {e}", file=out)
        return EXIT_REFUSED
    try:
        records = _normalise(candidate_records)
    except FileNotFoundError as e:
        print(f"error: {e}", file=out)
        return EXIT_REFUSED
    diffs = env_differences(baseline.get("env") or {}, _run_env(records))
    print(f"baseline: {baseline_path} ({len(baseline['points'])} points, {baseline.get('created')}, "
          f"GPU {(baseline.get('env') or {}).get('gpu_name')!r})", file=out)
    print(format_env(diffs), file=out)
    refused = [d for d in diffs if d[3] == "refuse"]
    if refused and not allow_mismatch:
        what = ", ".join(f"{k} {b!r} vs {c!r}" for k, b, c, _ in refused)
        print(f"error: refusing to compare timings across different GPUs ({what}); make a baseline on this GPU "
              f"with --save-baseline, or pass --allow-mismatch to compare anyway", file=out)
        return EXIT_REFUSED
    if refused:
        print("warning: GPU mismatch allowed by --allow-mismatch: the verdicts below compare different hardware", file=out)
    results = compare(baseline, records, threshold=threshold, alpha=alpha)
    print(format_table(results, threshold, alpha), file=out)
    flagged = sum(r.status == REGRESSION for r in results)
    if rerun is not None and flagged and rounds > 0:
        print(f"confirming {flagged} flagged point(s): {rounds} rerun(s) in a fresh process each", file=out)
        results = confirm(baseline, results, records, rerun, rounds=rounds, threshold=threshold, alpha=alpha)
        print(format_table(results, threshold, alpha), file=out)
        print("confirmation: a flagged point fails only if every rerun regresses too (or fails)", file=out)
    code = gate_exit_code(results)
    counts = {s: sum(r.status == s for r in results) for s in dict.fromkeys(r.status for r in results)}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    if code == EXIT_REFUSED:
        print(f"error: no point of this run matches the baseline ({summary or 'no records'}); "
              "run the same suite and parameters the baseline was made with", file=out)
    else:
        print(f"{'FAIL' if code else 'PASS'}: {summary}", file=out)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m suites.core.compare",
                                 description="Compare a results file with a performance baseline (exit 1 on a regression).")
    ap.add_argument("baseline", help="baseline JSON written by --save-baseline")
    ap.add_argument("results", help="results .jsonl file (or a folder of them) of the candidate run")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="practical threshold (fraction, default 0.05)")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="significance level (default 0.01)")
    ap.add_argument("--allow-mismatch", action="store_true", help="compare even if the GPU differs")
    args = ap.parse_args(argv)
    return compare_cli(args.baseline, args.results, args.threshold, args.allow_mismatch, alpha=args.alpha)


if __name__ == "__main__":
    raise SystemExit(main())
