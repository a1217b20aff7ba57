"""What the Guard remembers of the applied steps, as host numbers: the divergence test (its spike windows
are :class:`gradguard.stats.windows.HostWindow`).

Both are fed by the one vector the Guard fetches per step, so keeping them on the host costs no device
work and no further synchronisation (docs/guard.md, "What one step does").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

__all__ = ["Divergence"]


class Divergence:
    """Sustained rise: the last ``steps`` losses all exceed ``factor`` × the run's starting level, the
    smallest of its first ``steps`` losses (``x > b + (f − 1)·|b|``, so negative losses are judged by the
    same margin). ``factor=None`` disables it.

    The smallest of the recent losses must be above, so one outlier batch never trips it; the start, not
    the best loss so far, is the reference, because the best so far of a noisy loss drifts into its low
    tail (docs/guard.md). After a divergence rollback the test is disarmed until the next snapshot is
    committed. Host floats only.
    """

    def __init__(self, factor: float | None, steps: int) -> None:
        self.factor = factor
        self.steps = steps
        self.recent: deque[float] = deque(maxlen=steps)
        self.baseline: float | None = None
        self.armed = True

    def judge(self, loss: float) -> bool:
        """Whether the run has diverged with ``loss`` as its newest loss (fixes the baseline once known)."""
        if self.factor is None or not self.armed:
            return False
        recent = [*self.recent, loss][-self.steps :]
        if len(recent) < self.steps:
            return False
        if self.baseline is None:
            self.baseline = min(recent)
        return min(recent) > self.baseline + (self.factor - 1.0) * abs(self.baseline)

    def state_dict(self) -> dict[str, Any]:
        return {"armed": self.armed, "recent": list(self.recent), "baseline": self.baseline}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.recent = deque(map(float, state["recent"]), maxlen=self.steps)
        self.armed = bool(state["armed"])
        self.baseline = None if state["baseline"] is None else float(state["baseline"])
