"""Smoke version of the reliability campaign (``reliability/run.py``), and regression tests of bugs it found.

The full campaign (``make reliability``) injects ≥ 200 seeded faults into MLP/CNN/LSTM/transformer runs
and writes RELIABILITY.md; this file runs a handful of the same faults and asserts the same properties:
with ``gg.Guard`` + ``gg.watch`` on defaults every run completes with finite weights, a finding of the
right kind names the faulted module, and the final held-out loss stays within 5 % of the fault-free twin.
The control (no gradguard) runs are checked to really be damaged by the fault.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import gradguard as gg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reliability.campaign import LOSS_TOLERANCE, RunResult, detection, loss_delta, plan, run
from reliability.faults import MODULE_FAULTS, Fault, Injector
from reliability.models import MODELS

pytestmark = pytest.mark.xdist_group("reliability")


# ----------------------------------------------------------------------------- regression tests
def test_provenance_names_attention_when_out_proj_grad_is_nan() -> None:
    """Regression (found by the campaign): ``nn.MultiheadAttention`` never calls its ``out_proj`` module,
    so a NaN in ``out_proj``'s parameter gradient had no module to blame and the monitor said "producer
    unknown". The nearest ancestor that ran (the attention module) must be named."""
    model, task = MODELS["transformer"].make(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = gg.watch(model, console=False)
    handle = model.attn.out_proj.bias.register_hook(lambda g: g * float("nan"))
    x, y = task.batch(0)
    loss = task.loss_fn(model(x), y)
    loss.backward()
    assert not torch.isfinite(model.attn.out_proj.bias.grad).all()  # the fault really happened
    mon.step(loss)
    handle.remove()
    opt.step()
    blamed = [f.module for f in mon.findings if f.kind == "nonfinite"]
    mon.close()
    assert blamed == ["attn"]


# ----------------------------------------------------------------------------- smoke campaign
#: (model, fault class): a handful of the full campaign's faults (same seeds, same draw).
SMOKE = [
    ("mlp", "activation_nan"),
    ("mlp", "grad_inf"),
    ("mlp", "input_nan"),
    ("mlp", "loss_inf"),
    ("mlp", "outlier_batch"),
    ("lstm", "activation_inf"),
    ("transformer", "grad_nan"),
]


@pytest.fixture(scope="module")
def campaign() -> dict[tuple[str, str], dict[str, Any]]:
    """Run every smoke fault guarded and unguarded, and each model's fault-free twins, once."""
    twins: dict[tuple[str, bool], RunResult] = {}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for model, kind in SMOKE:
        specs = plan(0, [model], 1, kinds=(kind,), ideal=False)
        for spec in specs:
            if spec.fault is None and (model, spec.guarded) not in twins:
                twins[(model, spec.guarded)] = run(spec)
        faulted = {spec.guarded: run(spec) for spec in specs if spec.fault is not None}
        out[(model, kind)] = {"guarded": faulted[True], "control": faulted[False],
                              "twin": twins[(model, True)], "control_twin": twins[(model, False)]}
    return out


@pytest.mark.parametrize(("model", "kind"), SMOKE, ids=[f"{m}-{k}" for m, k in SMOKE])
def test_guarded_run_survives_detects_and_recovers(campaign: dict[Any, Any], model: str, kind: str) -> None:
    r = campaign[(model, kind)]
    g, c = r["guarded"], r["control"]
    assert g.fired >= 1 and c.fired >= 1  # the fault happened in both runs
    # The control (no gradguard) is really damaged by the fault: weights lost or final loss off by > 5 %.
    assert not c.finite or abs(loss_delta(c, r["control_twin"])) > LOSS_TOLERANCE
    # Guarded: completes, finite, the right finding (at the faulted module), final loss within 5 %.
    assert g.completed, g.error
    assert g.finite
    detected, blamed = detection(g)
    assert detected, f"findings {g.findings}; blamed {blamed}"
    fault = Fault(**g.spec["fault"])
    if fault.kind in MODULE_FAULTS:
        assert blamed == fault.module
    assert abs(loss_delta(g, r["twin"])) <= LOSS_TOLERANCE, loss_delta(g, r["twin"])


def test_fault_free_twins_raise_no_alarm_of_the_injected_kinds(campaign: dict[Any, Any]) -> None:
    for (model, _), r in campaign.items():
        twin = r["twin"]
        assert twin.completed and twin.finite and twin.skipped == 0 and twin.rollbacks == 0, model
        assert not [f for f in twin.findings if f[0] in ("nonfinite", "loss_spike")], (model, twin.findings)


def test_injectors_place_the_fault_where_they_say() -> None:
    """The activation injector poisons exactly one element of the named module's output, and only on
    the fault's step; the gradient injector one element of one parameter's gradient."""
    model, task = MODELS["mlp"].make(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    inj = Injector(Fault("activation_nan", step=1, module="fc1", seed=3), model, opt)
    for step in range(3):
        inj.begin(step)
        x, _ = inj.batch(step, *task.batch(step))
        seen = model.fc1(x)
        inj.end(step)
        assert int((~torch.isfinite(seen)).sum()) == (1 if step == 1 else 0)
    inj = Injector(Fault("grad_inf", step=0, module="fc2", seed=5), model, opt)
    inj.begin(0)
    x, y = task.batch(0)
    task.loss_fn(model(x), y).backward()
    inj.end(0)
    bad = {n: int((~torch.isfinite(p.grad)).sum()) for n, p in model.named_parameters()}
    assert sum(bad.values()) == 1 and next(n for n, v in bad.items() if v).startswith("fc2.")
