"""Declarative figure specifications: what to draw, as plain data that round-trips through JSON.

Experiments describe their figures with these records; :mod:`gradguard.report.plots` draws them. Keeping
the description as data is what lets ``gradguard report DIR`` redraw every figure from the saved results
without re-running (or re-computing) anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: What a series can be drawn as.
SERIES_KINDS = ("line", "scatter", "hist", "bar", "heatmap", "image", "marks", "hline", "vline")
SCALES = ("linear", "log", "symlog")


@dataclass(frozen=True)
class Series:
    """One thing drawn on a panel.

    ``line``/``scatter``: ``y`` against ``x`` (``x`` defaults to 0, 1, ...); non-finite ``y`` leaves a gap.
    ``hist``: a histogram of ``y`` with ``bins`` bins. ``bar``: one bar per ``y`` at categories ``ticks``.
    ``heatmap``: matrix ``z`` with column labels ``ticks`` and row labels ``row_ticks``, cells annotated.
    ``image``: a dense heatmap, too many cells to annotate: matrix ``z`` (rows top to bottom, labelled
    ``row_ticks``) over columns whose edges on the x axis are ``x`` (one more than columns), coloured by ``cmap``
    between ``vmin`` and ``vmax`` (colour bar titled ``zlabel``). Three cell values are not colours of the
    scale: ``None`` is "not logged" (light grey), NaN or +Inf is "non-finite value logged" (red), −Inf is
    "exact zero on a log scale" (black).
    ``marks``: a dotted vertical line at each ``x``, labelled at the top with the matching ``ticks`` entry.
    ``hline``/``vline``: a reference line at ``y[0]``/``x[0]``.
    """

    label: str
    y: list[Any] = field(default_factory=list)
    x: list[Any] | None = None
    kind: str = "line"
    z: list[list[Any]] | None = None
    ticks: list[str] | None = None
    row_ticks: list[str] | None = None
    marker: str | None = None
    linestyle: str = "-"
    color: str | None = None
    alpha: float = 1.0
    bins: int = 60
    cmap: str = "viridis"
    vmin: float | None = None
    vmax: float | None = None
    zlabel: str = ""


@dataclass(frozen=True)
class Panel:
    """One set of axes: title, labelled axes (with units), scales and the series drawn on it; ``xlim`` fixes
    the x range, ``legend_outside`` puts the legend right of the axes so it hides no data."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    xscale: str = "linear"
    yscale: str = "linear"
    legend: bool = True
    xlim: list[float] | None = None
    legend_outside: bool = False


@dataclass(frozen=True)
class Figure:
    """A named figure (its PNG is ``<name>.png``) made of panels laid out in ``ncols`` columns.

    ``panel_size`` (width, height in inches) overrides the default size of each panel.
    """

    name: str
    title: str
    panels: list[Panel]
    caption: str = ""
    ncols: int = 2
    panel_size: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, suitable for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Figure:
        """Inverse of :meth:`to_dict`."""
        panels = [
            Panel(**{**p, "series": [Series(**s) for s in p["series"]]}) for p in data["panels"]
        ]
        return cls(**{**data, "panels": panels})
