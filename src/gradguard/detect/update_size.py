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
- **rounded away** (kind ``vanishing``, evidence ``cause: "precision"``): a tensor *stored* in bfloat16 or
  float16 (``ParamInfo.dtype``; a model cast with ``model.to(torch.bfloat16)`` and a plain optimizer, no fp32
  master weights) whose every one of the last ``update_samples`` measured ratios is ≤ :data:`LOST` × the
  ratio its gradient and learning rate imply, ``lr · ‖g‖ / ‖w‖`` (the step of plain SGD; momentum and Adam
  take larger steps, so the bound is conservative), or exactly 0 when the learning rate is unknown. Round
  to nearest drops every element whose step is below half a unit in the last place of its weight, between
  ``|w|·2^-9`` and ``|w|·2^-8`` in bfloat16 (8 significant bits), ``|w|·2^-12`` and ``|w|·2^-11`` in float16
  (11 bits; IEEE 754-2008; Micikevicius et al. 2018, "Mixed Precision Training", keep fp32 master weights
  for this reason). It looks like a stalled layer, and when the whole model is cast every tensor stalls at
  once (so the stalled test, which needs the others to learn, is silent), but the cure is the precision.
  A stalled low-precision tensor the rounding test cannot confirm (no learning rate) says precision may be
  the cause (evidence ``possible_cause: "precision"``).

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
#: A step is lost to rounding when at most this fraction of the ratio ``lr·‖g‖/‖w‖`` arrives: plain SGD
#: delivers all of it in fp32 (measured ≈ 1), so a tenth means ≥ 90 % of the step's norm was dropped.
LOST = 0.1
#: Significant bits (with the implicit one) of the 16-bit storage types; half an ulp of w is ≤ |w|·2^-bits.
LOW_PRECISION_BITS = {"torch.bfloat16": 8, "torch.float16": 11}


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


def _precision_note(p: ParamInfo) -> str:
    bits = LOW_PRECISION_BITS[p.dtype]
    return (f"{p.name} is stored in {p.dtype.removeprefix('torch.')}, which rounds away every element step "
            f"below half a unit in its last place (|Δw| < |w|·2^-{bits})")


PRECISION_ADVICE = (
    "Keep the weights in fp32 and compute in low precision instead of casting the model: drop "
    "model.to(torch.bfloat16) / model.half() and train under torch.autocast(device_type, dtype=torch.bfloat16) "
    "(fp32 master weights), or raise the learning rate so each step exceeds the rounding threshold."
)


def _rounded_away(obs: Observation, judged: list[tuple[ParamInfo, list[float]]]) -> Finding | None:
    """One finding for the low-precision tensors whose measured steps fall ≤ ``LOST`` × ``lr·‖g‖/‖w‖``."""
    n = obs.options.update_samples
    lost: dict[str, tuple[float, float | None]] = {}  # name -> (largest measured ratio, implied ratio)
    first: ParamInfo | None = None
    for p, vals in judged:
        if p.dtype not in LOW_PRECISION_BITS:
            continue
        lr = obs.lrs.get(p.name)
        if lr is not None and lr <= 0:
            continue  # a learning rate of 0 is the stalled test's cause, not rounding
        if lr is None:
            ok = max(vals) == 0
            implied = None
        else:
            measured = [r for r in obs.rows if f"update_ratio/{p.name}" in r][-n:]
            # The gradient behind a measured step: the window's median norm (it moves slowly between steps).
            grads = sorted(finite_values(obs.rows[-obs.window :], f"grad_norm/{p.name}"))
            g = grads[len(grads) // 2]
            w = min(finite_values(measured, f"weight_norm/{p.name}"), default=0.0)
            implied = lr * g / w if w > 0 else None
            ok = implied is not None and implied > 0 and max(vals) <= LOST * implied
        if ok:
            lost[p.name] = (max(vals), implied)
            first = first or p
    if first is None:
        return None
    worst, implied = lost[first.name]
    others = [q for q in lost if q != first.name]
    if implied is not None:
        bound = "= 0" if worst == 0 else f"≤ {fmt(worst)}"
        seen = (f"its update ratio ‖Δw‖/‖w‖ has stayed {bound} for {n} measured steps while its gradient "
                f"and learning rate imply lr·‖g‖/‖w‖ ≈ {fmt(implied)}")
    else:
        seen = (f"its weights have not changed in {n} measured steps (‖Δw‖/‖w‖ = 0) although it receives a "
                "gradient (its learning rate is unknown: no optimizer given to gg.watch, or the tensor is not in it, "
                "and a tensor left out of the optimizer also reads so)")
    also = f"; {len(others)} more tensors likewise ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    return Finding(
        kind="vanishing", module=first.module, step=obs.step, severity="warning",
        message=(f"Updates lost to rounding, not vanishing gradients: {_precision_note(first)}; {seen}"
                 + (also if others else "") + "."),
        advice=PRECISION_ADVICE,
        evidence={"cause": "precision", "dtype": first.dtype, "ratio": worst, "implied_ratio": implied,
                  "threshold": 2.0 ** -LOW_PRECISION_BITS[first.dtype],
                  "tensors": {q: {"ratio": r, "implied_ratio": i} for q, (r, i) in lost.items()}},
    )


def detect(obs: Observation) -> list[Finding]:
    """``exploding`` for the tensor updated fastest beyond ``update_high``; ``vanishing`` for a stalled one,
    with ``cause: "precision"`` when its steps are below the rounding threshold of its 16-bit storage."""
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
    rounded = _rounded_away(obs, judged)
    if rounded is not None:
        out.append(rounded)
        lost = set(rounded.evidence["tensors"])
        judged = [(p, v) for p, v in judged if p.name not in lost]  # not reported twice as stalled
    if len(judged) >= 3:
        for p, vals in judged:
            others = [v[-1] for q, v in judged if q is not p]
            typical = statistics.median(others)
            if typical >= LEARNING and max(vals) <= opts.update_stall * typical:
                low = p.dtype in LOW_PRECISION_BITS
                stall: dict[str, object] = {"ratio": max(vals), "others_median": typical}
                if low:
                    stall.update({"possible_cause": "precision", "dtype": p.dtype})
                out.append(Finding(
                    kind="vanishing", module=p.module, step=obs.step, severity="warning",
                    message=(
                        f"{p.name} is stalled: its update ratio ‖Δw‖/‖w‖ has stayed ≤ {fmt(max(vals))} for "
                        f"{opts.update_samples} measured steps while the other tensors move {fmt(typical)} per step "
                        "(median), although it receives a gradient"
                        + (f"; precision may be the cause: {_precision_note(p)}" if low else "") + "."
                    ),
                    advice=(
                        "Check that the tensor is in the optimizer (optimizer = torch.optim.X(model.parameters())) "
                        "with a non-zero learning rate, and that its gradient is not far below the other layers' "
                        "(gg.probe(model, inputs))."
                        + (f" {PRECISION_ADVICE}" if low else "")
                    ),
                    evidence=stall,
                ))
                break
    return out
