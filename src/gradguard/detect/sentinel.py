"""The per-step tripwire that decides when the rules must run before the logging schedule.

The rules run on a fetch (every ``log_every`` steps). A finding is useful only once it is visible, so the
monitor also fetches early when this tripwire fires: at every one of the first ``early`` steps (nothing is
known about the run yet), and afterwards when a step's loss or global gradient norm looks like the start of
something the rules judge. It reads two host floats per step; the monitor feeds it only where those are
on the host already (CPU tensors: reading them is a memory load, not a device synchronisation).

Fires when ``x ≥ spike_factor · exp(m)`` for the loss or the gradient norm, with ``m`` an exponential moving
average of ``log x`` over ~16 steps (a spike or an explosion candidate), when the gradient norm
doubled at each of the last 3 steps (``exploding.GEOMETRIC``), or when the last ``level_steps``
losses all reach ``level_ratio`` × the run's best level or the chance level (a divergence candidate).
It only ever makes the rules run sooner; it never makes a finding.
"""

from __future__ import annotations

import itertools
import math

from gradguard.detect.base import RuleOptions, RunMemory
from gradguard.detect.exploding import GEOMETRIC, RECENT

#: Weight of a new value in the moving averages of log loss and log gradient norm (memory ≈ 1/ALPHA steps).
ALPHA = 1.0 / 16


class Sentinel:
    """Per-step tripwire (see the module docstring).

    Args:
        options: the rules' thresholds.
        early: fire at each of the first ``early`` steps.
        chance: the chance-level loss, if known.
    """

    def __init__(self, options: RuleOptions, early: int, chance: float | None = None) -> None:
        self.options = options
        self.early = early
        self.chance = chance
        self._memory = RunMemory()
        self._ema: dict[str, float] = {}
        self._tail: list[float] = []
        self._seen = 0
        self._grads: list[float] = []

    def _jump(self, key: str, x: float | None) -> bool:
        if x is None or not x > 0 or not math.isfinite(x):
            return False
        lx = math.log(x)
        m = self._ema.get(key)
        self._ema[key] = lx if m is None else m + ALPHA * (lx - m)
        return m is not None and lx - m >= math.log(self.options.spike_factor)

    def check(self, step: int, loss: float | None, grad_norm: float) -> bool:
        """True when the rules should run now (after recording ``step``)."""
        self._seen += 1
        fire = self._seen <= self.early
        fire = self._jump("grad_norm", grad_norm) or fire
        self._grads = [*self._grads[-RECENT:], grad_norm]
        if len(self._grads) == RECENT + 1 and all(a > 0 and b >= GEOMETRIC * a
                                                  for a, b in itertools.pairwise(self._grads)):
            fire = True
        if loss is not None and math.isfinite(loss):
            fire = self._jump("loss", loss) or fire
            best = self._memory.best
            self._memory.update(({"step": step, "loss": loss},))
            k = self.options.level_steps
            self._tail = [*self._tail[-(k - 1):], loss] if k > 1 else [loss]
            if len(self._tail) == k:
                level = min(self._tail)
                bar = self.options.level_ratio * best
                if self.chance is not None:
                    bar = min(bar, self.chance)
                fire = fire or level >= bar
        return fire
