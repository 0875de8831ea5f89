"""Figures from the stored fixture results: every figure, labelled axes, OOM crosses where
the data says OOM, one style per implementation, paper style, all file formats."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from reports import render, style
from reports.report import load

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture(scope="module")
def frame(fixture_results):
    return render.records_frame(load([fixture_results]))


@pytest.fixture(scope="module")
def drawn(frame, tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    figs, notes = render.render_figures(frame, out, formats=("png",))
    return {d.name if d.name == "gpu_compare" or d.title.endswith(H100) else f"{d.name}@other": d for d in figs}, notes, out


def _oom_artists(ax):
    return [ln for ln in ax.get_lines() if ln.get_gid() == style.OOM_GID]


def test_every_figure_is_drawn_with_files(drawn):
    figs, notes, out = drawn
    for name in ("latency_vs_n", "memory_vs_n", "kernel_tflops", "lmax_sweep", "accuracy", "gpu_compare"):
        assert name in figs, f"{name} missing; drawn: {sorted(figs)}"
        png = figs[name].files["png"]
        assert png.exists() and png.stat().st_size > 5000
        assert not figs[name].table.empty
    # Two cards -> one sub-folder per card.
    assert (out / render.slug(H100) / "latency_vs_n.png").exists()
    assert (out / "nvidia-h200" / "latency_vs_n.png").exists()
    assert "matched" in notes[0]


def test_axes_are_labelled_with_units(drawn):
    figs, _, _ = drawn
    for name, d in figs.items():
        if name.startswith("accuracy"):
            continue
        for ax in d.fig.axes:
            assert ax.get_xlabel(), f"{name}: unlabelled x axis"
            assert ax.get_ylabel(), f"{name}: unlabelled y axis"
    units = {"latency_vs_n": "(ms)", "memory_vs_n": "(MiB)", "kernel_tflops": "TFLOP/s"}
    for name, unit in units.items():
        assert unit in figs[name].fig.axes[0].get_ylabel()


@pytest.mark.parametrize("name,suite", [("latency_vs_n", "latency"), ("memory_vs_n", "memory-scaling"),
                                        ("kernel_tflops", "kernel-tflops"), ("lmax_sweep", "lmax-sweep")])
def test_oom_crosses_where_the_data_says_oom(drawn, frame, name, suite):
    figs, _, _ = drawn
    d = frame[(frame["suite"] == suite) & (frame["device"] == H100)]
    ooms = d[d["status"] == "oom"]
    assert len(ooms), "the fixture must hold OOM points for this suite"
    fig = figs[name].fig
    if suite == "lmax-sweep":
        ax = fig.axes[0]
        xs = sorted(float(x) for ln in _oom_artists(ax) for x in ln.get_xdata())
        assert xs == sorted(ooms["params.lmax"].astype(float))
        return
    modes = render._modes(d)
    for ax, mode in zip(fig.axes, modes):  # first row: one panel per mode
        expected = sorted(ooms.loc[ooms["params.mode"] == mode, "params.n_atoms"].astype(float))
        got = sorted(float(x) for ln in _oom_artists(ax) for x in ln.get_xdata())
        assert got == expected, (mode, got, expected)
        for ln in _oom_artists(ax):
            assert ln.get_marker() == style.OOM_MARKER
        # The legend explains the cross.
        legend = fig.axes[len(modes) - 1].get_legend()
        assert "out of memory" in [t.get_text() for t in legend.get_texts()]


def test_no_oom_cross_without_oom(frame, tmp_path):
    d = frame[(frame["suite"] == "latency") & (frame["impl"] == "e2former-v2") & (frame["device"] == H100)]
    assert (d["status"] == "ok").all()
    drawn = render.fig_latency(d, paper=False)
    assert not any(_oom_artists(ax) for ax in drawn.fig.axes)


def test_one_style_per_implementation_everywhere(drawn):
    figs, _, _ = drawn
    colours: dict[str, set] = {}
    for d in (figs["latency_vs_n"], figs["lmax_sweep"], figs["memory_vs_n"]):
        for ax in d.fig.axes:
            for ln in ax.get_lines():
                label = ln.get_label()
                if label.startswith("_"):
                    continue
                impl = label.split(" ")[0]
                colours.setdefault(impl, set()).add((matplotlib.colors.to_hex(ln.get_color()), ln.get_marker()))
    for impl in ("e2former-v2", "e2former-v1", "escn-md", "dense-tp"):
        assert len(colours[impl]) == 1, (impl, colours[impl])
        st = style.impl_style(impl)
        assert colours[impl] == {(st.colour.lower(), st.marker)}
    assert style.impl_style("core:chunked").colour == style.impl_style("chunked").colour
    assert len({style.impl_style(m).colour for m in ("e2former-v2", "e2former-v1", "escn-md", "dense-tp", "triton")}) == 5


def test_memory_slopes_and_bytes_per_atom(frame):
    assert render.loglog_slope([10, 100, 1000], [30, 300, 3000]) == pytest.approx((1.0, 3.0))
    slopes = render.memory_slopes(frame[frame["device"] == H100])
    row = slopes[(slopes["impl"] == "e2former-v2") & (slopes["mode"] == "fwd")].iloc[0]
    assert 0.95 < row["peak_bytes_slope"] < 1.05  # fixture: 4 MB + 30 kB per atom
    assert row["peak_bytes_per_atom"] == pytest.approx(30e3 + 4e6 / 1e6, rel=1e-3)
    oom = slopes[(slopes["impl"] == "dense-tp") & (slopes["mode"] == "fwd")].iloc[0]
    assert oom["oom_at_n"] == 100000


def test_paper_style_and_all_formats(frame, tmp_path):
    d = frame[(frame["suite"] == "latency") & (frame["device"] == H100)]
    with style.figure_style(paper=True):
        drawn = render.fig_latency(d, paper=True)
        assert matplotlib.rcParams["font.family"] == ["serif"]
        files = render.save(drawn, tmp_path)
    assert drawn.fig.get_figwidth() == pytest.approx(style.PAPER_COLUMN_IN)
    for fmt in ("png", "pdf", "svg"):
        assert files[fmt].exists() and files[fmt].stat().st_size > 1000
    assert files["svg"].read_text().lstrip().startswith("<?xml")
    assert files["pdf"].read_bytes()[:4] == b"%PDF"


def test_gpu_compare_bars_are_speed_ratios(drawn):
    figs, _, _ = drawn
    d = figs["gpu_compare"]
    t = d.table
    h100 = [c for c in t.columns if c.startswith("speedup[") and "H100" in c][0]
    h200 = [c for c in t.columns if c.startswith("speedup[") and "H200" in c][0]
    assert np.allclose(t[h100], 1.0)
    lat = [c for c in t.columns if c.startswith("latency_ms[")]
    assert np.allclose(t[h200], t[lat[0]] / t[lat[1]])
    assert d.fig.axes[0].get_ylabel().startswith("speed relative to")
