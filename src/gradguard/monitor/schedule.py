"""Schedules: plain ``step -> bool`` functions that say on which steps something happens (as in Cockpit)."""

from __future__ import annotations

from collections.abc import Callable

from gradguard.errors import check_number

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
