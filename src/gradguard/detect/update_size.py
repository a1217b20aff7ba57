"""Update size: per weight tensor, the step the optimizer takes relative to the weights, ‖Δw‖/‖w‖.

Healthy training moves each weight matrix by about 1e-3 of its norm per step (Karpathy, "A Recipe for
Training Neural Networks"; measured 3e-3–1e-2 here, with peaks near 0.1 during warm-up). Two tests, each on
the last ``update_samples`` (3) *measured* ratios of a tensor (the monitor measures them on detail steps),
so a single peak is never enough:

- **too large** (kind ``exploding``): every one ≥ ``update_high`` (0.1): at that pace the tensor is replaced
  within ten steps, which is a learning rate far too high for it. When the optimizer is known the message
  gives the learning rate that would bring the ratio to ``update_target`` (3e-3): ``lr · target / ratio``
  (the step of SGD and of Adam-type optimisers is proportional to the learning rate). Only once the loss has
  left its best level (:func:`gradguard.detect.base.loss_near_best`: one of its last three values at least
  ``NEAR_BEST`` × the run's best). Large steps that keep the loss at its best are a schedule's choice, not a
  fault (the classic word-level LSTM recipe,
  SGD at lr 20 with clipping at 0.25, moves its decoder by > 0.1 of its norm per step early on and learns).
- **stalled** (kind ``vanishing``): every one ≤ ``update_stall`` (1e-3) × the median ratio of the other
  tensors, while its gradient is non-zero and the others learn: the tensor receives a gradient and does not
  move (left out of the optimizer, a learning rate of 0 in its group, or a gradient far below the others').

Not judged: tensors with fewer than 2 dimensions (biases and norm-layer shifts start at or near zero, so
their ratio is large or undefined by design), lookup tables (``ParamInfo.sparse_rows``: a batch touches a
few rows, so ‖Δw‖/‖w‖ measures the batch, not the learning rate) and tensors without a gradient (frozen).
"""

from __future__ import annotations

import statistics

from gradguard.detect.base import Observation, ParamInfo, finite_values, fmt, loss_near_best
from gradguard.findings import Finding

#: The other tensors "learn" when their median ratio is at least this (an order below the healthy 1e-3).
LEARNING = 1e-4


def _judged(obs: Observation) -> list[tuple[ParamInfo, list[float]]]:
    n = obs.options.update_samples
    out = []
    for p in obs.params:
        if p.ndim < 2 or p.sparse_rows:
            continue
        grads = finite_values(obs.rows[-obs.window :], f"grad_norm/{p.name}")
        if not grads or max(grads) == 0:
            continue  # frozen, unused or dead: other rules' business
        vals = finite_values(obs.rows, f"update_ratio/{p.name}")[-n:]
        if len(vals) == n:
            out.append((p, vals))
    return out


def detect(obs: Observation) -> list[Finding]:
    """``exploding`` for the tensor updated fastest beyond ``update_high``; ``vanishing`` for a stalled one."""
    if obs.new == 0 or not any("update_ratio/" in k for r in obs.new_rows for k in r):
        return []  # judged when a new ratio arrives
    opts = obs.options
    judged = _judged(obs)
    out: list[Finding] = []
    fast = sorted(((p, min(v)) for p, v in judged if min(v) >= opts.update_high), key=lambda t: -t[1])
    if fast and not loss_near_best(obs):
        p, ratio = fast[0]
        lr = obs.lrs.get(p.name)
        suggestion = ""
        evidence: dict[str, object] = {"ratio": ratio, "tensors": {q.name: r for q, r in fast[:5]}}
        if lr is not None and lr > 0:
            new_lr = lr * opts.update_target / ratio
            suggestion = (f"; with this optimizer, lr {fmt(lr)} → about {fmt(new_lr)} brings it to "
                          f"≈ {opts.update_target:g}")
            evidence.update({"lr": lr, "suggested_lr": new_lr})
        also = ", ".join(f"{q.name} ({fmt(r)})" for q, r in fast[1:4])
        out.append(Finding(
            kind="exploding", module=p.module, step=obs.step, severity="warning",
            message=(
                f"The update ratio ‖Δw‖/‖w‖ of {p.name} has stayed ≥ {fmt(ratio)} for {opts.update_samples} measured "
                f"steps (healthy ≈ 1e-3–1e-2; ≥ {opts.update_high:g} replaces the tensor within ten steps)"
                + (f"; also {also}" if also else "") + "."
            ),
            advice=f"The learning rate is too high for this layer: lower it{suggestion}, or add warm-up.",
            evidence=evidence,
        ))
    if len(judged) >= 3:
        for p, vals in judged:
            others = [v[-1] for q, v in judged if q is not p]
            typical = statistics.median(others)
            if typical >= LEARNING and max(vals) <= opts.update_stall * typical:
                out.append(Finding(
                    kind="vanishing", module=p.module, step=obs.step, severity="warning",
                    message=(
                        f"{p.name} is stalled: its update ratio ‖Δw‖/‖w‖ has stayed ≤ {fmt(max(vals))} for "
                        f"{opts.update_samples} measured steps while the other tensors move {fmt(typical)} per step "
                        "(median), although it receives a gradient."
                    ),
                    advice=(
                        "Check that the tensor is in the optimizer (optimizer = torch.optim.X(model.parameters())) "
                        "with a non-zero learning rate, and that its gradient is not far below the other layers' "
                        "(gg.probe(model, inputs))."
                    ),
                    evidence={"ratio": max(vals), "others_median": typical},
                ))
                break
    return out
