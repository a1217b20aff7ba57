"""What the Guard remembers of the applied steps, as host numbers: the spike windows and the divergence test.

Both are fed by the one vector the Guard fetches per step, so keeping them on the host costs no device
work and no further synchronisation (docs/guard.md, "What one step does").
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gradguard.errors import StateError

__all__ = ["Divergence", "HostWindow"]


class HostWindow:
    """The last ``size`` values of ``rows`` series (loss, gradient norm) of applied steps, as host floats.

    Each row is kept twice: in push order (a ring of slots, for the recent maximum and for the state) and
    sorted (``bisect``), so the median is one index and the MAD a walk over half the window, with no
    array built per step. Non-finite values are never held (the Guard pushes applied steps only).
    """

    def __init__(self, size: int, rows: int) -> None:
        self.size = size
        self.slots = [[math.nan] * size for _ in range(rows)]
        self.sorted: list[list[float]] = [[] for _ in range(rows)]
        self.pushes = 0

    def push(self, values: Sequence[float]) -> None:
        """Store one value per row in the oldest slot."""
        slot = self.pushes % self.size
        for ring, order, v in zip(self.slots, self.sorted, values, strict=True):
            old = ring[slot]
            if math.isfinite(old):
                del order[bisect.bisect_left(order, old)]
            ring[slot] = v
            if math.isfinite(v):
                bisect.insort(order, v)
        self.pushes += 1

    def held(self) -> int:
        """Slots written so far (at most ``size``)."""
        return min(self.pushes, self.size)

    def median_mad(self, row: int) -> tuple[float, float]:
        """Median and median absolute deviation of a row's values, both the lower middle value as
        ``torch.nanmedian``'s (NaN when the row is empty).

        With ``s`` sorted and the median ``s[k]``, the deviations are two sorted runs outward from it,
        ``L_i = s[k] − s[k−i]`` and ``R_j = s[k+1+j] − s[k]``; the MAD is the largest of the ``k + 1``
        smallest of both, found by bisecting how many of them come from ``L``.
        """
        s = self.sorted[row]
        n = len(s)
        if n == 0:
            return math.nan, math.nan
        k = (n - 1) // 2
        med, take, right = s[k], k + 1, n - k - 1
        lo, hi = max(0, take - right), take  # i deviations from L, take − i from R
        while lo < hi:
            i = (lo + hi) // 2
            if med - s[k - i] < s[k + take - i] - med:  # L_i < R_(take−i−1): take more from L
                lo = i + 1
            else:
                hi = i
        from_l = med - s[k - lo + 1] if lo > 0 else -math.inf
        from_r = s[k + take - lo] - med if lo < take else -math.inf
        return med, max(from_l, from_r)

    def recent_max(self, row: int, k: int) -> float:
        """The largest of the row's last ``k`` pushed values."""
        ring, end = self.slots[row], self.pushes % self.size
        k = min(k, self.held())
        if end >= k:
            return max(ring[end - k : end])
        return max(ring[self.size - (k - end) :] + ring[:end])

    def state_dict(self) -> dict[str, Any]:
        """Explicit state: the slots as a CPU tensor (so ``torch.load(weights_only=True)`` reads it)."""
        return {"values": torch.tensor(self.slots, dtype=torch.float64), "pushes": self.pushes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a device ``gradguard.stats.Window``'s state is read too)."""
        values = torch.as_tensor(state["values"]).detach().to("cpu", torch.float64)
        if tuple(values.shape) != (len(self.slots), self.size):
            raise StateError(
                f"Guard window state of shape {tuple(values.shape)} does not fit this Guard (window={self.size})"
            )
        self.slots = values.tolist()
        self.pushes = int(state["pushes"])
        held = self.slots if self.pushes >= self.size else [ring[: self.pushes] for ring in self.slots]
        self.sorted = [sorted(v for v in ring if math.isfinite(v)) for ring in held]


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
