"""Loss spikes: one step whose loss (or global gradient norm) leaps far out of its recent window.

Robust z-score against the previous :data:`WINDOW` steps (median/MAD, so earlier spikes do not inflate
the scale). Losses are positive and their mini-batch noise is multiplicative, so when the window and the
value are all > 0 the score is taken on log(loss); otherwise on the raw value. A spike needs both
z ≥ :data:`Z_MIN` and a factor ≥ :data:`FACTOR` over the median, so a quiet, nearly constant window does
not turn ordinary noise into findings. Non-finite values are left to the ``nonfinite`` rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gradguard.detect.base import Observation, finite, finite_values, fmt
from gradguard.findings import Finding
from gradguard.stats import robust_zscore

WINDOW = 50
MIN_WINDOW = 10
Z_MIN = 6.0
FACTOR = 10.0


def spike_factors(values: Sequence[float], window: Sequence[float]) -> list[float]:
    """Each value over the median of ``window`` (``inf`` when that median is ≤ 0)."""
    med = sorted(window)[len(window) // 2]
    return [x / med if med > 0 else math.inf for x in values]


def spike_scores(values: Sequence[float], window: Sequence[float]) -> tuple[list[float], list[float]]:
    """``(z, factor)`` of each value against ``window``; z on the log scale when everything is positive."""
    factors = spike_factors(values, window)
    if min(values) > 0 and min(window) > 0:
        values, window = [math.log(x) for x in values], [math.log(x) for x in window]
    z = robust_zscore(torch.tensor(values, dtype=torch.float64), torch.tensor(window, dtype=torch.float64))
    return z.tolist(), factors


def _scan(rows: Sequence[Mapping[str, Any]], new: int, key: str) -> tuple[int, float, float, float] | None:
    """The most extreme spike among the new rows against the window just before them: (step, value, z, factor).

    One robust z-score call per fetch: the new rows are scored against the :data:`WINDOW` rows preceding
    the block, so a spike inside the block cannot hide a second one.
    """
    start = len(rows) - new
    window = finite_values(rows[max(0, start - WINDOW) : start], key)
    if len(window) < MIN_WINDOW:
        return None
    hits = [(int(r["step"]), float(r[key])) for r in rows[start:] if finite(r.get(key))]
    if not hits or max(spike_factors([v for _, v in hits], window)) < FACTOR:
        return None  # a spike needs both tests; the factor is free, the z-score costs tensor work
    zs, factors = spike_scores([v for _, v in hits], window)
    best = None
    for (step, value), z, factor in zip(hits, zs, factors, strict=True):
        if z >= Z_MIN and factor >= FACTOR and (best is None or z > best[2]):
            best = (step, value, z, factor)
    return best


def detect(obs: Observation) -> list[Finding]:
    """A ``loss_spike`` finding for the worst spike of the loss, else of the global gradient norm."""
    for key, label in (("loss", "loss"), ("grad_norm", "global gradient norm")):
        hit = _scan(obs.rows, obs.new, key)
        if hit is None:
            continue
        step, value, z, factor = hit
        return [
            Finding(
                kind="loss_spike",
                module="",
                step=step,
                severity="warning",
                message=(
                    f"The {label} jumped to {fmt(value)} at step {step}, ×{fmt(factor)} its median over the previous "
                    f"{WINDOW} steps (robust z = {fmt(z)})."
                ),
                advice=(
                    "Check that batch for corrupted or unnormalised inputs/labels; gg.Guard(model, opt) skips such "
                    "steps, and gg.clip.ZClip() or gg.clip.ClipNorm(1.0) bounds their update."
                ),
                evidence={"metric": key, "value": value, "zscore": z, "factor": factor, "step": step},
            )
        ]
    return []
