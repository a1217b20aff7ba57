"""The sink interface: where the monitor sends history rows, findings and activation samples."""

from __future__ import annotations

from torch import Tensor

from gradguard.findings import Finding


class Sink:
    """Base class with no-op methods; override the ones you need.

    Sinks are called on the logging schedule (never inside the per-step hot path): ``on_step`` once per
    recorded step, ``on_finding`` once per new or changed finding, ``on_histogram`` with activation
    samples of sampled steps, ``close`` when the monitor closes.
    """

    def on_step(self, record: dict[str, float]) -> None:
        """One history row: ``step``, ``loss``, ``grad_norm``, ``grad_norm/<param>``, ... (see ``Monitor.history``)."""

    def on_finding(self, finding: Finding) -> None:
        """A finding that is new, or whose severity/message changed."""

    def on_histogram(self, step: int, tag: str, values: Tensor) -> None:
        """Values (on the host) to draw as a histogram, e.g. ``act/<module>`` samples or time profiles."""

    def close(self) -> None:
        """Flush and release resources."""
