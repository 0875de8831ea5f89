#!/usr/bin/env python
"""e2f benchmark command line: run suites, list them, render reports, gate regressions.

    python run_bench.py --list
    python run_bench.py --suite memory-scaling                 # quick on CPU, full on CUDA
    python run_bench.py --suite smoke --impl matmul --sizes 64,128 --dtype fp32,bf16
    python run_bench.py --suite latency --full --out bench-out/h100 --resume
    python run_bench.py --report bench-out/h100 --paper
    python run_bench.py --suite kernel-regression --compare reports/baselines/h200.json
    python run_bench.py --suite kernel-regression --compare BASE.json --confirm 2   # two reruns a flagged point

Exit status: 0 when every point is ok/oom/skipped, 3 when a point recorded an error,
2 for a usage error (unknown suite, implementation or dtype, or a Python without the
package's dependencies), otherwise what the report renderer or the regression gate returns.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_POINT_ERRORS = 3


def _int_list(text: str) -> tuple[int, ...]:
    """'100,1000,1e4' or '1-6' -> integers."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            value = float(part)
            if value != int(value):
                raise argparse.ArgumentTypeError(f"not an integer: {part!r}")
            out.append(int(value))
    if not out:
        raise argparse.ArgumentTypeError(f"empty list: {text!r}")
    return tuple(out)


def _name_list(values: list[str] | None) -> tuple[str, ...] | None:
    """Repeatable and comma-separated: ['a,b', 'c'] -> ('a', 'b', 'c')."""
    if not values:
        return None
    return tuple(v.strip() for item in values for v in item.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_bench.py",
        description="Benchmark E2Former-V2 and its baselines: suites -> JSON-lines records -> reports.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", action="append", metavar="NAME", help="suite to run (repeatable); see --list")
    p.add_argument("--list", action="store_true", help="list suites, implementations and metrics, then exit")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--impl", action="append", metavar="NAME", help="only these implementations (repeatable, comma lists)")
    p.add_argument("--sizes", type=_int_list, metavar="N,N,...", help="atom counts (or the suite's size) to sweep, e.g. 100,1000,1e4")
    p.add_argument("--lmax", type=_int_list, metavar="L,L|A-B", help="L_max values, e.g. 2 or 1-6")
    p.add_argument("--dtype", action="append", metavar="DTYPE", help="float32, bfloat16, float16, float64 (repeatable)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="quick", action="store_true", default=None, help="small sweep (default on CPU)")
    size.add_argument("--full", dest="quick", action="store_false", help="the full sweep (default on CUDA)")
    p.add_argument("--out", metavar="DIR", help="results directory (default: bench-out/<suite>[+<suite>...])")
    p.add_argument("--resume", action="store_true", help="keep the results in --out and measure only missing points")
    p.add_argument("--seed", type=int, default=0, help="seed of every random input (default 0)")
    p.add_argument("--data", metavar="PATH", help="dataset for the accuracy suite")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps per model in the accuracy suite")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="accuracy suite: stop each model's training after this wall time (recorded with "
                        "the steps it reached) instead of losing the point to an outer time limit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--point", action="append", metavar="ID",
                   help="only the points with this record id (repeatable; the regression gate's reruns use it)")
    rep = p.add_argument_group("reports (reports.report)")
    rep.add_argument("--report", nargs="*", metavar="RESULTS",
                     help="render a report from results files/directories (no suite run needed); "
                          "without RESULTS: the --out directory")
    rep.add_argument("--paper", action="store_true", help="paper style figures (serif, column width, PDF/SVG)")
    rep.add_argument("--no-report", action="store_true", help="do not render a report after a suite run")
    reg = p.add_argument_group("regression gate (suites.core.compare)")
    reg.add_argument("--compare", metavar="BASELINE.json", help="compare this run (or the results in --out) with a baseline")
    reg.add_argument("--save-baseline", metavar="PATH", help="save this run (or the results in --out) as a baseline")
    reg.add_argument("--allow-mismatch", action="store_true", help="compare even if GPU/software differ from the baseline")
    reg.add_argument("--threshold", type=float, default=0.05, help="practical slowdown threshold (default 0.05 = 5%%)")
    reg.add_argument("--confirm", type=int, default=1, metavar="N",
                     help="measure each point flagged as a regression again in N fresh processes; it fails the gate "
                          "only if every rerun regresses too (default 1; 0: no reruns; needs --suite)")
    return p


#: Options of a suite run that its reruns (``--confirm``) repeat as given, and those they drop
#: or set themselves; every option of ``build_parser`` is in one of the two (a test checks).
RERUN_CARRIED = ("suite", "device", "impl", "sizes", "lmax", "dtype", "quick", "seed", "data", "steps",
                 "time_budget")
RERUN_DROPPED = ("help", "list", "out", "resume", "no_progress", "point", "report", "paper", "no_report",
                 "compare", "save_baseline", "allow_mismatch", "threshold", "confirm")


def rerun_argv(args: argparse.Namespace, device: str, point_ids: list[str], out_dir: Path) -> list[str]:
    """The command line that measures ``point_ids`` again as ``args`` measured them, into ``out_dir``."""
    argv = ["--out", str(out_dir), "--no-report", "--no-progress", "--device", device, "--seed", str(args.seed)]
    for name in ("suite", "impl", "dtype"):
        for value in getattr(args, name) or ():
            argv += [f"--{name}", value]
    for name in ("sizes", "lmax"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", ",".join(map(str, getattr(args, name)))]
    if args.quick is not None:
        argv.append("--quick" if args.quick else "--full")
    for name in ("data", "steps", "time_budget"):
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for pid in point_ids:
        argv += ["--point", pid]
    return argv


def fresh_process_rerun(args: argparse.Namespace, device: str, out_dir: Path):
    """A ``suites.core.compare.Rerun``: each call runs this script again in a new process on
    the given records' points, into ``<out>/confirm-<n>``, and returns the new records."""
    from suites.core.records import latest_by_point, load_all

    calls = 0

    def rerun(records: list[dict]) -> list[dict]:
        nonlocal calls
        calls += 1
        where = out_dir / f"confirm-{calls}"
        argv = rerun_argv(args, device, [r["point_id"] for r in records], where)
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv], check=False)
        return latest_by_point(load_all([where])) if where.exists() else []

    return rerun


def _usage_error(message: str) -> int:
    print(f"run_bench.py: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _missing_dependency(exc: ModuleNotFoundError) -> str | None:
    """What to tell a user whose Python cannot import a package this command needs (None when
    the missing module is one of this repository's own: a bug, not a setup problem)."""
    top = (exc.name or "").partition(".")[0]
    here = Path(__file__).resolve().parent
    if not top or (here / top).is_dir() or (here / f"{top}.py").is_file():
        return None
    return (f"this Python ({sys.executable}) cannot import {exc.name!r}: install the package and its "
            f"dependencies first, `pip install torch==2.13.0 -e .` (with the optional backends: "
            f"`-e \".[test]\"`; README, Quickstart)")


def _import_attr(module: str, attr: str, purpose: str):
    """``module.attr``, or a clear ImportError saying which part is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{purpose} needs {module}, which is not importable: {exc}") from exc
    if not hasattr(mod, attr):
        raise ImportError(f"{purpose} needs {module}.{attr}, which does not exist")
    return getattr(mod, attr)


def list_everything() -> str:
    import suites
    from suites.core.records import METRICS
    from suites.core.runner import get_suite, suite_names

    lines = ["Suites (--suite NAME):"]
    names = suite_names()
    impls: dict[str, list[str]] = {}
    for name in names:
        suite = get_suite(name)
        lines.append(f"  {name:<20} {suite.description}")
        lines.append(f"  {'':<20} implementations: {', '.join(suite.impls) or '-'}")
        if suite.metrics:
            lines.append(f"  {'':<20} metrics: {', '.join(suite.metrics)}")
        for impl in suite.impls:
            impls.setdefault(impl, []).append(name)
    for module, error in sorted(suites.IMPORT_ERRORS.items()):
        lines.append(f"  (suites/{module}.py failed to import: {error})")
    lines.append("")
    lines.append("Implementations (--impl NAME):")
    for impl in sorted(impls):
        lines.append(f"  {impl:<28} in {', '.join(impls[impl])}")
    lines.append("")
    lines.append("Metrics (records' \"metrics\"; suites may add more):")
    for key, text in METRICS.items():
        lines.append(f"  {key:<22} {text}")
    return "\n".join(lines)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _render_report(paths: list[str], out_dir: str, paper: bool, allow_mismatch: bool) -> int:
    render_cli = _import_attr("reports.report", "render_cli", "--report")
    extra = {"allow_mismatch": True} if allow_mismatch else {}
    return int(render_cli([str(p) for p in paths], str(out_dir), paper, **extra) or 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.list:
        print(list_everything())
        return 0

    import torch

    from suites.core.runner import SweepConfig, canonical_dtype, get_suite, suite_names

    suites_asked = _name_list(args.suite) or ()
    if args.report is not None and not suites_asked:
        paths = args.report or ([args.out] if args.out else [])
        if not paths:
            return _usage_error("--report needs RESULTS files/directories or --out DIR")
        if args.out and args.report:
            out_dir = Path(args.out)
        else:
            first = Path(paths[0])
            out_dir = (first if first.is_dir() else first.parent) / "report"
        try:
            return _render_report(paths, str(out_dir), args.paper, args.allow_mismatch)
        except ImportError as exc:
            return _usage_error(str(exc))

    if not suites_asked and not (args.compare or args.save_baseline):
        return _usage_error("nothing to do: give --suite NAME (see --list), --report, --compare or --save-baseline")

    valid = suite_names()
    for name in suites_asked:
        if name not in valid:
            return _usage_error(f"unknown suite {name!r}; valid suites: {', '.join(valid)}")
    try:
        dtypes = tuple(canonical_dtype(d) for d in _name_list(args.dtype)) if args.dtype else None
    except ValueError as exc:
        return _usage_error(str(exc))
    impls = _name_list(args.impl)
    if impls and suites_asked:
        known = {i for name in suites_asked for i in get_suite(name).impls}
        unknown = [i for i in impls if i not in known]
        if unknown:
            return _usage_error(f"unknown implementation(s) {', '.join(map(repr, unknown))} for "
                                f"{', '.join(suites_asked)}; valid: {', '.join(sorted(known))}")

    device = args.device or _default_device()
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        return _usage_error(f"bad --device {device!r}: {exc}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        return _usage_error(f"--device {device} asked for, but CUDA is not available here (use --device cpu)")
    quick = args.quick if args.quick is not None else dev.type != "cuda"
    out_dir = Path(args.out) if args.out else Path("bench-out") / ("+".join(suites_asked) or "results")

    cfg = SweepConfig(
        device=device, quick=quick, sizes=args.sizes, lmax=args.lmax, dtypes=dtypes, impls=impls,
        point_ids=tuple(args.point) if args.point else None,
        seed=args.seed, out_dir=out_dir, resume=args.resume, progress=not args.no_progress,
        extra={k: v for k, v in (("data", args.data), ("steps", args.steps), ("time_budget_s", args.time_budget))
               if v is not None},
    )

    rc = 0
    run_records: list[dict] = []
    if suites_asked:
        from suites.core.records import export_csv
        from suites.core.runner import DeviceMemoryLost, run_suites

        try:
            results = run_suites(suites_asked, cfg)
        except DeviceMemoryLost as exc:
            return _restart_resumed(argv, exc)
        for res in results:
            run_records.extend(res.records)
            csv = export_csv(res.records, res.path.with_suffix(".csv"))
            counts = ", ".join(f"{n} {s}" for s, n in sorted(res.counts().items()))
            print(f"{res.suite}: {counts or 'no points'} -> {res.path} (+ {csv.name})")
        if any(r["status"] == "error" for r in run_records):
            rc = EXIT_POINT_ERRORS
        if not args.no_report:
            rc = max(rc, _report_after_run([str(res.path) for res in results], out_dir, args.paper))
    else:
        from suites.core.records import latest_by_point, load_all

        if not out_dir.exists():
            return _usage_error(f"no suite run and no results at {out_dir}: give --suite or --out DIR")
        run_records = latest_by_point(load_all([out_dir]))

    if args.save_baseline:
        try:
            save_baseline = _import_attr("suites.core.compare", "save_baseline", "--save-baseline")
        except ImportError as exc:
            return _usage_error(str(exc))
        try:
            save_baseline(run_records, args.save_baseline)
        except ValueError as exc:
            print(f"run_bench.py: error: no baseline saved: {exc}", file=sys.stderr)
            return max(rc, 1)
        print(f"baseline saved to {args.save_baseline}")
    if args.compare:
        try:
            compare_cli = _import_attr("suites.core.compare", "compare_cli", "--compare")
        except ImportError as exc:
            return _usage_error(str(exc))
        rerun = fresh_process_rerun(args, device, out_dir) if suites_asked and args.confirm > 0 else None
        rc = max(rc, int(compare_cli(args.compare, run_records, args.threshold, args.allow_mismatch,
                                     rerun=rerun, rounds=args.confirm) or 0))
    return rc


#: How often one command restarts itself after a point left GPU memory it cannot free.
MAX_RESTARTS = 4
RESTARTS_ENV = "E2F_SWEEP_RESTARTS"


def resume_argv(argv: list[str]) -> list[str]:
    """The same command line with ``--resume`` (added once)."""
    return list(argv) if "--resume" in argv else [*argv, "--resume"]


def _restart_resumed(argv: list[str] | None, exc: Exception) -> int:
    """Run this command again in a fresh process, resuming: the failed point is stored, and
    every point after it needs the GPU memory this process lost (``DeviceMemoryLost``)."""
    restarts = int(os.environ.get(RESTARTS_ENV, "0"))
    if restarts >= MAX_RESTARTS:
        print(f"run_bench.py: error: {exc}; already restarted {restarts} times, stopping", file=sys.stderr)
        return 1
    args = resume_argv(sys.argv[1:] if argv is None else argv)
    print(f"run_bench.py: {exc}; restarting with --resume ({restarts + 1} of {MAX_RESTARTS})", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[RESTARTS_ENV] = str(restarts + 1)
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *args])


def _report_after_run(paths: list[str], out_dir: Path, paper: bool) -> int:
    """Render ``<out>/report`` from the results just written, if the renderer exists."""
    try:
        render_cli = _import_attr("reports.report", "render_cli", "report rendering")
    except ImportError as exc:
        print(f"note: no report rendered ({exc})", file=sys.stderr)
        return 0
    report_dir = out_dir / "report"
    try:
        rc = int(render_cli(paths, str(report_dir), paper) or 0)
    except Exception as exc:  # noqa: BLE001 -- the measurements are stored; say so and fail
        print(f"error: report rendering failed ({type(exc).__name__}: {exc}); results are kept in {out_dir}",
              file=sys.stderr)
        return 1
    print(f"report: {report_dir}")
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ModuleNotFoundError as exc:
        hint = _missing_dependency(exc)
        if hint is None:
            raise
        sys.exit(_usage_error(hint))
    except BrokenPipeError:
        # the reader left early (``--list | head``): not an error of ours; silence the
        # interpreter's own flush of the closed stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
