"""One training run with or without gradguard, with or without a fault; and the campaign plan.

A guarded run is the documented usage on defaults::

    mon = gg.watch(model, console=False)
    guard = gg.Guard(model, optimizer, monitor=mon, scheduler=scheduler)
    ... loss.backward(); mon.step(loss); guard.step(loss); scheduler.step()

A control run is the same loop with ``optimizer.step()`` and nothing from gradguard. Every run uses the
same seeded model, data order and cosine learning-rate schedule as its fault-free twin, so the final
held-out losses of the two are directly comparable.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from reliability.faults import FAULT_KINDS, LR_JUMP_STEPS, MODULE_FAULTS, Fault, Injector, draw_faults
from reliability.models import MODELS, ModelSpec

#: The final-loss target: a faulted guarded run ends within this relative distance of its fault-free twin.
LOSS_TOLERANCE = 0.05


@dataclass(frozen=True)
class RunSpec:
    """What to run: model, seed, fault (``None`` for the fault-free twin), guarded or control, steps.

    ``drop``: steps whose batch is left out entirely (no forward, no update; the schedule still steps).
    A fault-free run that drops the faulted steps is the *ideal skip*: the best any guard could do is
    to lose those batches and nothing else.
    """

    model: str
    seed: int
    fault: Fault | None
    guarded: bool
    steps: int
    drop: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "seed": self.seed, "guarded": self.guarded, "steps": self.steps,
                "fault": None if self.fault is None else self.fault.to_dict(), "drop": list(self.drop)}


@dataclass
class RunResult:
    """What one run did.

    ``completed``: no exception escaped the loop (``error`` holds its last traceback line otherwise);
    ``finite``: every parameter and buffer is finite at the end; ``eval_loss``: held-out loss of the final
    model; ``findings``: ``(kind, module, step, severity)`` of every monitor finding at the end;
    ``rollback_to``: the snapshot step each guard rollback returned to; ``fired``:
    how many times the injector wrote its value (0 means the fault never happened: a broken injector).
    """

    spec: dict[str, Any]
    completed: bool
    finite: bool
    eval_loss: float
    findings: list[tuple[str, str, int, str]] = field(default_factory=list)
    skipped: int = 0
    rollbacks: int = 0
    rollback_to: list[int] = field(default_factory=list)
    fired: int = 0
    seconds: float = 0.0
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eval_loss"] = self.eval_loss if math.isfinite(self.eval_loss) else str(self.eval_loss)
        return d


def _cosine(steps: int):
    # Cosine decay to 10 % of the base LR: runs end on a plateau, so a twin comparison measures damage,
    # not where along a steep descent the run happened to stop.
    return lambda s: 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))


def all_finite(model: nn.Module) -> bool:
    """True when every parameter and buffer of ``model`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())


def run(spec: RunSpec) -> RunResult:
    """Train ``spec.model`` for ``spec.steps`` steps under ``spec.fault``; never raises."""
    import gradguard as gg

    torch.set_num_threads(1)
    ms: ModelSpec = MODELS[spec.model]
    model, task = ms.make(spec.seed)
    opt = torch.optim.Adam(model.parameters(), lr=ms.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(spec.steps))
    inj = Injector(spec.fault, model, opt)
    mon = guard = None
    start = time.perf_counter()
    completed, error = True, ""
    try:
        if spec.guarded:
            mon = gg.watch(model, console=False)
            guard_cls = getattr(gg, "Guard", None)
            if guard_cls is None:  # until gradguard/__init__ exports it
                from gradguard.guard import Guard as guard_cls
            guard = guard_cls(model, opt, monitor=mon, scheduler=sched)
        for step in range(spec.steps):
            if step in spec.drop:
                sched.step()
                continue
            inj.begin(step)
            x, y = inj.batch(step, *task.batch(step))
            opt.zero_grad(set_to_none=True)
            loss = inj.loss(step, task.loss_fn(model(x), y))
            loss.backward()
            if guard is not None and mon is not None:
                mon.step(loss)
                guard.step(loss)
            else:
                opt.step()
            inj.end(step)
            sched.step()
    except Exception as exc:  # the campaign measures failures; it must not stop at one
        completed = False
        error = traceback.format_exception_only(type(exc), exc)[-1].strip()
    findings: list[tuple[str, str, int, str]] = []
    if mon is not None:
        try:
            findings = [(f.kind, f.module, f.step, f.severity) for f in mon.findings]
            mon.close()
        except Exception as exc:
            completed = False
            error = error or traceback.format_exception_only(type(exc), exc)[-1].strip()
    return RunResult(
        spec=spec.to_dict(),
        completed=completed,
        finite=all_finite(model),
        eval_loss=task.eval_loss(model),
        findings=findings,
        skipped=getattr(guard, "skipped", 0),
        rollbacks=getattr(guard, "rollbacks", 0),
        rollback_to=[int(e.numbers.get("to_step", -1)) for e in getattr(guard, "events", ()) if e.action == "rollback"],
        fired=inj.fired,
        seconds=round(time.perf_counter() - start, 3),
        error=error,
    )


def plan(
    seed: int,
    models: list[str],
    seeds_per_model: int,
    kinds: tuple[str, ...] = FAULT_KINDS,
    steps: int | None = None,
    ideal: bool = True,
) -> list[RunSpec]:
    """Every run of a campaign: per model and run seed, one fault of each class (guarded and control,
    and with ``ideal`` the guarded ideal skip) and the fault-free twin (guarded and control).

    Faults are drawn from ``numpy.random.default_rng`` seeded with ``(seed, model index, run seed, class
    index)``, so each is reproducible on its own.
    """
    specs: list[RunSpec] = []
    for name in models:
        mi = list(MODELS).index(name)
        ms = MODELS[name]
        n = steps or ms.steps
        for s in range(seeds_per_model):
            for guarded in (True, False):
                specs.append(RunSpec(name, s, None, guarded, n))
            for kind in kinds:
                # Seeded by the class itself, not its position in ``kinds``: a subset draws the same faults.
                rng = np.random.default_rng([seed, mi, s, FAULT_KINDS.index(kind)])
                fault = draw_faults(rng, kind, ms.act_modules, ms.grad_modules, n)
                for guarded in (True, False):
                    specs.append(RunSpec(name, s, fault, guarded, n))
                if ideal:
                    specs.append(RunSpec(name, s, None, True, n, fault_steps(fault)))
    return specs


def fault_steps(fault: Fault) -> tuple[int, ...]:
    """The steps whose batches a fault spoils (one, or the LR jump's span)."""
    span = LR_JUMP_STEPS if fault.kind == "lr_jump" else 1
    return tuple(range(fault.step, fault.step + span))


# ----------------------------------------------------------------------------- judging one run
def twin_key(spec: dict[str, Any]) -> tuple[str, int, bool]:
    return (spec["model"], spec["seed"], spec["guarded"])


def ideal_key(spec: dict[str, Any]) -> tuple[str, int, tuple[int, ...]]:
    """Key shared by a guarded faulted run and its ideal skip."""
    drop = tuple(spec.get("drop", ())) or fault_steps(Fault(**spec["fault"]))
    return (spec["model"], spec["seed"], drop)


def loss_delta(result: RunResult, twin: RunResult) -> float:
    """Relative final-loss difference ``(L_fault − L_twin) / L_twin`` (inf when the run ended non-finite)."""
    if not math.isfinite(result.eval_loss):
        return math.inf
    return (result.eval_loss - twin.eval_loss) / twin.eval_loss


def detection(result: RunResult) -> tuple[bool, str]:
    """Whether a finding of the right kind (at the faulted module, for module faults) was raised at or
    after the fault's step, and what the monitor blamed: the modules of its non-finite findings for
    non-finite faults (``"(loss/input)"`` for module ``""``, ``"(none)"`` when nothing was raised)."""
    f = result.spec["fault"]
    fault = Fault(**f)
    relevant = [(k, m, s) for k, m, s, _ in result.findings if k in fault.expected_kinds and s >= fault.step]
    ok = any(m == fault.module for _, m, _ in relevant) if fault.kind in MODULE_FAULTS else bool(relevant)
    named = sorted({m for _, m, _ in relevant if m})
    blamed = ", ".join(named) if named else ("(loss/input)" if relevant else "(none)")
    return ok, blamed
