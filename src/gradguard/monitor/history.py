"""The bounded history behind ``Monitor.history``: recent rows whole, older rows downsampled.

Memory stays flat on long runs (docs/monitor.md, "Memory on long runs"): the newest ``limit`` rows are kept
in full, and at most as many older ones, evenly spread over the whole run by a stride that doubles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


class History:
    """The newest ``limit`` rows in full and at most ``limit`` older ones (see :meth:`keep`).

    State: ``recent`` (the newest rows, every step), ``archive`` (older rows, every ``stride``-th step and the
    marked ones), ``stride`` (1 at first, doubling) and ``marked`` (steps of warnings, errors and non-finite
    rows: archived first, whole).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.recent: list[dict[str, Any]] = []  # the newest `limit` rows, every step
        self.archive: list[dict[str, Any]] = []  # older rows, every stride-th step (see keep)
        self.stride = 1
        self.marked: set[int] = set()  # steps of warnings, errors and non-finite rows: archived first

    def mark(self, steps: Iterable[int]) -> None:
        """Keep these steps whole in the archive (a warning, an error or a non-finite value)."""
        self.marked.update(steps)

    def keep(self, rows: Sequence[dict[str, Any]], steps: int) -> None:
        """Add ``rows`` (``steps``: the run's length so far, the monitor's step count).

        A row leaving the recent part is archived if its step is a multiple of the stride (1 at first);
        whenever the archive outgrows ``limit`` the stride doubles and the archive is thinned to it, so old
        steps stay evenly spread over the whole run. Steps of a warning, an error or a non-finite row are
        archived whatever the stride, until the stride exceeds the run's length, and keep their per-tensor
        columns; other archived rows keep the global scalars only (``step``, ``loss``, ``grad_norm``,
        ``loss_scale``), so the archive costs a few hundred bytes a row whatever the model's size. The rules
        read their own window (``window`` steps), not this history.
        """
        self.recent.extend(rows)
        excess = len(self.recent) - self.limit
        if excess <= 0:
            return
        old = self.recent[:excess]
        del self.recent[:excess]
        self.archive.extend(r if r["step"] in self.marked else {k: v for k, v in r.items() if "/" not in k}
                            for r in old if self._archived(r, steps))
        while len(self.archive) > self.limit:
            self.stride *= 2
            self.archive = [r for r in self.archive if self._archived(r, steps)]

    def _archived(self, row: Mapping[str, Any], steps: int) -> bool:
        step = row["step"]
        return step % self.stride == 0 or (self.stride <= steps and step in self.marked)

    def rows(self) -> list[dict[str, Any]]:
        """Archived rows then recent rows, oldest first."""
        return [*self.archive, *self.recent]
