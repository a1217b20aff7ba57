"""The realistic zoo as data: which programs exist, their healthy variants, and the faults a diagnosis must catch.

A :class:`Case` names a program, a fault, the finding kinds that describe it and where the fault is:
``"lr"`` (a learning-rate fault: the finding must name one of the layers whose updates grew most, measured
by the test), a module name (a layer-local fault: that layer), or ``""`` (a fault of the whole model or of
the data: any module). Faults that do not degrade a program (weights × 10 helps the tied-embedding LM
and the GPT, whose LayerNorms absorb the scale) are not cases; ``benchmarks/diagnosis.py`` still runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import char_gpt, digits_cnn, healthy, seq_classifier, word_lm
from .common import RunResult


@dataclass(frozen=True)
class Program:
    """A runnable program: its ``run`` function, fixed options, and steps in quick and full mode."""

    name: str
    run: Callable[..., RunResult]
    quick: int
    full: int
    options: dict[str, Any] = field(default_factory=dict)
    faults: tuple[str, ...] = ()

    def __call__(self, fault: str | None = None, *, seed: int = 0, quick: bool = True, **kwargs: Any) -> RunResult:
        steps = self.quick if quick else self.full
        return self.run(fault=fault, steps=steps, seed=seed, **self.options, **kwargs)


PROGRAMS: dict[str, Program] = {
    p.name: p
    for p in (
        Program("word_lm", word_lm.run, 60, 240, faults=word_lm.FAULTS),
        Program("char_gpt", char_gpt.run, 60, 300, faults=char_gpt.FAULTS),
        Program("digits_cnn", digits_cnn.run, 60, 240, faults=digits_cnn.FAULTS),
        Program("seq_classifier", seq_classifier.run, 60, 300, faults=seq_classifier.FAULTS),
        Program("plateau_mlp", healthy.plateau_mlp, 160, 400),
        Program("onecycle_cnn", digits_cnn.run, 60, 240, {"schedule": "onecycle"}),
        Program("new_head", healthy.new_head, 60, 200),
        Program("gan", healthy.gan, 150, 600),
        Program("tiny_batch_cnn", digits_cnn.run, 100, 400, {"batch_size": 4}),
    )
}

#: Healthy programs: the four realistic ones and the runs whose loss or gradient rises legitimately.
HEALTHY: tuple[str, ...] = tuple(PROGRAMS)


@dataclass(frozen=True)
class Case:
    """A fault that degrades a program, the kinds of finding that describe it, and where it is."""

    program: str
    fault: str
    kinds: tuple[str, ...]
    where: str

    @property
    def id(self) -> str:
        return f"{self.program}-{self.fault}"


_GROWTH = ("exploding", "loss_spike")
CASES: tuple[Case, ...] = (
    Case("word_lm", "no_clip_lr20", _GROWTH, "lr"),
    Case("word_lm", "no_clip_lr100", _GROWTH, "lr"),
    Case("word_lm", "lr_x100", _GROWTH, "lr"),
    Case("word_lm", "nan_hidden", ("nonfinite",), "rnn"),
    Case("char_gpt", "lr_x100", _GROWTH, "lr"),
    Case("digits_cnn", "init_x10", _GROWTH, ""),
    Case("digits_cnn", "lr_x100", _GROWTH, "lr"),
    Case("digits_cnn", "fp16_overflow", ("nonfinite",), "fc1"),
    Case("digits_cnn", "unnormalised_batch", _GROWTH, ""),
    Case("seq_classifier", "init_x10", _GROWTH, ""),
    Case("seq_classifier", "lr_x100", _GROWTH, "lr"),
)
