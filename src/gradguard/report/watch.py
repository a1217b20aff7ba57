"""The report of a watched training run: ``gg.watch(model, log_dir=D)`` appends ``D/metrics.jsonl``;
``gradguard report D`` draws it as ``D/report.html``.

Reads the monitor's log and draws it; computes no new statistics beyond picking which logged steps to show.
A run killed mid-write leaves at most one incomplete last line (see :class:`gradguard.sinks.jsonl.JsonlSink`):
it is skipped and counted, so the report of a dead run is still written.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from gradguard.errors import ConfigError
from gradguard.findings import SEVERITIES, Finding
from gradguard.report.figures import Figure, Panel, Series
from gradguard.report.files import REPORT, write_bytes_atomic
from gradguard.report.html import format_value, page
from gradguard.report.plots import render_png

#: The monitor's log file name inside ``log_dir``.
WATCH_LOG = "metrics.jsonl"
#: How many logged steps the per-layer profiles show (evenly spread over the run, first and last included).
PROFILE_STEPS = 5
#: An update/weight ratio near 1e-3 per step is the usual rule of thumb for a healthy learning rate
#: (Karpathy, CS231n notes); drawn as a reference line, not used as a verdict.
UPDATE_RATIO_REFERENCE = 1e-3


@dataclass(frozen=True)
class WatchLog:
    """What a monitor's ``metrics.jsonl`` holds.

    Attributes:
        steps: the logged step rows, in step order (``step``, ``loss``, ``grad_norm``, ``grad_norm/<param>``...).
        findings: the newest state of each finding (one per kind and module), worst first.
        params: parameter names in the order they were logged (``named_parameters()`` order).
        skipped_lines: lines that were not complete JSON objects (a run killed while writing its last line).
    """

    steps: list[dict[str, Any]]
    findings: list[Finding]
    params: list[str]
    skipped_lines: int


def is_watch_folder(folder: Path) -> bool:
    """True when ``folder`` holds a monitor log (``metrics.jsonl``)."""
    return (folder / WATCH_LOG).is_file()


def _number(value: Any) -> float:
    """A logged value as a float: non-finite values are logged as the strings "nan", "inf", "-inf"."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_watch_log(folder: Path) -> WatchLog:
    """Read ``folder/metrics.jsonl``; raises :class:`ConfigError` when it holds no monitor record at all."""
    path = folder / WATCH_LOG
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
    rows: dict[int, dict[str, Any]] = {}
    findings: dict[tuple[str, str], Finding] = {}
    skipped = 0
    for line in lines:
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            if obj.get("type") == "step":
                rows[int(obj["step"])] = obj
            elif obj.get("type") == "finding":
                f = Finding.from_dict(obj)
                findings[f.key] = f
            else:
                raise ValueError("not a monitor record")
        except (ValueError, KeyError, TypeError, ConfigError):
            skipped += 1
    if not rows and not findings:
        raise ConfigError(f"{path} holds no gradguard monitor record (lines of type 'step' or 'finding')")
    steps = [rows[s] for s in sorted(rows)]
    prefix = "grad_norm/"
    params = list(dict.fromkeys(k[len(prefix):] for row in steps for k in row if k.startswith(prefix)))
    ordered = sorted(findings.values(), key=lambda f: (-SEVERITIES.index(f.severity), f.step, f.module))
    return WatchLog(steps, ordered, params, skipped)


def _profile_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Up to :data:`PROFILE_STEPS` rows holding ``key/...`` values, evenly spread, first and last included."""
    having = [r for r in rows if any(k.startswith(key + "/") for k in r)]
    if len(having) <= PROFILE_STEPS:
        return having
    picks = {round(i * (len(having) - 1) / (PROFILE_STEPS - 1)) for i in range(PROFILE_STEPS)}
    return [having[i] for i in sorted(picks)]


def _depth_profile(log: WatchLog, key: str) -> list[Series]:
    return [
        Series(f"step {row['step']}", [_number(row.get(f"{key}/{p}")) for p in log.params],
               x=list(range(len(log.params))), marker="o")
        for row in _profile_rows(log.steps, key)
    ]


def watch_figures(log: WatchLog) -> list[Figure]:
    """The report's figures: the run over time, and per-parameter profiles along the depth."""
    steps = [int(r["step"]) for r in log.steps]
    loss = [_number(r.get("loss")) for r in log.steps]
    norm = [_number(r.get("grad_norm")) for r in log.steps]
    bad = [s for s, v in zip(steps, norm, strict=True) if not math.isfinite(v)]
    over_time: list[Panel] = []
    for values, label in ((loss, "loss"), (norm, "global gradient L2 norm ‖g‖")):
        if not any(math.isfinite(v) for v in values):
            continue
        series = [Series(label, values, x=steps)]
        finite = [v for v in values if math.isfinite(v) and v > 0]
        if bad and finite:
            series.append(Series("non-finite gradient", [max(finite)] * len(bad), x=bad, kind="scatter",
                                 marker="x", color="red"))
        over_time.append(Panel(f"{label} per step", "training step", label, series, yscale="log"))
    figures = []
    if over_time:
        figures.append(Figure("run", "The run: loss and gradient norm", over_time,
                              caption="Log scale; red crosses mark steps whose gradients held NaN or Inf."))
    depth: list[Panel] = []
    ticks = f"parameter (0 = {log.params[0]}, {len(log.params) - 1} = {log.params[-1]})" if log.params else ""
    grads = _depth_profile(log, "grad_norm")
    if grads:
        depth.append(Panel("gradient norm per parameter tensor", ticks, "‖∂L/∂w‖", grads, yscale="log"))
    ratios = _depth_profile(log, "update_ratio")
    if ratios:
        ratios.append(Series(f"{UPDATE_RATIO_REFERENCE:g} (rule of thumb)", [UPDATE_RATIO_REFERENCE], kind="hline"))
        depth.append(Panel("update / weight ratio per step", ticks, "‖Δw‖ / ‖w‖", ratios, yscale="log"))
    if depth:
        figures.append(Figure("depth", "Along the depth, at a few logged steps", depth,
                              caption="A gradient that falls by decades from the last tensor to the first is "
                                      "vanishing; update ratios far above 1e-3 mean steps too large for the "
                                      "weights, far below it a learning rate too small or a stalled layer. "
                                      "Exact zeros (an update lost below float32 resolution) have no place on "
                                      "a log scale and are not drawn."))
    return figures


def _findings_table(findings: list[Finding]) -> str:
    if not findings:
        return "<p>No findings.</p>"
    rows = "".join(
        f"<tr class='{escape(f.severity)}'><td>{escape(f.severity)}</td><td>{escape(f.kind)}</td>"
        f"<td><code>{escape(f.module or '(model)')}</code></td><td class='num'>{f.step}</td>"
        f"<td>{escape(f.message)}</td><td>{escape(f.advice)}</td></tr>"
        for f in findings
    )
    head = "<tr><th>severity</th><th>kind</th><th>module</th><th>step</th><th>what</th><th>remedy</th></tr>"
    return f"<table>{head}{rows}</table>"


def render_watch_report(folder: Path) -> Path:
    """Write ``folder/report.html`` (figures embedded) from the monitor log in ``folder``; returns its path."""
    log = load_watch_log(folder)
    last = log.steps[-1] if log.steps else {}
    meta = (f"{len(log.steps)} logged steps (last: {last.get('step', '–')}), {len(log.params)} parameter tensors, "
            f"last global gradient norm {format_value(_number(last.get('grad_norm')))}")
    if log.skipped_lines:
        meta += f"; {log.skipped_lines} incomplete line(s) skipped"
    parts = [f"<h1>Watched run: {escape(folder.name)}</h1>", f"<p class='meta'>{escape(meta)}</p>",
             "<h2>Findings</h2>", _findings_table(log.findings), "<h2>Figures</h2>"]
    for figure in watch_figures(log):
        data = base64.b64encode(render_png(figure)).decode("ascii")
        parts.append(f"<figure><img alt='{escape(figure.title)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{escape(figure.caption)}</figcaption></figure>")
    path = folder / REPORT
    write_bytes_atomic(path, page(f"gradguard: {folder.name}", "\n".join(parts)).encode("utf-8"))
    return path
