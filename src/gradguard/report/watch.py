"""The report of a run: ``gg.watch(model, log_dir=D)`` and ``gradguard run --out D`` append ``D/metrics.jsonl``;
:func:`render_watch_report` (``gradguard report D``) draws it as ``D/report.html`` with its figures as PNGs
beside it, and :func:`render_compare_report` (``gradguard report A B``) draws two runs side by side in
``A/compare-<name of B>.html``.

Reads the log (:mod:`gradguard.report.runlog`) and draws it; computes no statistic beyond choosing how logged
values are grouped for display (:mod:`gradguard.report.heatmaps`). The pages are self-contained: figures are
embedded as base64 PNG, styles inline, no script, no network fetch.
"""

from __future__ import annotations

import base64
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from html import escape
from pathlib import Path

import numpy as np

from gradguard.errors import ConfigError
from gradguard.findings import Finding
from gradguard.report.figures import Figure, Panel, Series
from gradguard.report.files import REPORT, write_bytes_atomic
from gradguard.report.heatmaps import Grid, gradient_grid, inactive_grid, update_ratio_grid
from gradguard.report.html import format_value, page
from gradguard.report.plots import AxesFrame, Rendered, render
from gradguard.report.runlog import WATCH_LOG, Event, WatchLog, is_watch_folder, load_watch_log, number

__all__ = ["PROFILE_STEPS", "WATCH_LOG", "is_watch_folder", "load_watch_log", "profile_picks",
           "render_compare_report", "render_watch_report", "watch_figures"]

#: How many logged steps the per-layer and per-time-step profiles show (spread evenly, first and last included).
PROFILE_STEPS = 5
#: An update/weight ratio near 1e-3 per step is the usual rule of thumb for a healthy learning rate
#: (Karpathy, CS231n notes); drawn as a reference line, not used as a verdict.
UPDATE_RATIO_REFERENCE = 1e-3
#: Recurrent modules drawn in the per-time-step figure (the first ones in the log).
MAX_TIME_MODULES = 6
WIDTH = 11.0  # inches: the page's figures share one width, so their step axes line up
SEVERITY_COLOURS = {"error": "#c62828", "warning": "#e08600", "info": "#6f6f6f"}
#: How Guard interventions are drawn on the gradient-norm panel: (label, colour, marker or None for a line).
EVENT_STYLES = {
    "skip": ("skipped step", "#e65100", "v"),
    "clip": ("clipped step (norm before the clip)", "#2e7d32", "."),
    "rollback": ("rolled back", "#6a1b9a", None),
    "lr_backoff": ("learning rate backed off", "#795548", None),
}
#: Two marks closer than this share of the width go on separate lines of the rail.
RAIL_GAP = 0.03

_CSS = """
.banner { border-left: .35rem solid #c62828; background: #fdecea; padding: .6rem .9rem; margin: .8rem 0; }
.banner.unclosed { border-color: #e08600; background: #fff4e0; }
.status { color: #137333; }
figure.plot .frame { position: relative; display: inline-block; max-width: 100%; }
figure.plot img { display: block; max-width: 100%; }
.rail { position: relative; margin: 0 0 .3rem 0; font-size: .78rem; }
.rail a { position: absolute; transform: translateX(-50%); padding: 0 .25rem; border-radius: .6rem;
          color: #fff; text-decoration: none; line-height: 1.25rem; white-space: nowrap; }
.rail a.error, .sev.error { background: #c62828; } .rail a.warning, .sev.warning { background: #e08600; }
.rail a.info, .sev.info { background: #6f6f6f; }
.sev { color: #fff; border-radius: .6rem; padding: 0 .35rem; }
tr:target { outline: 2px solid #1565c0; background: #e3f2fd; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1.2rem; align-items: start; }
.pair > div { min-width: 0; overflow-x: auto; }
body.wide { max-width: 110rem; }
"""


@dataclass(frozen=True)
class _Mark:
    """A finding on a timeline: its number, step, severity and the anchors of its mark and its table row."""

    label: str
    finding: Finding
    mark_id: str
    row_id: str


def _marks(log: WatchLog, prefix: str = "", tag: str = "") -> list[_Mark]:
    return [_Mark(f"{tag}{i}", f, f"{prefix}mark-{i}", f"{prefix}finding-{i}") for i, f in enumerate(log.findings, 1)]


def profile_picks(logged: np.ndarray, count: int = PROFILE_STEPS) -> list[int]:
    """Indices of up to ``count`` entries where ``logged`` is True, evenly spread, first and last included."""
    having = np.flatnonzero(logged)
    if len(having) <= count:
        return [int(i) for i in having]
    picks = {round(i * (len(having) - 1) / (count - 1)) for i in range(count)}
    return [int(having[i]) for i in sorted(picks)]


def _span(logs: Sequence[WatchLog]) -> list[float]:
    """The x range of every step axis: the logged steps, and the steps of findings and events outside them
    (so that every finding's line is on the timeline)."""
    points = [float(s) for g in logs for s in (g.steps[:1].tolist() + g.steps[-1:].tolist())]
    points += [float(f.step) for g in logs for f in g.findings] + [float(e.step) for g in logs for e in g.events]
    if not points:
        return [0.0, 1.0]
    return [min(points), max(points) + 1.0]  # the heatmaps' last column ends one step after the last step


def _at(log: WatchLog, key: str, steps: Sequence[int]) -> list[float]:
    """The logged value of ``key`` at each of ``steps`` (NaN where that step did not log a finite one)."""
    t = log.track(key)
    out = []
    for s in steps:
        i = int(np.searchsorted(log.steps, s))
        ok = i < len(log.steps) and log.steps[i] == s and t.logged[i] and math.isfinite(t.values[i])
        out.append(float(t.values[i]) if ok else math.nan)
    return out


def _on_curve(values: list[float], top: float) -> list[float]:
    return [v if math.isfinite(v) and v > 0 else top for v in values]


def _event_series(log: WatchLog, top: float) -> list[Series]:
    by_action: dict[str, list[Event]] = {}
    for e in log.events:
        by_action.setdefault(e.action, []).append(e)
    out = []
    for action, events in by_action.items():
        label, colour, marker = EVENT_STYLES.get(action, (action.replace("_", " "), "#455a64", None))
        label = f"{label} ({len(events)})"
        steps = [e.step for e in events]
        if marker is None:
            out.append(Series(label, x=steps, kind="marks", color=colour, alpha=0.6))
            continue
        logged = _at(log, "grad_norm", steps)
        # A clip event may carry the norm it measured before clipping; that is where the spike shows.
        values = [number(e.extra.get("norm", v)) for e, v in zip(events, logged, strict=True)]
        out.append(Series(label, _on_curve(values, top), x=steps, kind="scatter", marker=marker, color=colour))
    return out


def _finding_series(marks: Sequence[_Mark], labelled: bool) -> list[Series]:
    out = []
    for severity, colour in SEVERITY_COLOURS.items():
        chosen = [m for m in marks if m.finding.severity == severity]
        if chosen:
            out.append(Series(f"{severity} finding" if labelled else "", x=[m.finding.step for m in chosen],
                              kind="marks", color=colour, ticks=[m.label for m in chosen] if labelled else None))
    return out


def _curve_panel(runs: Sequence[tuple[str, WatchLog]], key: str, label: str, xlim: list[float],
                 extra: list[Series]) -> Panel | None:
    series, finite_all = [], []
    for name, log in runs:
        t = log.track(key)
        steps = [int(s) for s in log.steps[t.logged]]
        values = [float(v) for v in t.values[t.logged]]
        finite_all += [v for v in values if math.isfinite(v)]
        series.append(Series(f"{label} {name}".strip(), values, x=steps))
    if not finite_all:
        return None
    positive = [v for v in finite_all if v > 0]
    log_scale = len(positive) == len(finite_all)
    top = max(positive) if positive else max(finite_all)
    for name, log in runs:
        t = log.track(key)
        bad = [int(s) for s, v, lg in zip(log.steps, t.values, t.logged, strict=True) if lg and not math.isfinite(v)]
        if bad:
            series.append(Series(f"non-finite {label} {name}".strip(), [top] * len(bad), x=bad, kind="scatter",
                                 marker="x", color="red"))
    return Panel(f"{label} per step", "training step", label, series + extra,
                 yscale="log" if log_scale else "linear", xlim=xlim, legend_outside=True)


def _timeline(runs: Sequence[tuple[str, WatchLog, list[_Mark]]], name: str) -> Figure | None:
    xlim = _span([log for _, log, _ in runs])
    pairs = [(n, log) for n, log, _ in runs]
    marks = [m for _, _, ms in runs for m in ms]
    norm_top = max([v for _, log in pairs for v in log.track("grad_norm").values if math.isfinite(v) and v > 0],
                   default=1.0)
    events = [s for _, log in pairs for s in _event_series(log, norm_top)] if len(runs) == 1 else []
    panels = [p for p in (_curve_panel(pairs, "loss", "loss", xlim, []),
                          _curve_panel(pairs, "grad_norm", "global gradient L2 norm ‖g‖", xlim, events))
              if p is not None]
    if not panels:
        return None
    # The findings' lines on every panel, numbered on the top one.
    panels = [replace(p, series=p.series + _finding_series(marks, labelled=i == 0)) for i, p in enumerate(panels)]
    return Figure(name, "The run: loss and global gradient norm", panels, ncols=1, panel_size=[WIDTH, 3.0])


def _grid_height(grid: Grid | None) -> float:
    rows = len(grid.z) if grid is not None else 4
    return max(2.4, 1.1 + 0.15 * rows)


def _heat_panel(grid: Grid | None, title: str, cmap: str, zlabel: str, vrange: tuple[float, float] | None,
                xlim: list[float]) -> Panel:
    if grid is None:
        return Panel(f"{title}: not logged", "training step", "", [], legend=False, xlim=xlim)
    series = [grid.series(cmap=cmap, zlabel=zlabel, vmin=vrange[0] if vrange else None,
                          vmax=vrange[1] if vrange else None)]
    rows = grid.row if grid.row in ("tensor", "module") else f"blocks of {grid.row}"
    return Panel(title, "training step", f"{rows}, input → output", series, legend=False, xlim=xlim)


def _shared_range(grids: Sequence[Grid | None]) -> tuple[float, float] | None:
    ranges = [r for g in grids if g is not None and (r := g.finite_range()) is not None]
    return (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None


def _heatmaps(runs: Sequence[tuple[str, WatchLog]], prefix: str = "") -> list[tuple[Figure, str]]:
    """The layer × step heatmaps, one figure each; with two runs, a panel per run on one colour scale."""
    xlim = _span([log for _, log in runs])
    single = len(runs) == 1
    size = [WIDTH, 0.0] if single else [WIDTH * 0.68, 0.0]
    out: list[tuple[Figure, str]] = []

    def add(name: str, title: str, grids: list[Grid | None], cmap: str, zlabel: str, caption: str,
            vrange: tuple[float, float] | None) -> None:
        if all(g is None for g in grids):
            return
        # One run: the figure's title says it all; two: each panel names its run.
        panels = [_heat_panel(g, "" if single else run, cmap, zlabel, vrange, xlim)
                  for g, (run, _) in zip(grids, runs, strict=True)]
        height = max(_grid_height(g) for g in grids)
        out.append((Figure(prefix + name, title, panels, ncols=len(panels), panel_size=[size[0], height]),
                    caption))

    # Two runs share one colour scale, so both show the RMS only when both logged their element counts.
    per_element = all(len(log.numel) == len(log.params) for _, log in runs)
    grads = [gradient_grid(log, per_element=per_element) for _, log in runs]
    rms = all(g is not None and g[1] for g in grads)
    grad_grids = [g[0] if g is not None else None for g in grads]
    what = "per-element RMS ‖g‖/√numel" if rms else "tensor norm ‖g‖ (element counts not logged)"
    title = "Gradient flow: log10 " + ("gradient RMS per element" if rms else "gradient norm") + " per tensor"
    add("grad_flow", title, grad_grids, "viridis", "log10 ‖g‖/√numel" if rms else "log10 ‖g‖",
        "Each row is a parameter tensor (past 60 tensors: a module or a block of modules) in the order of the "
        f"model's parameters (input at the top), each column a span of steps; the colour is log10 of the {what}, "
        "averaged over the span (a geometric mean). A "
        "gradient that is many decades darker at the top than at the bottom is vanishing (Hochreiter 1991; "
        "Glorot & Bengio 2010); a band that brightens over the steps is exploding (Pascanu et al. 2013). "
        "Grouped rows (more than 60 tensors) show whole modules, labelled with their tensor index range; a "
        "grouped cell is the RMS over the group's tensors.", _shared_range(grad_grids))
    ratio_grids = [update_ratio_grid(log) for _, log in runs]
    add("update_ratio", "Update / weight ratio per tensor, log10", ratio_grids, "plasma",
        "log10 ‖Δw‖ / ‖w‖",
        f"log10 of ‖Δw‖/‖w‖ per step on the steps that logged it; about {UPDATE_RATIO_REFERENCE:g} (−3) is the "
        "usual rule of thumb (Karpathy, CS231n notes): far above means steps too large for the weights, far "
        "below a learning rate too small or a stalled layer. Black cells: the update was exactly zero.",
        _shared_range(ratio_grids))
    inactive = [inactive_grid(log) for _, log in runs]
    omitted = sum(g[1] for g in inactive if g is not None)
    left_out = f" {omitted} module(s) whose share stayed 0 are not drawn." if omitted else ""
    add("units", "Zero or saturated outputs per module", [g[0] if g is not None else None for g in inactive],
        "YlOrRd", "share of outputs", "Per module, the share of its outputs that are exactly zero (dead ReLU "
        "units output nothing; Lu et al. 2019) or in the flat region of tanh/sigmoid, where the local gradient "
        f"vanishes (Glorot & Bengio 2010), on the steps whose activations were sampled.{left_out}", (0.0, 1.0))
    return out


def _depth_figure(log: WatchLog) -> Figure | None:
    panels = []
    ticks = f"parameter (0 = {log.params[0]}, {len(log.params) - 1} = {log.params[-1]})" if log.params else ""
    for key, title, ylabel in (("grad_norm", "gradient norm per parameter tensor", "‖∂L/∂w‖"),
                               ("update_ratio", "update / weight ratio per step", "‖Δw‖ / ‖w‖")):
        tracks = [log.track(f"{key}/{p}") for p in log.params]
        if not tracks:
            continue
        any_logged = np.logical_or.reduce([t.logged for t in tracks])
        series = [Series(f"step {log.steps[i]}", [float(t.values[i]) if t.logged[i] else math.nan for t in tracks],
                         x=list(range(len(tracks))), marker="o" if len(tracks) <= 60 else None)
                  for i in profile_picks(any_logged)]
        if not series:
            continue
        if key == "update_ratio":
            series.append(Series(f"{UPDATE_RATIO_REFERENCE:g} (rule of thumb)", [UPDATE_RATIO_REFERENCE], kind="hline"))
        panels.append(Panel(title, ticks, ylabel, series, yscale="log"))
    if not panels:
        return None
    return Figure("depth", "Along the depth, at a few logged steps", panels)


def _time_figure(log: WatchLog) -> Figure | None:
    panels = []
    for module, profiles in list(log.time_grad.items())[:MAX_TIME_MODULES]:
        picks = profile_picks(np.ones(len(profiles), dtype=bool))
        series = [Series(f"step {profiles[i][0]}", profiles[i][1], x=list(range(len(profiles[i][1]))))
                  for i in picks]
        panels.append(Panel(f"{module}: gradient per time step", "time step t", "‖∂L/∂h_t‖", series, yscale="log"))
    if not panels:
        return None
    return Figure("time_grad", "Recurrent modules: gradient reaching each time step", panels)


def watch_figures(log: WatchLog) -> list[tuple[Figure, str]]:
    """Every figure of a one-run report, with its caption, in page order."""
    out: list[tuple[Figure, str]] = []
    timeline = _timeline([("", log, _marks(log))], "timeline")
    if timeline is not None:
        out.append((timeline, "Log scales where every value is positive. Numbered dotted lines are the findings "
                    "(the numbers below the figure link to their text); red crosses mark non-finite values; "
                    "markers on the gradient-norm panel are the Guard's interventions."))
    out.extend(_heatmaps([("", log)]))
    time_fig = _time_figure(log)
    if time_fig is not None:
        out.append((time_fig, "‖∂L/∂h_t‖ of each recurrent module's output at time step t, at a few logged steps: "
                    "a gradient that falls by decades towards t = 0 no longer reaches early inputs (vanishing "
                    "through time; Bengio et al. 1994); one that grows towards t = 0 explodes (Pascanu et al. "
                    "2013)."))
    depth = _depth_figure(log)
    if depth is not None:
        out.append((depth, "A gradient that falls by decades from the last tensor to the first is vanishing; "
                    "update ratios far above 1e-3 mean steps too large for the weights, far below it a learning "
                    "rate too small or a stalled layer. Exact zeros have no place on a log scale and are not "
                    "drawn."))
    return out


def _rail(frame: AxesFrame, marks: Sequence[_Mark]) -> str:
    """Links under the figure, each below its finding's line: ``left`` as a share of the image's width."""
    if not marks:
        return ""
    placed: list[tuple[float, int, _Mark]] = []
    line_ends: list[float] = []
    for m in sorted(marks, key=lambda m: m.finding.step):
        share = (m.finding.step - frame.x0) / (frame.x1 - frame.x0) if frame.x1 > frame.x0 else 0.0
        left = frame.left + min(max(share, 0.0), 1.0) * (frame.right - frame.left)
        line = next((i for i, end in enumerate(line_ends) if end + RAIL_GAP <= left), len(line_ends))
        if line == len(line_ends):
            line_ends.append(left)
        line_ends[line] = left
        placed.append((left, line, m))
    links = "".join(
        f"<a id='{m.mark_id}' class='{escape(m.finding.severity)}' href='#{m.row_id}' "
        f"style='left:{100 * left:.2f}%;top:{1.35 * line:.2f}rem' "
        f"title='{escape(m.finding.kind)} {escape(m.finding.module or '(model)')} at step {m.finding.step}'>"
        f"{escape(m.label)}</a>"
        for left, line, m in placed
    )
    return f"<div class='rail' style='height:{1.35 * len(line_ends) + 0.2:.2f}rem'>{links}</div>"


def _figure_html(rendered: Rendered, title: str, caption: str, rail: str = "") -> str:
    data = base64.b64encode(rendered.png).decode("ascii")
    return (f"<figure class='plot'><div class='frame'><img alt='{escape(title)}' src='data:image/png;base64,{data}'>"
            f"{rail}</div><figcaption>{escape(caption)}</figcaption></figure>")


def _status(log: WatchLog) -> str:
    """The closing state of the run: a banner when the report is partial."""
    last = f"step {int(log.steps[-1])}" if len(log.steps) else "the start (no step was logged)"
    end = log.end
    if end is None:
        return ("<div class='banner unclosed'><strong>Partial run: no closing record.</strong> "
                "<code>gradguard run</code> writes one when the program ends, so this process was killed before "
                "it could (SIGKILL, out of memory, the machine stopped) or is still running. What was logged up to "
                f"{escape(last)} is shown. A log that <code>gg.watch(model, log_dir=...)</code> writes from your "
                "own loop has no closing record either.</div>")
    code = f", exit code {end.exit_code}" if end.exit_code is not None else ""
    reason = f": {end.reason}" if end.reason else ""
    if end.status == "complete":
        return f"<p class='status'>Run complete{escape(code)}.</p>"
    what = {"interrupted": "was interrupted", "error": "ended with an error"}.get(end.status, f"ended ({end.status})")
    return (f"<div class='banner'><strong>Partial run: the program {what}{escape(reason)}{escape(code)}.</strong> "
            f"What was logged up to {escape(last)} is shown.</div>")


def _meta(log: WatchLog) -> str:
    n = len(log.steps)
    span = f"{n} logged steps ({int(log.steps[0])}–{int(log.steps[-1])})" if n else "no logged step"
    meta = (f"{span}, {len(log.params)} parameter tensors, last loss {format_value(log.last('loss'))}, "
            f"last global gradient norm {format_value(log.last('grad_norm'))}")
    if log.skipped_lines:
        meta += f"; {log.skipped_lines} incomplete line(s) skipped"
    return f"<p class='meta'>{escape(meta)}</p>"


def _findings_table(marks: Sequence[_Mark]) -> str:
    if not marks:
        return "<p>No findings.</p>"
    rows = "".join(
        f"<tr id='{m.row_id}' class='{escape(m.finding.severity)}'>"
        f"<td><a href='#{m.mark_id}'>{escape(m.label)}</a></td>"
        f"<td><span class='sev {escape(m.finding.severity)}'>{escape(m.finding.severity)}</span></td>"
        f"<td>{escape(m.finding.kind)}</td><td><code>{escape(m.finding.module or '(model)')}</code></td>"
        f"<td class='num'>{m.finding.step}</td><td>{escape(m.finding.message)}</td>"
        f"<td>{escape(m.finding.advice)}</td></tr>"
        for m in marks
    )
    head = "<tr><th>#</th><th>severity</th><th>kind</th><th>module</th><th>step</th><th>what</th><th>remedy</th></tr>"
    return f"<table>{head}{rows}</table>"


def _events_table(events: Sequence[Event]) -> str:
    if not events:
        return ""
    by_action: dict[str, list[Event]] = {}
    for e in events:
        by_action.setdefault(e.action, []).append(e)
    rows = []
    for action, group in by_action.items():
        reasons = Counter(e.reason for e in group if e.reason).most_common(3)
        text = "; ".join(f"{r} (×{c})" for r, c in reasons)
        rows.append(f"<tr><td>{escape(action)}</td><td class='num'>{len(group)}</td>"
                    f"<td class='num'>{group[0].step}–{group[-1].step}</td><td>{escape(text)}</td></tr>")
    head = "<tr><th>action</th><th>steps</th><th>first–last</th><th>most common reasons</th></tr>"
    return f"<h2>Interventions</h2><table>{head}{''.join(rows)}</table>"


def render_watch_report(folder: Path) -> Path:
    """Write ``folder/report.html`` and its figures (``folder/<figure>.png``) from ``folder/metrics.jsonl``;
    returns the page's path.

    The page shows the run's closing state (a banner when it is partial: interrupted, ended with an error, or
    without a closing record), the loss and global gradient norm over the steps with every finding numbered on
    the timeline and linked to its row in the findings table, the Guard's interventions, layer × step
    heatmaps of log10 gradient per tensor, of log10 update/weight ratio and of the share of zero or saturated
    outputs, the gradient per time step of recurrent modules when logged, and profiles along the depth.
    """
    log = load_watch_log(folder)
    marks = _marks(log)
    parts = [f"<h1>Run report: {escape(folder.resolve().name)}</h1>", _status(log), _meta(log)]
    timeline: list[str] = []
    figures: list[str] = []
    for figure, caption in watch_figures(log):
        rendered = render(figure)
        write_bytes_atomic(folder / f"{figure.name}.png", rendered.png)
        if figure.name == "timeline":
            timeline.append(_figure_html(rendered, figure.title, caption, _rail(rendered.frames[-1], marks)))
        else:
            figures.append(_figure_html(rendered, figure.title, caption))
    body = [*timeline, "<h2>Findings</h2>", _findings_table(marks), _events_table(log.events),
            "<h2>Figures</h2>", *figures]
    path = folder / REPORT
    text = page(f"gradguard: {folder.resolve().name}", "\n".join(parts + body), css=_CSS)
    write_bytes_atomic(path, text.encode("utf-8"))
    return path


def compare_path(a: Path, b: Path) -> Path:
    """Where :func:`render_compare_report` writes: ``a/compare-<name of b>.html`` (the name reduced to letters,
    digits, ``_``, ``-`` and ``.``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", b.resolve().name).lstrip(".") or "run"
    return a / f"compare-{name}.html"


def _summary_table(runs: Sequence[tuple[str, WatchLog]]) -> str:
    def cells(fn: object) -> str:
        return "".join(f"<td class='num'>{escape(str(fn(log)))}</td>" for _, log in runs)  # type: ignore[operator]

    def status(log: WatchLog) -> str:
        if log.end is None:
            return "partial: no closing record"
        code = f" (exit {log.end.exit_code})" if log.end.exit_code is not None else ""
        return f"{log.end.status}{code}"

    def findings(log: WatchLog) -> str:
        counts = Counter(f.severity for f in log.findings)
        return ", ".join(f"{counts[s]} {s}" for s in ("error", "warning", "info") if counts[s]) or "none"

    def events(log: WatchLog) -> str:
        counts = Counter(e.action for e in log.events)
        return ", ".join(f"{c} {a}" for a, c in counts.items()) or "none"

    rows = [("status", status), ("logged steps", lambda g: len(g.steps)),
            ("last step", lambda g: int(g.steps[-1]) if len(g.steps) else "–"),
            ("parameter tensors", lambda g: len(g.params)), ("last loss", lambda g: format_value(g.last("loss"))),
            ("last global gradient norm", lambda g: format_value(g.last("grad_norm"))),
            ("findings", findings), ("interventions", events)]
    head = "<tr><th></th>" + "".join(f"<th>{escape(name)}</th>" for name, _ in runs) + "</tr>"
    body = "".join(f"<tr><th>{escape(label)}</th>{cells(fn)}</tr>" for label, fn in rows)
    return f"<table>{head}{body}</table>"


def render_compare_report(a: Path, b: Path) -> Path:
    """Write two runs side by side, ``a`` against ``b`` (e.g. healthy and sick, before and after a remedy),
    to :func:`compare_path` ``(a, b)`` with its figures as ``compare-<b>-<figure>.png`` beside it; returns the
    page's path.

    The page holds the runs' closing states and a summary table, both runs' loss and global gradient norm on
    one timeline with every finding marked (A1, A2, ... and B1, ...) and linked to its row, the heatmaps of
    both runs side by side on one colour scale, and both findings tables.
    """
    for folder in (a, b):
        if not is_watch_folder(folder):
            raise ConfigError(f"{str(folder)!r} holds no run log ({WATCH_LOG}); compare needs two run folders")
    la, lb = load_watch_log(a), load_watch_log(b)
    na, nb = f"A: {a.resolve().name}", f"B: {b.resolve().name}"
    path = compare_path(a, b)
    stem = path.stem
    ma, mb = _marks(la, "a-", "A"), _marks(lb, "b-", "B")
    parts = [f"<h1>Two runs: {escape(na)} against {escape(nb)}</h1>", _summary_table([(na, la), (nb, lb)]),
             "<div class='pair'>",
             f"<div><h2>{escape(na)}</h2>{_status(la)}{_meta(la)}</div>",
             f"<div><h2>{escape(nb)}</h2>{_status(lb)}{_meta(lb)}</div></div>"]
    timeline = _timeline([(na, la, ma), (nb, lb, mb)], f"{stem}-timeline")
    if timeline is not None:
        rendered = render(timeline)
        write_bytes_atomic(a / f"{timeline.name}.png", rendered.png)
        parts.append(_figure_html(rendered, timeline.title, "Both runs on one set of axes; numbered dotted lines "
                                  "are the findings of run A (A1, ...) and run B (B1, ...), linked below.",
                                  _rail(rendered.frames[-1], ma + mb)))
    parts.append("<div class='pair'>"
                 f"<div><h2>Findings of {escape(na)}</h2>{_findings_table(ma)}{_events_table(la.events)}</div>"
                 f"<div><h2>Findings of {escape(nb)}</h2>{_findings_table(mb)}{_events_table(lb.events)}</div>"
                 "</div>")
    for figure, caption in _heatmaps([(na, la), (nb, lb)], prefix=f"{stem}-"):
        rendered = render(figure)
        write_bytes_atomic(a / f"{figure.name}.png", rendered.png)
        parts.append(_figure_html(rendered, figure.title, caption + " Both panels share one colour scale."))
    text = page(f"gradguard: {na} against {nb}", "\n".join(parts), css=_CSS, body_class="wide")
    write_bytes_atomic(path, text.encode("utf-8"))
    return path
