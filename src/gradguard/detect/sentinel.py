"""The per-step tripwire that decides when the rules must run before the logging schedule.

The rules run on a fetch (every ``log_every`` steps). A finding is useful only once it is visible, so the
monitor also fetches early when this tripwire fires: at every one of the first ``early`` steps (nothing is
known about the run yet), and afterwards when a step's loss or global gradient norm looks like the start of
something the rules judge. It reads two host floats per step; the monitor feeds it only where those are
on the host already (CPU tensors: reading them is a memory load, not a device synchronisation).

It fires only where a rule could report something of severity warning or worse (a finding of severity
info can wait for the logging schedule), mirroring the rules' own bars with ``m`` an exponential moving
average of ``log x`` over ~16 steps standing in for the window's median:

* a single step with ``x ≥ spike_warning · exp(m)`` for the loss or the gradient norm (``loss_spike`` is a
  warning from that factor on);
* the median of the last ``RECENT`` gradient norms ``≥ growth · exp(m)`` (``exploding``, growth in time), or
  the gradient norm doubling at each of the last 3 steps (``exploding.GEOMETRIC``);
* the last ``level_steps`` losses all at ``level_ratio`` × the run's best level or more and, with a known
  chance level ``χ`` below which the run has learned, also at ``B + GIVEN_BACK · (χ − B)`` or more, or all at
  ``χ`` or above (``divergence``).

A run that fits its data to a loss near 0 has batches ×10 apart and levels ×2 apart all the time; bars
below the rules' would fetch at nearly every step for nothing. It only ever makes the rules run sooner; it
never makes a finding.
"""

from __future__ import annotations

import itertools
import math
import statistics

from gradguard.detect.base import RuleOptions, RunMemory
from gradguard.detect.divergence import GIVEN_BACK
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

    def _jump(self, key: str, x: float | None) -> float | None:
        """Update the moving average of ``log x``; return ``log x − m`` against the average before, if any."""
        if x is None or not x > 0 or not math.isfinite(x):
            return None
        lx = math.log(x)
        m = self._ema.get(key)
        self._ema[key] = lx if m is None else m + ALPHA * (lx - m)
        return None if m is None else lx - m

    def check(self, step: int, loss: float | None, grad_norm: float) -> bool:
        """True when the rules should run now (after recording ``step``)."""
        self._seen += 1
        opts = self.options
        fire = self._seen <= self.early
        m = self._ema.get("grad_norm")
        jump = self._jump("grad_norm", grad_norm)
        fire = fire or (jump is not None and jump >= math.log(opts.spike_warning))
        self._grads = [*self._grads[-RECENT:], grad_norm]
        if len(self._grads) == RECENT + 1 and all(a > 0 and b >= GEOMETRIC * a
                                                  for a, b in itertools.pairwise(self._grads)):
            fire = True
        recent = self._grads[-RECENT:]
        if m is not None and len(recent) == RECENT and all(math.isfinite(g) for g in recent):
            fire = fire or statistics.median(recent) >= opts.growth * math.exp(m)
        if loss is not None and math.isfinite(loss):
            jump = self._jump("loss", loss)
            fire = fire or (jump is not None and jump >= math.log(opts.spike_warning))
            best = self._memory.best
            self._memory.update(({"step": step, "loss": loss},))
            k = self.options.level_steps
            self._tail = [*self._tail[-(k - 1):], loss] if k > 1 else [loss]
            if len(self._tail) == k:
                level = min(self._tail)
                bar = opts.level_ratio * best
                if self.chance is not None:
                    if best < self.chance:
                        bar = max(bar, best + GIVEN_BACK * (self.chance - best))
                    bar = min(bar, self.chance)
                fire = fire or level >= bar
        return fire
