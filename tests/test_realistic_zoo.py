"""The realistic zoo: ``gg.watch`` and ``gg.Guard`` on training programs written as practitioners write them.

Programs and faults live in ``tests/programs`` (``registry.CASES``, ``registry.HEALTHY``). Each fault test
first measures that the fault really degraded the run — its loss stays above twice its best so far for 3
steps (where the healthy run of the same seed does not by then) or turns non-finite, or its held-out
metric is worse than the worst of three healthy seeds by more than their spread; a case whose degradation
shows only at full length (``Case.quick_degrades``) has it measured by the full-length test — then
asserts, on the findings of severity ≥ warning as the user sees them (the step each was *printed*,
recorded by a sink; see ``programs/common.py``):

* the kind (``registry.Case.kinds``);
* the module: a layer-local fault names its layer; a learning-rate fault names one of the layers whose
  update ratio ‖Δw‖/‖w‖ grew most (top 3, or within half of the largest growth), growth measured here
  from weight copies against the steps before the fault (mid-run faults) or the healthy run's first
  steps (faults present from step 0); a fault of the data or of the whole init may name any module;
* the delay: visible at most 3 steps after the first degraded step (step 0 for faults present from the
  start; steps are counted from 0, the first ``mon.step``).

Healthy programs (the four above, a plateau exit, one-cycle, a fresh head on a pretrained body, an
unnormalised 16-block residual MLP, a 2-D GAN, batches of 4): no finding of severity ≥ warning.
``test_guard_*``: the default ``gg.Guard`` on the healthy programs intervenes (skip, clip, rollback, each
*measured*: a skip is ``step`` returning False, a clip a gradient norm the step lowered) on at most 1 % of
steps, ends within the seed noise of unguarded, and where it never intervened is bit-identical to the
unguarded run; on the word LM without clipping it keeps the run finite and better than unguarded.

What the faults look like (quick mode, seed 0, measured with ``python tests/test_realistic_zoo.py``;
"onset" is the first degraded step; healthy references in the second table):

| case | fault step | onset | loss: start → best → last | grad norm median / max | held-out |
|---|---|---|---|---|---|
| word_lm-no_clip_lr20 | 0 | 3 | 4.15 → 4.15 → 7.69e+04 | 19.3 / 9.84e+04 | val loss 3.01e+04 |
| word_lm-no_clip_lr100 | 0 | 1 | 4.15 → 4.15 → 1.35e+03 | 4.74 / 11 | val loss 1.12e+03 |
| word_lm-lr_x100 | 20 | 21 | 4.15 → 3.44 → 1.17e+03 | 3.97 / 27.3 | val loss 1.04e+03 |
| word_lm-nan_hidden | 20 | 20 | 4.15 → 3.44 → nan (non-finite from 20) | 0.461 / 1.07 | val loss inf |
| char_gpt-init_x10 | 0 | None | 5.47 → 1.74 → 1.96 | 0.92 / 4.27 | val loss 1.83 |
| char_gpt-lr_x100 | 30 | 31 | 4.57 → 2.43 → 3.67 | 2.15 / 29.4 | val loss 3.5 |
| digits_cnn-init_x10 | 0 | None | 509 → 29.3 → 29.3 | 166 / 607 | test accuracy 0.521 |
| digits_cnn-lr_x100 | 20 | 21 | 2.35 → 2.2 → 2.35 | 0.269 / 137 | test accuracy 0.101 |
| digits_cnn-fp16_overflow | 20 | 20 | 2.35 → 2.2 → nan (non-finite from 20) | 0.369 / 0.581 | test accuracy 0 |
| digits_cnn-unnormalised_batch | 20 | None | 2.35 → 2.2 → 2.28 | 0.383 / 2.55e+04 | test accuracy 0.0957 |
| seq_classifier-init_x10 | 0 | None | 4.83 → 3.02 → 4.69 | 713 / 9.12e+03 | test accuracy 0.234 |
| seq_classifier-lr_x100 | 20 | 47 | 1.39 → 1.35 → 4.78 | 1.59 / 4.01e+03 | test accuracy 0.275 |

| healthy program | loss: start → best → last | grad norm median / max | held-out (seeds 0, 1, 2) |
|---|---|---|---|
| word_lm | 4.15 → 2.76 → 2.8 | 0.321 / 1.07 | val loss 2.81, 2.23, 2.08 |
| char_gpt | 4.57 → 2.03 → 2.16 | 1.13 / 15.2 | val loss 2.07, 2.17, 2.1 |
| digits_cnn | 2.35 → 0.793 → 0.92 | 0.812 / 2.91 | test accuracy 0.819, 0.819, 0.849 |
| seq_classifier | 1.39 → 1.06 → 1.07 | 0.326 / 1.82 | test accuracy 0.506, 0.502, 0.504 |
| plateau_mlp | 2.32 → 1.64 → 1.76 | 0.372 / 4.49 | train accuracy 0.252, 0.386, 0.242 |
| onecycle_cnn | 2.35 → 0.406 → 0.564 | 1.52 / 3.43 | test accuracy 0.869, 0.872, 0.897 |
| new_head | 1.63 → 0.533 → 0.774 | 2.13 / 4.2 | test accuracy 0.674, 0.67, 0.634 |
| residual_mlp | 2.39 → 0.133 → 0.197 | 4.27 / 10.3 | test accuracy 0.904, 0.942, 0.904 |
| gan | 1.37 → 1.12 → 1.6 | 1.08 / 2.2 | distance to modes 0.529, 0.459, 0.471 |
| tiny_batch_cnn | 2.38 → 1.27 → 1.82 | 1.18 / 3.89 | test accuracy 0.32, 0.3, 0.476 |
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
from programs.common import RunResult, default_guard, quiet_watch
from programs.judge import culprits, degradation_start, names
from programs.registry import CASES, HEALTHY, PROGRAMS, Case

pytestmark = pytest.mark.xdist_group("realistic_zoo")

SEEDS = (0, 1, 2)
MAX_DELAY = 3


@functools.cache
def _run(name: str, fault: str | None = None, seed: int = 0, quick: bool = True, watched: bool = True,
         guarded: bool = False) -> RunResult:
    return PROGRAMS[name](fault, seed=seed, quick=quick, monitor_factory=quiet_watch if watched else None,
                          guard_factory=default_guard if guarded else None)


def _healthy_metrics(name: str, quick: bool = True) -> list[float]:
    """The held-out metric over the seeds (seed 0 watched: the monitor must not change training)."""
    return [_run(name, None, seed, quick, watched=seed == 0).metric for seed in SEEDS]


def _seen(r: RunResult) -> str:
    rows = [f"step {s.visible}: {s.finding.severity} {s.finding.kind} at {s.finding.module!r}" for s in r.visible()]
    return "; ".join(rows[:12]) or "nothing of severity >= warning was printed"


def _check_case(case: Case, quick: bool) -> None:
    r = _run(case.program, case.fault, 0, quick)
    healthy = _healthy_metrics(case.program, quick)
    start = degradation_start(r, healthy, _run(case.program, None, 0, quick))
    if quick and not case.quick_degrades:
        start = r.fault_step  # the diagnosis is checked here, the degradation by the full-length test
    assert start is not None, (
        f"{case.id}: the fault did not degrade the run, so it cannot test a diagnosis: {r.describe()}; "
        f"healthy {r.metric_name} over seeds {healthy}"
    )
    if case.fault == "fp16_overflow":
        assert r.extra["fp16_inf_steps"], "float16 never overflowed: the fault did not happen"
    wanted, where = culprits(case, r, _run(case.program, None, 0, quick))
    context = f"What the fault does: {case.hint}. Measured: {r.describe()}; printed: {_seen(r)}"
    after = [s for s in r.visible() if s.visible >= (r.fault_step or 0)]
    of_kind = [s for s in after if s.finding.kind in case.kinds]
    assert of_kind, f"{case.id}: no finding of kind {case.kinds} (severity >= warning) after the fault. {context}"
    placed = [s for s in of_kind if names(s.finding.module, wanted)]
    assert placed, f"{case.id}: no {case.kinds} finding names {where}. {context}"
    delay = placed[0].visible - start
    assert delay <= MAX_DELAY, (
        f"{case.id}: the first {placed[0].finding.kind} finding naming {where} became visible at step "
        f"{placed[0].visible}, {delay} steps after the degradation began at step {start} (allowed {MAX_DELAY}). "
        f"{context}"
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_is_diagnosed(case: Case) -> None:
    _check_case(case, quick=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_is_diagnosed_full_length(case: Case) -> None:
    _check_case(case, quick=False)


def _check_healthy(name: str, quick: bool) -> None:
    r = _run(name, None, 0, quick)
    assert all(math.isfinite(v) for v in r.losses), f"{name} is not healthy: {r.describe()}"
    loud = r.visible()
    assert not loud, f"{name} is healthy ({r.describe()}) but the monitor printed: {_seen(r)}"
    final = [f for f in r.findings if f.severity != "info"]
    assert not final, f"{name} is healthy but mon.findings holds {[(f.kind, f.module, f.severity) for f in final]}"


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_program_is_silent(name: str) -> None:
    _check_healthy(name, quick=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_program_is_silent_full_length(name: str) -> None:
    _check_healthy(name, quick=False)


def _interventions(r: RunResult) -> int:
    assert r.guard is not None
    return r.guard["skips"] + r.guard["clips"] + r.guard["rollbacks"]


@pytest.mark.parametrize("name", HEALTHY)
def test_guard_default_leaves_healthy_programs_alone(name: str) -> None:
    plain = _healthy_metrics(name)
    r = _run(name, None, 0, watched=False, guarded=True)
    assert r.guard is not None
    n = _interventions(r)
    assert n <= 0.01 * r.guard["steps"], (
        f"the default Guard intervened on {n} of {r.guard['steps']} healthy steps of {name} "
        f"({ {k: v for k, v in r.guard.items() if k != 'summaries'} }, summary {r.guard['summaries']})"
    )
    if n == 0:
        assert r.losses == _run(name, None, 0).losses, f"the Guard never intervened on {name}, yet the run changed"
    spread = max(plain) - min(plain)
    assert min(plain) - spread <= r.metric <= max(plain) + spread, (
        f"guarded {name} ends at {r.metric_name} {r.metric:.4g}; unguarded seeds {plain} (spread {spread:.3g})"
    )


@pytest.mark.parametrize("fault", ["no_clip_lr20", "no_clip_lr100"])
def test_guard_default_keeps_word_lm_without_clipping_finite(fault: str) -> None:
    plain = _run("word_lm", fault, 0, watched=False)
    r = _run("word_lm", fault, 0, watched=False, guarded=True)
    assert all(math.isfinite(v) for v in r.losses) and math.isfinite(r.metric), r.describe()
    assert r.metric < plain.metric, f"guarded: {r.describe()}; unguarded: {plain.describe()}"


def test_diagnosis_benchmark_reads_the_peers_right() -> None:
    """The DIAGNOSIS table's peer columns, checked on the NaN carried in the LM's hidden state (step 20):
    DebugUnderflowOverflow stops at the LSTM that receives it, detect_anomaly in the first backward,
    Lightning's grad_norm sees a non-finite norm, and none of them alarms on the healthy LM."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import diagnosis

    duo = diagnosis.underflow_overflow("word_lm", "nan_hidden", True).alarms
    assert [(a.step, a.module) for a in duo] == [(20, "rnn")]
    grad = diagnosis.anomaly("word_lm", "nan_hidden", True).alarms
    assert [a.step for a in grad] == [20] and grad[0].module.endswith("Backward0")
    _, _, norms = diagnosis.gradguard_and_grad_norm("word_lm", "nan_hidden", True)
    assert norms.first(0) is not None and norms.first(0).step == 20
    assert not diagnosis.underflow_overflow("word_lm", None, True).alarms
    assert not diagnosis.anomaly("word_lm", None, True).alarms


def test_diagnosis_benchmark_reads_torch_surgeon_right() -> None:
    """torch-surgeon's alerts are stamped with the training step: the NaN carried into the LM's hidden state
    at step 20 makes its first alerts at step 20, and the healthy LM raises none."""
    pytest.importorskip("torch_surgeon")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import diagnosis

    alarms = diagnosis.surgeon("word_lm", "nan_hidden", True).alarms
    assert alarms and alarms[0].step == 20, [(a.step, a.what, a.module) for a in alarms[:5]]
    assert not diagnosis.surgeon("word_lm", None, True).alarms


def _tables() -> tuple[str, str]:
    """The two tables of the module docstring, measured."""
    def fmt(x: float) -> str:
        return f"{x:.3g}"

    def row(r: RunResult) -> str:
        fin = [v for v in r.losses if math.isfinite(v)]
        gn = sorted(v for v in r.grad_norms if math.isfinite(v))
        nonfinite = next((i for i, v in enumerate(r.losses) if not math.isfinite(v)), None)
        last = fmt(r.losses[-1]) + ("" if nonfinite is None else f" (non-finite from {nonfinite})")
        return (f"{fmt(r.losses[0])} → {fmt(min(fin))} → {last} | {fmt(gn[len(gn) // 2])} / {fmt(gn[-1])}")

    faults = []
    for c in CASES:
        r = _run(c.program, c.fault)
        faults.append(f"| {c.id} | {r.fault_step} | {r.onset()} | {row(r)} | {r.metric_name} {fmt(r.metric)} |")
    healthy = []
    for name in HEALTHY:
        r = _run(name)
        healthy.append(f"| {name} | {row(r)} | {r.metric_name} {', '.join(fmt(m) for m in _healthy_metrics(name))} |")
    return "\n".join(faults), "\n".join(healthy)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    fault_table, healthy_table = _tables()
    sys.stdout.write(fault_table + "\n\n" + healthy_table + "\n")
