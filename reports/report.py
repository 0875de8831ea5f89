"""Markdown and self-contained HTML reports from stored results (never measuring).

``render_cli(paths, out_dir, paper)`` (what ``python run_bench.py --report PATHS`` calls)
reads results files or folders of them, draws every figure the records allow
(``reports.render``), and writes into ``out_dir``::

    report.md            figures (PNG links), the table behind each, environments, commands
    report.html          the same page, one file: figures embedded as base64 PNG
    figures/<name>.{png,pdf,svg}
    tables/<name>.csv    the table behind each figure, plus memory slopes, environments,
                         status counts

:func:`update_readme` rewrites the section of README.md between
``<!-- figures:start -->`` and ``<!-- figures:end -->`` from the stored H100 results.

Also ``python -m reports.report PATHS --out DIR [--paper] [--allow-mismatch]`` and
``python -m reports.report --update-readme``.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import shlex
import sys
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from reports import render

README_START = "<!-- figures:start -->"
README_END = "<!-- figures:end -->"
ENV_KEYS = ("gpu_name", "gpu_count", "gpu_memory_total_bytes", "driver", "cuda", "torch", "triton", "e3nn",
            "fairchem", "python", "cpu", "hostname", "git_commit", "git_dirty", "sm_clock_mhz", "mem_clock_mhz",
            "power_limit_w")


# --------------------------------------------------------------------------- loading


def load(paths: Iterable[str | Path]) -> list[dict]:
    """Every record in ``paths`` (files, or folders searched for ``*.jsonl``); a truncated
    or corrupt line is reported and skipped (``suites.core.records``)."""
    from suites.core import records as store

    return store.load_all(paths)


# --------------------------------------------------------------------------- pieces


def _md_table(df: pd.DataFrame, max_rows: int = 400) -> str:
    if df is None or df.empty:
        return "_(no rows)_\n"
    d = df.head(max_rows).copy()
    for c in d.columns:
        if pd.api.types.is_float_dtype(d[c]):
            d[c] = d[c].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    d = d.fillna("").astype(str).map(lambda s: s.replace("|", "\\|").replace("\n", " ")[:160])
    lines = ["| " + " | ".join(map(str, d.columns)) + " |", "|" + "---|" * len(d.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in d.itertuples(index=False)]
    if len(df) > max_rows:
        lines.append(f"\n_{len(df) - max_rows} more rows in the CSV._")
    return "\n".join(lines) + "\n"


def environments(df: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct run environment (device, versions, commit) with the commands."""
    if df.empty:
        return pd.DataFrame()
    cols = [f"env.{k}" for k in ENV_KEYS if f"env.{k}" in df.columns]
    key_cols = ["device", *cols]
    rows = []
    for key, g in df.groupby(key_cols, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = {c.removeprefix("env."): v for c, v in zip(key_cols, key)}
        row["suites"] = ", ".join(sorted(g["suite"].dropna().unique()))
        row["records"] = len(g)
        row["first"] = g["timestamp"].min() if "timestamp" in g else None
        row["last"] = g["timestamp"].max() if "timestamp" in g else None
        if "env.command" in g:
            row["commands"] = " ;; ".join(str(c) for c in g["env.command"].dropna().unique())
        rows.append(row)
    return pd.DataFrame(rows)


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return pd.DataFrame()
    t = df.groupby(["device", "suite", "impl", "status"]).size().unstack("status", fill_value=0).reset_index()
    return t


def problems(df: pd.DataFrame) -> pd.DataFrame:
    """Points that did not give numbers (error, skipped, oom) with their reasons."""
    if df.empty:
        return pd.DataFrame()
    bad = df[df["status"] != "ok"]
    cols = ["device", "suite", "impl", "status"] + [c for c in bad.columns if c.startswith("params.")] + ["error"]
    cols = [c for c in dict.fromkeys(cols) if c in bad.columns and (c in ("device", "suite", "impl", "status", "error")
                                                                     or bad[c].notna().any())]
    return bad[cols].rename(columns=lambda c: c.removeprefix("params.")).reset_index(drop=True)


def suite_commands(df: pd.DataFrame, suite: str) -> list[str]:
    if "env.command" not in df.columns:
        return []
    return [str(c) for c in df.loc[df["suite"] == suite, "env.command"].dropna().unique()]


def regenerate_command(paths: Sequence[str | Path], out_dir: str | Path, paper: bool, allow_mismatch: bool = False) -> str:
    parts = ["python", "run_bench.py", "--report", *map(str, paths), "--out", str(out_dir)]
    if paper:
        parts.append("--paper")
    cmd = " ".join(shlex.quote(p) for p in parts)
    if allow_mismatch:
        cmd = "E2F_ALLOW_VERSION_MISMATCH=1 " + cmd
    return cmd


# --------------------------------------------------------------------------- writers


def _write_markdown(out: Path, title: str, figs, notes, tables: dict, df, regen: str) -> Path:
    lines = [f"# {title}", "", f"Regenerate this report: `{regen}`", "",
             f"{len(df)} records, devices: {', '.join(sorted(df['device'].unique())) if len(df) else 'none'}.", ""]
    for note in notes:
        if note:
            lines += [f"> **GPU comparison:** {note}", ""]
    for d in figs:
        rel = d.files.get("png")
        lines += [f"## {d.title}", ""]
        if rel is not None:
            lines += [f"![{d.title}]({Path(rel).relative_to(out).as_posix()})", ""]
        others = ", ".join(f"[{fmt.upper()}]({Path(p).relative_to(out).as_posix()})" for fmt, p in d.files.items() if fmt != "png")
        if others:
            lines += [f"Also as {others}.", ""]
        if d.caption:
            lines += [d.caption, ""]
        cmds = suite_commands(df, d.suite)
        if cmds:
            lines += ["Data measured by:", ""] + [f"    {c}" for c in cmds] + [""]
        lines += [f"Table (`tables/{d.name}.csv`):", "", _md_table(d.table), ""]
    for name, (heading, table) in tables.items():
        lines += [f"## {heading}", "", f"`tables/{name}.csv`", "", _md_table(table), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f3f3f3}img{max-width:100%}code,pre{background:#f6f6f6;padding:2px 4px}
.note{border-left:4px solid #d55e00;padding:.3em .8em;background:#fff4ec}details{margin-bottom:1em}"""


def _html_table(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "<p><em>(no rows)</em></p>"
    return df.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0)


def _write_html(out: Path, title: str, figs, notes, tables: dict, df, regen: str) -> Path:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>", f"<p>Regenerate this report: <code>{e(regen)}</code></p>",
             f"<p>{len(df)} records; devices: {e(', '.join(sorted(df['device'].unique())) if len(df) else 'none')}.</p>"]
    for note in notes:
        if note:
            parts.append(f"<p class='note'><b>GPU comparison:</b> {e(note)}</p>")
    for d in figs:
        parts.append(f"<h2>{e(d.title)}</h2>")
        png = d.files.get("png")
        if png is not None:
            data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
            parts.append(f"<img alt='{e(d.title)}' src='data:image/png;base64,{data}'>")
        if d.caption:
            parts.append(f"<p>{e(d.caption)}</p>")
        cmds = suite_commands(df, d.suite)
        if cmds:
            parts.append("<p>Data measured by:</p><pre>" + e("\n".join(cmds)) + "</pre>")
        parts.append(f"<details open><summary>Table behind the figure (tables/{e(d.name)}.csv)</summary>{_html_table(d.table)}</details>")
    for name, (heading, table) in tables.items():
        parts.append(f"<h2>{e(heading)}</h2><details open><summary>tables/{e(name)}.csv</summary>{_html_table(table)}</details>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def build_report(records: list[dict], out_dir: str | Path, *, paper: bool = False, allow_mismatch: bool = False,
                 regen: str = "", title: str = "e2f benchmark report") -> dict:
    """Render figures, tables, report.md and report.html; return a summary dict of the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = render.records_frame(records)
    figs, notes = render.render_figures(df, out / "figures", paper, allow_mismatch=allow_mismatch)
    tables_dir = out / "tables"
    tables_dir.mkdir(exist_ok=True)
    for d in figs:
        d.table.to_csv(tables_dir / f"{d.name}.csv", index=False)
    extra = {}
    if len(df) and (df["suite"] == "memory-scaling").any():
        per_device = [render.memory_slopes(g).assign(device=dev) for dev, g in df.groupby("device")]
        extra["memory_slopes"] = ("Memory: fitted log-log slopes and bytes per atom", pd.concat(per_device, ignore_index=True))
    extra["status_counts"] = ("Points per status", status_counts(df))
    extra["problems"] = ("Points without numbers (oom, error, skipped) and why", problems(df))
    extra["environment"] = ("Environment of every run", environments(df))
    for name, (_, table) in extra.items():
        table.to_csv(tables_dir / f"{name}.csv", index=False)
    (out / "environment.json").write_text(json.dumps(environments(df).to_dict(orient="records"), indent=1, default=str))
    md = _write_markdown(out, title, figs, notes, extra, df, regen)
    page = _write_html(out, title, figs, notes, extra, df, regen)
    return {"markdown": md, "html": page, "figures": [d.files for d in figs], "notes": notes, "records": len(df)}


def render_cli(paths: list[str], out_dir: str, paper: bool, allow_mismatch: bool | None = None) -> int:
    """Entry point of ``run_bench.py --report``: 0 on success, 1 if nothing could be read.

    ``allow_mismatch`` (default: the environment variable ``E2F_ALLOW_VERSION_MISMATCH=1``)
    lets the GPU comparison put cards measured with different software versions side by
    side; otherwise the comparison is refused and the report says why.
    """
    import os

    if allow_mismatch is None:
        allow_mismatch = os.environ.get("E2F_ALLOW_VERSION_MISMATCH", "") == "1"
    try:
        records = load(paths)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not records:
        print(f"error: no results records in {', '.join(map(str, paths))}", file=sys.stderr)
        return 1
    summary = build_report(records, out_dir, paper=paper, allow_mismatch=allow_mismatch,
                           regen=regenerate_command(paths, out_dir, paper, allow_mismatch))
    for note in summary["notes"]:
        if note:
            print(f"gpu-compare: {note}", file=sys.stderr)
    print(f"report: {summary['markdown']} and {summary['html']} ({summary['records']} records, "
          f"{len(summary['figures'])} figures)")
    return 0


# --------------------------------------------------------------------------- README


def update_readme(readme: str | Path = "README.md", results: str | Path = "reports/results", *, gpu: str = "H100",
                  fig_dir: str | Path | None = None) -> bool:
    """Replace the README section between the figure markers with the current ``gpu`` figures.

    Figures are rendered from the records under ``results`` whose device name contains
    ``gpu`` into ``fig_dir`` (PNG), and linked with the table of headline numbers.
    Returns False (README unchanged) when no such records exist; raises ``ValueError`` if
    the markers are missing.
    """
    readme = Path(readme)
    fig_dir = Path(fig_dir) if fig_dir is not None else Path("reports/figures") / gpu.lower()
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text or text.index(README_START) > text.index(README_END):
        raise ValueError(f"{readme} lacks the markers {README_START} ... {README_END}")
    records = [r for r in load([results]) if gpu.lower() in render.device_label(r.get("env")).lower()]
    if not records:
        return False
    df = render.records_frame(records)
    figs, _ = render.render_figures(df, fig_dir, paper=False, formats=("png",))
    root = readme.parent.resolve()
    devices = sorted(df["device"].unique())
    when = str(df["timestamp"].max())[:10] if "timestamp" in df else ""
    body = [README_START,
            f"<!-- generated by `python -m reports.report --update-readme` from {Path(results).as_posix()}; do not edit -->",
            "", f"Measured on {', '.join(devices)} (latest run {when}).", ""]
    for d in figs:
        png = Path(d.files["png"]).resolve()
        try:
            rel = png.relative_to(root).as_posix()
        except ValueError:
            rel = png.as_posix()
        body += [f"**{d.title}**", "", f"![{d.title}]({rel})", ""]
    slopes = render.memory_slopes(df) if (df["suite"] == "memory-scaling").any() else pd.DataFrame()
    if len(slopes):
        body += ["Memory: fitted log-log slope and bytes/atom at the largest N", "", _md_table(slopes), ""]
    body.append(README_END)
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + "\n".join(body) + text[end:], encoding="utf-8")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reports.report", description="Render reports from stored results.")
    ap.add_argument("paths", nargs="*", default=["reports/results"], help="results .jsonl files or folders")
    ap.add_argument("--out", default="reports/latest", help="report folder (default reports/latest)")
    ap.add_argument("--paper", action="store_true", help="serif fonts, single-column width")
    ap.add_argument("--allow-mismatch", action="store_true",
                    help="compare GPUs even if their software versions differ (the report says so)")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the README figure section from --gpu results")
    ap.add_argument("--gpu", default="H100", help="card whose records the README shows (a substring of its name)")
    ap.add_argument("--readme", default="README.md")
    args = ap.parse_args(argv)
    if args.update_readme:
        changed = update_readme(args.readme, args.paths[0] if args.paths else "reports/results", gpu=args.gpu)
        print("README figures updated" if changed else f"no {args.gpu} records found: README unchanged")
        return 0
    return render_cli(args.paths, args.out, args.paper, allow_mismatch=args.allow_mismatch or None)


if __name__ == "__main__":
    raise SystemExit(main())
