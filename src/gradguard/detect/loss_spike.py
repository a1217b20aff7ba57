"""Loss spikes: one step whose loss (or global gradient norm) leaps far out of its recent window.

The spike test is the one of :mod:`gradguard.stats.windows` (:class:`~gradguard.stats.windows.SpikeRule`:
small-sample-corrected robust z-score, minimum excess, jump over the recent maximum), against the
``watch(window=...)`` steps before the new rows, so the monitor and :class:`gradguard.Guard` agree on what a
spike is. The global gradient norm is tested exactly as the Guard tests it. The loss is tested on the log
scale: losses are positive and their mini-batch noise is multiplicative (a batch of 4 holding one
misclassified example has many times the median loss), so a window's spread is only comparable across
runs in log units; on logs the "jump" is simply exceeding the recent maximum. Both also need a factor
≥ ``spike_factor`` over the median, so a quiet, nearly constant window does not turn ordinary noise into
findings. A spike is a warning from ``spike_warning`` × the median on (two orders of magnitude: beyond what
single examples of tiny batches produce), info below. Non-finite values are left to the ``nonfinite`` rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradguard.detect.base import Observation, RuleOptions, finite, finite_values, fmt
from gradguard.findings import Finding
from gradguard.stats import SpikeRule


def spike_rules(options: RuleOptions) -> tuple[SpikeRule, SpikeRule]:
    """``(raw, log)``: the Guard's spike test for gradient norms, and its log-scale form for losses."""
    return SpikeRule(z=options.spike_z), SpikeRule(z=options.spike_z, min_excess=0.0, jump=1.0)


def _scan(
    rows: Sequence[Mapping[str, Any]], new: int, key: str, window: int, rule: SpikeRule, log: bool, factor: float
) -> tuple[int, float, float, float, int] | None:
    """The most extreme spike among the new rows against the window just before them:
    ``(step, value, z, factor, window size)``, or None."""
    start = len(rows) - new
    past = finite_values(rows[max(0, start - window) : start], key)
    hits = [(int(r["step"]), float(r[key])) for r in rows[start:] if finite(r.get(key))]
    if len(past) < rule.min_history or not hits:
        return None
    med = sorted(past)[len(past) // 2]
    if med > 0 and max(v for _, v in hits) < factor * med:
        return None  # the factor is free; the robust z-score costs tensor work
    if log:
        if min(past) <= 0 or min(v for _, v in hits) <= 0:
            return None  # a loss that can be ≤ 0 (a log-likelihood) has no multiplicative noise to model
        scores = rule.scan([math.log(v) for _, v in hits], [math.log(v) for v in past])
    else:
        scores = rule.scan([v for _, v in hits], past)
    best = None
    for (step, value), (spike, z, _) in zip(hits, scores, strict=True):
        f = value / med if med > 0 else math.inf
        if spike and f >= factor and (best is None or z > best[2]):
            best = (step, value, z, f, len(past))
    return best


def detect(obs: Observation) -> list[Finding]:
    """A ``loss_spike`` finding for the worst spike of the loss, else of the global gradient norm."""
    raw, logged = spike_rules(obs.options)
    for key, label, rule, log in (("loss", "loss", logged, True), ("grad_norm", "global gradient norm", raw, False)):
        hit = _scan(obs.rows, obs.new, key, obs.window, rule, log, obs.options.spike_factor)
        if hit is None:
            continue
        step, value, z, factor, n = hit
        scale = "log-scale robust z" if log else "robust z"
        return [
            Finding(
                kind="loss_spike",
                module="",
                step=step,
                severity="warning" if factor >= obs.options.spike_warning else "info",
                message=(
                    f"The {label} jumped to {fmt(value)} at step {step}, ×{fmt(factor)} its median over the previous "
                    f"{n} steps ({scale} = {fmt(z)}, limit {fmt(rule.threshold(n))})."
                ),
                advice=(
                    "Check that batch for corrupted or unnormalised inputs/labels; gg.Guard(model, opt) skips such "
                    "steps, and gg.clip.ZClip() or gg.clip.ClipNorm(1.0) bounds their update."
                ),
                evidence={"metric": key, "value": value, "zscore": z, "factor": factor, "step": step, "window": n},
            )
        ]
    return []
