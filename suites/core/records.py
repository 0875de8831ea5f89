"""The results store: one JSON object per measured point, appended to a JSON-lines file.

Schema (version 1; every key is documented in README "Results schema")::

    {"schema": 1, "suite": str, "impl": str, "point_id": str,
     "status": "ok" | "oom" | "error" | "skipped", "error": str | null,
     "params": {...}, "metrics": {...}, "env": {...}, "timestamp": ISO-8601 UTC}

Durability: :func:`append_record` writes a whole record (and its newline) with one
``os.write`` on an ``O_APPEND`` descriptor, then ``fsync``: a crash can at worst leave a
truncated *last* line, never damage an earlier record. :func:`load_records` reports such
a line (a :class:`CorruptRecordWarning` and a note on stderr) and skips it; the next
append starts on a fresh line.

Resuming: a point whose latest record has a final status (:data:`FINAL_STATUSES`: ok,
oom, skipped) is not measured again; ``error`` points are retried.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error", "skipped")
FINAL_STATUSES = frozenset({"ok", "oom", "skipped"})
RECORD_KEYS = ("schema", "suite", "impl", "point_id", "status", "error", "params", "metrics", "env", "timestamp")

# The metric keys suites share (README "Results schema" documents each; a suite may add more).
METRICS = {
    "latency_ms": "median wall time of one call, ms",
    "latency_iqr_ms": "interquartile range of the samples, ms",
    "repeats": "number of timed samples",
    "samples_ms": "every timed sample, ms",
    "flops_core": "analytic useful FLOPs of the attention core (or the measured kernel)",
    "flops_total": "analytic useful FLOPs of the whole measured call",
    "tflops_core": "flops_core / latency, TFLOP/s",
    "tflops_total": "flops_total / latency, TFLOP/s",
    "gbps": "analytic bytes moved / latency, GB/s",
    "roof_fraction": "tflops_core (else tflops_total) / the card's dense peak for the dtype",
    "bandwidth_fraction": "gbps / the card's HBM bandwidth",
    "peak_bytes": "CUDA peak bytes allocated above the inputs during the call (null on CPU)",
    "saved_bytes": "bytes autograd saves for backward during the forward, deduplicated by storage",
    "bytes_per_atom": "peak_bytes / n_atoms (saved_bytes / n_atoms where no peak is measurable)",
    "memory_source": "'cuda_peak' or 'saved': which figure bytes_per_atom divides",
    "saved_bytes_per_atom": "saved_bytes / n_atoms",
    "rss_delta_bytes": "CPU only: sampled growth of the process RSS during the call",
    "flops_counted": "FlopCounterMode count of the call (matmul-like ops only; cross-check)",
    "config": "the Triton autotune config the measured callable chose, if it exposes one",
}


class CorruptRecordWarning(UserWarning):
    """A results line that is not a complete JSON record (skipped on load)."""


def canonical_json(value: Any) -> str:
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def point_id(suite: str, impl: str, params: dict) -> str:
    """Stable id of a sweep point: a hash of suite, impl and params (key order ignored)."""
    digest = hashlib.sha256(canonical_json({"suite": suite, "impl": impl, "params": params}).encode())
    return digest.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """Plain-JSON form: numpy/torch scalars to numbers, non-finite floats to null, tuples to lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return _jsonable(value.item())  # numpy / torch scalars
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return str(value)  # torch.dtype, torch.device, triton Config, ...


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def make_record(
    suite: str,
    impl: str,
    params: dict,
    *,
    status: str,
    metrics: dict | None = None,
    error: str | None = None,
    env: dict | None = None,
) -> dict:
    """A schema-1 record (``point_id`` and ``timestamp`` filled in)."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; valid: {', '.join(STATUSES)}")
    return {
        "schema": SCHEMA_VERSION,
        "suite": suite,
        "impl": impl,
        "point_id": point_id(suite, impl, params),
        "status": status,
        "error": error,
        "params": _jsonable(dict(params)),
        "metrics": _jsonable(dict(metrics or {})),
        "env": _jsonable(dict(env or {})),
        "timestamp": utc_now(),
    }


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one line: one write, flush and fsync (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_jsonable(record), separators=(",", ":"), allow_nan=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            # A previous crash may have left a truncated line without its newline: start
            # a fresh line so that the new record is not glued onto the broken one.
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = "\n" + line
        data = line.encode()
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def _report_corrupt(message: str) -> None:
    warnings.warn(message, CorruptRecordWarning, stacklevel=3)
    print(f"warning: {message}", file=sys.stderr)


def load_records(path: str | os.PathLike) -> list[dict]:
    """Records of one JSON-lines file (missing file: empty list), or of every ``*.jsonl``
    below a directory (see :func:`load_all`).

    A line that is not a complete JSON object with the record keys is reported
    (:class:`CorruptRecordWarning` and stderr, with the line number) and skipped.
    """
    path = Path(path)
    if path.is_dir():
        return load_all([path])
    if not path.exists():
        return []
    return _load_file(path)


def _load_file(path: Path) -> list[dict]:
    records = []
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    for lineno, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            last = all(not r.strip() for r in raw_lines[lineno:])
            what = "truncated last line" if last else "corrupt line"
            _report_corrupt(f"{path}:{lineno}: {what} skipped ({exc.__class__.__name__}: {exc})")
            continue
        missing = [k for k in ("suite", "impl", "point_id", "status") if not isinstance(record, dict) or k not in record]
        if missing:
            _report_corrupt(f"{path}:{lineno}: record without {', '.join(missing)} skipped")
            continue
        records.append(record)
    return records


def results_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (every ``*.jsonl`` below them, sorted) to result files."""
    files = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(p.rglob("*.jsonl")))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no results file or directory at {p}")
    return files


def load_all(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Records of every results file under ``paths`` (files or directories)."""
    records = []
    for f in results_files(paths):
        records.extend(_load_file(f))
    return records


def latest_by_point(records: Iterable[dict]) -> list[dict]:
    """The last record of each point_id, in first-seen order (a retried point keeps its latest)."""
    latest: dict[str, dict] = {}
    order: dict[str, int] = {}
    for i, r in enumerate(records):
        order.setdefault(r["point_id"], i)
        latest[r["point_id"]] = r
    return sorted(latest.values(), key=lambda r: order[r["point_id"]])


def done_point_ids(records: Iterable[dict]) -> set[str]:
    """point_ids whose latest record has a final status (what ``--resume`` skips)."""
    return {r["point_id"] for r in latest_by_point(list(records)) if r.get("status") in FINAL_STATUSES}


def to_dataframe(records: Iterable[dict]):
    """A pandas DataFrame, one row per record: top-level keys plus ``params.*``,
    ``metrics.*`` and ``env.*`` columns (``samples_ms`` kept as a list)."""
    import pandas as pd

    rows = []
    for r in records:
        row = {k: r.get(k) for k in ("suite", "impl", "point_id", "status", "error", "timestamp")}
        for section in ("params", "metrics", "env"):
            for k, v in (r.get(section) or {}).items():
                row[f"{section}.{k}"] = v
        rows.append(row)
    return pd.DataFrame(rows)


def export_csv(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write :func:`to_dataframe` as CSV (list values JSON-encoded) and return the path."""
    df = to_dataframe(records)
    for col in df.columns:
        if df[col].map(lambda v: isinstance(v, (list, dict))).any():
            df[col] = df[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


class ResultsStore:
    """One results file: append records, load them, know which points are done."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        append_record(self.path, record)

    def load(self) -> list[dict]:
        return load_records(self.path)

    def done_ids(self) -> set[str]:
        return done_point_ids(self.load())

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"
