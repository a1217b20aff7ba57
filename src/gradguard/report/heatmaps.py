"""Layer × step heatmaps of a run log: what each row and column shows, as ``image`` series.

Rows are parameter tensors (or modules) in depth order; more than :data:`MAX_ROWS` of them are grouped into
blocks of consecutive rows, and more logged steps than :data:`MAX_COLUMNS` into equal-width step bins. Both
reductions only choose how logged values are shown; the values stay the monitor's:

* a block of rows shows the weighted power mean ``(Σ wᵢ vᵢᵖ / Σ wᵢ)^(1/p)`` of its logged rows at a step:
  with ``p = 2`` and ``wᵢ = numelᵢ`` on the per-element RMS ``‖gᵢ‖/√numelᵢ`` this is exactly the RMS over the
  block's elements, with ``wᵢ = ‖wᵢ‖²`` on the update ratios ``‖Δwᵢ‖/‖wᵢ‖`` exactly the block's ratio
  ``‖Δw‖/‖w‖``, with ``p = 1`` and ``wᵢ`` = output count on output shares exactly the block's share;
* a step bin shows the mean of the cell values it holds (of log10 values: the geometric mean).

A logged NaN/Inf anywhere in a cell marks the whole cell non-finite, so a single bad step stays visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradguard.report.figures import Series
from gradguard.report.runlog import WatchLog

#: At most this many rows: beyond it, consecutive rows are grouped into blocks of equal size.
MAX_ROWS = 60
#: At most this many step columns: beyond it, steps are averaged over equal-width bins.
MAX_COLUMNS = 400
#: Row labels longer than this are shortened in the middle.
LABEL_CHARS = 34


@dataclass(frozen=True)
class Grid:
    """Cells of one heatmap: ``z[r][c]`` (None: not logged; NaN: non-finite logged; −Inf: log10 of an exact
    zero), row labels, column edges in steps, and ``row``: what one row is ("tensor", "module", "4 modules")."""

    z: list[list[float | None]]
    row_labels: list[str]
    edges: list[float]
    row: str

    def finite_range(self) -> tuple[float, float] | None:
        """Smallest and largest finite cell value (None when no cell is finite)."""
        vals = [v for row in self.z for v in row if v is not None and math.isfinite(v)]
        return (min(vals), max(vals)) if vals else None

    def series(self, *, cmap: str, zlabel: str, vmin: float | None = None, vmax: float | None = None) -> Series:
        """The grid as an ``image`` series."""
        return Series("", kind="image", z=self.z, x=self.edges, row_ticks=self.row_labels, cmap=cmap,
                      zlabel=zlabel, vmin=vmin, vmax=vmax)


def _short(name: str) -> str:
    if len(name) <= LABEL_CHARS:
        return name
    keep = (LABEL_CHARS - 1) // 2
    return name[:keep] + "…" + name[-keep:]


def blocks(names: Sequence[str], max_rows: int = MAX_ROWS, *,
           by_module: bool = False) -> tuple[list[tuple[int, int, str]], str]:
    """Consecutive ``(start, stop, label)`` groups of ``names`` and what one group is ("tensor", "module",
    "4 modules", ...): one per name when there are at most ``max_rows``; else, with ``by_module``, whole modules
    (a parameter's module is its name up to the last dot) grouped ``ceil(modules / max_rows)`` at a time,
    otherwise ``ceil(n / max_rows)`` names at a time. Labels give the index range and the first and last name."""
    n = len(names)
    if n <= max_rows:
        return [(i, i + 1, _short(name)) for i, name in enumerate(names)], "tensor" if by_module else "module"
    units: list[tuple[int, int, str]] = []  # runs of consecutive names of one module (or single names)
    for i, name in enumerate(names):
        owner = name.rpartition(".")[0] if by_module else name
        if by_module and units and units[-1][2] == owner and units[-1][1] == i:
            units[-1] = (units[-1][0], i + 1, owner)
        else:
            units.append((i, i + 1, owner))
    per = max(1, math.ceil(len(units) / max_rows))
    out = []
    for k in range(0, len(units), per):
        group = units[k:k + per]
        start, stop = group[0][0], group[-1][1]
        if len(group) == 1:
            label = f"{_short(group[0][2])} [{start}–{stop - 1}]"
        else:
            label = f"[{start}–{stop - 1}] {_short(group[0][2])} … {_short(group[-1][2])}"
        out.append((start, stop, label))
    # Grouped rows are modules either way: whole modules of parameters, or activation rows (one per module).
    return out, "module" if per == 1 else f"{per} modules"


def power_mean_rows(values: np.ndarray, logged: np.ndarray, weights: np.ndarray | None,
                    groups: list[tuple[int, int, str]], power: float) -> tuple[np.ndarray, np.ndarray]:
    """Per group and step, ``(Σ wᵢ vᵢᵖ / Σ wᵢ)^(1/p)`` over the group's logged rows (see the module docstring);
    NaN where any logged value is non-finite. Returns ``(values, logged)`` of shape (groups, steps)."""
    out = np.full((len(groups), values.shape[1]), math.nan)
    any_logged = np.zeros_like(out, dtype=bool)
    w = np.ones_like(values) if weights is None else weights
    for g, (a, b, _) in enumerate(groups):
        v, lg, wg = values[a:b], logged[a:b], w[a:b]
        bad = (lg & ~np.isfinite(v)).any(axis=0)
        use = lg & np.isfinite(v) & np.isfinite(wg)
        num = np.where(use, wg * np.abs(np.where(use, v, 0.0)) ** power, 0.0).sum(axis=0)
        den = np.where(use, wg, 0.0).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = (num / den) ** (1.0 / power)
        # All weights zero (e.g. zero weights under a ratio): fall back to the plain mean of the values.
        plain = (np.where(use, np.abs(np.where(use, v, 0.0)) ** power, 0.0).sum(axis=0)
                 / np.maximum(use.sum(axis=0), 1)) ** (1.0 / power)
        mean = np.where(den > 0, mean, plain)
        out[g] = np.where(bad, math.nan, mean)
        any_logged[g] = lg.any(axis=0)
    return out, any_logged


def bin_columns(cells: np.ndarray, logged: np.ndarray, steps: np.ndarray, span: tuple[int, int],
                max_columns: int = MAX_COLUMNS) -> tuple[list[list[float | None]], list[float]]:
    """Columns of ``cells`` (rows × steps, already in display units) over the run's ``span`` (first and last
    step, inclusive). At most ``max_columns`` steps logged anything: one column per such step, reaching
    halfway to its neighbours. More: the mean over equal-width step bins. A column holding a non-finite value
    is NaN; one whose logged values are all −Inf is −Inf; one with no logged value is None. Returns the
    cells and the column edges (one more than columns)."""
    first, last = span
    have = logged.any(axis=0)
    at = steps[have].astype(float)
    # Steps are ascending, so each column is a contiguous slice [lo, hi) of steps: sums via cumulative sums.
    if 0 < len(at) <= max_columns:
        edges = np.concatenate([[first], (at[1:] + at[:-1]) / 2, [last + 1]])
        lo = np.flatnonzero(have)  # a column runs from its logged step to the next one
        hi = np.concatenate([lo[1:], [len(steps)]])
    else:
        edges = np.linspace(first, last + 1, max(1, min(max_columns, len(at))) + 1)
        cut = np.searchsorted(steps, edges[1:-1], side="left")
        lo, hi = np.concatenate([[0], cut]), np.concatenate([cut, [len(steps)]])
    n = len(edges) - 1
    finite = logged & np.isfinite(cells)
    bad = logged & np.isnan(cells) | logged & np.isposinf(cells)
    zero = logged & np.isneginf(cells)

    def per_bin(x: np.ndarray) -> np.ndarray:
        c = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(x, axis=1, dtype=float)], axis=1)
        return c[:, hi] - c[:, lo]

    total, count = per_bin(np.where(finite, cells, 0.0)), per_bin(finite)
    n_bad, n_zero = per_bin(bad), per_bin(zero)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = total / count
    out: list[list[float | None]] = []
    for r in range(cells.shape[0]):
        row: list[float | None] = []
        for c in range(n):
            if n_bad[r, c] > 0:
                row.append(math.nan)
            elif count[r, c] > 0:
                row.append(float(mean[r, c]))
            elif n_zero[r, c] > 0:
                row.append(-math.inf)
            else:
                row.append(None)
        out.append(row)
    return out, [float(e) for e in edges]


def _matrix(log: WatchLog, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    tracks = [log.track(k) for k in keys]
    n = len(log.steps)
    if not tracks:
        return np.zeros((0, n)), np.zeros((0, n), dtype=bool)
    return np.stack([t.values for t in tracks]), np.stack([t.logged for t in tracks])


def _span(log: WatchLog) -> tuple[int, int]:
    return (int(log.steps[0]), int(log.steps[-1])) if len(log.steps) else (0, 0)


def _log10(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(x)


def gradient_grid(log: WatchLog, *, per_element: bool = True, max_rows: int = MAX_ROWS,
                  max_columns: int = MAX_COLUMNS) -> tuple[Grid, bool] | None:
    """log10 of each tensor's gradient per element, ``‖g‖/√numel`` (RMS), when ``per_element`` and every
    tensor's ``numel`` is logged, else of its norm ``‖g‖``; returns the grid and whether it is the RMS. None
    without per-tensor gradient norms."""
    if not log.params or not len(log.steps):
        return None
    values, logged = _matrix(log, [f"grad_norm/{p}" for p in log.params])
    numel = log.numel
    rms = per_element and len(numel) == len(log.params)
    weights = None
    if rms:
        sizes = np.array([numel[p] for p in log.params], dtype=float)[:, None]
        values = values / np.sqrt(sizes)
        weights = np.broadcast_to(sizes, values.shape)
    groups, row = blocks(log.params, max_rows, by_module=True)
    rows, rows_logged = power_mean_rows(values, logged, weights, groups, power=2.0)
    z, edges = bin_columns(_log10(rows), rows_logged, log.steps, _span(log), max_columns)
    return Grid(z, [g[2] for g in groups], edges, row), rms


def update_ratio_grid(log: WatchLog, *, max_rows: int = MAX_ROWS, max_columns: int = MAX_COLUMNS) -> Grid | None:
    """log10 of each tensor's update/weight ratio ``‖Δw‖/‖w‖``; blocks weighted by ``‖w‖²`` where the
    weight norms are logged with the ratios. None when no ratio was logged."""
    keys = [f"update_ratio/{p}" for p in log.params]
    if not any(log.track(k).logged.any() for k in keys):
        return None
    values, logged = _matrix(log, keys)
    wn, wn_logged = _matrix(log, [f"weight_norm/{p}" for p in log.params])
    weights = wn ** 2 if bool((wn_logged | ~logged).all()) else None
    groups, row = blocks(log.params, max_rows, by_module=True)
    rows, rows_logged = power_mean_rows(values, logged, weights, groups, power=2.0)
    z, edges = bin_columns(_log10(rows), rows_logged, log.steps, _span(log), max_columns)
    return Grid(z, [g[2] for g in groups], edges, row)


def inactive_grid(log: WatchLog, *, max_rows: int = MAX_ROWS,
                  max_columns: int = MAX_COLUMNS) -> tuple[Grid, int] | None:
    """Per module, the share of its outputs that are exactly zero (dead ReLU units) or in the flat region of
    tanh/sigmoid (saturated): the larger of the logged ``frac_zero`` and ``frac_saturated``. Modules whose
    share is 0 at every logged step are left out; returns the grid and how many were. None when no module
    has a nonzero share."""
    shown, values, logged, sizes = [], [], [], []
    for m in log.modules:
        zero, sat = log.track(f"act/{m}/frac_zero"), log.track(f"act/{m}/frac_saturated")
        lg = zero.logged | sat.logged
        # np.maximum propagates NaN: a share made NaN by a non-finite output stays visible.
        v = np.maximum(np.where(zero.logged, zero.values, -math.inf), np.where(sat.logged, sat.values, -math.inf))
        with np.errstate(invalid="ignore"):
            if not (lg & ((v > 0) | np.isnan(v))).any():
                continue
        shown.append(m)
        values.append(v)
        logged.append(lg)
        n = log.track(f"act/{m}/numel")
        sizes.append(np.where(n.logged & np.isfinite(n.values), n.values, 1.0))
    if not shown:
        return None
    groups, row = blocks(shown, max_rows)
    rows, rows_logged = power_mean_rows(np.stack(values), np.stack(logged), np.stack(sizes), groups, power=1.0)
    z, edges = bin_columns(rows, rows_logged, log.steps, _span(log), max_columns)
    return Grid(z, [g[2] for g in groups], edges, row), len(log.modules) - len(shown)
