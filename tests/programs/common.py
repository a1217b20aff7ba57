"""What every realistic program shares: the :class:`RunResult` it returns and the :class:`Recorder` that fills it.

A program writes its own training loop, the way its public model does, and calls the recorder at the two
places a user would put gradguard: ``rec.backward(loss)`` after ``loss.backward()`` (the monitor's
``mon.step(loss)`` and the measurements), and ``rec.optimizer_step(loss)`` in place of ``optimizer.step()``
(the Guard's ``guard.step(loss)`` when one is given). Everything the tests and ``benchmarks/diagnosis.py``
judge is measured here, outside gradguard, with plain torch:

* the loss of every step and the global gradient 2-norm before any clipping;
* per module, the update ratio ‖Δw‖/‖w‖ of every step (parameters of one module pooled), from weight copies;
* when each finding became **visible**: a sink records the step during whose ``mon.step`` (or, at the end,
  the closing ``mon.findings``) the monitor printed it. Reading ``mon.findings`` after every step would
  flush the monitor each step and so hide the latency of its logging schedule, which a user does see;
* what the Guard did, measured: a skip is ``guard.step`` returning False, a clip is a gradient norm that
  ``guard.step`` lowered, a rollback is a rise of ``guard.rollbacks``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard.sinks import Sink

#: ``monitor_factory(model, sink) -> Monitor``: how a test or benchmark attaches gradguard to a model.
MonitorFactory = Callable[[nn.Module, Sink], Any]
#: ``guard_factory(model, optimizer, monitor) -> Guard`` (monitor may be None).
GuardFactory = Callable[[nn.Module, torch.optim.Optimizer, Any], Any]


def quiet_watch(model: nn.Module, sink: Sink) -> gg.Monitor:
    """``gg.watch`` with its defaults, the console replaced by the recording sink (tests print nothing)."""
    return gg.watch(model, console=False, sinks=[sink])


def loud_watch(model: nn.Module, sink: Sink) -> gg.Monitor:
    """``gg.watch`` with its defaults and the console, as a user runs it (script mode)."""
    return gg.watch(model, sinks=[sink])


def default_guard(model: nn.Module, optimizer: torch.optim.Optimizer, monitor: Any) -> gg.Guard:
    """``gg.Guard`` with its defaults."""
    return gg.Guard(model, optimizer, monitor=monitor)


@dataclass
class Seen:
    """One finding as printed: the step at which it became visible and the finding itself."""

    visible: int
    finding: gg.Finding


class FindingLog(Sink):
    """A sink that stamps each printed finding with the recorder's current step."""

    def __init__(self, clock: Callable[[], int], prefix: str = "") -> None:
        self.clock = clock
        self.prefix = prefix
        self.seen: list[Seen] = []

    def on_finding(self, finding: gg.Finding) -> None:
        if self.prefix:
            module = f"{self.prefix}.{finding.module}" if finding.module else self.prefix
            finding = gg.Finding(finding.kind, module, finding.step, finding.severity, finding.message,
                                 finding.advice, dict(finding.evidence))
        self.seen.append(Seen(self.clock(), finding))


@dataclass
class RunResult:
    """Everything one run measured. Steps are counted from 0 (the first optimizer step)."""

    program: str
    fault: str | None
    seed: int
    steps: int
    losses: list[float]
    metric: float
    metric_name: str
    higher_is_better: bool
    grad_norms: list[float]
    update_ratios: dict[str, list[float]]
    seen: list[Seen]
    findings: list[gg.Finding]
    fault_step: int | None
    chance_loss: float | None = None
    stopped: tuple[int, str] | None = None
    guard: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def visible(self, min_severity: str = "warning") -> list[Seen]:
        """Printed findings of at least ``min_severity``, in the order they appeared."""
        rank = gg.SEVERITIES.index(min_severity)
        return [s for s in self.seen if gg.SEVERITIES.index(s.finding.severity) >= rank]

    def onset(self, run_length: int = 3) -> int | None:
        """The first degraded step: the loss turns non-finite, or starts ``run_length`` consecutive steps
        above twice the best loss before it (losses here are cross-entropies, ≥ 0)."""
        best = math.inf
        above = 0
        for i, v in enumerate(self.losses):
            if not math.isfinite(v):
                return i - above
            if v > 2 * best:
                above += 1
                if above >= run_length:
                    return i - run_length + 1
            else:
                above = 0
            best = min(best, v)
        return None

    def worse_than(self, healthy: list[float]) -> bool:
        """The held-out metric is worse than the worst healthy seed by more than the healthy seeds' spread."""
        if not math.isfinite(self.metric):
            return True
        spread = max(healthy) - min(healthy)
        if self.higher_is_better:
            return self.metric < min(healthy) - spread
        return self.metric > max(healthy) + spread

    def describe(self) -> str:
        """One line: how the loss and gradient norm moved, for failure messages."""
        fin = [v for v in self.losses if math.isfinite(v)]
        gn = sorted(v for v in self.grad_norms if math.isfinite(v))
        med = gn[len(gn) // 2] if gn else math.nan
        return (
            f"{self.program}[{self.fault}] seed {self.seed}: loss {_f(self.losses[0])} → min "
            f"{_f(min(fin, default=math.nan))} → last {_f(self.losses[-1])} (non-finite from step "
            f"{_first_nonfinite(self.losses)}), grad norm median {_f(med)} max {_f(max(gn, default=math.nan))}, "
            f"{self.metric_name} {_f(self.metric)}, onset {self.onset()}"
        )


def _f(x: float) -> str:
    return f"{x:.3g}"


def _first_nonfinite(values: list[float]) -> int | None:
    return next((i for i, v in enumerate(values) if not math.isfinite(v)), None)


def global_norm(params: list[Tensor]) -> float:
    """‖g‖₂ over the gradients present (plain torch, the reference the tests trust)."""
    grads = [p.grad.detach().double() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.stack([g.norm() for g in grads]).norm())


def module_of(name: str) -> str:
    """``encoder.weight`` → ``encoder``; a parameter of the root module → ``""``."""
    return name.rsplit(".", 1)[0] if "." in name else ""


class Recorder:
    """Runs the gradguard calls of a training loop and measures the run; see the module docstring."""

    def __init__(self, program: str, fault: str | None, seed: int, steps: int, *,
                 monitor_factory: MonitorFactory | None = None, guard_factory: GuardFactory | None = None,
                 stop_on_error: bool = False, after_backward: Callable[[int, nn.Module], None] | None = None) -> None:
        self.program, self.fault, self.seed, self.steps = program, fault, seed, steps
        self.monitor_factory = monitor_factory
        self.guard_factory = guard_factory
        self.stop_on_error = stop_on_error
        self.after_backward = after_backward
        self.step = 0
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.update_ratios: dict[str, list[float]] = {}
        self.logs: list[FindingLog] = []
        self.parts: dict[str, _Part] = {}
        self.stopped: tuple[int, str] | None = None
        self.fault_step: int | None = None
        self.guard_counts = {"steps": 0, "skips": 0, "clips": 0, "rollbacks": 0}
        self.extra: dict[str, Any] = {}

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, name: str = "") -> None:
        """Register a model (and its optimizer) to watch and guard; ``name`` tells the models of one program apart."""
        log = FindingLog(lambda: self.step, prefix=name)
        mon = self.monitor_factory(model, log) if self.monitor_factory is not None else None
        guard = self.guard_factory(model, optimizer, mon) if self.guard_factory is not None else None
        self.logs.append(log)
        self.parts[name] = _Part(model, optimizer, mon, guard, name)

    def backward(self, loss: Tensor, name: str = "") -> None:
        """After ``loss.backward()``: the monitor's step and the measurements of this step's gradients."""
        part = self.parts[name]
        if part.monitor is not None:
            part.monitor.step(loss)
        if self.after_backward is not None:
            self.after_backward(self.step, part.model)
        if name == next(iter(self.parts)):
            self.losses.append(float(loss.detach()))
            self.grad_norms.append(global_norm(part.params))

    def optimizer_step(self, loss: Tensor, name: str = "") -> None:
        """In place of ``optimizer.step()``: the Guard's step when there is one, and the update ratios."""
        part = self.parts[name]
        before = [p.detach().clone() for p in part.params]
        if part.guard is not None:
            norm = global_norm(part.params)
            rollbacks = part.guard.rollbacks
            applied = part.guard.step(loss)
            after = global_norm(part.params)
            self.guard_counts["steps"] += 1
            self.guard_counts["skips"] += int(not applied)
            self.guard_counts["clips"] += int(applied and math.isfinite(norm) and after < norm * (1 - 1e-6))
            self.guard_counts["rollbacks"] += part.guard.rollbacks - rollbacks
        else:
            part.optimizer.step()
        by_module: dict[str, list[float]] = {}
        for (pname, p), old in zip(part.named, before, strict=True):
            key = f"{name}.{module_of(pname)}".strip(".") if name else module_of(pname)
            d = by_module.setdefault(key, [0.0, 0.0])
            d[0] += float((p.detach().double() - old.double()).norm()) ** 2
            d[1] += float(old.double().norm()) ** 2
        for key, (d2, w2) in by_module.items():
            self.update_ratios.setdefault(key, []).append(math.sqrt(d2) / math.sqrt(w2) if w2 > 0 else math.nan)

    def next_step(self) -> None:
        """End of one training iteration (all models of the program stepped)."""
        self.step += 1

    @contextlib.contextmanager
    def loop(self) -> Iterator[None]:
        """Around the training loop: with ``stop_on_error``, an exception (a peer tool aborting the run)
        ends the loop and is recorded with its step instead of propagating."""
        try:
            yield
        except Exception as exc:
            if not self.stop_on_error:
                raise
            self.stopped = (self.step, f"{type(exc).__name__}: {str(exc)[:300]}")

    def result(self, metric: float, metric_name: str, higher_is_better: bool,
               chance_loss: float | None = None) -> RunResult:
        """Close the monitors (what they print then is visible at the end of the run) and return the result."""
        self.step = len(self.losses)
        findings: list[gg.Finding] = []
        for part in self.parts.values():
            if part.monitor is not None:
                for f in part.monitor.findings:
                    module = f"{part.name}.{f.module}".strip(".") if part.name else f.module
                    findings.append(gg.Finding(f.kind, module, f.step, f.severity, f.message, f.advice,
                                               dict(f.evidence)))
                part.monitor.close()
        guard = None
        if any(p.guard is not None for p in self.parts.values()):
            guard = dict(self.guard_counts)
            guard["summaries"] = {n: p.guard.summary() for n, p in self.parts.items() if p.guard is not None}
        return RunResult(
            program=self.program, fault=self.fault, seed=self.seed, steps=self.steps, losses=self.losses,
            metric=metric, metric_name=metric_name, higher_is_better=higher_is_better, grad_norms=self.grad_norms,
            update_ratios=self.update_ratios, seen=[s for log in self.logs for s in log.seen], findings=findings,
            fault_step=self.fault_step, chance_loss=chance_loss, stopped=self.stopped, guard=guard, extra=self.extra,
        )


@dataclass
class _Part:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    monitor: Any
    guard: Any
    name: str

    def __post_init__(self) -> None:
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]


def scale_lr(optimizer: torch.optim.Optimizer, factor: float, scheduler: Any = None) -> None:
    """Multiply the learning rate by ``factor``, in the optimizer and in a scheduler's base LRs (a
    ``LambdaLR`` rewrites ``lr`` from ``base_lrs`` at every step)."""
    for g in optimizer.param_groups:
        g["lr"] *= factor
        if "initial_lr" in g:
            g["initial_lr"] *= factor
    if scheduler is not None:
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


def scale_weights(model: nn.Module, factor: float) -> None:
    """Weight matrices and kernels of linear, convolutional and recurrent layers × ``factor`` (biases,
    embeddings and norm layers untouched): the "weights × 10 at init" fault."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.RNNBase):
                for name, p in module.named_parameters(recurse=False):
                    if p.dim() >= 2 and name != "bias":
                        p.mul_(factor)


def main(run: Callable[..., RunResult], faults: tuple[str, ...], argv: list[str] | None = None) -> None:
    """Script entry point shared by the programs: ``python -m programs.word_lm --fault no_clip_lr20``."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--fault", choices=faults, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guard", action="store_true", help="train under the default gg.Guard")
    args = ap.parse_args(argv)
    kwargs: dict[str, Any] = {"fault": args.fault, "seed": args.seed, "monitor_factory": loud_watch}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.guard:
        kwargs["guard_factory"] = default_guard
    r = run(**kwargs)
    print(r.describe())
    for s in r.seen:
        print(f"visible at step {s.visible}: [{s.finding.severity}] {s.finding.kind} at {s.finding.module!r}")
    if r.guard is not None:
        print("guard:", {k: v for k, v in r.guard.items() if k != "summaries"})
