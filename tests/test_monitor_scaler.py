"""gradguard.monitor.scaler against a naive reference: a loop over every row of a mixed-precision run."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from gradguard.detect.base import Origin
from gradguard.monitor.scaler import OverflowSkips, is_overflow


def _row(step: int, skipped: bool, scale: float, loss: float = 1.0) -> dict[str, Any]:
    return {"step": step, "loss": loss, "grad_norm": math.inf if skipped else 1.0, "loss_scale": scale}


def test_a_skip_is_a_nonfinite_scaled_norm_with_a_finite_loss() -> None:
    assert is_overflow(_row(0, True, 2.0**16))
    assert is_overflow({**_row(0, True, 2.0**16), "loss": None})
    assert not is_overflow(_row(0, True, 2.0**16, loss=math.nan))  # the loss itself is bad: not routine
    assert not is_overflow(_row(0, False, 2.0**16))
    assert not is_overflow({"step": 0, "loss": 1.0, "grad_norm": math.inf})  # no scaler: not a skip


def test_counts_runs_and_one_collapse_per_run_match_a_plain_loop() -> None:
    rng = random.Random(0)
    # Runs of skips of random lengths (some past the collapse run of 20 skips in a row), halving the scale
    # at each skip as GradScaler's default backoff does; fetched in blocks of random sizes.
    flags: list[bool] = []
    while len(flags) < 400:
        flags += [True] * rng.choice([0, 1, 3, 25]) + [False] * rng.randint(1, 5)
    rows, scale = [], 2.0**16
    for step, skipped in enumerate(flags):
        rows.append(_row(step, skipped, scale))
        scale = scale / 2 if skipped else scale
    ends = [0]
    while ends[-1] < len(rows):
        ends.append(min(len(rows), ends[-1] + rng.randint(1, 12)))
    skips = OverflowSkips()
    reports = [skips.count(rows[a:b]) for a, b in itertools.pairwise(ends)]
    # Reference, row by row: the total, the current run and whether this run's collapse was reported;
    # a collapse is 20 skips in a row or a scale at or below 1 (docs of watch(scaler=...)).
    total = run = 0
    reported = False
    expected: list[tuple[int, float, bool] | None] = []
    for a, b in itertools.pairwise(ends):
        last = None
        for row in rows[a:b]:
            if math.isinf(row["grad_norm"]):
                total, run, last = total + 1, run + 1, row
            else:
                run, reported = 0, False
        if last is None:
            expected.append(None)
        elif run >= 20 or last["loss_scale"] <= 1.0:
            expected.append(None if reported else (last["step"], last["loss_scale"], True))
            reported = True
        else:
            expected.append((last["step"], last["loss_scale"], False))
    assert reports == expected
    assert skips.overflows == total == sum(flags)
    assert any(r is not None and r[2] for r in reports)  # the 25-skip runs collapse
    assert any(r is not None and not r[2] for r in reports)  # and the short ones are routine


def test_the_collapse_names_the_module_the_replay_found() -> None:
    skips = OverflowSkips()
    skips.count([_row(s, True, 2.0 ** -s) for s in range(3)])
    origin = Origin("fc1", "forward", "an Inf in the output", {"inf": 3})
    error = skips.collapse(2, 0.25, 65536.0, origin)
    assert (error.severity, error.module, error.kind) == ("error", "fc1", "nonfinite")
    assert error.evidence["overflow_run"] == 3 and error.evidence["phase"] == "forward"
    assert "float32" in error.advice
    unnamed = skips.collapse(2, 0.25, 65536.0, Origin("", "forward", "failed", {"replay_error": "x"}))
    assert unnamed.module == "" and "could not name" in unnamed.message
    info = skips.routine(2, 0.25, 65536.0)
    assert info.severity == "info" and info.evidence["overflow_skips"] == 3
