"""Schedules: on which steps the monitor does its periodic work (activation hooks, detail statistics).

:func:`every` is a plain ``step -> bool`` function (as in Cockpit). :class:`Sampling` is the monitor's own
schedule: a fixed period, or an adaptive one that is dense at the start of a run and whenever something
looks suspicious, and sparse in between. Its state changes on the host only, when the monitor records a
sampled step (:meth:`Sampling.taken`) or raises an alert (:meth:`Sampling.alert`) from values it already
has on the host; deciding never reads the device. The design and its worst-case detection latency are in
docs/monitor.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradguard.errors import ConfigError, check_number

Schedule = Callable[[int], bool]


def every(n: int, offset: int = 0) -> Schedule:
    """Schedule that fires on steps ``offset, offset + n, offset + 2n, ...`` (steps count from 0).

    >>> [s for s in range(25) if every(10)(s)]
    [0, 10, 20]
    """
    check_number("n", n, low=1, integer=True)
    check_number("offset", offset, low=0, integer=True)

    def fires(step: int) -> bool:
        return step >= offset and (step - offset) % n == 0

    return fires


class Sampling:
    """Sampled steps every ``dense`` steps while dense, every ``sparse`` steps otherwise.

    Dense for the first ``start`` steps and for ``hold`` steps after each :meth:`alert`; ``sparse == dense``
    is a fixed period (steps ``0, dense, 2·dense, ...``). The next sampled step is ``s + period(s)`` after
    the last sampled step ``s``; an alert brings it forward to ``max(now + 1, s + dense)``, so the first
    sampled step after an alert comes at most ``dense`` steps after the last one and has the weights of the
    step before it (for the update ratio). A step that was due but not sampled (no gradient) leaves the
    next step due.

    >>> s = Sampling(10, 50, start=30, hold=20)
    >>> fired = []
    >>> for step in range(200):
    ...     if s(step):
    ...         fired.append(step)
    ...         s.taken(step)
    ...     if step == 120:
    ...         s.alert(step + 1, "loss jump")
    >>> fired
    [0, 10, 20, 30, 80, 122, 132, 142, 192]

    Args:
        dense: period while dense (≥ 1).
        sparse: period otherwise (≥ ``dense``; ``None``: ``dense``, a fixed period).
        start: steps from the start of the run that are dense (≥ 0).
        hold: steps after an alert that are dense (≥ 0).
    """

    def __init__(self, dense: int, sparse: int | None = None, *, start: int = 0, hold: int = 0) -> None:
        check_number("dense", dense, low=1, integer=True)
        if sparse is not None:
            check_number("sparse", sparse, low=1, integer=True)
            if sparse < dense:
                raise ConfigError(f"sparse={sparse} is below dense={dense}; allowed: sparse >= dense")
        check_number("start", start, low=0, integer=True)
        check_number("hold", hold, low=0, integer=True)
        self.dense = dense
        self.sparse = dense if sparse is None else sparse
        self.start = start
        self.hold = hold
        self._next = 0
        self._last: int | None = None
        self._dense_until = start
        #: Alerts received (those that changed the schedule), and the reason of the latest.
        self.alerts = 0
        self.reason = ""

    @property
    def adaptive(self) -> bool:
        return self.sparse > self.dense

    def __call__(self, step: int) -> bool:
        """True when ``step`` is a sampled step (pure: the answer changes only through taken/alert)."""
        return step >= self._next

    def period(self, step: int) -> int:
        """The period in force at ``step``."""
        return self.dense if step < self._dense_until else self.sparse

    def taken(self, step: int) -> None:
        """``step`` was sampled: the next sampled step is one period later."""
        self._last = step
        self._next = step + self.period(step)

    def alert(self, step: int, reason: str) -> None:
        """Something looks suspicious as of ``step`` (the next step to run): dense for ``hold`` steps."""
        if not self.adaptive:
            return
        self._dense_until = max(self._dense_until, step + self.hold)
        soon = step + 1 if self._last is None else max(step + 1, self._last + self.dense)
        if soon < self._next:
            self._next = soon
        self.alerts += 1
        self.reason = reason

    def state_dict(self) -> dict[str, Any]:
        """Where the schedule stands (not its periods, which are the constructor's)."""
        return {"next": self._next, "last": self._last, "dense_until": self._dense_until, "alerts": self.alerts,
                "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next = int(state["next"])
        self._last = None if state["last"] is None else int(state["last"])
        self._dense_until = int(state["dense_until"])
        self.alerts = int(state.get("alerts", 0))
        self.reason = str(state.get("reason", ""))

    def __repr__(self) -> str:
        if not self.adaptive:
            return f"Sampling({self.dense})"
        return f"Sampling({self.dense}, {self.sparse}, start={self.start}, hold={self.hold})"
