"""Exploding gradients (and activations): growth against the tensor's own history, along depth or time.

Three relative tests, none against an absolute norm:

1. *Growth in time.* The median of the last :data:`RECENT` global gradient norms against the
   ``watch(window=...)`` steps before them: flagged when it is ≥ ``RuleOptions.growth`` (10) times the
   window's median **and** a spike by the one spike test of :mod:`gradguard.stats.windows` (the Guard's:
   small-sample robust z, and a jump over the recent maximum, so the slow ×10–20 climb of a deep net
   leaving its plateau is not an explosion). The tensors that grew most are named. Without a window (or
   before any spike): a gradient norm multiplied by ≥ :data:`GEOMETRIC` at each of the last 3 steps.
   Either is a warning only when the loss rose with it (:func:`loss_rose`: the median of the last
   :data:`RECENT` losses above the median over the same reference steps, or a non-finite loss); a larger
   gradient while the loss keeps falling is ``info``. Large learning rates drive training to the edge of
   stability, where the sharpness settles at 2/η and the gradient norm rises while the loss goes on
   decreasing (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
   Stability"): a one-cycle schedule at its peak does this, and it is not a fault.
2. *Growth along depth.* Per-element gradient RMS ‖g‖/√n of the weight tensors, input layer against output
   layer: ≥ :data:`DEPTH_RATIO` means each layer's Jacobian multiplies the backward signal by more than 1
   (Pascanu et al. 2013, "On the difficulty of training recurrent neural networks"; Glorot & Bengio 2010).
3. *Growth through time* (recurrent modules). RMS of the output h_t at each time step: last against first
   ≥ :data:`DEPTH_RATIO` while exceeding 1 — a bounded (tanh/sigmoid) cell cannot do this, an unbounded
   ReLU recurrence whose Jacobian has spectral radius > 1 does (Pascanu et al. 2013; Le et al. 2015,
   IRNN); its BPTT gradients grow by the same factor.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from gradguard.detect.base import Observation, ParamInfo, finite, finite_values, fmt
from gradguard.findings import Finding
from gradguard.stats import SpikeRule

#: Per-step factor of the global gradient norm that, kept up for RECENT steps, is an instability: gradient
#: descent with a step beyond 2/λ on a direction of curvature λ multiplies the gradient by |1 − ηλ| > 1 at
#: every step. A doubling at each of 3 steps (×8) is far beyond the ×1.03 per step of a plateau exit or a
#: warm-up, and needs no window, so it works from the fourth step on.
GEOMETRIC = 2.0
#: Finite values of a tensor's own history needed before its growth is ranked.
MIN_WINDOW = 10
#: Steps averaged (median) at the end of the new rows, so one outlier batch is a spike, not an explosion.
RECENT = 3
#: Three orders of magnitude between the ends of the network (or of the sequence).
DEPTH_RATIO = 1e3

ADVICE = (
    "Clip the gradient with gg.clip.ClipNorm(1.0) (or element-wise gg.clip.ClipValue(1.0)), guard the "
    "optimizer with gg.Guard(model, opt), and lower the learning rate"
)


def detect(obs: Observation) -> list[Finding]:
    """Exploding findings from growth in time, along depth and through time."""
    out = []
    f = _growth_in_time(obs) or _geometric_growth(obs)
    if f is not None:
        out.append(f)
    f = _growth_along_depth(obs)
    if f is not None:
        out.append(f)
    out.extend(_growth_through_time(obs))
    return out


def _growth_in_time(obs: Observation) -> Finding | None:
    rows = obs.rows
    if obs.new == 0 or len(rows) <= RECENT:
        return None
    tail = rows[-RECENT:]
    recent = finite_values(tail, "grad_norm")
    # The window ends before the new rows (and before the tail): a sustained rise inside the new block must
    # not become its own reference.
    end = min(len(rows) - obs.new, len(rows) - RECENT)
    before = rows[max(0, end - obs.window) : end]
    window = finite_values(before, "grad_norm")
    rule = SpikeRule(z=obs.options.spike_z)
    if len(recent) < RECENT or len(window) < rule.min_history:
        return None
    latest = statistics.median(recent)
    base = statistics.median(window)
    if not base > 0:
        return None
    ratio = latest / base
    if ratio < obs.options.growth:
        return None  # both tests must pass; the ratio is free, the spike test costs tensor work
    ((spike, z, _),) = rule.scan([latest], window)
    if not spike:
        return None
    grown = grown_tensors(obs, before, tail, obs.options.growth)
    return _growth_finding(
        obs, grown[:3], ratio, loss_rose(before, tail),
        f"The global gradient norm grew ×{fmt(ratio)} over its median of the previous {len(window)} steps "
        f"({fmt(base)} → {fmt(latest)}, median of the last {RECENT}; robust z = {fmt(z)}, limit "
        f"{fmt(rule.threshold(len(window)))})",
        {"grad_norm": latest, "window_median": base, "ratio": ratio, "zscore": z},
    )


def loss_rose(before: Sequence[Mapping[str, Any]], tail: Sequence[Mapping[str, Any]]) -> bool | None:
    """Whether the median loss over ``tail`` is above its median over ``before`` (a non-finite loss in
    ``tail`` counts as above); None when either holds no loss (the monitor was not given one)."""
    new = [v for r in tail if (v := r.get("loss")) is not None]
    if not all(finite(v) for v in new):
        return True
    old = finite_values(before, "loss")
    if not new or not old:
        return None
    return statistics.median(float(v) for v in new) > statistics.median(old)


def _growth_finding(obs: Observation, top: list[tuple[ParamInfo, float]], ratio: float, rose: bool | None,
                    text: str, evidence: dict[str, Any]) -> Finding:
    """An ``exploding`` finding for a global-norm growth of ``ratio``, at the tensor that grew most; ``info``
    when the loss did not rise with it (``rose`` False, see :func:`loss_rose`)."""
    names = ", ".join(f"{p.name} ×{fmt(r)}" for p, r in top) if top else "every tensor"
    severity = "info" if rose is False else "error" if ratio >= 1e3 else "warning"
    held = ("; the loss has not risen over the same steps (a large learning rate at the edge of stability "
            "does this; a warning follows if it rises)") if rose is False else ""
    return Finding(
        kind="exploding",
        module=top[0][0].module if top else "",
        step=obs.step,
        severity=severity,
        message=f"{text}; largest growth: {names}{held}.",
        advice=ADVICE + ".",
        evidence={**evidence, "grown": {p.name: r for p, r in top}, "loss_rose": rose},
    )


def _geometric_growth(obs: Observation) -> Finding | None:
    """The global gradient norm multiplied by ≥ ``GEOMETRIC`` at each of the last :data:`RECENT` steps."""
    rows = obs.rows
    if obs.new == 0 or len(rows) <= RECENT:
        return None
    last = [r.get("grad_norm") for r in rows[-RECENT - 1 :]]
    if not all(finite(v) and v > 0 for v in last):  # type: ignore[operator]
        return None
    values = [float(v) for v in last if isinstance(v, int | float)]
    gains = [b / a for a, b in itertools.pairwise(values)]
    if min(gains) < GEOMETRIC:
        return None
    total = values[-1] / values[0]
    grown = grown_tensors(obs, rows[-RECENT - 1 : -RECENT], rows[-1:])[:3]
    return _growth_finding(
        obs, grown, total, loss_rose(rows[-RECENT - 1 : -RECENT], rows[-RECENT:]),
        f"The global gradient norm has multiplied by ×{', ×'.join(fmt(g) for g in gains)} over the last "
        f"{RECENT} steps ({fmt(values[0])} → {fmt(values[-1])}): the optimizer's steps amplify instead of descend",
        {"gains": gains, "grad_norm": values[-1]},
    )


def grown_tensors(
    obs: Observation, before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], at_least: float = 0.0
) -> list[tuple[ParamInfo, float]]:
    """Parameters whose gradient norm grew most from ``before`` to ``after`` (ratio of medians, largest first,
    only ratios ≥ ``at_least``)."""
    grown = []
    for p in obs.params:
        key = f"grad_norm/{p.name}"
        old = finite_values(before, key)
        new = finite_values(after, key)
        if len(old) < min(MIN_WINDOW, len(before)) or not old or not new:
            continue
        base = statistics.median(old)
        if base > 0:
            grown.append((p, statistics.median(new) / base))
    grown.sort(key=lambda t: -t[1])
    return [(p, r) for p, r in grown if r >= at_least]


def depth_profile(obs: Observation) -> list[tuple[str, float]]:
    """Per module, in forward order, the median per-element gradient RMS of its weight tensors (ndim ≥ 2).

    Uses the latest rows (up to 20) with a finite value, so a NaN step is skipped, never averaged in.
    Modules with an exactly zero gradient are left out: that is dead units or an unused layer, not a
    vanishing signal.
    """
    cached = obs.cache.get("depth_profile")
    if cached is not None:
        return list(cached)
    order = {name: i for i, name in enumerate(obs.depth)}
    recent = obs.rows[-20:]
    per_module: dict[str, list[float]] = {}
    for p in obs.params:
        if p.ndim < 2 or p.sparse_rows or p.module not in order:
            continue
        vals = finite_values(recent, f"grad_norm/{p.name}")
        if not vals:
            continue
        rms = statistics.median(vals) / p.numel**0.5
        if rms > 0:
            per_module.setdefault(p.module, []).append(rms)
    prof = [(m, statistics.median(v)) for m, v in per_module.items()]
    prof.sort(key=lambda t: order[t[0]])
    obs.cache["depth_profile"] = list(prof)
    return prof


def _growth_along_depth(obs: Observation) -> Finding | None:
    prof = depth_profile(obs)
    if len(prof) < 3 or obs.new == 0:
        return None
    (first, g_first), (last, g_last) = prof[0], prof[-1]
    ratio = g_first / g_last
    if ratio < DEPTH_RATIO:
        return None
    return Finding(
        kind="exploding",
        module=first,
        step=obs.step,
        severity="warning",
        message=(
            f"Gradients grow ×{fmt(ratio)} from the output layer `{last}` (RMS {fmt(g_last)}) to the input layer "
            f"`{first}` (RMS {fmt(g_first)}) across {len(prof)} layers."
        ),
        advice=(
            "Re-initialise with gg.init.apply(model, 'he_normal') (ReLU) or 'xavier_uniform' (tanh/sigmoid) so "
            f"each layer keeps the variance; add BatchNorm; {ADVICE[0].lower() + ADVICE[1:]}."
        ),
        evidence={"ratio": ratio, "profile": dict(prof)},
    )


def _growth_through_time(obs: Observation) -> list[Finding]:
    out = []
    for name, prof in obs.time_forward.items():
        values: Sequence[float] = [float(v) for v in prof]
        if len(values) < 2 or obs.new == 0:
            continue
        first = next((v for v in values if finite(v) and v > 0), None)
        last = values[-1]
        if first is None:
            continue
        peak = max((v for v in values if finite(v)), default=0.0)
        grows = (not finite(last)) or last / first >= DEPTH_RATIO
        if not grows or peak <= 1.0:
            continue
        ratio = last / first if finite(last) else float("inf")
        grad = obs.time_grad.get(name)
        evidence: dict[str, object] = {"ratio": ratio, "first": first, "last": last, "steps": len(values)}
        if grad is not None:
            evidence["grad_per_step"] = [float(g) for g in grad]
        out.append(
            Finding(
                kind="exploding",
                module=name,
                step=obs.step,
                severity="error" if not finite(last) else "warning",
                message=(
                    f"The output of `{name}` grows ×{fmt(ratio)} over {len(values)} time steps (RMS {fmt(first)} at "
                    f"t=0 → {fmt(last)} at t={len(values) - 1}): the recurrence amplifies, so its gradients through "
                    "time explode too."
                ),
                advice=(
                    "Use a bounded cell activation (tanh, the default) or keep the recurrent weights near the "
                    "identity (IRNN: gg.init.apply(model, 'identity'), or 'orthogonal' with gain ≤ 1); "
                    + ADVICE[0].lower() + ADVICE[1:] + "."
                ),
                evidence=evidence,
            )
        )
    return out
