"""JSON Lines metrics file, safe against a process killed at any moment."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from gradguard.errors import check_choice
from gradguard.findings import Finding
from gradguard.sinks.base import Sink

#: ``JsonlSink(tensors=...)``: which step rows carry their per-tensor and per-module columns.
TENSOR_ROWS = ("sampled", "all")
#: Column prefixes that only sampled rows carry: the last key of a sampled row starts with one of them.
_SAMPLED_TAIL = ("act/", "update_ratio/", "weight_norm/")


def _clean(obj: Any) -> Any:
    # JSON has no NaN/Inf; write them as strings so every line stays standard JSON.
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if obj != obj else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _whole(record: dict[str, Any]) -> bool:
    """A sampled row (its last key is a sampled-only column), or one whose loss or gradient norm is not finite."""
    last = next(reversed(record), "")
    if last.startswith(_SAMPLED_TAIL):
        return True
    return any(isinstance(v := record.get(k), float) and not math.isfinite(v) for k in ("loss", "grad_norm"))


class JsonlSink(Sink):
    """Append one JSON object per line to ``<log_dir>/metrics.jsonl``.

    Lines are ``{"type": "step", ...row}`` and ``{"type": "finding", ...finding}``. Each line is encoded
    completely first and written with a single ``os.write`` on an ``O_APPEND`` descriptor, so a crash can
    only lose whole lines, never leave half of one behind a complete one. The monitor calls the sink on
    its logging schedule, so writes (and their cost) follow that schedule.

    Size on long runs (docs/monitor.md): with ``tensors="sampled"`` every step's line has the global
    scalars (``step``, ``loss``, ``grad_norm``, ``loss_scale``), and the per-tensor and per-module columns
    (``grad_norm/<p>``, ``weight_norm/<p>``, ``update_ratio/<p>``, ``act/<m>/<field>``, ...) are written on
    the monitor's sampled steps and on every step whose loss or gradient norm is not finite; a
    ``nonfinite/<p>`` count is written only where it is not 0. The report's heatmaps then have one column
    per sampled step. ``tensors="all"`` writes every row whole.

    Args:
        log_dir: folder of the file (created if missing).
        filename: the file's name.
        tensors: ``"sampled"`` or ``"all"`` (see above).
    """

    def __init__(self, log_dir: str | os.PathLike[str], filename: str = "metrics.jsonl", *,
                 tensors: str = "sampled") -> None:
        self._all_rows = check_choice("tensors", tensors, TENSOR_ROWS) == "all"
        self.path = Path(log_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _line(self, obj: dict[str, Any]) -> None:
        """Encode one whole line, then hand it to the kernel in one ``os.write`` (unbuffered: no flush needed)."""
        if self._fd is None:
            return
        view = memoryview((json.dumps(_clean(obj), separators=(",", ":")) + "\n").encode())
        while view:  # os.write may write less than asked (rare; signals); finish the same line.
            n = os.write(self._fd, view)
            view = view[n:]

    def on_step(self, record: dict[str, float]) -> None:
        if not self._all_rows:
            if _whole(record):
                record = {k: v for k, v in record.items() if not (k.startswith("nonfinite/") and v == 0)}
            else:
                record = {k: v for k, v in record.items() if "/" not in k}
        self._line({"type": "step", **record})

    def on_finding(self, finding: Finding) -> None:
        self._line({"type": "finding", **finding.to_dict()})

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
