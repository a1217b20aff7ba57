"""Claims: a statement about an experiment, the value measured in the run, what was expected, a verdict.

The verdict is always computed from the measurement by one of the constructors below, never written by
hand, so a report cannot say "holds" for a number that does not meet its bound. A NaN measurement fails
every comparison, and so every claim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Claim:
    """One checked claim: ``id``, ``statement``, ``measured``, ``expected`` (human form), ``holds``."""

    id: str
    statement: str
    measured: float | int | str | bool
    expected: str
    holds: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form written to ``metrics.json``."""
        return asdict(self)


def _num(value: float) -> float:
    return float(value)


def at_least(id: str, statement: str, measured: float, bound: float) -> Claim:
    """Holds when ``measured ≥ bound``."""
    m = _num(measured)
    return Claim(id, statement, m, f"≥ {bound:.4g}", bool(m >= bound))


def at_most(id: str, statement: str, measured: float, bound: float) -> Claim:
    """Holds when ``measured ≤ bound``."""
    m = _num(measured)
    return Claim(id, statement, m, f"≤ {bound:.4g}", bool(m <= bound))


def between(id: str, statement: str, measured: float, low: float, high: float) -> Claim:
    """Holds when ``low ≤ measured ≤ high``."""
    m = _num(measured)
    return Claim(id, statement, m, f"in [{low:.4g}, {high:.4g}]", bool(low <= m <= high))


def close_to(id: str, statement: str, measured: float, target: float, rtol: float) -> Claim:
    """Holds when ``|measured − target| ≤ rtol·|target|``; ``measured`` is the relative error shown."""
    m = _num(measured)
    rel = abs(m - target) / abs(target) if target != 0 else abs(m)
    return Claim(id, f"{statement} (measured {m:.4g} vs {target:.4g})", rel, f"relative error ≤ {rtol:.3g}",
                 bool(rel <= rtol))


def is_true(id: str, statement: str, measured: bool, detail: str = "") -> Claim:
    """Holds when ``measured`` is true; ``detail`` (optional) is appended to the statement."""
    text = f"{statement} ({detail})" if detail else statement
    return Claim(id, text, bool(measured), "yes", bool(measured))


def finite(value: float) -> bool:
    """Whether a measured float is finite (helper for claims about runs that blow up)."""
    return math.isfinite(value)
