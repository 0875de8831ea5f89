"""Suites, sweep points and the sweep loop.

A suite is a subclass of :class:`Suite` decorated with :func:`register_suite`, in a module
``suites/<name>.py`` (every module there is imported by :func:`suites.discover_suites`,
so a new file registers itself)::

    @register_suite
    class MySuite(Suite):
        name = "my-suite"
        description = "what it measures"
        impls = ("a", "b")
        metrics = ("latency_ms", "peak_bytes")

        def points(self, cfg):
            return [Point(impl, {"n_atoms": n, "mode": "fwd"})
                    for impl in self.impls for n in cfg.pick_sizes(quick=[64], full=[1024])]

        def measure(self, point, cfg):
            return measure(forward_for(point), mode=point.params["mode"], device=cfg.device, ...)

:func:`run_suite` runs every point not yet stored (``--resume``) and appends one record
per point to ``<out>/<suite>.jsonl``:

- ``measure`` returns the metrics dict -> ``status='ok'``;
- out of memory (``torch.OutOfMemoryError``, or a ``RuntimeError`` saying "out of
  memory") -> ``status='oom'``; memory is freed and the sweep goes on. Later points of the
  same implementation that differ only by a larger ``n_atoms`` are recorded as
  ``'skipped'`` (with the reason) instead of being run into the same wall;
- :class:`SkipPoint` raised, or :meth:`Suite.unavailable` giving a reason ->
  ``status='skipped'`` with that reason (printed, never silent);
- any other exception -> ``status='error'`` with the message; the sweep goes on.
"""
from __future__ import annotations

import abc
import math
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from suites.core import records as rec
from suites.core.env import environment
from suites.core.memory import free_memory, held_tensors

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {
    "fp64": "float64", "double": "float64", "f64": "float64",
    "fp32": "float32", "float": "float32", "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16", "half": "float16", "f16": "float16",
}


def canonical_dtype(name: str) -> str:
    """'fp32' -> 'float32' etc.; ValueError naming the valid names."""
    key = str(name).strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        valid = ", ".join([*DTYPES, *_DTYPE_ALIASES])
        raise ValueError(f"unknown dtype {name!r}; valid: {valid}")
    return key


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[canonical_dtype(name)]


@dataclass(frozen=True)
class Point:
    """One sweep point: an implementation and its parameters (JSON-able values).

    Conventional params keys: ``n_atoms``, ``lmax``, ``channels``, ``dtype``, ``mode``
    ('fwd' | 'bwd' | 'fwd+bwd'), ``neighbors`` (K); suites add their own.
    """

    impl: str
    params: dict

    def label(self) -> str:
        return f"{self.impl} " + " ".join(f"{k}={v}" for k, v in self.params.items())


@dataclass
class SweepConfig:
    """What the command line asked for; suites read it to build and measure points.

    ``sizes``/``lmax``/``dtypes``/``impls`` are None when not given (the suite's
    defaults apply: use :meth:`pick_sizes` etc.). ``point_ids``, when given, keeps only the
    points with those record ids (the regression gate's reruns). ``extra`` carries
    suite-specific options (``extra["data"]``: the ``--data`` path of the accuracy suite).
    """

    device: str = "cpu"
    quick: bool = True
    sizes: tuple[int, ...] | None = None
    lmax: tuple[int, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    impls: tuple[str, ...] | None = None
    point_ids: tuple[str, ...] | None = None
    seed: int = 0
    out_dir: Path = Path("bench-out")
    resume: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        if self.dtypes is not None:
            self.dtypes = tuple(canonical_dtype(d) for d in self.dtypes)

    @property
    def full(self) -> bool:
        return not self.quick

    @property
    def out(self) -> Path:
        """Alias of ``out_dir``."""
        return self.out_dir

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    def pick_sizes(self, quick: Iterable[int], full: Iterable[int]) -> list[int]:
        """``--sizes`` if given, else the suite's quick or full list."""
        return list(self.sizes) if self.sizes is not None else list(quick if self.quick else full)

    def pick_lmax(self, quick: Iterable[int], full: Iterable[int]) -> list[int]:
        """``--lmax`` if given, else the suite's quick or full list."""
        return list(self.lmax) if self.lmax is not None else list(quick if self.quick else full)

    def pick_dtypes(self, default: Iterable[str] = ("float32",)) -> list[str]:
        """``--dtype`` if given, else ``default`` (canonical names such as 'float32')."""
        return list(self.dtypes) if self.dtypes is not None else [canonical_dtype(d) for d in default]

    def wants(self, impl: str) -> bool:
        """False when ``--impl`` filters ``impl`` out."""
        return self.impls is None or impl in self.impls

    def results_path(self, suite_name: str) -> Path:
        return self.out_dir / f"{suite_name}.jsonl"


class SkipPoint(Exception):
    """Raise from :meth:`Suite.measure` to record the point as 'skipped' with a reason."""


class Suite(abc.ABC):
    """Base class of a benchmark suite (see the module docstring)."""

    name: str = ""
    description: str = ""
    impls: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()

    @abc.abstractmethod
    def points(self, cfg: SweepConfig) -> list[Point]:
        """The sweep's points for ``cfg`` (sizes, dtypes, implementations)."""

    @abc.abstractmethod
    def measure(self, point: Point, cfg: SweepConfig) -> dict:
        """Measure one point; return its metrics (raise SkipPoint or let OOM propagate)."""

    def unavailable(self, impl: str, cfg: SweepConfig) -> str | None:
        """Why ``impl`` cannot run with ``cfg`` (e.g. Triton on a CPU), or None if it can."""
        return None


_SUITES: dict[str, type[Suite]] = {}


def register_suite(cls: type[Suite]) -> type[Suite]:
    """Class decorator: make ``cls`` runnable as ``--suite cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty `name`")
    old = _SUITES.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"suite name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}")
    _SUITES[cls.name] = cls
    return cls


def unregister_suite(name: str) -> None:
    """Remove a suite (tests register throw-away suites)."""
    _SUITES.pop(name, None)


def _discover() -> None:
    import suites

    suites.discover_suites()


def suite_names() -> list[str]:
    """Names of every registered suite (after importing every module in ``suites/``)."""
    _discover()
    return sorted(_SUITES)


def get_suite(name: str) -> Suite:
    """An instance of the suite ``name``; ValueError naming the valid ones."""
    _discover()
    try:
        return _SUITES[name]()
    except KeyError:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(sorted(_SUITES)) or '(none)'}") from None


# --------------------------------------------------------------------------- the sweep


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors (``torch.OutOfMemoryError`` or its message)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
    )


def _error_text(exc: BaseException, limit: int = 2000) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    text = f"{type(exc).__name__}: {exc}".strip()
    return (text[:limit] + ("..." if len(text) > limit else "")) + where


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _size_key(point_params: dict) -> tuple:
    return tuple(sorted((k, rec.canonical_json(v)) for k, v in point_params.items() if k != "n_atoms"))


@dataclass
class SweepResult:
    """What :func:`run_suite` did: the records of every point of the sweep (stored ones
    included, the latest per point), how many were measured now, and where they are."""

    suite: str
    path: Path
    records: list[dict]
    measured: int
    resumed: int

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)


def run_suite(
    suite: Suite | str,
    cfg: SweepConfig,
    *,
    env: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run every point of ``suite`` under ``cfg``; append a record per point measured.

    With ``cfg.resume`` the points already stored with a final status are not measured
    again. Without it, an existing results file is moved aside (``<suite>.jsonl.<time>.old``)
    so that the run starts clean.
    """
    if isinstance(suite, str):
        suite = get_suite(suite)
    say = log or (lambda msg: print(msg, file=sys.stderr))
    store = rec.ResultsStore(cfg.results_path(suite.name))
    env = env if env is not None else environment(cfg.device)

    if store.path.exists() and not cfg.resume:
        aside = store.path.with_name(f"{store.path.name}.{time.strftime('%Y%m%dT%H%M%S')}.old")
        store.path.rename(aside)
        say(f"{suite.name}: previous results moved to {aside} (use --resume to continue them)")
    stored = rec.latest_by_point(store.load()) if cfg.resume else []
    stored_by_id = {r["point_id"]: r for r in stored}
    done = {pid for pid, r in stored_by_id.items() if r["status"] in rec.FINAL_STATUSES}

    points = [p for p in suite.points(cfg) if cfg.wants(p.impl)
              and (cfg.point_ids is None or rec.point_id(suite.name, p.impl, p.params) in cfg.point_ids)]
    reasons: dict[str, str | None] = {}
    broken: dict[str, str] = {}  # impl -> why its availability check itself failed
    for impl in dict.fromkeys(p.impl for p in points):
        try:
            reasons[impl] = suite.unavailable(impl, cfg)
        except Exception as exc:  # noqa: BLE001 -- recorded as an error for its points
            broken[impl] = f"availability check failed: {_error_text(exc)}"
            say(f"{suite.name}: {impl}: {broken[impl]}")
            continue
        if reasons[impl]:
            say(f"{suite.name}: skipping {impl}: {reasons[impl]}")

    # OOM walls: (impl, params without n_atoms) -> the smallest n_atoms that ran out of memory.
    walls: dict[tuple, float] = {}

    def note_wall(record: dict):
        if record["status"] == "oom" and "n_atoms" in record["params"]:
            key = (record["impl"], _size_key(record["params"]))
            walls[key] = min(walls.get(key, math.inf), record["params"]["n_atoms"])

    for r in stored:
        note_wall(r)

    results: list[dict] = []
    measured = resumed = 0
    bar = _progress(points, len(points), suite.name, cfg.progress)
    iterator = bar if bar is not None else points
    for point in iterator:
        pid = rec.point_id(suite.name, point.impl, point.params)
        if bar is not None:
            bar.set_postfix_str(point.label()[:80], refresh=True)
        if pid in done:
            results.append(stored_by_id[pid])
            resumed += 1
            continue
        if point.impl in broken:
            record = rec.make_record(suite.name, point.impl, point.params, status="error", error=broken[point.impl],
                                     env=env)
        else:
            record = _run_point(suite, point, cfg, env, reasons.get(point.impl), walls)
        store.append(record)
        note_wall(record)
        results.append(record)
        measured += 1
        if record["status"] in ("error", "oom"):
            msg = f"{suite.name}: {point.label()}: {record['status']}: {record['error']}"
            (bar.write(msg, file=sys.stderr) if bar is not None else say(msg))
            held = (record.get("metrics") or {}).get("held_after_failure_bytes", 0)
            if held > HELD_LIMIT_BYTES:
                if bar is not None:
                    bar.close()
                raise DeviceMemoryLost(f"{suite.name}: {point.label()}", held)
    if bar is not None:
        bar.close()
    if resumed:
        say(f"{suite.name}: {resumed} point(s) already stored, not measured again (--resume)")
    return SweepResult(suite=suite.name, path=store.path, records=results, measured=measured, resumed=resumed)



def _run_point(suite: Suite, point: Point, cfg: SweepConfig, env: dict, unavailable: str | None, walls) -> dict:
    def record(status, metrics=None, error=None):
        return rec.make_record(suite.name, point.impl, point.params, status=status, metrics=metrics, error=error, env=env)

    if unavailable:
        return record("skipped", error=unavailable)
    if "n_atoms" in point.params:
        wall = walls.get((point.impl, _size_key(point.params)))
        if wall is not None and point.params["n_atoms"] >= wall:
            return record("skipped", error=f"not run: n_atoms={wall:g} of the same configuration ran out of memory")

    _seed_everything(cfg.seed)
    status, metrics, error = "ok", None, None
    allocated_before = _allocated(cfg.device)
    try:
        metrics = suite.measure(point, cfg)
        if not isinstance(metrics, dict):
            raise TypeError(f"{type(suite).__name__}.measure returned {type(metrics).__name__}, not a metrics dict")
    except SkipPoint as exc:
        status, error = "skipped", str(exc)
    except Exception as exc:  # noqa: BLE001 -- every failure of a point is data
        status = "oom" if is_oom(exc) else "error"
        error = _error_text(exc)
        metrics = None
        _clear_frames(exc)
        del exc
    if status != "ok":
        free_memory(cfg.device)
        held = _allocated(cfg.device) - allocated_before
        if held > HELD_NOTE_BYTES:
            error += _held_note(cfg.device, held)
            metrics = {"held_after_failure_bytes": held}
    return record(status, metrics=metrics, error=error)


def _clear_frames(exc: BaseException) -> None:
    """Drop the locals of every finished frame in ``exc``'s tracebacks (its context and
    cause included), so the tensors of the failed call are freed even if something else keeps
    the exception object. (Memory that PyTorch's C++ autograd engine keeps after an OOM in a
    CUDA backward is out of reach: :class:`DeviceMemoryLost`.)"""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


#: A failed point that leaves more than this allocated gets a note naming what holds it.
HELD_NOTE_BYTES = 256 * 2**20
#: ... and more than this ends the process's sweep (:class:`DeviceMemoryLost`): the points
#: after it would run with that much less memory and fail or measure wrongly.
HELD_LIMIT_BYTES = 2 * 2**30


class DeviceMemoryLost(RuntimeError):
    """A failed point left GPU memory allocated that this process cannot get back.

    Seen after an out-of-memory error inside a CUDA backward: PyTorch's autograd engine keeps
    the failed graph (pytorch/pytorch#82218; 63 GiB after E2Former-V2's energy + forces at
    N = 65,536 on an H100). The point's record is stored; ``run_bench.py`` restarts itself
    with ``--resume`` so the remaining points run in a fresh process.
    """

    def __init__(self, label: str, held: int):
        super().__init__(f"{label} left {held / 2**30:.1f} GiB of GPU memory allocated after failing; the points "
                         f"after it need a fresh process (rerun with --resume)")
        self.held = held


def _allocated(device) -> int:
    """CUDA bytes allocated on ``device`` (0 elsewhere)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return 0
    return torch.cuda.memory_allocated(device)


def _held_note(device, held: int) -> str:
    """The error-text note for a failed point that left ``held`` bytes allocated."""
    seen, lines = held_tensors(device) if torch.device(device).type == "cuda" else (0, [])
    return (f" [{held / 2**30:.2f} GiB stayed allocated after this failure ({seen / 2**30:.2f} GiB in tensors "
            f"gc sees): {'; '.join(lines)}]")


# --------------------------------------------------------------------------- summary


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def summary_table(records: Iterable[dict], *, max_error: int = 60) -> str:
    """A plain-text table of records: impl, params, status, latency, memory, error."""
    rows = [("suite", "impl", "params", "status", "latency_ms", "peak", "saved", "note")]
    for r in records:
        m = r.get("metrics") or {}
        lat = m.get("latency_ms")
        params = " ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items())
        note = (r.get("error") or "")[:max_error]
        rows.append((
            r["suite"], r["impl"], params, r["status"],
            "-" if lat is None else f"{lat:.3f}",
            _fmt_bytes(m.get("peak_bytes")), _fmt_bytes(m.get("saved_bytes")), note,
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_suites(names: Iterable[str], cfg: SweepConfig) -> list[SweepResult]:
    """Run several suites with one environment record; print the summary table."""
    env = environment(cfg.device)
    results = [run_suite(get_suite(n), cfg, env=env) for n in names]
    all_records = [r for res in results for r in res.records]
    if all_records:
        print(summary_table(all_records))
    return results

