"""How a run is judged, in one place for the tests and ``benchmarks/diagnosis.py``.

* :func:`degradation_start`: did the fault degrade the run, and from which step does a detection delay
  count: the loss stays above twice its best so far for 3 steps or turns non-finite
  (:meth:`RunResult.onset`) where the healthy run of the same seed has not done so by then (a criterion
  the run without the fault meets by itself, as the noisy losses of a classifier near zero loss do, says
  nothing about the fault), or the held-out metric is worse than the worst healthy seed by more than the
  healthy seeds' spread; a fault present from step 0 counts from step 0.
* :func:`update_growth` / :func:`culprits`: for a learning-rate fault, the layers whose update ratio
  ‖Δw‖/‖w‖ grew most: the mean over the 4 steps from the fault, over the mean of the 5 steps before it
  (mid-run faults) or of the healthy run's first 4 steps (faults present from step 0); the top 3, and any
  within half of the largest growth.
* :func:`names`: a finding names a wanted module when it is that module or inside it.
"""

from __future__ import annotations

import math

from .common import RunResult
from .registry import Case

TOP_LAYERS = 3


def degradation_start(r: RunResult, healthy_metrics: list[float], healthy: RunResult) -> int | None:
    """The step a detection delay counts from, or None when the fault did not degrade the run; ``healthy``
    is the run of the same program and seed without the fault."""
    onset = r.onset()
    own = healthy.onset()
    if onset is not None and own is not None and own <= onset:
        onset = None
    if onset is None and not r.worse_than(healthy_metrics):
        return None
    if r.fault_step == 0:
        return 0
    return onset if onset is not None else r.fault_step


def _mean(values: list[float]) -> float:
    if not values:
        return math.nan
    return math.inf if not all(math.isfinite(v) for v in values) else sum(values) / len(values)


def update_growth(r: RunResult, healthy: RunResult) -> dict[str, float]:
    """Per module, how many times its update ratio grew at the fault (see the module docstring)."""
    fs = r.fault_step or 0
    growth = {}
    for module, ratios in r.update_ratios.items():
        before = ratios[max(0, fs - 5) : fs] if fs > 0 else healthy.update_ratios.get(module, [])[:4]
        ref = _mean(before)
        after = _mean(ratios[fs : fs + 4])
        if math.isfinite(ref) and ref > 0 and not math.isnan(after):
            growth[module] = after / ref
    return growth


def top_layers(growth: dict[str, float]) -> list[str]:
    """The top :data:`TOP_LAYERS` modules by growth, and any within half of the largest."""
    ranked = sorted(growth, key=growth.__getitem__, reverse=True)
    if not ranked:
        return []
    best = growth[ranked[0]]
    return [m for i, m in enumerate(ranked) if i < TOP_LAYERS or growth[m] >= 0.5 * best]


def culprits(case: Case, r: RunResult, healthy: RunResult) -> tuple[list[str], str]:
    """The modules a finding may name for this case (empty: any), and a sentence saying which."""
    if case.where == "lr":
        growth = update_growth(r, healthy)
        wanted = top_layers(growth)
        shown = ", ".join(f"{m} {growth[m]:.3g}x" for m in wanted)
        return wanted, f"one of the layers whose updates grew most ({shown})"
    if case.where:
        return [case.where], f"the faulty layer {case.where!r}"
    return [], "any module"


def names(module: str, wanted: list[str]) -> bool:
    """True when ``module`` is one of ``wanted`` or inside one of them; any module when ``wanted`` is empty."""
    return not wanted or any(module == m or module.startswith(m + ".") for m in wanted)
