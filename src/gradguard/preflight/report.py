"""The probe's report: :class:`ProbeReport`, and its Markdown tables and self-contained HTML page.

Rendering only: every number shown was measured by :mod:`gradguard.preflight.measure` and judged by
:mod:`gradguard.preflight.verdict`. Plots are drawn with matplotlib's Agg backend into PNG bytes embedded as
``data:`` URIs, so the page needs no other file and no network. Every string that comes from the user's
model (module names, messages quoting them) is escaped with ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradguard.errors import ConfigError
from gradguard.findings import Finding
from gradguard.preflight.rows import LayerRow, RecurrentProfile, TimeProfile
from gradguard.report.files import write_bytes_atomic
from gradguard.report.html import page


@dataclass
class ProbeReport:
    """Everything one :func:`gradguard.probe` call measured, and the verdict.

    Attributes:
        layers: :class:`~gradguard.preflight.rows.LayerRow` per module call, in execution order.
        findings: :class:`gradguard.Finding` list, worst first (``step`` is 0).
        recurrent: :class:`~gradguard.preflight.rows.RecurrentProfile` per recurrent module call.
        time: :class:`~gradguard.preflight.rows.TimeProfile` of the model input when ``time_dim`` was
            given, else None.
        loss: the probe loss value.
        loss_kind: one of :data:`gradguard.preflight.loss.LOSS_KINDS`.
        options: the resolved options of the call (seed, train, time_dim, ...).
    """

    layers: list[LayerRow]
    findings: list[Finding]
    recurrent: list[RecurrentProfile] = field(default_factory=list)
    time: TimeProfile | None = None
    loss: float = float("nan")
    loss_kind: str = "projection"
    options: dict[str, Any] = field(default_factory=dict)

    def layer(self, name: str, call: int = 1) -> LayerRow:
        """The row of module ``name`` (its ``call``-th call)."""
        for row in self.layers:
            if row.name == name and row.call == call:
                return row
        raise ConfigError(f"no probed module named {name!r} (call {call}); have {[r.label for r in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (NaN stays NaN; use ``json.dumps(..., allow_nan=True)``)."""
        return {
            "layers": [asdict(r) for r in self.layers],
            "findings": [f.to_dict() for f in self.findings],
            "recurrent": [asdict(r) for r in self.recurrent],
            "time": None if self.time is None else asdict(self.time),
            "loss": self.loss,
            "loss_kind": self.loss_kind,
            "options": dict(self.options),
        }

    def to_markdown(self) -> str:
        """Per-layer table, recurrent profiles and findings as GitHub-flavoured Markdown."""
        return report_markdown(self)

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML report (plots embedded as PNG) to ``path``; returns the path."""
        return write_html(self, Path(path))


_COLUMNS = ("#", "module", "type", "mean", "std", "std gain", "zero", "sat", "dead", "nonfinite",
            "‖∂L/∂y‖ rms", "grad gain", "‖W‖", "‖∂L/∂W‖")


def _g(x: float | None) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and math.isnan(x):
        return "–"
    return f"{x:.3g}"


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.0%}"


def layer_cells(report: ProbeReport) -> list[list[str]]:
    """One list of display strings per layer row, in :data:`_COLUMNS` order."""
    return [
        [str(r.index), r.label, r.type, _g(r.mean), _g(r.std), _g(r.std_gain), _pct(r.frac_zero),
         _pct(r.frac_saturated) if r.saturation else "–", _pct(r.dead_frac), _g(r.nonfinite), _g(r.grad_rms),
         _g(r.grad_gain), _g(r.param_norm), _g(r.param_grad_norm)]
        for r in report.layers
    ]


_REC_COLUMNS = ("module", "cell", "steps", "growth/step", "horizon", "ρ(W_hh)", "ρ·mean f'", "gate mean", "note")


def time_lines(report: ProbeReport) -> list[str]:
    """The input-gradient-through-time summary as short sentences (empty without ``time_dim``)."""
    t = report.time
    if t is None:
        return []
    reach = "reaches the first step" if t.reaches_start else f"{t.horizon:.1f} steps back"
    return [f"steps: {len(t.norms)} (time_dim {t.time_dim}); peak at step {t.peak_step}",
            f"per-step growth factor: {_g(t.growth)}; horizon (1e-3 of peak): {reach}"]


def recurrent_cells(report: ProbeReport) -> list[list[str]]:
    """One list of display strings per unrolled recurrent module, in :data:`_REC_COLUMNS` order."""
    rows = []
    for p in report.recurrent:
        horizon = "–" if math.isnan(p.horizon) else (f"≥ {p.horizon:.0f} (all)" if p.reaches_start
                                                      else f"{p.horizon:.1f}")
        gate = f"{p.gate_name}: " + ", ".join(_g(v) for v in p.gate_mean) if p.gate_name else "–"
        rho = ", ".join(_g(v) for v in p.spectral_radius) or "–"
        srho = ", ".join(_g(v) for v in p.scaled_radius) or "–"
        rows.append([p.module or "(model)", f"{p.cell} ({p.nonlinearity})", str(p.steps), _g(p.growth), horizon,
                     rho, srho, gate, p.note])
    return rows


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def report_markdown(report: ProbeReport) -> str:
    """Per-layer table, time/recurrent profiles and findings as Markdown."""
    lines = [f"# Probe report (loss: {report.loss_kind} = {_g(report.loss)})", "", "## Layers (execution order)", ""]
    lines.append("| " + " | ".join(_COLUMNS) + " |")
    lines.append("|" + "---|" * len(_COLUMNS))
    for cells in layer_cells(report):
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    if report.time is not None:
        lines += ["", "## Gradient through time at the input", ""] + [f"- {t}" for t in time_lines(report)]
    if report.recurrent:
        lines += ["", "## Recurrent modules (unrolled)", "", "| " + " | ".join(_REC_COLUMNS) + " |",
                  "|" + "---|" * len(_REC_COLUMNS)]
        for cells in recurrent_cells(report):
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    lines += ["", "## Findings", ""]
    if not report.findings:
        lines.append("No findings.")
    for f in report.findings:
        where = f"`{f.module}`" if f.module else "model"
        lines.append(f"- **{f.severity} · {f.kind}** at {_md_escape(where)}: {_md_escape(f.message)}  ")
        lines.append(f"  Remedy: {_md_escape(f.advice)}")
    return "\n".join(lines) + "\n"


def _png(fig: object) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")  # type: ignore[attr-defined]
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _positive(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def plots(report: ProbeReport) -> dict[str, str]:
    """Base64 PNGs: ``layers`` (forward std and backward gradient RMS per layer, log scale) and ``time``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    out: dict[str, str] = {}
    if report.layers:
        fig = Figure(figsize=(max(6.0, 0.35 * len(report.layers)), 3.6))
        ax = fig.subplots()
        xs = list(range(len(report.layers)))
        ax.plot(xs, _positive([r.std for r in report.layers]), "o-", label="forward std of output")
        ax.plot(xs, _positive([r.grad_rms for r in report.layers]), "s-", label="backward ‖∂L/∂y‖ rms")
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([r.label for r in report.layers], rotation=60, fontsize=7)
        ax.set_xlabel("module (execution order)")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        out["layers"] = _png(fig)
    series: list[tuple[str, list[float]]] = []
    if report.time is not None:
        series.append(("‖∂L/∂x_t‖ at the input", report.time.norms))
    for p in report.recurrent:
        if p.last_norms:
            series.append((f"{p.module or '(model)'}: last step's gradient at h_t", p.last_norms))
            for k, hn in enumerate(p.hidden_norms):
                series.append((f"{p.module or '(model)'}: ‖∂L/∂h_t‖ layer {k}", hn))
    if series:
        fig = Figure(figsize=(6.5, 3.6))
        ax = fig.subplots()
        for label, values in series:
            # The last-step profile often lies on top of ‖∂L/∂h_t‖ (many-to-one models): dash it.
            style = "--" if "last step" in label else "-"
            ax.plot(range(len(values)), _positive(list(values)), style, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("time step t")
        ax.set_ylabel("gradient norm")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        out["time"] = _png(fig)
    return out


def _table(columns: tuple[str, ...], rows: list[list[str]], text: set[int]) -> str:
    """An HTML table; the columns whose index is in ``text`` hold words, the others numbers."""
    e = html.escape
    out = ["<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>"]
    for cells in rows:
        out.append("<tr>" + "".join(f"<td>{e(c)}</td>" if i in text else f"<td class='num'>{e(c)}</td>"
                                    for i, c in enumerate(cells)) + "</tr>")
    return "".join(out) + "</table>"


def report_html(report: ProbeReport) -> str:
    """The whole report as one self-contained HTML page (the lab's stylesheet) with embedded PNG plots."""
    e = html.escape
    parts = ["<h1>Probe report</h1>",
             f"<p class='meta'>one forward and backward pass; loss: {e(report.loss_kind)} = {e(_g(report.loss))}</p>",
             "<h2>Findings</h2>"]
    if not report.findings:
        parts.append("<p>No findings.</p>")
    else:
        parts.append("<ul>")
        for f in report.findings:
            parts.append(f"<li class='{e(f.severity)}'><b>{e(f.severity)} · {e(f.kind)}</b> at "
                         f"<code>{e(f.module or '(model)')}</code>: {e(f.message)}<br>Remedy: {e(f.advice)}</li>")
        parts.append("</ul>")
    images = plots(report)
    parts.append("<h2>Layers (execution order)</h2>")
    if "layers" in images:
        parts.append(f"<figure><img alt='per-layer forward std and gradient norm' src='data:image/png;base64,"
                     f"{images['layers']}'></figure>")
    parts.append(_table(_COLUMNS, layer_cells(report), text={1, 2}))
    if "time" in images or report.time is not None or report.recurrent:
        parts.append("<h2>Gradient through time</h2>")
    if "time" in images:
        parts.append(f"<figure><img alt='gradient norm per time step' src='data:image/png;base64,{images['time']}'>"
                     "</figure>")
    if report.time is not None:
        parts.append("<h3>At the input</h3><ul>" + "".join(f"<li>{e(t)}</li>" for t in time_lines(report)) + "</ul>")
    if report.recurrent:
        parts.append("<h3>Recurrent modules (unrolled)</h3>")
        parts.append(_table(_REC_COLUMNS, recurrent_cells(report), text={0, 1, 7, 8}))
    return page("gradguard probe", "\n".join(parts))


def write_html(report: ProbeReport, path: Path) -> Path:
    """Write :func:`report_html` to ``path`` (parent folders are created; written to a temporary name and
    renamed, so a killed run never leaves a half-written page)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, report_html(report).encode("utf-8"))
    return path
