"""Console sink: prints each new or changed finding once, with rich."""

from __future__ import annotations

from typing import IO

from rich.console import Console
from rich.markup import escape

from gradguard.findings import Finding
from gradguard.sinks.base import Sink

_STYLE = {"info": "cyan", "warning": "yellow", "error": "bold red"}


class ConsoleSink(Sink):
    """Print findings as they appear: ``[severity] kind at `module` (step s): message → advice``."""

    def __init__(self, file: IO[str] | None = None) -> None:
        self.console = Console(file=file, highlight=False, soft_wrap=True)
        self._seen: dict[tuple[str, str], tuple[str, str]] = {}

    def on_finding(self, finding: Finding) -> None:
        # The monitor sends a finding again when its numbers change; print only a change of severity.
        state = (finding.severity, finding.kind)
        if self._seen.get(finding.key) == state:
            return
        self._seen[finding.key] = state
        where = f"`{finding.module}`" if finding.module else "the model"
        style = _STYLE[finding.severity]
        self.console.print(
            f"[{style}]{finding.severity.upper():7s}[/{style}] {finding.kind} at {escape(where)} "
            f"(step {finding.step}): {escape(finding.message)}\n         → {escape(finding.advice)}",
            markup=True,
        )
