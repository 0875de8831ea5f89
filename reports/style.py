"""One look for every figure: a colour and a marker per implementation, two page styles.

Implementations are named as the suites name them: models (``e2former-v2``, ...), the
attention layer of a model (``layer:<model>``), attention-core backends (``materialized``,
``chunked``, ``triton``, also written ``core:<backend>``) and the dense reference
(``sdpa-dense``). A layer shares its model's colour with an open marker and a dashed line,
so the eye pairs them; ``core:X`` is the same implementation as ``X``.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Okabe-Ito colours (colour-blind safe), then tab10 for anything new.
_FIXED = {
    "e2former-v2": ("#0072B2", "o"),
    "triton": ("#D55E00", "*"),
    "chunked": ("#009E73", "s"),
    "materialized": ("#CC79A7", "D"),
    "e2former-v1": ("#E69F00", "^"),
    "escn-md": ("#56B4E9", "v"),
    "dense-tp": ("#000000", "P"),
    "sdpa-dense": ("#999999", "h"),
    # the moments form (``CoreInputs.moments``): a darker shade of its backend's or model's
    # colour, pentagons
    "e2former-v2-moments": ("#003F63", "p"),
    "triton-moments": ("#7F3800", "p"),
    "chunked-moments": ("#005C43", "p"),
    "materialized-moments": ("#8C3F6E", "p"),
}
_FALLBACK_COLOURS = [matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab10").colors]
# no "X": it reads as the out-of-memory cross
_FALLBACK_MARKERS = ["<", ">", "p", "d", "8", "H", "1"]

DTYPE_LINESTYLES = {"float32": "-", "fp32": "-", "bfloat16": "--", "bf16": "--",
                    "float16": ":", "fp16": ":", "float64": "-."}
MODE_LINESTYLES = {"fwd": "-", "fwd+bwd": "--", "bwd": ":"}

# The mark for a point that ran out of memory (Figure-1 style): a cross, thick.
OOM_MARKER = "x"
OOM_GID = "oom"


@dataclass(frozen=True)
class ImplStyle:
    colour: str
    marker: str
    linestyle: str
    filled: bool

    def line_kwargs(self) -> dict:
        return {
            "color": self.colour,
            "marker": self.marker,
            "linestyle": self.linestyle,
            "markerfacecolor": self.colour if self.filled else "white",
            "markeredgecolor": self.colour,
        }


def _base(impl: str) -> tuple[str, bool]:
    """(implementation the style is keyed on, whether this is the layer-only variant)."""
    if impl.startswith("core:"):
        return impl[len("core:"):], False
    if impl.startswith("layer:"):
        return impl[len("layer:"):], True
    return impl, False


def impl_style(impl: str) -> ImplStyle:
    """The fixed style of ``impl``; unknown names get a stable colour from a hash."""
    base, layer = _base(impl)
    if base in _FIXED:
        colour, marker = _FIXED[base]
    else:
        h = int(hashlib.sha1(base.encode()).hexdigest(), 16)
        colour = _FALLBACK_COLOURS[h % len(_FALLBACK_COLOURS)]
        marker = _FALLBACK_MARKERS[(h // 7) % len(_FALLBACK_MARKERS)]
    return ImplStyle(colour, marker, "--" if layer else "-", not layer)


# Single-column width of a two-column paper (ACS/APS/NeurIPS-like): 3.4 in.
PAPER_COLUMN_IN = 3.4
SCREEN_PANEL_IN = (4.6, 3.6)


def panel_size(ncols: int, nrows: int = 1, paper: bool = False) -> tuple[float, float]:
    """Figure size in inches for a grid of panels."""
    if paper:
        w = PAPER_COLUMN_IN
        return w, nrows * w / max(ncols, 1) * 0.85 + 0.5
    return SCREEN_PANEL_IN[0] * ncols, SCREEN_PANEL_IN[1] * nrows


def rc_params(paper: bool) -> dict:
    """Matplotlib rc settings: a clean screen style, or serif fonts at paper sizes."""
    common = {
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "savefig.bbox": "tight",
        "legend.frameon": False,
        "svg.fonttype": "none",
        "pdf.fonttype": 42,
    }
    if paper:
        common.update({
            "font.family": "serif",
            "font.serif": ["DejaVu Serif", "Times New Roman", "Times"],
            "mathtext.fontset": "dejavuserif",
            "font.size": 7,
            "axes.labelsize": 7,
            "axes.titlesize": 7,
            "legend.fontsize": 5.5,
            "xtick.labelsize": 6,
            "ytick.labelsize": 6,
            "lines.linewidth": 1.0,
            "lines.markersize": 3.5,
            "savefig.dpi": 300,
        })
    else:
        common.update({
            "font.family": "sans-serif",
            "font.size": 10,
            "legend.fontsize": 8,
            "lines.linewidth": 1.6,
            "lines.markersize": 5.5,
            "savefig.dpi": 150,
        })
    return common


@contextmanager
def figure_style(paper: bool = False):
    """Context in which figures are drawn with the house style."""
    with plt.rc_context(rc_params(paper)):
        yield
