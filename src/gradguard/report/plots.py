"""Draw :class:`~gradguard.report.figures.Figure` specifications as PNG images with matplotlib's Agg.

Uses ``matplotlib.figure.Figure`` with an Agg canvas directly (not ``pyplot``), so nothing depends on a
display or on pyplot's global figure registry. Draws what it is given; computes no statistics.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_rgba
from matplotlib.figure import Figure as MplFigure
from matplotlib.patches import Patch

from gradguard.report.figures import Figure, Panel, Series

PANEL_SIZE = (6.0, 4.0)  # inches per panel
WIDE_PANEL_WIDTH = 9.0
DPI = 100
#: Colours of the cells of an ``image`` series that are not values of its scale.
NOT_LOGGED, NON_FINITE, EXACT_ZERO = "#e4e4e4", "#e8000b", "#000000"


@dataclass(frozen=True)
class AxesFrame:
    """Where a panel's axes landed in the PNG: fractions of the image's width (``left``, ``right``, from the
    left edge) and height (``top``, ``bottom``, from the top edge), and the x range they show. A page
    overlays links on the image with these (a step ``s`` is at ``left + (s − x0)/(x1 − x0)·(right − left)``)."""

    left: float
    right: float
    top: float
    bottom: float
    x0: float
    x1: float


@dataclass(frozen=True)
class Rendered:
    """A drawn figure: the PNG bytes and the frame of each panel, in panel order."""

    png: bytes
    frames: list[AxesFrame]


def _floats(values: list[Any]) -> np.ndarray:
    # Saved results spell non-finite values as strings ("nan", "inf"); float() reads both forms.
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def _image_cells(z: list[list[Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``z`` as floats and the masks of its special cells: not logged (None), non-finite (NaN, +Inf, or their
    spelled-out forms), exact zero on a log scale (−Inf)."""
    missing = np.array([[v is None for v in row] for row in z], dtype=bool).reshape(len(z), -1)
    values = np.array([_floats(row) for row in z], dtype=float).reshape(len(z), -1)
    zero = np.isneginf(values)
    bad = ~missing & ~zero & ~np.isfinite(values)
    return values, missing, bad, zero


def _draw_image(ax: Axes, s: Series) -> None:
    values, missing, bad, zero = _image_cells(s.z or [])
    finite = values[np.isfinite(values)]
    vmin = s.vmin if s.vmin is not None else (float(finite.min()) if finite.size else 0.0)
    vmax = s.vmax if s.vmax is not None else (float(finite.max()) if finite.size else 1.0)
    norm = Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1.0)
    cmap = colormaps[s.cmap]
    # Colours are computed here rather than by imshow's masking, which cannot tell the three special cells apart.
    rgba = cmap(norm(np.where(np.isfinite(values), values, vmin)))
    for mask, colour in ((missing, NOT_LOGGED), (bad, NON_FINITE), (zero, EXACT_ZERO)):
        rgba[mask] = to_rgba(colour)
    rows, cols = values.shape
    x = _floats(s.x) if s.x else np.arange(cols + 1, dtype=float)
    ax.pcolormesh(x, np.arange(rows + 1) - 0.5, rgba, shading="flat", rasterized=True)
    ax.set_ylim(rows - 0.5, -0.5)  # first row at the top
    labels = s.row_ticks or [str(i) for i in range(rows)]
    ax.set_yticks(range(rows), labels, fontsize=8 if rows <= 30 else 6.5)
    bar = ax.figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.04, pad=0.01)
    bar.set_label(s.zlabel, fontsize=9)
    legend = [Patch(color=c, label=t) for m, c, t in ((missing, NOT_LOGGED, "not logged"),
                                                       (bad, NON_FINITE, "NaN / Inf"),
                                                       (zero, EXACT_ZERO, "exactly 0")) if m.any()]
    if legend:
        ax.legend(handles=legend, fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.08), ncols=len(legend),
                  frameon=False, borderaxespad=0.0)


def _draw_marks(ax: Axes, s: Series) -> None:
    x = _floats(s.x or [])
    colour = s.color or "grey"
    ax.vlines(x, 0.0, 1.0, transform=ax.get_xaxis_transform(), colors=colour, linestyles=":", linewidth=1.1,
              alpha=s.alpha, label=s.label or "_nolegend_", zorder=1)
    for xi, text in zip(x, s.ticks or [], strict=False):
        ax.text(xi, 1.0, text, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7,
                color=colour, clip_on=False)


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
    elif s.kind == "image":
        _draw_image(ax, s)
    elif s.kind == "marks":
        _draw_marks(ax, s)
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
    if not any(s.kind in ("heatmap", "image") for s in panel.series):
        ax.set_yscale(panel.yscale)
        ax.grid(True, which="major", alpha=0.3)
    if panel.xlim is not None:
        ax.set_xlim(float(panel.xlim[0]), float(panel.xlim[1]))
    if panel.legend and any(s.label for s in panel.series if s.kind != "image"):
        if panel.legend_outside:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        else:
            ax.legend(fontsize=8, loc="best")


def render_png(figure: Figure) -> bytes:
    """The figure as PNG bytes: panels on a grid of ``figure.ncols`` columns, titled, tight layout."""
    return render(figure).png


def render(figure: Figure) -> Rendered:
    """The figure as PNG bytes, with the frame of each panel's axes (see :class:`AxesFrame`)."""
    n = max(len(figure.panels), 1)
    ncols = min(figure.ncols, n)
    nrows = math.ceil(n / ncols)
    if figure.panel_size is not None:
        width, height = figure.panel_size[0] * ncols, figure.panel_size[1] * nrows
    else:  # a lone panel gets room for its legend
        width, height = (PANEL_SIZE[0] * ncols if ncols > 1 else WIDE_PANEL_WIDTH), PANEL_SIZE[1] * nrows
    fig = MplFigure(figsize=(width, height + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, panel in zip(axes.flat, figure.panels, strict=False):
        _draw_panel(ax, panel)
    for ax in list(axes.flat)[len(figure.panels):]:
        ax.set_visible(False)
    fig.suptitle(figure.title, fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # draws the figure: the constrained layout is final from here on
    frames = []
    for ax in list(axes.flat)[:len(figure.panels)]:
        box = ax.get_position()
        x0, x1 = ax.get_xlim()
        frames.append(AxesFrame(box.x0, box.x1, 1.0 - box.y1, 1.0 - box.y0, float(x0), float(x1)))
    return Rendered(buf.getvalue(), frames)
