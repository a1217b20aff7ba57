"""Forward explosion: the activations' scale multiplied layer after layer.

Along the layers that own weights, in forward order, the gain of each is ``g_k = std(y_k) / std(y_{k−1})``
(the first against the input where it is known). A variance-preserving initialisation keeps ``g_k ≈ 1``
(He et al. 2015 for ReLU, Glorot & Bengio 2010 for tanh); a residual addition of two independent signals of
equal variance gives ``√2``, which is why residual streams of unnormalised ResNets and pre-norm transformers
grow with depth without anything being wrong. A layer amplifies when ``g_k ≥ forward_gain`` (2, clear of
``√2``); an explosion is a run of consecutive amplifying layers whose product reaches ``forward_growth``
(100: two orders of magnitude). Weights scaled by ``a`` multiply each layer's gain by ``a``, so a
network initialised ×10 shows gains of 5–7 at every layer. The finding names the layer where the run
starts and the initialisation that fixes it; where one layer's gain reaches ``forward_growth`` by itself,
the explosion is that layer's (weights grown past their range, an overflow), and it is the one named.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from torch import nn

from gradguard.detect.base import Observation, fmt
from gradguard.findings import Finding

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers: their output scale is set by the normalisation, not by their input."""
    return isinstance(module, _NORMS)


def amplifying_run(stds: Sequence[tuple[str, float]], input_std: float | None, gain: float,
                   growth: float, norms: Collection[str] = ()) -> tuple[int, int, float] | None:
    """``(start, end, product)`` of the first run of layers ``start..end`` (inclusive, indices into ``stds``)
    each growing the std ≥ ``gain`` × over the previous one, whose product reaches ``growth``; else None.

    ``stds`` are ``(layer, std)`` in forward order; ``input_std`` (if known) is the reference of the first.
    A layer in ``norms`` (normalisation) ends a run and is never an amplifier itself: its output is the
    reference of the next layer.
    """
    prev = input_std if input_std is not None and input_std > 0 else None
    start, product = -1, 1.0
    for i, (name, s) in enumerate(stds):
        g = s / prev if prev is not None and prev > 0 and name not in norms else math.nan
        if math.isfinite(g) and g >= gain:
            if start < 0:
                start, product = i, 1.0
            product *= g
            if product >= growth:
                end = i
                for j in range(i + 1, len(stds)):
                    g2 = stds[j][1] / stds[j - 1][1] if stds[j][0] not in norms else math.nan
                    if not (math.isfinite(g2) and g2 >= gain):
                        break
                    product, end = product * g2, j
                return start, end, product
        else:
            start = -1
        prev = s if math.isfinite(s) else None
    return None


def init_advice(relu: bool) -> str:
    """The initialisation call that restores a gain of 1 per layer."""
    if relu:
        return 're-initialise with gg.init.apply(model, "he_normal") (ReLU family; "xavier_normal" for tanh/sigmoid)'
    return 're-initialise with gg.init.apply(model, "xavier_normal") (tanh/sigmoid; "he_normal" for ReLU)'


def forward_finding(stds: Sequence[tuple[str, float]], input_std: float | None, gain: float, growth: float,
                    step: int, relu: bool, norms: Collection[str] = ()) -> Finding | None:
    """The ``exploding`` finding for :func:`amplifying_run` on ``stds``, or None."""
    hit = amplifying_run(stds, input_std, gain, growth, norms)
    if hit is None:
        return None
    start, end, product = hit
    first, last = stds[start], stds[end]
    layers = end - start + 1
    per_layer = product ** (1.0 / layers)
    # A run can start at index 0 only against a known input std (the first gain needs a predecessor).
    ref_name, ref_std = ("the input", input_std) if start == 0 else (f"`{stds[start - 1][0]}`", stds[start - 1][1])
    ref = float(ref_std) if ref_std else math.nan
    gains = [(stds[i][0], stds[i][1] / (stds[i - 1][1] if i > start else ref)) for i in range(start, end + 1)]
    worst, worst_gain = max(gains, key=lambda t: t[1] if math.isfinite(t[1]) else -math.inf)
    alone = worst_gain >= growth  # one layer is the explosion by itself
    return Finding(
        kind="exploding",
        module=worst if alone else first[0],
        step=step,
        severity="error" if product >= growth**2 else "warning",
        message=(
            f"The activations grow ×{fmt(product)} over {layers} layers, from `{first[0]}` (std {fmt(first[1])}, "
            f"×{fmt(first[1] / ref_std) if ref_std else '?'} over {ref_name}) to `{last[0]}` "
            f"(std {fmt(last[1])}): about ×{fmt(per_layer)} per layer where a "
            "variance-preserving initialisation keeps ≈ 1"
            + (f"; `{worst}` alone multiplies it ×{fmt(worst_gain)}." if alone and layers > 1 else ".")
        ),
        advice=(f"`{worst}` is too large by itself: if it was initialised so, {init_advice(relu)}; if its weights "
                "grew, lower the learning rate and clip (gg.clip.ClipNorm(1.0)) or guard the optimizer "
                "(gg.Guard(model, opt)); a normalisation layer after it bounds its output." if alone else
                f"The weights are too large from `{first[0]}` on: {init_advice(relu)}, or add normalisation layers."),
        evidence={"growth": product, "per_layer": per_layer, "layers": {n: s for n, s in stds[start : end + 1]},
                  "input_std": input_std, "gains": dict(gains)},
    )


def detect(obs: Observation) -> list[Finding]:
    """Forward explosion along the weighted layers of the latest sampled step."""
    if obs.new == 0 or not obs.activations or not obs.depth:
        return []
    owners = {p.module for p in obs.params if not p.sparse_rows}
    stds = []
    for name in obs.depth:
        if name in owners and name in obs.activations:
            s = obs.activations[name].get("std", math.nan)
            if math.isfinite(s) and s > 0:
                stds.append((name, float(s)))
    if len(stds) < 2:
        return []
    relu = not any(k in ("sigmoid", "tanh") for k in obs.saturation_kinds.values())
    f = forward_finding(stds, obs.input_std, obs.options.forward_gain, obs.options.forward_growth, obs.step, relu,
                        obs.norm_layers)
    return [] if f is None else [f]
