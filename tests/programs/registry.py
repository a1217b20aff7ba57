"""The realistic zoo as data: which programs exist, their healthy variants, and the faults a diagnosis must catch.

A :class:`Case` names a program, a fault, the finding kinds that describe it and where the fault is:
``"lr"`` (a learning-rate fault: the finding must name one of the layers whose updates grew most, measured
by the test), a module name (a layer-local fault: that layer), or ``""`` (a fault of the whole model or of
the data: any module). Faults that do not degrade a program (weights × 10 helps the tied-embedding LM; a
GRU classifier with gradient clipping recovers from one batch × 1000 within a few steps) are not cases;
``benchmarks/diagnosis.py`` still runs them. A case whose degradation shows only at full length
(``quick_degrades=False``) is diagnosed in quick mode too, its degradation measured by the full-length test.
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
        Program("residual_mlp", healthy.residual_mlp, 60, 240),
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
    hint: str = ""
    quick_degrades: bool = True

    @property
    def id(self) -> str:
        return f"{self.program}-{self.fault}"


_GROWTH = ("exploding", "loss_spike")
CASES: tuple[Case, ...] = (
    Case("word_lm", "no_clip_lr20", _GROWTH, "lr",
         "SGD lr 20 without clip_grad_norm_: losses 4.15, 4.38, 7.38, 21.7, 44.1, 70.3 (steps 0-5), grad norm "
         "0.31, 1.65, 3.97, 19.3; 1e4-1e5 later"),
    Case("word_lm", "no_clip_lr100", _GROWTH, "lr",
         "SGD lr 100 without clipping: losses 4.15, 21.0, 199, 304, 444 (steps 0-4), grad norm 0.3-8"),
    Case("word_lm", "lr_x100", _GROWTH, "lr",
         "lr 20 -> 2000 at step 20 (clipping kept): loss 3.97 at step 20, 404 at 21, 100-1000 after; grad "
         "norm 0.27 -> 27"),
    Case("word_lm", "nan_hidden", ("nonfinite",), "rnn",
         "one NaN written into the carried hidden state h0 that `rnn` receives with the batch at step 20; "
         "the tokens are clean, so the module to name is the LSTM whose (state) input held it"),
    Case("char_gpt", "init_x10", _GROWTH, "",
         "weights x10 (the tied token embedding with the head): losses 5.47, 5.39, 5.07 from step 0, chance "
         "ln 96 = 4.56, so logits of std ~1.3; ahead of the healthy run for ~180 steps (larger logits), then "
         "behind: val loss 0.99, 0.99, 1.01 over seeds 0-2 at 300 steps against 0.955-0.96 (better at 60)",
         quick_degrades=False),
    Case("char_gpt", "lr_x100", _GROWTH, "lr",
         "AdamW LR x100 at step 30 (clipping at 1.0 kept): loss 2.43 at step 30, 9.1 at 31, 14-18 by 33-35, "
         "above the chance level ln 96 = 4.56; grad norm 1.6 -> 29"),
    Case("digits_cnn", "init_x10", _GROWTH, "",
         "conv/linear weights x10: losses 509, 370, 394 from step 0 (chance ln 10 = 2.3), grad norm 300-600"),
    Case("digits_cnn", "lr_x100", _GROWTH, "lr",
         "Adam lr 3e-3 -> 0.3 at step 20: loss 2.2 -> 94 at step 21, then ~2.3 (chance), grad norm 0.4 -> 137"),
    Case("digits_cnn", "fp16_overflow", ("nonfinite",), "fc1",
         "fc1 under float16 autocast with weights scaled past float16's range at step 20: its output is inf, "
         "the loss NaN from step 20"),
    Case("digits_cnn", "unnormalised_batch", _GROWTH, "",
         "one batch x1000 at step 20: loss 2.9e3, grad norm 2.5e4, then the loss sits at chance (2.2-2.3) and "
         "the test accuracy at 0.1"),
    Case("seq_classifier", "init_x10", _GROWTH, "",
         "GRU and head weights x10: loss 4.8 (chance ln 4 = 1.39) from step 0, grad norm 260-1400, never learns"),
    Case("seq_classifier", "lr_x100", _GROWTH, "lr",
         "Adam lr 3e-3 -> 0.3 at step 20 (clipping at 1.0 kept): loss 1.37 -> 2.68 at step 21, then climbs "
         "to 3-5; grad norm 0.18 -> 2.3"),
)
