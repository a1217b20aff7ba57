"""Detection rules: statistics in, findings out. One small module per pathology.

Each rule is a function ``detect(obs: Observation) -> list[Finding]``; :data:`RULES` lists them. Rules are
relative and robust: they compare a quantity with its own window (median/MAD) or the run's best so far, or
layers with each other along the depth or time, never a raw norm with one absolute constant. Thresholds
are :class:`RuleOptions` fields or named module constants; docs/detection.md gives their reasons.
"""

from __future__ import annotations

from gradguard.detect import (
    dead_units,
    divergence,
    exploding,
    forward,
    loss_spike,
    nonfinite,
    saturation,
    update_size,
    vanishing,
)
from gradguard.detect.base import Observation, Origin, ParamInfo, RuleOptions, RunMemory
from gradguard.detect.sentinel import Sentinel
from gradguard.findings import Finding

#: The rules, in KINDS order of the kind they mostly report. A tuple: fixed at import, never mutated.
RULES = (
    exploding.detect,
    divergence.detect,
    forward.detect,
    update_size.detect,
    vanishing.detect,
    nonfinite.detect,
    dead_units.detect,
    saturation.detect,
    loss_spike.detect,
)


def run_rules(obs: Observation) -> list[Finding]:
    """Apply every rule in :data:`RULES` to ``obs``."""
    out: list[Finding] = []
    for rule in RULES:
        out.extend(rule(obs))
    return out


__all__ = ["RULES", "Observation", "Origin", "ParamInfo", "RuleOptions", "RunMemory", "Sentinel", "run_rules"]
