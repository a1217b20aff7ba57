"""Rendering of lab results and run logs: figure specifications, PNG plots and self-contained HTML reports.

Reads saved results and draws them; computes no statistics (STYLE.md, principle 2).
"""

from gradguard.report.figures import Figure, Panel, Series
from gradguard.report.files import ExperimentResults, find_experiments, load_experiment
from gradguard.report.render import render_folder, render_index_file
from gradguard.report.watch import render_compare_report, render_watch_report

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
