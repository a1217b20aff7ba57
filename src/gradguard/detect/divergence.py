"""Divergence: a loss that rises to a new level and stays there, or that starts far above chance.

Judged against the whole run (:class:`~gradguard.detect.base.RunMemory`), not only the sliding window, so
a run that climbs for twenty steps cannot set its own baseline. With ``L`` the smallest of the last
``level_steps`` (3) losses (the level the loss has *stayed* above) and ``B`` the run's best level (smallest
median of 3 consecutive losses so far), the run has diverged when

1. ``L ≥ level_ratio · B`` (2×: the degradation a user notices), and
2. the rise is out of the run's noise: with at least ``min_history`` (16) earlier losses,
   ``log(L / M) / σ`` exceeds the spike test's small-sample limit for ``z₃`` σ, where ``M`` is the
   median of the 16 losses before the rise, ``σ`` the batch-to-batch noise of ``log loss`` over the
   :data:`NOISE_STEPS` (64) losses before it (:func:`step_noise`: robust, and blind to the trend of a
   falling loss), and ``Φ̄(z₃)³ = Φ̄(spike_z)``: three consecutive values each that rare are together as
   rare as one ``spike_z`` spike (``z₃ ≈ 3.1`` for 6 σ). Both are recent: the best level ``B`` is an
   extreme of the run, and noise measured over a whole window mixes regimes (the batches of a tiny-batch
   run all sit near the chance level at first and spread over an order of magnitude once it has learned,
   so the noise of a window that reaches back to its start is a fraction of the current one). With
   fewer, there is no noise scale yet: the rise must be twice as large in log units,
   ``L ≥ level_ratio² · B`` (4×), and above every earlier loss.

With a known chance level ``χ`` (``ln C`` for ``C`` classes; label smoothing, ``ignore_index`` and skewed
labels put the real one lower, so ``ln C`` errs towards silence), a rise must also give back
:data:`GIVEN_BACK` (a quarter) of what the run had learned, ``L − B ≥ ¼ (χ − B)``; a run whose recent
level ``M`` was below
``0.8 χ`` and whose loss stays at ``≥ χ`` (and passes test 2) has lost what it learned, even below 2×.

*The start* (a classifier at initialisation should sit at its chance loss). Logits
near zero give exactly ``ln C`` whatever the labels (label smoothing, ``ignore_index`` and skewed labels
included), and logits of std ``s`` independent of the label give about ``ln C + s²/2``. The start level
``S`` (median of the first ``level_steps`` losses, so one batch is not a level) is a warning when it is
``≥ ln C + ln 2`` (:data:`START_LIKELIHOOD`): on average the true class gets less than half the
probability a uniform guess gives it, so the initial logits are too large (``s ≳ 1.2``: beyond the
``s² ≈ 1/3`` of PyTorch's default head and the ``s ≈ 1`` of a He-initialised one on unit-variance
features). This needs ``χ = ln C`` (``num_classes``, or inferred); against a ``chance_loss`` given
directly, whose uniform guess may lie above it, ``S ≥ level_ratio · χ`` is the test. Error from ``10 χ``.
Kind ``exploding``: the loss has left its basin; the layers whose gradients (and, when measured, updates)
grew most are named.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

from gradguard.detect.base import Observation, finite, fmt
from gradguard.detect.exploding import ADVICE
from gradguard.findings import Finding
from gradguard.stats import spike_threshold

#: The run learned something when its best level fell below this fraction of the chance level.
LEARNED = 0.8
#: A level this many times the best (or a start this many times the chance level) is an error, not a warning.
CHANCE_FACTOR = 10.0
#: With a known chance level, a rise is a divergence only once it gives back this share of what the run had
#: learned (``L − B ≥ GIVEN_BACK · (χ − B)``): a classifier at a tenth of the chance loss has heavy-tailed
#: batch noise (a few hard batches triple it), and ×2 over its best is still far better than guessing.
GIVEN_BACK = 0.25
#: Losses before the rise whose median is the level it rose from (the recent level, not the window's,
#: which a falling loss would place far above it).
RECENT_LEVEL = 16
#: Finite earlier losses before the rise is judged against their spread (as ``SpikeRule.min_history``).
MIN_HISTORY = 16
#: Losses before the rise whose step-to-step spread is the noise: enough for the MAD to be worth about 40
#: degrees of freedom (the small-sample limit is then within 15 % of its large-sample value), few enough to
#: be the run's current noise regime.
NOISE_STEPS = 64
#: A start level this many times less likely than a uniform guess (``S ≥ ln C + ln START_LIKELIHOOD``) is
#: too confident to be an initialisation.
START_LIKELIHOOD = 2.0


def joint_z(z: float, k: int) -> float:
    """``z_k`` with ``Φ̄(z_k)^k = Φ̄(z)``: k independent exceedances of ``z_k`` are as rare as one of ``z``."""
    tail = NormalDist().cdf(-z)
    return -NormalDist().inv_cdf(tail ** (1.0 / k))


def step_noise(losses: Sequence[float]) -> float | None:
    """σ of the step-to-step noise of ``log loss``: ``1.4826 · MAD(Δ log ℓ) / √2``, None for a loss ≤ 0.

    Differences remove the trend (a falling loss is not noise); the MAD ignores earlier spikes; the √2
    undoes the doubling of the variance by differencing independent noise.
    """
    if min(losses) <= 0:
        return None
    logs = [math.log(v) for v in losses]
    d = [b - a for a, b in itertools.pairwise(logs)]
    med = statistics.median(d)
    return 1.4826 * statistics.median(abs(x - med) for x in d) / math.sqrt(2.0)


def _chance_text(chance: float, source: str) -> str:
    return f"the chance level {fmt(chance)}" + (f" ({source})" if source else "")


def module_growth(obs: Observation, before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]],
                  stat: str) -> dict[str, float]:
    """Per module, the growth of ``stat`` (``grad_norm`` or ``update_ratio``) pooled over its tensors, largest
    first: median over ``after`` of the module's pooled value over its median over ``before``.

    Pooled as ``(Σ_p x_p²)^½`` for gradient norms (the module's gradient norm) and as ``‖Δw‖/‖w‖`` of the
    module for update ratios (``(Σ (r_p ‖w_p‖)²)^½ / (Σ ‖w_p‖²)^½``), lookup tables left out of the latter.
    """
    groups: dict[str, list[str]] = {}
    for p in obs.params:
        if stat == "update_ratio" and p.sparse_rows:
            continue
        groups.setdefault(p.module, []).append(p.name)

    def floats(r: Mapping[str, Any], keys: list[str]) -> list[float] | None:
        vals = [r.get(k) for k in keys]
        return [float(v) for v in vals if isinstance(v, int | float)] if all(finite(v) for v in vals) else None

    def pooled(rows: Sequence[Mapping[str, Any]], names: list[str]) -> list[float]:
        out = []
        for r in rows:
            vals = floats(r, [f"{stat}/{n}" for n in names])
            if vals is None:
                continue
            if stat == "grad_norm":
                out.append(math.sqrt(sum(v * v for v in vals)))
                continue
            w = floats(r, [f"weight_norm/{n}" for n in names])
            den = math.sqrt(sum(x * x for x in w)) if w is not None else 0.0
            if w is not None and den > 0:
                out.append(math.sqrt(sum((v * x) ** 2 for v, x in zip(vals, w, strict=True))) / den)
        return out

    growth = {}
    for module, names in groups.items():
        old, new = pooled(before, names), pooled(after, names)
        if old and new and statistics.median(old) > 0:
            growth[module] = statistics.median(new) / statistics.median(old)
    return dict(sorted(growth.items(), key=lambda t: -t[1]))


def _layers(obs: Observation, before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]) -> tuple[
        str, dict[str, float], dict[str, float]]:
    """The module whose updates (when measured since the rise) or else gradients grew most, and the
    per-module growth of both (top 3 each)."""
    grads = dict(list(module_growth(obs, before, after, "grad_norm").items())[:3])
    updates = dict(list(module_growth(obs, before, after, "update_ratio").items())[:3])
    top = next(iter(updates), None) or next(iter(grads), None)
    return (top or ""), grads, updates


def detect(obs: Observation) -> list[Finding]:
    """An ``exploding`` finding when the loss has left its best level (or starts far above chance)."""
    run = obs.run
    if run is None or obs.new == 0 or run.first is None:
        return []
    opts = obs.options
    chance = run.chance
    k = opts.level_steps
    losses = [(i, float(r["loss"])) for i, r in enumerate(obs.rows) if finite(r.get("loss"))]
    if len(losses) < k or not math.isfinite(run.best) or run.best <= 0:
        return []
    if chance is not None and run.first_step is not None and obs.step < run.first_step + 2 * k:
        start = [v for i, v in losses if int(obs.rows[i]["step"]) < run.first_step + k]
        bar = chance + math.log(START_LIKELIHOOD) if run.uniform else opts.level_ratio * chance
        if len(start) == k and statistics.median(start) >= bar:
            return [_above_chance_from_start(obs, chance, run.chance_source, statistics.median(start))]
    tail = losses[-k:]
    if tail[0][0] < len(obs.rows) - obs.new - (k - 1):
        return []  # nothing new in the last k losses
    level = min(v for _, v in tail)
    ratio = level / run.best
    past = [v for _, v in losses[:-k]][-obs.window:]
    # "Learned" is judged on the recent level, not the run's best: a run hovering near chance dips below
    # 0.8 χ now and then.
    back_at_chance = (chance is not None and level >= chance and len(past) >= MIN_HISTORY
                      and statistics.median(past[-RECENT_LEVEL:]) <= LEARNED * chance)
    if ratio < opts.level_ratio and not back_at_chance:
        return []
    if chance is not None and run.best < chance and level - run.best < GIVEN_BACK * (chance - run.best):
        return []
    if len(past) >= MIN_HISTORY:
        near = past[-NOISE_STEPS:]
        sigma = step_noise(near)
        if sigma is None:
            return []
        recent = statistics.median(past[-RECENT_LEVEL:])
        limit = spike_threshold(joint_z(opts.spike_z, k), len(near))
        z = math.log(level / recent) / sigma if sigma > 0 else math.inf
        if not z > limit:
            return []
        noise = (f"{fmt(z)} σ of the batch-to-batch noise of the last {len(near)} losses above the median "
                 f"{fmt(recent)} of the {min(len(past), RECENT_LEVEL)} before, limit {fmt(limit)}")
    else:
        early = opts.level_ratio**2
        if ratio < early or (past and level <= max(past)):
            return []
        z, limit = math.nan, math.nan
        noise = f"×{early:g} or more within the first {len(past) + k} losses, above every earlier one"
    first_tail_row = tail[0][0]
    before = obs.rows[max(0, first_tail_row - obs.window) : first_tail_row]
    module, grads, updates = _layers(obs, before, obs.rows[first_tail_row:])
    at_chance = chance is not None and level >= chance
    where = ""
    if chance is not None:
        where = (f"; it is at or above {_chance_text(chance, run.chance_source)}" if at_chance else
                 f"; {_chance_text(chance, run.chance_source)} is {fmt(chance)}")
    grew = ", ".join(f"`{n}` ×{fmt(r)}" for n, r in grads.items())
    upd = ", ".join(f"`{n}` ×{fmt(r)}" for n, r in updates.items())
    detail = (f" Gradient norms grew most in {grew}" if grew else "") + (f"; update ratios in {upd}" if upd else "")
    return [
        Finding(
            kind="exploding",
            module=module,
            step=obs.step,
            severity="error" if at_chance or ratio >= CHANCE_FACTOR else "warning",
            message=(
                f"The loss has stayed at ≥ {fmt(level)} for {k} steps, ×{fmt(ratio)} its best level {fmt(run.best)} "
                f"(step {run.best_step}){where} ({noise}): training is diverging.{detail + '.' if detail else ''}"
            ),
            advice=(
                "Lower the learning rate (by the factor the update ratios grew, when given) or restore the last "
                f"good checkpoint; {ADVICE[0].lower() + ADVICE[1:]}."
            ),
            evidence={
                "level": level, "best": run.best, "best_step": run.best_step, "ratio": ratio, "zscore": z,
                "limit": limit, "chance": chance, "grown": grads, "update_growth": updates,
            },
        )
    ]


def _above_chance_from_start(obs: Observation, chance: float, source: str, level: float) -> Finding:
    run = obs.run
    assert run is not None and run.first is not None
    factor = level / chance
    k = obs.options.level_steps
    excess = level - chance
    # ln C + s²/2 for logits of std s: the scale the start implies (only meaningful against ln C).
    scale = f" (logits of std ≈ {fmt(math.sqrt(2 * excess))} where ≈ 0 gives ln C)" if run.uniform else ""
    return Finding(
        kind="exploding",
        module="",
        step=obs.step,
        severity="error" if factor >= CHANCE_FACTOR else "warning",
        message=(
            f"The loss starts at {fmt(level)} (median of its first {k} steps), {fmt(excess)} nats above "
            f"{_chance_text(chance, source)}{scale}: the true class gets ×{fmt(math.exp(-excess))} the "
            "probability of a uniform guess, so the initial outputs (logits) are too large and training starts "
            "by undoing its initialisation."
        ),
        advice=(
            "Check the initialisation: gg.probe(model, inputs) names the layer where activations start to grow; "
            "re-initialise with gg.init.apply(model, 'he_normal') (ReLU) or 'xavier_uniform' (tanh/sigmoid), and "
            "normalise the inputs."
        ),
        evidence={"first_loss": run.first, "level": level, "chance": chance, "factor": factor},
    )
