"""Reading a run's log, ``metrics.jsonl``, into columns: what the monitor and ``gradguard run`` wrote.

Line types (see :class:`gradguard.sinks.jsonl.JsonlSink`):

* ``{"type": "step", "step": s, "loss", "grad_norm", "grad_norm/<param>", "update_ratio/<param>", ...}``: one
  history row; per-tensor keys may be present on some rows only (detail logged on a schedule), so every
  column records where it was logged. ``numel/<param>`` (element count), ``act/<module>/frac_zero`` and
  ``.../frac_saturated``, and ``time_grad/<module>`` (a list: ‖∂L/∂h_t‖ per time step of a recurrent module)
  are read when present.
* ``{"type": "finding", ...}``: a new or changed :class:`~gradguard.findings.Finding` (the last state counts).
* ``{"type": "event", "step": s, "action": "skip" | "clip" | "rollback" | "lr_backoff" | ..., "reason": str}``:
  an intervention of a Guard.
* ``{"type": "run", "status": "complete" | "error" | "interrupted", "exit_code": int, "reason": str}``: the
  closing record. A log without one comes from a process that did not get to write it.

A process killed mid-write leaves at most one incomplete last line: it is skipped and counted. Lines of
another ``type`` are ignored, so newer writers do not break older readers.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradguard.errors import ConfigError
from gradguard.findings import SEVERITIES, Finding

#: The log file name inside a run folder (``gg.watch(model, log_dir=D)`` writes ``D/metrics.jsonl``).
WATCH_LOG = "metrics.jsonl"
#: Per-tensor columns read from step rows (``<prefix>/<param>``).
PARAM_PREFIXES = ("grad_norm", "update_ratio", "weight_norm", "numel")
#: Per-module activation fields read from step rows (``act/<module>/<field>``).
ACT_FIELDS = ("frac_zero", "frac_saturated", "numel")
#: Closing statuses of a run.
RUN_STATUSES = ("complete", "error", "interrupted")


def number(value: Any) -> float:
    """A logged value as a float: non-finite values are logged as the strings "nan", "inf", "-inf"."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass(frozen=True)
class Track:
    """One logged quantity over the run's steps: ``values[i]`` at ``WatchLog.steps[i]`` where ``logged[i]``
    (NaN elsewhere). Logged non-finite values stay NaN/±Inf, so "not logged" and "logged NaN" differ."""

    values: np.ndarray
    logged: np.ndarray


@dataclass(frozen=True)
class Event:
    """A logged intervention: ``action`` at ``step`` because of ``reason``; ``extra`` holds the other keys."""

    step: int
    action: str
    reason: str
    extra: dict[str, Any]


@dataclass(frozen=True)
class RunEnd:
    """The closing record of a run: ``status`` is one of :data:`RUN_STATUSES` (another word is kept as written
    and read as "not complete")."""

    status: str
    exit_code: int | None
    reason: str


@dataclass(frozen=True)
class WatchLog:
    """What a run's ``metrics.jsonl`` holds.

    Attributes:
        steps: the logged steps, ascending, once each (a repeated step keeps its last row).
        tracks: ``loss``, ``grad_norm`` and the per-tensor and per-module columns, keyed as in the log.
        params: parameter names in the order they were first logged (``named_parameters()`` order: depth).
        modules: module names with activation fields, in the order first logged.
        time_grad: per recurrent module, ``(step, [‖∂L/∂h_t‖ for t = 0, 1, ...])`` in step order.
        findings: the last state of each finding (one per kind and module), worst first.
        events: interventions in step order.
        end: the closing record, or None when there is none.
        skipped_lines: lines that were not complete JSON objects (a process killed while writing its last line).
    """

    steps: np.ndarray
    tracks: dict[str, Track]
    params: list[str]
    modules: list[str]
    time_grad: dict[str, list[tuple[int, list[float]]]]
    findings: list[Finding]
    events: list[Event]
    end: RunEnd | None
    skipped_lines: int

    def track(self, key: str) -> Track:
        """The column ``key``; all "not logged" when the log never had it."""
        found = self.tracks.get(key)
        if found is not None:
            return found
        return Track(np.full(len(self.steps), math.nan), np.zeros(len(self.steps), dtype=bool))

    def last(self, key: str) -> float:
        """The value of ``key`` at the last step that logged it (NaN if none did)."""
        t = self.track(key)
        where = np.flatnonzero(t.logged)
        return float(t.values[where[-1]]) if where.size else math.nan

    @property
    def numel(self) -> dict[str, int]:
        """Element count of each parameter whose ``numel/<param>`` was logged."""
        out = {}
        for p in self.params:
            n = self.last(f"numel/{p}")
            if math.isfinite(n) and n > 0:
                out[p] = int(n)
        return out


def is_watch_folder(folder: Path) -> bool:
    """True when ``folder`` holds a run log (``metrics.jsonl``)."""
    return (folder / WATCH_LOG).is_file()


def _kept(key: str) -> bool:
    """Whether a step row's ``key`` is one the report reads as a column."""
    head, sep, rest = key.partition("/")
    if not sep:
        return key in ("loss", "grad_norm")
    if head == "act":
        return rest.rpartition("/")[2] in ACT_FIELDS
    return head in PARAM_PREFIXES


class _Layout:
    """The step rows that share one key order: which of their values are columns, gathered as rows.

    Rows logged on the same schedule have the same keys in the same order, so the per-key decision is made
    once per layout, and each row costs one C-level gather of its values.
    """

    def __init__(self, keys: tuple[str, ...]) -> None:
        kept = [i for i, k in enumerate(keys) if _kept(k)]
        self.keys = [keys[i] for i in kept]
        self.pick = operator.itemgetter(*kept) if len(kept) > 1 else (lambda v: tuple(v[i] for i in kept))
        self.series = [k[len("time_grad/"):] for k in keys if k.startswith("time_grad/")]
        self.lines: list[int] = []
        self.rows: list[tuple[Any, ...]] = []

    def add(self, line: int, values: list[Any]) -> None:
        self.lines.append(line)
        self.rows.append(self.pick(values))

    def matrix(self) -> np.ndarray:
        """The gathered values as floats (rows × keys); non-finite values are spelled as strings in the log."""
        try:
            return np.array(self.rows, dtype=float).reshape(len(self.rows), len(self.keys))
        except (TypeError, ValueError):  # a value that is not a number: read it cell by cell
            return np.array([[number(v) for v in row] for row in self.rows], dtype=float).reshape(
                len(self.rows), len(self.keys))


def _event(obj: dict[str, Any]) -> Event:
    step, action = obj["step"], obj["action"]
    if not isinstance(action, str) or isinstance(step, bool):
        raise ValueError("not an event")
    extra = {k: v for k, v in obj.items() if k not in ("type", "step", "action", "reason")}
    return Event(int(step), action, str(obj.get("reason", "")), extra)


def _run_end(obj: dict[str, Any]) -> RunEnd:
    status = obj["status"]
    if not isinstance(status, str) or not status:
        raise ValueError("not a run status")
    code = obj.get("exit_code")
    return RunEnd(status, int(code) if isinstance(code, int) and not isinstance(code, bool) else None,
                  str(obj.get("reason", "")))


def load_watch_log(folder: Path) -> WatchLog:
    """Read ``folder/metrics.jsonl`` (see the module docstring); raises :class:`ConfigError` when the file
    cannot be read or holds no gradguard record at all."""
    path = folder / WATCH_LOG
    try:
        fh = path.open("r", encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
    layouts: dict[tuple[str, ...], _Layout] = {}
    step_lines: list[int] = []
    step_of_line: list[int] = []
    time_grad: dict[str, dict[int, list[float]]] = {}
    findings: dict[tuple[str, str], Finding] = {}
    events: list[Event] = []
    end: RunEnd | None = None
    skipped = 0
    with fh:
        for i, line in enumerate(fh):
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
                    raise ValueError("not a record")
                kind = obj["type"]
                if kind == "step":
                    step = obj["step"]
                    if isinstance(step, bool) or not isinstance(step, int | float):
                        raise ValueError("no step number")
                    keys = tuple(obj)
                    layout = layouts.get(keys)
                    if layout is None:
                        layout = layouts[keys] = _Layout(keys)
                    layout.add(i, list(obj.values()))
                    step_lines.append(i)
                    step_of_line.append(int(step))
                    for module in layout.series:
                        value = obj[f"time_grad/{module}"]
                        if isinstance(value, list):
                            time_grad.setdefault(module, {})[int(step)] = [number(v) for v in value]
                elif kind == "finding":
                    f = Finding.from_dict(obj)
                    findings[f.key] = f
                elif kind == "event":
                    events.append(_event(obj))
                elif kind == "run":
                    end = _run_end(obj)
            except (ValueError, KeyError, TypeError, ConfigError):
                skipped += 1
    if not step_lines and not findings and not events and end is None:
        raise ConfigError(f"{path} holds no gradguard monitor record (lines of type 'step' or 'finding')")
    # One row per step, the last line that logged it; ascending steps.
    by_step = np.array(step_of_line, dtype=np.int64)
    lines = np.array(step_lines, dtype=np.int64)
    steps, last_from_end = np.unique(by_step[::-1], return_index=True)
    rows = lines[::-1][last_from_end]
    position = np.full(int(lines.max()) + 1 if lines.size else 0, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    values: dict[str, np.ndarray] = {}
    logged: dict[str, np.ndarray] = {}
    params: dict[str, None] = {}
    modules: dict[str, None] = {}
    # Layouts in the order first seen, keys in row order: names keep the order they were first logged in.
    for layout in sorted(layouts.values(), key=lambda lay: lay.lines[0]):
        at = position[np.array(layout.lines, dtype=np.int64)]
        keep = at >= 0
        matrix = layout.matrix()[keep]
        for j, key in enumerate(layout.keys):
            if key not in values:
                values[key] = np.full(len(steps), math.nan)
                logged[key] = np.zeros(len(steps), dtype=bool)
            values[key][at[keep]] = matrix[:, j]
            logged[key][at[keep]] = True
            head, _, rest = key.partition("/")
            if head == "grad_norm" and rest:
                params.setdefault(rest)
            elif head == "act":
                modules.setdefault(rest.rpartition("/")[0])
    tracks = {k: Track(values[k], logged[k]) for k in values}
    ordered = sorted(findings.values(), key=lambda f: (-SEVERITIES.index(f.severity), f.step, f.module))
    return WatchLog(
        steps=steps,
        tracks=tracks,
        params=list(params),
        modules=list(modules),
        time_grad={m: sorted(d.items()) for m, d in time_grad.items()},
        findings=ordered,
        events=sorted(events, key=lambda e: e.step),
        end=end,
        skipped_lines=skipped,
    )
