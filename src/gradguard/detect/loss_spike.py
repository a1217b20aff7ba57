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


def spike_score(value: float, window: Sequence[float]) -> tuple[float, float]:
    """``(z, factor)`` of ``value`` against ``window``; z on the log scale when everything is positive."""
    med = sorted(window)[len(window) // 2]
    positive = value > 0 and all(v > 0 for v in window)
    if positive:
        z = float(robust_zscore(torch.tensor(math.log(value)), torch.log(torch.tensor(window))))
    else:
        z = float(robust_zscore(torch.tensor(value), torch.tensor(window)))
    factor = value / med if med > 0 else float("inf")
    return z, factor


def _scan(rows: Sequence[Mapping[str, Any]], new: int, key: str) -> tuple[int, float, float, float] | None:
    """The most extreme spike among the new rows: (step, value, z, factor)."""
    best = None
    for i in range(len(rows) - new, len(rows)):
        v = rows[i].get(key)
        if not finite(v):
            continue
        window = finite_values(rows[max(0, i - WINDOW) : i], key)
        if len(window) < MIN_WINDOW:
            continue
        z, factor = spike_score(float(v), window)  # type: ignore[arg-type]
        if z >= Z_MIN and factor >= FACTOR and (best is None or z > best[2]):
            best = (int(rows[i]["step"]), float(v), z, factor)  # type: ignore[arg-type]
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
