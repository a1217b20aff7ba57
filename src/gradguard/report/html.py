"""Self-contained HTML reports: figures embedded as base64 PNG, inline CSS, no scripts, no network.

Every string that comes from results or configuration passes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import json
import math
from html import escape
from typing import Any

from gradguard.report.files import REPORT, ExperimentResults

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.meta { color: #666; font-size: .9rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92rem; }
th, td { border: 1px solid #ddd; padding: .3rem .55rem; text-align: left; vertical-align: top; }
th { background: #f4f4f6; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.ok { color: #137333; font-weight: 600; white-space: nowrap; }
.bad { color: #b3261e; font-weight: 600; white-space: nowrap; }
td a { white-space: nowrap; }
figure { margin: 1.2rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: .9rem; max-width: 60rem; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .82rem; }
.summary { font-size: 1.02rem; max-width: 60rem; }
.error { color: #b3261e; } .warning { color: #a05a00; } .info { color: #555; }
"""


def format_value(value: Any) -> str:
    """A short human form of a measured or expected value (4 significant digits for floats)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def page(title: str, body: str, *, css: str = "", body_class: str = "") -> str:
    """A complete self-contained page: the shared stylesheet (plus ``css``) inline, no scripts, no network fetch."""
    klass = f' class="{escape(body_class)}"' if body_class else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
        # An empty data: favicon stops the browser from requesting /favicon.ico (a network fetch).
        "<link rel=\"icon\" href=\"data:,\">"
        f"<style>{_CSS}{css}</style></head><body{klass}>\n{body}\n</body></html>\n"
    )


def _mark(holds: bool) -> str:
    return '<span class="ok">✓ holds</span>' if holds else '<span class="bad">✗ fails</span>'


def claims_table(claims: list[tuple[str | None, dict[str, Any]]]) -> str:
    """The ✓/✗ claims table of ``(experiment folder or None, claim)`` pairs; a named folder gets a linked
    first column (the index page), ``None`` leaves it out (an experiment's own page)."""
    linked = any(folder is not None for folder, _ in claims)
    head = "<tr>" + ("<th>experiment</th>" if linked else "")
    head += "<th>claim</th><th>statement</th><th>measured</th><th>expected</th><th>verdict</th></tr>"
    rows = []
    for folder, c in claims:
        first = f'<td><a href="{escape(folder)}/{REPORT}">{escape(folder)}</a></td>' if folder is not None else ""
        rows.append(
            f"<tr>{first}<td>{escape(str(c['id']))}</td><td>{escape(str(c['statement']))}</td>"
            f"<td class=\"num\">{escape(format_value(c['measured']))}</td>"
            f"<td class=\"num\">{escape(str(c['expected']))}</td><td>{_mark(bool(c['holds']))}</td></tr>"
        )
    return "<table>" + head + "".join(rows) + "</table>"


def _scalars(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_scalars(value, name + "."))
        elif isinstance(value, bool | int | float | str) or (
            isinstance(value, list) and len(value) <= 12 and all(not isinstance(v, list | dict) for v in value)
        ):
            out.append((name, value))
    return out


def render_experiment(results: ExperimentResults, images: dict[str, bytes]) -> str:
    """The experiment's report page; ``images`` maps figure names to PNG bytes (embedded inline)."""
    m = results.metrics
    n_hold = sum(bool(c["holds"]) for c in results.claims)
    references = ", ".join(str(s) for s in m.get("references", []))
    mode = "quick" if m.get("quick") else "full"
    parts = [
        f"<h1>{escape(str(m.get('title', results.id)))}</h1>",
        f'<p class="meta">experiment <code>{escape(results.id)}</code> · {escape(references)} · '
        f"{escape(mode)} mode · seed {escape(str(m.get('seed')))} · "
        f"{escape(format_value(m.get('elapsed_s', float('nan'))))} s · "
        f"{n_hold}/{len(results.claims)} claims hold</p>",
        f'<p class="summary">{escape(str(m.get("summary", "")))}</p>',
        "<h2>Claims</h2>",
        claims_table([(None, c) for c in results.claims]),
        "<h2>Figures</h2>",
    ]
    for spec in results.figures:
        name = str(spec["name"])
        png = images.get(name, b"")
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img alt="{escape(str(spec.get("title", name)))}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(str(spec.get('caption', '')))}</figcaption></figure>"
        )
    rows = "".join(
        f'<tr><td>{escape(k)}</td><td class="num">{escape(format_value(v))}</td></tr>'
        for k, v in _scalars(m.get("metrics", {}))
    )
    parts += ["<h2>Measurements</h2>", f"<table><tr><th>name</th><th>value</th></tr>{rows}</table>"]
    config = json.dumps(results.config, indent=1, ensure_ascii=False)
    parts += ["<h2>Configuration</h2>", f"<pre>{escape(config)}</pre>"]
    return page(f"gradguard lab: {m.get('title', results.id)}", "\n".join(parts))


def render_index(runs: list[ExperimentResults]) -> str:
    """The index page of a run: one row per experiment linking its report, then every claim."""
    total = sum(len(r.claims) for r in runs)
    held = sum(bool(c["holds"]) for r in runs for c in r.claims)
    rows = "".join(
        f'<tr><td><a href="{escape(r.folder.name)}/{REPORT}">{escape(r.id)}</a></td>'
        f"<td>{escape(str(r.metrics.get('title', '')))}</td>"
        f"<td>{escape(', '.join(str(s) for s in r.metrics.get('references', [])))}</td>"
        f"<td class=\"num\">{sum(bool(c['holds']) for c in r.claims)}/{len(r.claims)}</td>"
        f"<td>{_mark(r.all_hold)}</td></tr>"
        for r in runs
    )
    parts = [
        "<h1>gradguard lab</h1>",
        f'<p class="meta">{len(runs)} experiments · {held}/{total} claims hold</p>',
        '<p class="summary">Each experiment reproduces a demonstration about vanishing and exploding gradients, '
        "measures it, and checks its claims. Follow a link for the figures and the explanation.</p>",
        "<h2>Experiments</h2>",
        "<table><tr><th>experiment</th><th>title</th><th>references</th><th>claims</th><th>verdict</th></tr>"
        f"{rows}</table>",
        "<h2>All claims</h2>",
    ]
    parts.append(claims_table([(r.folder.name, c) for r in runs for c in r.claims]))
    return page("gradguard lab", "\n".join(parts))
