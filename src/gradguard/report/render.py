"""Turn saved results into files: each figure's PNG and the report page, and a run's index page."""

from __future__ import annotations

from pathlib import Path

from gradguard.report.figures import Figure
from gradguard.report.files import INDEX, REPORT, ExperimentResults, load_experiment, write_bytes_atomic
from gradguard.report.html import render_experiment, render_index
from gradguard.report.plots import render_png


def render_folder(folder: Path) -> Path:
    """(Re)draw every figure of the finished experiment in ``folder`` and write its ``report.html``."""
    results = load_experiment(folder)
    images: dict[str, bytes] = {}
    for spec in results.figures:
        figure = Figure.from_dict(spec)
        images[figure.name] = render_png(figure)
        write_bytes_atomic(folder / f"{figure.name}.png", images[figure.name])
    path = folder / REPORT
    write_bytes_atomic(path, render_experiment(results, images).encode("utf-8"))
    return path


def render_index_file(folder: Path, runs: list[ExperimentResults]) -> Path:
    """Write ``folder/index.html`` linking the reports of ``runs`` (sub-folders of ``folder``)."""
    path = folder / INDEX
    write_bytes_atomic(path, render_index(runs).encode("utf-8"))
    return path
