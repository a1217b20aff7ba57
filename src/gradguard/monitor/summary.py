"""The monitor's end-of-run summary: a dict of what ``Monitor.summary()`` measured, printed as a table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradguard.findings import Finding

#: Columns of the per-parameter table: (key in ``summary["parameters"][name]``, header, width).
COLUMNS = (
    ("grad_norm", "grad norm", 11),
    ("median_grad_norm", "median", 11),
    ("weight_norm", "weight norm", 11),
    ("update_ratio", "update ratio", 12),
)
NAME_WIDTH = 40


class MonitorSummary(dict[str, Any]):
    """``{"steps": int, "parameters": {name: {column: float}}, "findings": [Finding, ...]}``; ``str()`` is
    :func:`render_summary`, so ``print(mon.summary())`` shows the table and the findings."""

    def __init__(self, *, steps: int, parameters: Mapping[str, Mapping[str, float]], findings: Sequence[Finding]
                 ) -> None:
        super().__init__(steps=steps, parameters={k: dict(v) for k, v in parameters.items()},
                         findings=list(findings))

    def __str__(self) -> str:
        return render_summary(self)


def _num(x: float) -> str:
    return "-" if x != x else f"{x:.3g}"


def render_summary(summary: Mapping[str, Any]) -> str:
    """The text table of a :class:`MonitorSummary`: one line per parameter, then one entry per finding."""
    params: Mapping[str, Mapping[str, float]] = summary["parameters"]
    findings: Sequence[Finding] = summary["findings"]
    lines = [f"gradguard monitor: {summary['steps']} steps, {len(params)} parameter tensors"]
    header = f"{'parameter':{NAME_WIDTH}s} " + " ".join(f"{title:>{w}s}" for _, title, w in COLUMNS)
    lines += [header, "-" * len(header)]
    for name, values in params.items():
        cells = " ".join(f"{_num(values.get(key, float('nan'))):>{w}s}" for key, _, w in COLUMNS)
        lines.append(f"{name[:NAME_WIDTH]:{NAME_WIDTH}s} {cells}")
    lines.append("")
    if not findings:
        lines.append("No findings.")
    for f in findings:
        where = f"`{f.module}`" if f.module else "model"
        lines.append(f"[{f.severity}] {f.kind} at {where} (step {f.step}): {f.message}")
        lines.append(f"    advice: {f.advice}")
    return "\n".join(lines)


def parameter_table(names: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per parameter, over ``rows`` (the rules' window): the latest gradient norm, the median of the finite
    ones (the upper median), the latest weight norm and update ratio; NaN where never measured."""
    table: dict[str, dict[str, float]] = {}
    for name in names:
        fin = sorted(float(r[key]) for r in rows if _isfinite(r.get(key := f"grad_norm/{name}")))
        table[name] = {
            "grad_norm": _last(rows, f"grad_norm/{name}"),
            "median_grad_norm": fin[len(fin) // 2] if fin else math.nan,
            "weight_norm": _last(rows, f"weight_norm/{name}"),
            "update_ratio": _last(rows, f"update_ratio/{name}"),
        }
    return table


def _last(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    for r in reversed(rows):
        v = r.get(key)
        if v is not None:
            return float(v)
    return float("nan")


def _isfinite(x: Any) -> bool:
    return isinstance(x, float | int) and math.isfinite(x)
