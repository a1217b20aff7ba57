"""Vanishing gradients: where along the depth the backward signal collapses.

The test is relative along the depth: the per-element gradient RMS ‖g‖/√n of the input end's weights
(the largest over the first quarter of the modules, at least one: how much of the backward signal got
through) against the output layer's (see :func:`gradguard.detect.exploding.depth_profile`). The input
*end*, not its first module: a projection off the signal's path, such as an attention block's query and
key at initialisation (their gradient is second order in two small weight matrices while the softmax is
near uniform), is not what the layers before it receive, and a healthy transformer would otherwise read as
vanishing at step 0. A signal that collapsed through the depth leaves every layer of the input end small.
When the ratio is
≤ 1/:data:`~gradguard.detect.exploding.DEPTH_RATIO` (three orders of magnitude), the first layers learn
a thousand times slower than the last under SGD (Hochreiter 1991; Glorot & Bengio 2010). The update
ratio ‖Δw‖/‖w‖ is reported beside it: Karpathy's rule of thumb is ≈ 1e-3 per step for a layer that
learns at a healthy pace; a layer far below it has stopped changing. Adaptive optimisers (Adam) rescale the step, so a
layer with a tiny gradient can still learn at the output layer's pace: the finding is a *warning* only
once the update ratios confirm it (the weakest layer moves ≤ :data:`SLOWER` × the output layer's ratio),
and *info* while they are unmeasured or show the layer learning anyway (a deep default-init net under
Adam leaving its plateau).

A NaN is never "vanishing": non-finite and exactly-zero gradients are excluded from the profile
(zero is dead units or an unused layer, reported by their own rules). One exception is named: weights
*stored* in float16 (``model.half()``, ``ParamInfo.dtype``) whose gradient is exactly 0 at the input end of
a collapsing profile. float16 flushes magnitudes below 2^-24 ≈ 6e-8 to zero (IEEE 754 half precision;
Micikevicius et al. 2018), so a gradient that shrinks through the depth reaches those layers as exact
zeros: underflow, not dead units. The finding then lists them and carries ``cause: "precision"``. Under
``torch.autocast`` the weights and their gradients are fp32, so the rule cannot see where a float16
backward underflowed (docs/detection.md).
"""

from __future__ import annotations

from gradguard.detect.base import Observation, ParamInfo, finite_values, fmt
from gradguard.detect.exploding import DEPTH_RATIO, depth_profile
from gradguard.findings import Finding

#: The healthy update-to-weight ratio per step (Karpathy, "A Recipe for Training Neural Networks").
HEALTHY_UPDATE_RATIO = 1e-3
#: The weakest layer learns an order of magnitude slower than the output layer: the gradient collapse matters.
SLOWER = 0.1


def _update_ratio(obs: Observation, module: str) -> float | None:
    vals = [
        v
        for p in obs.params
        if p.module == module and p.ndim >= 2
        for v in finite_values(obs.rows, f"update_ratio/{p.name}")[-5:]
    ]
    return sorted(vals)[len(vals) // 2] if vals else None


def _underflowed(obs: Observation, before: str) -> list[str]:
    """float16-stored modules earlier in the depth than ``before`` whose weight gradients are exactly 0."""
    order = {name: i for i, name in enumerate(obs.depth)}
    by_module: dict[str, list[ParamInfo]] = {}
    for p in obs.params:
        if p.ndim >= 2 and not p.sparse_rows and order.get(p.module, len(order)) < order[before]:
            by_module.setdefault(p.module, []).append(p)
    zero = []
    for m, ps in by_module.items():
        vals = [v for p in ps for v in finite_values(obs.rows[-20:], f"grad_norm/{p.name}")]
        if vals and max(vals) == 0 and all(p.dtype == "torch.float16" for p in ps):
            zero.append(m)
    return sorted(zero, key=order.__getitem__)


def detect(obs: Observation) -> list[Finding]:
    """A ``vanishing`` finding at the layer with the smallest gradient when the depth ratio collapses."""
    prof = depth_profile(obs)
    if len(prof) < 3 or obs.new == 0:
        return []
    last, g_last = prof[-1]
    quarter = prof[: max(1, len(prof) // 4)]
    first, g_first = max(quarter, key=lambda t: t[1])  # the signal that reached the input end
    ratio = g_first / g_last
    if ratio > 1.0 / DEPTH_RATIO:
        return []
    weakest, g_weak = min(prof, key=lambda t: t[1])
    ur_first, ur_last = _update_ratio(obs, weakest), _update_ratio(obs, last)
    updates = ""
    confirmed = ur_first is not None and ur_last is not None and ur_first <= SLOWER * ur_last
    if ur_first is not None and ur_last is not None:
        updates = (
            f"; update ratios ‖Δw‖/‖w‖ {fmt(ur_first)} there vs {fmt(ur_last)} at the output "
            f"(healthy ≈ {HEALTHY_UPDATE_RATIO:g})"
        )
    evidence: dict[str, object] = {
        "ratio": ratio,
        "profile": dict(prof),
        "update_ratio_weakest": ur_first,
        "update_ratio_output": ur_last,
    }
    advice = (
        "Re-initialise with gg.init.apply(model, 'xavier_uniform') for sigmoid/tanh or "
        "gg.init.apply(model, 'he_normal') with ReLU, replace sigmoid by ReLU/ELU, add BatchNorm "
        "(torch.nn.BatchNorm1d) before each activation, or add residual connections."
    )
    zero = _underflowed(obs, first) if obs.depth else []
    if zero:
        names = ", ".join(f"`{m}`" for m in zero[:4]) + (", ..." if len(zero) > 4 else "")
        updates += (
            f"; before it, {len(zero)} float16 layers ({names}) have exactly zero gradients: float16 underflow "
            "(magnitudes below 2^-24 ≈ 6e-8 flush to 0), not dead units"
        )
        evidence.update({"cause": "precision", "dtype": "torch.float16", "underflow": zero})
        advice = (
            "Keep fp32 weights and train under torch.autocast with a torch.amp.GradScaler (it scales the loss so "
            "small gradients stay representable), or use bfloat16 (fp32's exponent range); then " + advice[0].lower()
            + advice[1:]
        )
    return [
        Finding(
            kind="vanishing",
            module=weakest,
            step=obs.step,
            severity="warning" if confirmed else "info",
            message=(
                f"Gradients shrink ×{fmt(ratio)} from the output layer `{last}` (RMS {fmt(g_last)}) to the input "
                f"end `{first}` (RMS {fmt(g_first)}) across {len(prof)} layers; weakest at `{weakest}` "
                f"(RMS {fmt(g_weak)}){updates}."
            ),
            advice=advice,
            evidence=evidence,
        )
    ]
