"""Synthetic run logs in the format of :class:`gradguard.sinks.jsonl.JsonlSink` and ``gradguard run``, for
report tests whose models would be too large or too slow to train (200 layers, 20 000 steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gradguard.findings import Finding
from gradguard.report.runlog import WATCH_LOG


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if obj != obj else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def param_names(layers: int, bias: bool = True) -> list[str]:
    names = []
    for i in range(layers):
        names.append(f"blocks.{i}.weight")
        if bias:
            names.append(f"blocks.{i}.bias")
    return names


def synthetic_log(folder: Path, *, layers: int, steps: int, bias: bool = True, detail_every: int = 1,
                  sample_every: int = 10, numel: bool = False, findings: list[Finding] | None = None,
                  events: list[dict[str, Any]] | None = None, end: dict[str, Any] | None = None,
                  nan_at: int | None = None, time_grad: dict[str, int] | None = None, seed: int = 0) -> list[str]:
    """Write ``folder/metrics.jsonl`` for a ``layers``-deep net whose gradient falls by 10× every
    ``layers / 4`` layers towards the input (a vanishing profile) and slowly grows over the steps; per-tensor
    norms on every ``detail_every``-th step, update ratios and activation shares on every ``sample_every``-th.
    Returns the parameter names."""
    rng = np.random.default_rng(seed)
    names = param_names(layers, bias)
    depth = np.array([int(n.split(".")[1]) for n in names], dtype=float)
    scale = 10.0 ** (-4.0 * (layers - 1 - depth) / max(layers, 1))
    lines = []
    for s in range(steps):
        norms = scale * (1.0 + s / max(steps, 1)) * rng.lognormal(0.0, 0.2, len(names))
        row: dict[str, Any] = {"type": "step", "step": s, "loss": 2.0 / (1.0 + 0.01 * s),
                               "grad_norm": float(np.sqrt((norms ** 2).sum()))}
        if s == nan_at:
            row["loss"], row["grad_norm"] = math.nan, math.nan
        if s % detail_every == 0:
            for n, g in zip(names, norms, strict=True):
                row[f"grad_norm/{n}"] = math.nan if s == nan_at and n == names[-1] else float(g)
                if numel and s == 0:
                    row[f"numel/{n}"] = 64 * 64 if n.endswith("weight") else 64
        if s % sample_every == 0 and s > 0:
            for n in names:
                row[f"weight_norm/{n}"] = 8.0
                row[f"update_ratio/{n}"] = float(1e-3 * rng.lognormal(0.0, 0.3))
            for i in range(layers):
                row[f"act/blocks.{i}.act/frac_zero"] = min(1.0, 0.4 + 0.6 * s / steps * (i % 5 == 0))
                row[f"act/blocks.{i}.act/frac_saturated"] = 0.0
                row[f"act/blocks.{i}.act/numel"] = 2048.0
            for module, length in (time_grad or {}).items():
                row[f"time_grad/{module}"] = [float(0.8 ** (length - t) * (1 + s / steps)) for t in range(length)]
        lines.append(row)
    for f in findings or []:
        lines.append({"type": "finding", **f.to_dict()})
    for e in events or []:
        lines.append({"type": "event", **e})
    if end is not None:
        lines.append({"type": "run", **end})
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(_clean(obj), separators=(",", ":")) + "\n" for obj in lines)
    (folder / WATCH_LOG).write_text(text, encoding="utf-8")
    return names


def some_findings(steps: int, names: list[str], count: int = 6) -> list[Finding]:
    """``count`` findings of every severity, spread over the run (two close together) on various tensors."""
    kinds = ("vanishing", "exploding", "nonfinite", "dead_units", "saturation", "loss_spike")
    out = []
    for i in range(count):
        step = 1 if i == 1 else min(steps - 1, (i * steps) // count)
        out.append(Finding(kinds[i % len(kinds)], names[(i * 7) % len(names)], step,
                           ("info", "warning", "error")[i % 3], f"message {i} at step {step}", f"advice {i}", {}))
    return out
