"""Draw :class:`~gradguard.report.figures.Figure` specifications as PNG images with matplotlib's Agg.

Uses ``matplotlib.figure.Figure`` with an Agg canvas directly (not ``pyplot``), so nothing depends on a
display or on pyplot's global figure registry. Draws what it is given; computes no statistics.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from gradguard.report.figures import Figure, Panel, Series

PANEL_SIZE = (6.0, 4.0)  # inches per panel
WIDE_PANEL_WIDTH = 9.0
DPI = 100


def _floats(values: list[Any]) -> np.ndarray:
    # Saved results spell non-finite values as strings ("nan", "inf"); float() reads both forms.
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def _draw_series(ax: Axes, s: Series, yscale: str, slot: tuple[int, int] = (0, 1)) -> None:
    """Draw one series; ``slot`` = (index, count) of bar series on the panel, to set grouped bars side by side."""
    kw: dict[str, Any] = {"label": s.label or None, "alpha": s.alpha}
    if s.color:
        kw["color"] = s.color
    if s.kind in ("line", "scatter"):
        y = _floats(s.y)
        x = _floats(s.x) if s.x is not None else np.arange(len(y), dtype=float)
        if yscale == "log":
            y = np.where(y > 0, y, np.nan)  # log axes cannot show ≤ 0; leave a gap rather than warn
        if s.kind == "line":
            ax.plot(x, y, linestyle=s.linestyle, marker=s.marker or "", markersize=4, **kw)
        else:
            ax.scatter(x, y, marker=s.marker or "o", s=28, zorder=3, **kw)
    elif s.kind == "hist":
        y = _floats(s.y)
        ax.hist(y[np.isfinite(y)], bins=s.bins, density=True, **kw)
    elif s.kind == "bar":
        y = _floats(s.y)
        ticks = s.ticks or [str(i) for i in range(len(y))]
        index, count = slot
        width = 0.8 / count
        pos = np.arange(len(y)) - 0.4 + width * (index + 0.5)
        ax.bar(pos, np.nan_to_num(y, nan=0.0), width=width, **kw)
        ax.set_xticks(range(len(y)), ticks, rotation=30, ha="right")
    elif s.kind == "heatmap":
        z = np.array([_floats(row) for row in (s.z or [])])
        image = ax.imshow(z, aspect="auto", cmap="viridis")
        ax.figure.colorbar(image, ax=ax, shrink=0.85)
        ax.set_xticks(range(z.shape[1]), s.ticks or [str(i) for i in range(z.shape[1])], rotation=30)
        ax.set_yticks(range(z.shape[0]), s.row_ticks or [str(i) for i in range(z.shape[0])])
        middle = np.nanmean(z) if np.isfinite(z).any() else 0.0
        for (r, c), v in np.ndenumerate(z):
            text = "n/a" if not math.isfinite(v) else f"{v:.2g}"
            ax.text(c, r, text, ha="center", va="center", fontsize=8, color="black" if v > middle else "white")
    elif s.kind == "hline":
        ax.axhline(float(s.y[0]), linestyle=s.linestyle or "--", color=s.color or "grey", label=s.label or None)
    elif s.kind == "vline":
        ax.axvline(float((s.x or [0])[0]), linestyle=s.linestyle or "--", color=s.color or "grey",
                   label=s.label or None)


def _draw_panel(ax: Axes, panel: Panel) -> None:
    bars = [s for s in panel.series if s.kind == "bar"]
    for s in panel.series:
        slot = (bars.index(s), len(bars)) if s.kind == "bar" else (0, 1)
        _draw_series(ax, s, panel.yscale, slot)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    categorical = any(s.kind in ("heatmap", "bar") for s in panel.series)
    if not categorical:
        ax.set_xscale(panel.xscale)
    if not any(s.kind == "heatmap" for s in panel.series):
        ax.set_yscale(panel.yscale)
        ax.grid(True, which="major", alpha=0.3)
    if panel.legend and any(s.label for s in panel.series):
        ax.legend(fontsize=8, loc="best")


def render_png(figure: Figure) -> bytes:
    """The figure as PNG bytes: panels on a grid of ``figure.ncols`` columns, titled, tight layout."""
    n = max(len(figure.panels), 1)
    ncols = min(figure.ncols, n)
    nrows = math.ceil(n / ncols)
    width = PANEL_SIZE[0] * ncols if ncols > 1 else WIDE_PANEL_WIDTH  # a lone panel gets room for its legend
    fig = MplFigure(figsize=(width, PANEL_SIZE[1] * nrows + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, panel in zip(axes.flat, figure.panels, strict=False):
        _draw_panel(ax, panel)
    for ax in list(axes.flat)[len(figure.panels):]:
        ax.set_visible(False)
    fig.suptitle(figure.title, fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
