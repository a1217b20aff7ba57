"""Run experiments and write their results: config, metrics with claims, figures, report, index."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from gradguard import __version__
from gradguard.errors import ConfigError
from gradguard.lab.experiment import ExperimentInfo, RunContext
from gradguard.report.files import CONFIG, FIGURES, METRICS, ExperimentResults, load_experiment, write_json_atomic
from gradguard.report.render import render_folder, render_index_file

#: torch CPU threads while an experiment runs (restored afterwards).
THREADS = 1


def versions() -> dict[str, str]:
    """Versions that decide whether two runs can give the same numbers."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "gradguard": __version__,
        "platform": platform.platform(),
    }


def prepare_out(out: Path) -> Path:
    """Create ``out`` and check it is writable; raises :class:`ConfigError` with the reason if not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".gradguard-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {str(out)!r} is not writable: {exc.strerror or exc}") from None
    return out


def run_experiment(
    info: ExperimentInfo, out: Path, *, seed: int, quick: bool, progress: Callable[[float], None] | None = None
) -> ExperimentResults:
    """Run one experiment with a fixed seed and write ``out/<id>/``; returns the saved results.

    Files are written only after the experiment finished, each atomically, ``metrics.json`` after the
    files it refers to: an interrupted run leaves earlier experiments' folders complete and this one
    without a ``metrics.json`` (so it is never mistaken for a finished one).
    """
    folder = out / info.id
    torch.manual_seed(seed)
    ctx = RunContext(seed=seed, quick=quick, rng=np.random.default_rng(seed), progress=progress or (lambda f: None))
    # One thread: CPU reductions split across threads round differently, so a fixed count is part of
    # "same seed, same numbers"; the lab's small models also run fastest without threading overhead.
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    try:
        result = info.run(ctx)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    config = {"experiment": info.id, "seed": seed, "quick": quick, "threads": THREADS, "config": result.config,
              "versions": versions()}
    write_json_atomic(folder / CONFIG, config)
    write_json_atomic(folder / FIGURES, [f.to_dict() for f in result.figures])
    metrics = {
        "id": info.id,
        "title": info.title,
        "references": list(info.references),
        "summary": info.summary,
        "seed": seed,
        "quick": quick,
        "elapsed_s": round(elapsed, 2),
        "metrics": result.metrics,
        "claims": [c.to_dict() for c in result.claims],
    }
    write_json_atomic(folder / METRICS, metrics)
    render_folder(folder)
    return load_experiment(folder)


def run_many(
    infos: Sequence[ExperimentInfo],
    out: Path,
    *,
    seed: int,
    quick: bool,
    progress: Callable[[ExperimentInfo], Callable[[float], None]] | None = None,
    index: bool = False,
) -> list[ExperimentResults]:
    """Run ``infos`` in order into ``out``; with ``index``, rewrite ``out/index.html`` after each one."""
    prepare_out(out)
    done: list[ExperimentResults] = []
    for info in infos:
        done.append(run_experiment(info, out, seed=seed, quick=quick, progress=progress(info) if progress else None))
        if index:
            render_index_file(out, done)
    return done
