"""Detection rules: statistics in, findings out. One small module per pathology.

Each rule is a function ``detect(obs: Observation) -> list[Finding]``; :data:`RULES` lists them in the
order of :data:`gradguard.KINDS`. Rules are relative and robust: they compare a quantity with its own
window (median/MAD), or layers with each other along the depth or time, never a raw norm with one
absolute constant. Every threshold is a named module constant with its reasoning.
"""

from __future__ import annotations

from gradguard.detect import dead_units, exploding, loss_spike, nonfinite, saturation, vanishing
from gradguard.detect.base import Observation, Origin, ParamInfo
from gradguard.findings import Finding

#: The rules, one per kind, in KINDS order. A tuple: fixed at import, never mutated.
RULES = (
    exploding.detect,
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


__all__ = ["RULES", "Observation", "Origin", "ParamInfo", "run_rules"]
