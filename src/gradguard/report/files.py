"""Reading and writing run folders: atomic writes, strict JSON, and loading finished results.

A run folder holds one sub-folder per experiment (``DIR/ID/``) with ``config.json``, ``metrics.json``
(scalars and the ``claims`` list), ``figures.json`` (figure specifications), the PNG figures and
``report.html``. ``metrics.json`` is written after everything it refers to, so its presence marks a
finished experiment.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradguard.errors import ConfigError
from gradguard.report.figures import Figure

CONFIG, METRICS, FIGURES, REPORT, INDEX = "config.json", "metrics.json", "figures.json", "report.html", "index.html"

#: A figure's name is a plain file stem: no separators, not hidden, no "..".
_FIGURE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")

#: Keys every claim in ``metrics.json`` has (see :class:`gradguard.lab.claims.Claim`).
CLAIM_KEYS = ("id", "statement", "measured", "expected", "holds")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place.

    ``os.replace`` is atomic on POSIX and Windows, so a run killed at any moment leaves either the old
    file or the complete new one under the final name, never half of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh hidden name ("x" mode never reuses one); open() applies the umask, unlike mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats spelled ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON has none).

    ``float()`` reads these strings back, so readers need no special case.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def write_json_atomic(path: Path, value: Any) -> None:
    """Strict, indented JSON (see :func:`jsonable`) written with :func:`write_bytes_atomic`."""
    text = json.dumps(jsonable(value), indent=1, ensure_ascii=False, allow_nan=False)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


@dataclass(frozen=True)
class ExperimentResults:
    """The saved results of one finished experiment, as read back from its folder."""

    folder: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    figures: list[dict[str, Any]]

    @property
    def id(self) -> str:
        return str(self.metrics["id"])

    @property
    def claims(self) -> list[dict[str, Any]]:
        return list(self.metrics.get("claims", []))

    @property
    def all_hold(self) -> bool:
        return all(bool(c["holds"]) for c in self.claims)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable gradguard result file ({exc.__class__.__name__})") from None


def is_experiment_folder(folder: Path) -> bool:
    """True when ``folder`` holds a finished experiment (its ``metrics.json``)."""
    return (folder / METRICS).is_file()


def load_experiment(folder: Path) -> ExperimentResults:
    """Read a finished experiment folder; raises :class:`ConfigError` if it is not one."""
    if not is_experiment_folder(folder):
        raise ConfigError(f"{str(folder)!r} is not a finished gradguard experiment (no {METRICS})")
    metrics = _read_json(folder / METRICS)
    if not isinstance(metrics, dict) or "id" not in metrics or "claims" not in metrics:
        raise ConfigError(f"{folder / METRICS} is not a gradguard metrics file (needs 'id' and 'claims')")
    # A foreign or hand-edited file must fail here, in one line, not as a KeyError deep in the renderer.
    claims = metrics["claims"]
    if not isinstance(claims, list) or not all(isinstance(c, dict) and set(CLAIM_KEYS) <= set(c) for c in claims):
        raise ConfigError(
            f"{folder / METRICS} is not a gradguard metrics file ('claims' must be a list of objects with "
            f"{', '.join(CLAIM_KEYS)})"
        )
    if not isinstance(metrics.get("metrics", {}), dict):
        raise ConfigError(f"{folder / METRICS} is not a gradguard metrics file ('metrics' must be an object)")
    config = _read_json(folder / CONFIG) if (folder / CONFIG).is_file() else {}
    figures = _read_json(folder / FIGURES) if (folder / FIGURES).is_file() else []
    if not isinstance(figures, list):
        raise ConfigError(f"{folder / FIGURES} is not a gradguard figures file (needs a list of figures)")
    for spec in figures:
        try:
            name = Figure.from_dict(spec).name
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(f"{folder / FIGURES} holds an entry that is not a gradguard figure spec") from None
        # The name becomes "<name>.png" beside the report: it must not reach outside the folder.
        if not isinstance(name, str) or not _FIGURE_NAME.fullmatch(name):
            raise ConfigError(
                f"{folder / FIGURES}: figure name {name!r} is not allowed; use letters, digits, '_', '-', '.' "
                "(not starting with '.')"
            )
    return ExperimentResults(folder, config, metrics, figures)


def find_experiments(folder: Path) -> list[Path]:
    """Experiment folders of a run: ``folder`` itself if it is one, else its finished sub-folders."""
    if not folder.is_dir():
        raise ConfigError(f"{str(folder)!r} is not a folder")
    if is_experiment_folder(folder):
        return [folder]
    found = sorted(p for p in folder.iterdir() if p.is_dir() and is_experiment_folder(p))
    if not found:
        raise ConfigError(f"{str(folder)!r} is not a gradguard run: no experiment folder with {METRICS} in it")
    return found
