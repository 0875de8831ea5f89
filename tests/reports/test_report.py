"""Markdown/HTML reports, the README section, and gpu-compare's refusal of mismatched versions."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from reports import render, report
from suites import gpu_compare


def _subset(src, dst, keep):
    lines = [ln for ln in src.read_text().splitlines() if keep(json.loads(ln))]
    dst.write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture(scope="module")
def small_results(fixture_results, tmp_path_factory):
    """Latency and memory records of the fixture (both cards): quick to render."""
    d = tmp_path_factory.mktemp("res")
    return _subset(fixture_results, d / "part.jsonl", lambda r: r["suite"] in ("latency", "memory-scaling"))


def test_render_cli_writes_markdown_html_tables_environment(small_results, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report.render_cli([str(small_results)], str(out), False) == 0
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "python run_bench.py --report" in md and str(small_results) in md
    assert "![Latency vs N" in md and "figures/" in md
    assert "data:image/png;base64," in html and "<img" in html and "src='figures" not in html
    for name in ("latency_vs_n", "memory_vs_n", "memory_slopes", "environment", "status_counts", "problems"):
        assert (out / "tables" / f"{name}.csv").exists(), name
    env = json.loads((out / "environment.json").read_text())
    assert {e["gpu_name"] for e in env} == {"NVIDIA H100 80GB HBM3", "NVIDIA H200"}
    assert "Environment of every run" in md and "2.11.0+cu128" in md
    assert "python run_bench.py --suite latency --full" in md  # the command that measured the data
    problems = pd.read_csv(out / "tables" / "problems.csv")
    assert set(problems["status"]) >= {"oom", "error"}
    assert "RuntimeError: boom" not in md or "broken-impl" in md


def test_render_cli_fails_cleanly(tmp_path, capsys):
    assert report.render_cli([str(tmp_path / "missing.jsonl")], str(tmp_path / "o"), False) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert report.render_cli([str(empty)], str(tmp_path / "o"), False) == 1
    assert "no results records" in capsys.readouterr().err


def test_truncated_last_line_is_skipped_not_fatal(small_results, tmp_path):
    broken = tmp_path / "broken.jsonl"
    text = small_results.read_text()
    broken.write_text(text + text.splitlines()[0][:40])
    with pytest.warns(Warning, match="truncated"):
        records = report.load([broken])
    assert len(records) == len(text.splitlines())


def test_gpu_compare_refuses_mismatched_versions(fixture_results, mismatch_results, capsys):
    h100 = [r for r in report.load([fixture_results]) if "H100" in r["env"]["gpu_name"]]
    df = render.records_frame(h100 + report.load([mismatch_results]))
    refused = gpu_compare.compare_frame(df)
    assert refused.refused and refused.table is None
    assert "REFUSED" in refused.note and "torch" in refused.note and "--allow-mismatch" in refused.note
    allowed = gpu_compare.compare_frame(df, allow_mismatch=True)
    assert allowed.table is not None and len(allowed.table) > 0
    assert allowed.note.startswith("WARNING") and "torch" in allowed.note
    # Command line: exit 2 and the reason without the flag, 0 with it.
    paths = [str(fixture_results), str(mismatch_results)]
    assert gpu_compare.main(paths) == 2
    assert "REFUSED" in capsys.readouterr().err
    assert gpu_compare.main([*paths, "--allow-mismatch"]) == 0
    assert "WARNING" in capsys.readouterr().out


def test_gpu_compare_needs_two_cards(small_results):
    one = [r for r in report.load([small_results]) if "H100" in r["env"]["gpu_name"]]
    result = gpu_compare.compare_frame(render.records_frame(one))
    assert result.table is None and not result.refused and "at least two GPUs" in result.note


def test_update_readme_replaces_only_the_marked_section(small_results, tmp_path):
    results = tmp_path / "results" / "h100"
    results.mkdir(parents=True)
    shutil.copy(small_results, results / "latency.jsonl")
    readme = tmp_path / "README.md"
    readme.write_text(f"# e2f\n\nintro\n\n{report.README_START}\nold figures\n{report.README_END}\n\n## after\n")
    assert report.update_readme(readme, tmp_path / "results", fig_dir=tmp_path / "figs")
    text = readme.read_text()
    assert "old figures" not in text and text.startswith("# e2f\n\nintro") and text.endswith("## after\n")
    assert "![Latency vs N" in text and "figs/latency_vs_n.png" in text and "H200" not in text
    assert (tmp_path / "figs" / "latency_vs_n.png").exists()
    assert "slope" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(readme, tmp_path / "results", fig_dir=tmp_path / "figs")
