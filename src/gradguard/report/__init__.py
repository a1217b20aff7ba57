"""Rendering of lab results: figure specifications, PNG plots and self-contained HTML reports.

Reads saved results and draws them; computes no statistics (STYLE.md, principle 2).
"""

from gradguard.report.figures import Figure, Panel, Series
from gradguard.report.files import ExperimentResults, find_experiments, load_experiment
from gradguard.report.render import render_folder, render_index_file

__all__ = [
    "ExperimentResults",
    "Figure",
    "Panel",
    "Series",
    "find_experiments",
    "load_experiment",
    "render_folder",
    "render_index_file",
]
