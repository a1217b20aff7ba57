"""The experiment registry: every experiment's frozen info record, in the order ``lab list`` shows them."""

from __future__ import annotations

from collections.abc import Iterable

from gradguard.errors import ConfigError
from gradguard.lab.experiment import ExperimentInfo
from gradguard.lab.experiments import (
    activations,
    adding_problem,
    batchnorm,
    deep_init,
    matrix_product,
    optimizers,
    relu_lstm,
    residual,
    rnn_through_time,
    sigmoid_gradient,
    stacked_lstm_clip,
    weighted_sum,
)

EXPERIMENTS: tuple[ExperimentInfo, ...] = (
    relu_lstm.INFO,
    weighted_sum.INFO,
    matrix_product.INFO,
    sigmoid_gradient.INFO,
    deep_init.INFO,
    activations.INFO,
    batchnorm.INFO,
    rnn_through_time.INFO,
    adding_problem.INFO,
    stacked_lstm_clip.INFO,
    residual.INFO,
    optimizers.INFO,
)


def ids() -> list[str]:
    """Every registered experiment id."""
    return [e.id for e in EXPERIMENTS]


def get(id: str) -> ExperimentInfo:
    """The experiment named ``id``; raises :class:`ConfigError` listing the valid ids otherwise."""
    for e in EXPERIMENTS:
        if e.id == id:
            return e
    raise ConfigError(f"unknown experiment {id!r}; valid ids: {', '.join(ids())}")


def select(names: Iterable[str]) -> list[ExperimentInfo]:
    """The experiments named, in the order given, each once."""
    chosen: list[ExperimentInfo] = []
    for name in names:
        info = get(name)
        if info not in chosen:
            chosen.append(info)
    return chosen


def coverage() -> dict[str, list[str]]:
    """Reference → ids of the experiments that reproduce its result, references in alphabetical order."""
    out: dict[str, list[str]] = {}
    for e in EXPERIMENTS:
        for ref in e.references:
            out.setdefault(ref, []).append(e.id)
    return dict(sorted(out.items()))
