"""Rendering of lab results and run logs: figure specifications, PNG plots and self-contained HTML reports.

Reads saved or measured results and draws them; computes no statistics (data flows into the reports, see
docs/README.md). Names load on first use (PEP 562), so that importing
one renderer does not import the plotting stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradguard.report.figures import Figure, Panel, Series
    from gradguard.report.files import ExperimentResults, find_experiments, load_experiment
    from gradguard.report.render import render_folder, render_index_file
    from gradguard.report.watch import render_compare_report, render_watch_report

_LAZY = {
    "ExperimentResults": "files",
    "Figure": "figures",
    "Panel": "figures",
    "Series": "figures",
    "find_experiments": "files",
    "load_experiment": "files",
    "render_compare_report": "watch",
    "render_folder": "render",
    "render_index_file": "render",
    "render_watch_report": "watch",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'gradguard.report' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gradguard.report.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ExperimentResults",
    "Figure",
    "Panel",
    "Series",
    "find_experiments",
    "load_experiment",
    "render_compare_report",
    "render_folder",
    "render_index_file",
    "render_watch_report",
]
