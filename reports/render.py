"""Figures from stored results records (never measuring).

Every figure function takes the records of one device as a flat :class:`pandas.DataFrame`
(see :func:`records_frame`) and returns a :class:`Drawn` (figure + the table behind it) or
``None`` when the records hold nothing for it. :func:`render_figures` draws them all,
per device, and writes PNG (for the README/HTML) plus PDF and SVG (for papers).

Conventions: log-log axes for quantities vs N; a point that ran out of memory is drawn as
a cross (``reports.style.OOM_MARKER``, artist gid ``"oom"``) at the top of its panel, at
the N where it failed; every implementation keeps its colour and marker in every figure.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from reports import style  # noqa: E402

FORMATS = ("png", "pdf", "svg")
FINAL = ("ok", "oom", "error", "skipped")
# Parameters that never split a series (they are the x axis, a panel, or bookkeeping).
_NOT_SERIES = {"params.n_atoms", "params.mode", "params.seed", "params.repeats", "params.warmup", "params.lmax"}


# --------------------------------------------------------------------------- records -> frame


def device_label(env: dict | None) -> str:
    """The card a record was measured on ('NVIDIA H100 80GB HBM3'), or 'CPU (<model>)'."""
    env = env or {}
    gpu = env.get("gpu_name")
    if gpu:
        return str(gpu)
    cpu = env.get("cpu") or env.get("cpu_model") or ""
    return f"CPU ({cpu})" if cpu else "CPU"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def records_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Flatten records (``suites.core.records.to_dataframe``) and add ``device``.

    Columns: ``suite, impl, status, error, point_id, timestamp, device`` plus ``params.*``,
    ``metrics.*`` and ``env.*``. A point stored more than once on one device (a resumed or
    repeated run) keeps its latest record; the same point on two cards keeps both.
    """
    from suites.core.records import to_dataframe

    records = list(records)
    df = to_dataframe(records)
    if df.empty:
        return df
    df["device"] = [device_label(r.get("env")) for r in records]
    df = df.sort_values("timestamp", kind="stable", na_position="first")
    key = df["point_id"].fillna("").astype(str) + "|" + df["device"]
    return df[~key.duplicated(keep="last")].reset_index(drop=True)


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)


# --------------------------------------------------------------------------- drawing helpers


@dataclass
class Drawn:
    """One figure and the table it was drawn from."""

    name: str
    title: str
    suite: str
    fig: plt.Figure
    table: pd.DataFrame
    caption: str = ""
    files: dict = field(default_factory=dict)


def _series_columns(df: pd.DataFrame, extra_exclude: Iterable[str] = ()) -> list[str]:
    """``params.*`` columns that vary inside ``df`` (each value gets its own line)."""
    skip = _NOT_SERIES | set(extra_exclude)
    cols = []
    for c in df.columns:
        if c.startswith("params.") and c not in skip and df[c].astype(str).nunique(dropna=False) > 1:
            cols.append(c)
    return cols


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _label(impl: str, key: dict) -> str:
    # a column with a missing value reads as floats in pandas: 58, not 58.0
    key = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in key.items()}
    extra = ", ".join(str(_SHORT.get(str(v), v)) if k in ("params.dtype", "params.mode") else f"{k.split('.', 1)[1]}={v}"
                      for k, v in key.items())
    return f"{impl} ({extra})" if extra else impl


def _plot_series(ax, df: pd.DataFrame, x: str, y: str, *, linestyle_by: str | None = None,
                 exclude: Iterable[str] = ()) -> list[dict]:
    """Draw one line per implementation (and per varying parameter); OOM as crosses.

    Returns the OOM points drawn (for the caller's bookkeeping); crosses are placed after
    the y-range is known, at the top of the panel.
    """
    df = df[df["status"].isin(("ok", "oom"))]
    series_cols = [c for c in _series_columns(df, exclude) if c != linestyle_by]
    ooms = []
    groups = df.groupby(["impl", *series_cols, *([linestyle_by] if linestyle_by else [])], dropna=False, sort=True)
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        impl = key[0]
        named = dict(zip(series_cols, key[1:1 + len(series_cols)]))
        st = style.impl_style(impl)
        kw = st.line_kwargs()
        if linestyle_by:
            lsv = key[-1]
            kw["linestyle"] = (style.DTYPE_LINESTYLES if "dtype" in linestyle_by else style.MODE_LINESTYLES).get(str(lsv), "-")
            named[linestyle_by] = lsv
        ok = g[(g["status"] == "ok") & g[y].notna()].sort_values(x) if y in g else g.iloc[0:0]
        if len(ok):
            ax.plot(ok[x].astype(float), ok[y].astype(float), label=_label(impl, named), **kw)
        for _, row in g[g["status"] == "oom"].iterrows():
            ooms.append({"x": float(row[x]), "colour": st.colour, "impl": impl})
    return ooms


def _draw_ooms(ax, ooms: list[dict], logy: bool = True) -> None:
    """Crosses at the top of the panel for the points that ran out of memory."""
    if not ooms:
        return
    lo, hi = ax.get_ylim()
    if not ax.has_data() or not np.isfinite(hi) or (logy and hi <= 0):
        lo, hi = 1.0, 10.0
        ax.set_ylim(lo, hi)
    y = hi * 1.6 if logy else hi + 0.08 * (hi - lo)
    for o in ooms:
        ax.plot([o["x"]], [y], linestyle="none", marker=style.OOM_MARKER, color=o["colour"],
                markersize=plt.rcParams["lines.markersize"] * 1.6,
                markeredgewidth=plt.rcParams["lines.linewidth"] * 1.4, gid=style.OOM_GID, label="_oom")
    ax.set_ylim(lo, y * 1.8 if logy else y + 0.08 * (hi - lo))


def _row_legend(axes_row, has_oom: bool, paper: bool = False, first_row: bool = True) -> None:
    """One legend for a row of panels, outside on the right of the last one; in the paper
    style (single column) one legend for the figure, below it, from the first row."""
    if paper and not first_row:
        return
    handles, labels = [], []
    for ax in axes_row:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    if has_oom:
        handles.append(Line2D([], [], linestyle="none", marker=style.OOM_MARKER, color="0.3",
                              markeredgewidth=2, markersize=7))
        labels.append("out of memory")
    if not handles:
        return
    if paper:
        fig = axes_row[0].figure
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2)
    else:
        axes_row[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _log_axes(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    xs = sorted({float(x) for ln in ax.get_lines() for x in np.atleast_1d(ln.get_xdata()) if float(x) > 0})
    if xs and xs[-1] / xs[0] < 300 and len(xs) <= 8:
        # Under ~2 decades the log locator labels one tick or none: label the measured N.
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(xs))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        if len(xs) > 3:  # neighbouring labels such as 65,536 and 262,144 would run together
            ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _table(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    present = [c for c in cols if c in df.columns]
    sort = [c for c in ("impl", "params.mode", "params.dtype", "params.lmax", "params.n_atoms") if c in present]
    out = df[present].sort_values(sort, kind="stable") if sort else df[present]
    return out.rename(columns=lambda c: c.split(".", 1)[-1]).reset_index(drop=True)


def _modes(df: pd.DataFrame) -> list[str]:
    order = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}
    return sorted(_col(df, "params.mode").dropna().astype(str).unique(), key=lambda m: order.get(m, 9))


# --------------------------------------------------------------------------- slopes


def loglog_slope(n: Iterable[float], y: Iterable[float]) -> tuple[float, float]:
    """Least-squares slope of log y vs log n over the upper half of the N range (where the
    per-atom term dominates fixed overheads), and y/n at the largest n.

    Returns ``(slope, y_per_n_at_max)``; slope is nan with fewer than two points.
    """
    pts = sorted((float(a), float(b)) for a, b in zip(n, y) if a and b and a > 0 and b > 0)
    if not pts:
        return math.nan, math.nan
    per = pts[-1][1] / pts[-1][0]
    if len(pts) < 2:
        return math.nan, per
    fit = pts[len(pts) // 2 - 1:] if len(pts) >= 4 else pts
    lx, ly = np.log([p[0] for p in fit]), np.log([p[1] for p in fit])
    return float(np.polyfit(lx, ly, 1)[0]), per


def memory_slopes(df: pd.DataFrame) -> pd.DataFrame:
    """Per implementation and mode: fitted log-log slope and bytes/atom of peak and saved bytes."""
    d = df[df["suite"] == "memory-scaling"]
    rows = []
    if d.empty:
        return pd.DataFrame(rows)
    for (impl, mode), g in d.groupby(["impl", "params.mode"], dropna=False):
        ok = g[g["status"] == "ok"]
        row = {"impl": impl, "mode": mode, "points": len(ok), "oom_at_n": _min_or_none(g[g["status"] == "oom"]["params.n_atoms"])}
        for metric in ("peak_bytes", "saved_bytes"):
            col = f"metrics.{metric}"
            if col in ok and ok[col].notna().any():
                slope, per = loglog_slope(ok["params.n_atoms"], ok[col])
                row[f"{metric}_slope"] = round(slope, 3) if np.isfinite(slope) else None
                row[f"{metric}_per_atom"] = round(per, 1) if np.isfinite(per) else None
        rows.append(row)
    return pd.DataFrame(rows)


def _min_or_none(s: pd.Series):
    s = s.dropna()
    return int(s.min()) if len(s) else None


# --------------------------------------------------------------------------- figures


def fig_latency(df: pd.DataFrame, paper: bool) -> Drawn | None:
    """Figure-1 style: whole-model latency vs N, one panel per mode, OOM as crosses."""
    d = df[df["suite"] == "latency"]
    if d.empty or "params.n_atoms" not in d:
        return None
    modes = _modes(d) or ["fwd"]
    fig, axes = plt.subplots(1, len(modes), figsize=style.panel_size(len(modes), paper=paper), squeeze=False)
    any_oom = False
    for ax, mode in zip(axes[0], modes):
        sub = d[_col(d, "params.mode") == mode]
        ooms = _plot_series(ax, sub, "params.n_atoms", "metrics.latency_ms")
        _log_axes(ax, "atoms N", "latency (ms)")
        _draw_ooms(ax, ooms)
        any_oom |= bool(ooms)
        ax.set_title({"fwd": "energy + forces (inference)", "fwd+bwd": "energy + forces, + backward (training)"}.get(mode, mode))
    _row_legend(axes[0], any_oom, paper)
    fig.tight_layout()
    cols = ["impl", "params.mode", "params.n_atoms", "params.lmax", "params.dtype", "status", "metrics.latency_ms",
            "metrics.latency_iqr_ms", "metrics.atoms_per_s", "metrics.ns_per_day", "error"]
    return Drawn("latency_vs_n", "Latency vs N (energy + forces)", "latency", fig, _table(d, cols),
                 "Median latency over repeats; crosses: out of memory at that N.")


def fig_memory(df: pd.DataFrame, paper: bool) -> Drawn | None:
    """Peak activation bytes and bytes saved for backward vs N, with fitted slopes."""
    d = df[df["suite"] == "memory-scaling"]
    if d.empty:
        return None
    modes = _modes(d) or ["fwd"]
    has = lambda m: m in d and d[m].notna().any()  # noqa: E731
    # No allocator peak on the CPU (the RSS growth there is allocator noise: table only).
    metrics = [m for m in ("metrics.peak_bytes", "metrics.saved_bytes") if has(m)] or ["metrics.peak_bytes"]
    slopes = memory_slopes(d)
    fig, axes = plt.subplots(len(metrics), len(modes), figsize=style.panel_size(len(modes), len(metrics), paper), squeeze=False)
    names = {"metrics.peak_bytes": "peak activation memory above inputs (MiB)",
             "metrics.saved_bytes": "bytes saved for backward (MiB)"}
    for r, metric in enumerate(metrics):
        any_oom = False
        key = metric.split(".", 1)[1] + "_slope"
        for c, mode in enumerate(modes):
            ax = axes[r][c]
            sub = d[_col(d, "params.mode") == mode].copy()
            if metric in sub:
                sub[metric] = sub[metric].astype(float) / 2**20
            ooms = _plot_series(ax, sub, "params.n_atoms", metric)
            # Fitted slopes of every mode into the legend label, so one legend serves the row.
            for line in ax.get_lines():
                impl = line.get_label()
                fits = slopes[slopes["impl"] == impl] if len(slopes) and key in slopes else slopes.iloc[0:0]
                parts = [f"{m} {v:.2f}" for m, v in zip(fits["mode"], fits[key]) if v is not None and np.isfinite(v)] if len(fits) else []
                if parts:
                    line.set_label(f"{impl}  (slope {', '.join(parts)})")
            _log_axes(ax, "atoms N", names[metric])
            _draw_ooms(ax, ooms)
            any_oom |= bool(ooms)
            ax.set_title(f"{mode}")
        _row_legend(axes[r], any_oom, paper, r == 0)
    fig.tight_layout()
    cols = ["impl", "params.mode", "params.n_atoms", "status", "metrics.peak_bytes", "metrics.saved_bytes",
            "metrics.bytes_per_atom", "metrics.rss_delta_bytes", "error"]
    table = _table(d, cols)
    return Drawn("memory_vs_n", "Activation memory vs N", "memory-scaling", fig, table,
                 ("" if "metrics.peak_bytes" in metrics else
                  "No allocator peak on this device (CPU): bytes saved for backward only; RSS growth in the table. ")
                 + "Slopes: least-squares fit of log bytes vs log N over the upper half of the N range "
                 "(1 = linear). Fitted slopes and bytes/atom at the largest N: see the slopes table.")


def fig_tflops(df: pd.DataFrame, paper: bool) -> Drawn | None:
    """Attention core: core TFLOPS and fraction of the card's roof vs N, per backend and dtype."""
    d = df[df["suite"] == "kernel-tflops"]
    if d.empty:
        return None
    modes = _modes(d) or ["fwd"]
    # The roof row only where the card has a roof (none on a CPU or an unknown GPU).
    any_roof = "metrics.roof_fraction" in d and d["metrics.roof_fraction"].notna().any()
    rows = 2 if any_roof else 1
    fig, axes = plt.subplots(rows, len(modes), figsize=style.panel_size(len(modes), rows, paper), squeeze=False)
    any_oom = False
    for c, mode in enumerate(modes):
        sub = d[_col(d, "params.mode") == mode].copy()
        ax = axes[0][c]
        ooms = _plot_series(ax, sub, "params.n_atoms", "metrics.tflops_core", linestyle_by="params.dtype")
        _log_axes(ax, "atoms N", "core TFLOPS (TFLOP/s)")
        _draw_ooms(ax, ooms)
        any_oom |= bool(ooms)
        ax.set_title(f"attention core, {mode}")
        if not any_roof:
            continue
        ax = axes[1][c]
        if "metrics.roof_fraction" in sub:
            sub["metrics.roof_percent"] = sub["metrics.roof_fraction"].astype(float) * 100.0
        ooms = _plot_series(ax, sub, "params.n_atoms", "metrics.roof_percent", linestyle_by="params.dtype")
        _log_axes(ax, "atoms N", "fraction of roof (%)")
        _draw_ooms(ax, ooms)
    _row_legend(axes[0], any_oom, paper)
    fig.tight_layout()
    cols = ["impl", "params.mode", "params.dtype", "params.n_atoms", "status", "metrics.latency_ms", "metrics.tflops_core",
            "metrics.tflops_total", "metrics.gbps", "metrics.roof_fraction", "metrics.roofline_fraction", "metrics.roof_bound",
            "metrics.roof_dtype", "metrics.sdpa_backend", "metrics.config", "error"]
    return Drawn("kernel_tflops", "Attention-core throughput", "kernel-tflops", fig, _table(d, cols),
                 "Core TFLOPS = the issue-4 core count / latency. Fraction of roof = core TFLOPS / the card's dense "
                 "peak for the dtype (roofline_fraction and roof_bound in the table: total FLOPs against "
                 "min(peak, intensity x HBM bandwidth)). Line style = dtype (solid fp32, dashed bf16, dotted fp16)."
                 + ("" if any_roof else " No roof for this device: the roof row is left out."))


def fig_lmax(df: pd.DataFrame, paper: bool) -> Drawn | None:
    """Latency, FLOPs and peak memory vs L_max at fixed N, per model."""
    d = df[df["suite"] == "lmax-sweep"]
    if d.empty or "params.lmax" not in d:
        return None
    has = lambda m: m in d and d[m].notna().any()  # noqa: E731
    memory = ("metrics.peak_bytes", "peak memory above inputs (MiB)") if has("metrics.peak_bytes") else \
        ("metrics.saved_bytes", "bytes saved for backward (MiB)")
    panels = [(m, lab) for m, lab in (("metrics.latency_ms", "latency (ms)"),
                                       ("metrics.flops_total", "FLOPs of one energy forward (analytic)"), memory) if has(m)]
    if not panels:
        panels = [("metrics.latency_ms", "latency (ms)")]
    fig, axes = plt.subplots(1, len(panels), figsize=style.panel_size(len(panels), paper=paper), squeeze=False)
    any_oom = False
    for ax, (metric, label) in zip(axes[0], panels):
        sub = d.copy()
        if metric in ("metrics.peak_bytes", "metrics.saved_bytes") and metric in sub:
            sub[metric] = sub[metric].astype(float) / 2**20
        ooms = _plot_series(ax, sub, "params.lmax", metric, linestyle_by="params.mode",
                            exclude=("params.n_atoms",))
        ax.set_yscale("log")
        ax.set_xlabel(r"$L_{max}$")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        _draw_ooms(ax, ooms)
        any_oom |= bool(ooms)
    _row_legend(axes[0], any_oom, paper)
    n = sorted(_col(d, "params.n_atoms").dropna().unique())
    fig.suptitle(f"L_max sweep at N = {', '.join(str(int(x)) for x in n)}")
    fig.tight_layout()
    cols = ["impl", "params.mode", "params.lmax", "params.n_atoms", "status", "metrics.latency_ms", "metrics.flops_total",
            "metrics.peak_bytes", "metrics.saved_bytes", "error"]
    return Drawn("lmax_sweep", "L_max sweep", "lmax-sweep", fig, _table(d, cols),
                 "Line style = mode (solid fwd, dashed fwd+bwd); crosses: out of memory.")


#: The accuracy suite's error metrics, as drawn.
ACCURACY_PANELS = (("metrics.energy_mae_mev_per_atom", "energy MAE (meV/atom)"),
                   ("metrics.force_mae_mev_per_A", "force MAE (meV/Å)"))


def fig_accuracy(df: pd.DataFrame, paper: bool) -> Drawn | None:
    """Energy and force errors per model (bars, log scale); the table holds every record's metrics."""
    d = df[(df["suite"] == "accuracy") & (df["status"] == "ok")]
    if d.empty:
        return None
    # steps asked (params) and steps done (metrics; fewer when the time budget stopped training)
    d = d.rename(columns={"params.steps": "params.steps_asked", "metrics.steps": "metrics.steps_done"})
    metric_cols = [c for c in d.columns if c.startswith("metrics.") and d[c].notna().any()
                   and (pd.api.types.is_numeric_dtype(d[c]) or c == "metrics.time_budget_reached")
                   and not c.endswith(("_ms", "repeats"))]
    param_cols = [c for c in _series_columns(d) if c != "params.dtype"] + (["params.dataset"] if "params.dataset" in d else [])
    # bar labels: the model, and what else tells two of its records apart (not the steps asked)
    series = [c for c in _series_columns(d, ("params.steps_asked", "params.mode")) if c != "params.dtype"]
    table = _table(d, ["impl", *dict.fromkeys(param_cols), *metric_cols])
    panels = [(m, label) for m, label in ACCURACY_PANELS if m in d and d[m].notna().any()]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=style.panel_size(len(panels), paper=paper), squeeze=False)
    stopped = d["metrics.time_budget_reached"].fillna(False).astype(bool) if "metrics.time_budget_reached" in d \
        else pd.Series(False, index=d.index)
    for ax, (metric, label) in zip(axes[0], panels):
        sub = d[d[metric].notna()]
        repeated = sub["impl"].duplicated(keep=False)
        labels = [_label(row["impl"], {c: row[c] for c in series}) if repeated[i] else row["impl"]
                  for i, row in sub.iterrows()]
        bars = ax.bar(range(len(sub)), sub[metric].astype(float),
                      color=[style.impl_style(impl).colour for impl in sub["impl"]],
                      hatch=["//" if stopped[i] else "" for i in sub.index], edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, fmt="%.3g", fontsize=6 if paper else 8)
        ax.set_yscale("log")
        # bars start a decade below the smallest: close values look close, not 10x apart
        low, high = float(sub[metric].min()), float(sub[metric].max())
        ax.set_ylim(10 ** math.floor(math.log10(low)), high * 1.6)
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel(label)
        ax.set_xlabel("model")
        ax.set_xticks(range(len(sub)), labels, rotation=30, ha="right")
    data = sorted(str(x) for x in _col(d, "params.data").dropna().unique()) if "params.data" in d else []
    fig.suptitle("Test-set errors" + (f" ({', '.join(data)})" if data else ""))
    fig.tight_layout()
    return Drawn("accuracy", "Accuracy", "accuracy", fig, table,
                 "Mean absolute errors on the test split, log scale. Hatched: training stopped by its time "
                 "budget before the steps asked (steps done in the table).")


FIGURES: dict[str, Callable[[pd.DataFrame, bool], Drawn | None]] = {
    "latency_vs_n": fig_latency,
    "memory_vs_n": fig_memory,
    "kernel_tflops": fig_tflops,
    "lmax_sweep": fig_lmax,
    "accuracy": fig_accuracy,
}


def fig_gpu_compare(df: pd.DataFrame, paper: bool, *, allow_mismatch: bool = False) -> tuple[Drawn | None, str]:
    """Per-GPU bars: latency of each shared point on every card, relative to the first card.

    Returns ``(drawn or None, note)``; the note says why nothing was drawn (one card only,
    or software versions differ and ``allow_mismatch`` is off) or which versions differ.
    """
    from suites import gpu_compare

    result = gpu_compare.compare_frame(df, allow_mismatch=allow_mismatch)
    if result.table is None or result.table.empty:
        return None, result.note
    table = result.table
    headline = gpu_compare.headline_points(table)
    cards = result.cards
    fig, ax = plt.subplots(figsize=style.panel_size(2, 1.6 if not paper else 1.4, paper))
    labels = list(headline["point"])
    x = np.arange(len(labels))
    width = 0.8 / len(cards)
    greys = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00"]
    for i, card in enumerate(cards):
        ratio = headline[f"speedup[{card}]"].astype(float)
        ax.bar(x + (i - (len(cards) - 1) / 2) * width, ratio, width, label=card, color=greys[i % len(greys)])
    ax.axhline(1.0, color="0.3", linewidth=0.8)
    ax.set_xticks(x, labels, rotation=35, ha="right")
    ax.set_ylabel(f"speed relative to {cards[0]} (x)")
    ax.set_xlabel("point (suite: implementation, mode, largest N on every card)")
    ax.set_title("Per-GPU comparison (higher is faster)")
    ax.legend()
    fig.tight_layout()
    return Drawn("gpu_compare", "Per-GPU comparison", "gpu-compare", fig, table, result.note), result.note


# --------------------------------------------------------------------------- driver


def save(drawn: Drawn, out_dir: Path, formats: Iterable[str] = FORMATS) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for fmt in formats:
        path = out_dir / f"{drawn.name}.{fmt}"
        drawn.fig.savefig(path)
        files[fmt] = path
    drawn.files = files
    return files


def render_figures(df: pd.DataFrame, out_dir: str | Path, paper: bool = False, *, formats: Iterable[str] = FORMATS,
                   allow_mismatch: bool = False, close: bool = True) -> tuple[list[Drawn], list[str]]:
    """Draw and save every figure the records allow, per device; then the GPU comparison.

    Returns ``(figures, notes)``. With records of one device the files are
    ``<out_dir>/<figure>.<fmt>``; with several, ``<out_dir>/<device-slug>/<figure>.<fmt>``.
    """
    out_dir = Path(out_dir)
    drawn_all: list[Drawn] = []
    notes: list[str] = []
    if df.empty:
        return drawn_all, ["no records"]
    finals = df[df["status"].isin(FINAL)]
    devices = list(dict.fromkeys(finals["device"]))
    with style.figure_style(paper):
        for device in devices:
            ddf = finals[finals["device"] == device]
            sub_dir = out_dir if len(devices) == 1 else out_dir / slug(device)
            for name, fn in FIGURES.items():
                drawn = fn(ddf, paper)
                if drawn is None:
                    continue
                if len(devices) > 1:
                    drawn.title = f"{drawn.title} — {device}"
                save(drawn, sub_dir, formats)
                drawn.table.insert(0, "device", device)
                drawn_all.append(drawn)
                if close:
                    plt.close(drawn.fig)
        gpu_devices = [d for d in devices if not d.startswith("CPU")]
        if len(gpu_devices) > 1:
            drawn, note = fig_gpu_compare(finals, paper, allow_mismatch=allow_mismatch)
            notes.append(note)
            if drawn is not None:
                save(drawn, out_dir, formats)
                drawn_all.append(drawn)
                if close:
                    plt.close(drawn.fig)
    return drawn_all, notes
