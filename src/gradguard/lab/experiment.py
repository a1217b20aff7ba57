"""What an experiment is: a frozen info record, the context it runs in, and the result it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradguard.lab.claims import Claim
from gradguard.report.figures import Figure


@dataclass
class RunContext:
    """Everything an experiment may read while it runs.

    ``quick`` selects the small configuration used by tests; ``rng`` is a NumPy generator seeded with
    ``seed`` (the runner also seeds torch's global generator with it before the experiment starts);
    ``progress(fraction)`` moves the experiment's progress bar (0 to 1).
    """

    seed: int
    quick: bool
    rng: np.random.Generator
    progress: Callable[[float], None] = lambda fraction: None


@dataclass
class Result:
    """What an experiment returns: the resolved configuration, measurements, claims and figures."""

    config: dict[str, Any]
    metrics: dict[str, Any]
    claims: list[Claim]
    figures: list[Figure] = field(default_factory=list)


@dataclass(frozen=True)
class ExperimentInfo:
    """Registry record of one experiment (what ``gradguard lab list`` prints).

    Attributes:
        id: the name used on the command line and as the output folder.
        references: the papers whose result it reproduces (e.g. ``("Glorot & Bengio 2010",)``).
        title: one line.
        summary: the paragraph opening its report: what it shows and which remedy it supports.
        run: ``RunContext -> Result``.
    """

    id: str
    references: tuple[str, ...]
    title: str
    summary: str
    run: Callable[[RunContext], Result]
