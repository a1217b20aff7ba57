"""The attached monitoring session: hooks and patches that turn an unmodified program into a watched one.

What is installed (all removed by :meth:`Session.close`):

* a global module forward pre-hook and forward hook (:class:`gradguard.attach.discover.CallRecorder`),
  only during the first training step: they find the model(s) and the first batch;
* global optimizer step pre/post hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook`` /
  ``_post_hook``): an optimizer step is a step boundary, and its parameters name the model it trains;
* one ``register_post_accumulate_grad_hook`` per parameter of each watched model: it marks that a backward
  pass reached the model (the step is then "pending" until it is recorded);
* patches, where PyTorch has no hook: ``torch.autograd.backward`` (``Tensor.backward`` calls it) is
  wrapped to capture the loss, a scalar tensor that ``backward()`` was called on, and to know when a backward
  pass ends; ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` are wrapped so that the pending step
  is recorded *before* the clip (an explosion shows in the norm before clipping, not after); with
  ``guard=True`` the ``step`` attribute of each discovered optimizer *instance* is replaced by a guarded
  step (:class:`gradguard.Guard`), since no hook can cancel an optimizer step.

A step is recorded (``Monitor.step(loss)``) at the first of: a clip call, an optimizer step, and — for a
model updated without any ``torch.optim`` optimizer (hand-written SGD) — the end of each backward pass.
That is where a hand-wired monitor goes (right after ``loss.backward()``), and the tests check that both
record the same history and findings. Limits: until the first optimizer step is seen, every backward pass
is a step, so with gradient accumulation the first micro-batches are recorded as steps of their own; with
a ``GradScaler`` the loss and gradients seen are the scaled ones (as a hand-wired monitor would see them
before ``scaler.unscale_``); a clip function imported by name before the session started
(``from torch.nn.utils import clip_grad_norm_`` in an earlier notebook cell) is not intercepted, and the
step is then recorded at the optimizer step, after the clip. Under ``torchrun``, ``--guard`` judges each
rank's own loss, so ranks can disagree on a loss spike; non-finite gradients (all-reduced) are skipped
on every rank alike.

Per step, beyond the hand-wired ``Monitor.step(loss)``, the attached path does host bookkeeping only: the
backward wrapper, one post-accumulate-grad call per parameter (a flag), and the optimizer pre/post hooks
(a dictionary look-up); no device value is read and nothing is written. The module hooks of discovery are
removed after the first whole training step. ``metrics.jsonl`` is written by the monitor's sinks on its
logging schedule, each line with one unbuffered write: a process killed by SIGKILL loses the steps
recorded since the last fetch (fewer than ``log_every``) and the run line, never a part of a line.

The guarded step does not clip (``Guard(clip=None)``): a healthy program's updates stay exactly its own.
The optimizer of a model is known only once it steps, so its first step is guarded from inside the step
pre-hook: the guard makes (or skips) the update itself, and the program's own call then runs with the
gradients set aside (optimizers skip parameters whose ``.grad`` is ``None``), which the post-hook puts back.
"""

from __future__ import annotations

import functools
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from gradguard.attach.discover import CallRecorder, owner, program_name, unwrap, with_gradients
from gradguard.errors import GradGuardError, InputError, check_number
from gradguard.findings import Finding
from gradguard.monitor import Monitor, watch
from gradguard.sinks import ConsoleSink, JsonlSink, Sink

if TYPE_CHECKING:  # imported where used: only --guard and --probe need them, and every run pays its start-up
    from gradguard.guard import Guard
    from gradguard.preflight import ProbeReport

#: Status values of the final ``{"type": "run", ...}`` line of ``metrics.jsonl``.
RUN_STATUSES = ("complete", "error", "interrupted")
#: The ``--probe`` report's file name in the run folder.
PROBE_REPORT = "probe.html"


class RunLog(JsonlSink):
    """``metrics.jsonl`` lines the monitor does not write: guard events and the final run status.

    Same file and the same one-``os.write``-per-line guarantee as :class:`gradguard.sinks.JsonlSink`
    (both descriptors append, so lines from the two never interleave within a line).
    """

    def record(self, obj: dict[str, Any]) -> None:
        self._line(obj)


class _Deferred(Sink):
    """Forwards to a sink chosen later: a model is watched from its first forward, but its folder is known
    only when its first step confirms that it is the model being trained."""

    def __init__(self) -> None:
        self.target: Sink | None = None

    def on_step(self, record: dict[str, float]) -> None:
        if self.target is not None:
            self.target.on_step(record)

    def on_finding(self, finding: Finding) -> None:
        if self.target is not None:
            self.target.on_finding(finding)

    def close(self) -> None:
        if self.target is not None:
            self.target.close()


@dataclass
class Target:
    """One watched model: its monitor, where it writes, the optimizers that step it, its guard."""

    model: nn.Module
    monitor: Monitor
    param_ids: set[int]
    sink: _Deferred
    hooks: list[RemovableHandle]
    name: str = ""
    folder: Path | None = None
    log: RunLog | None = None
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    guard: Guard | None = None
    pending: bool = False
    loss: Tensor | None = None
    step_loss: Tensor | None = None
    records: int = 0
    probe: ProbeReport | None = None


def _scalar(tensors: Any) -> Tensor | None:
    """The loss a ``backward()`` call started from: a one-element tensor (``numel`` reads no device value).

    Not detached: ``Monitor.step`` reads the loss's graph (its last nodes' names) to infer the chance level
    of a cross-entropy, as it does for the ``loss`` a hand-written loop passes. It is held only until the
    step is recorded (the program's own ``loss`` variable lives longer), then only its detached value.
    """
    if isinstance(tensors, list | tuple) and len(tensors) == 1:
        tensors = tensors[0]
    if isinstance(tensors, Tensor) and tensors.numel() == 1:
        return tensors
    return None


class Session:
    """An attached monitor; create it with :func:`autowatch` (or ``gradguard run``). See the module docstring.

    Attributes:
        targets: the watched models, in the order their first step was recorded.
    """

    def __init__(
        self,
        *,
        log_dir: str | Path | None = None,
        guard: bool = False,
        probe: bool = False,
        console: bool = True,
        log_every: int = 10,
    ) -> None:
        for name, flag in (("guard", guard), ("probe", probe), ("console", console)):
            if not isinstance(flag, bool):
                raise InputError(f"{name}={flag!r} must be True or False")
        check_number("log_every", log_every, low=1, integer=True)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.guard_steps = guard
        self.probe_first = probe
        self.console = console
        self.log_every = log_every
        self.targets: list[Target] = []
        self._candidates: list[Target] = []  # watched from their first forward, not yet confirmed by a step
        self._by_optimizer: weakref.WeakKeyDictionary[torch.optim.Optimizer, Target | None] = (
            weakref.WeakKeyDictionary())
        self._stash: dict[int, list[tuple[Tensor, Tensor | None]]] = {}
        self._patched_steps: list[tuple[torch.optim.Optimizer, Any]] = []
        self._busy = False  # gradguard's own forward/backward (probe, replay, guard) is not the program's
        self._closed = False
        self._said_no_optimizer = False
        self._failed = False
        self._last_loss: Tensor | None = None
        self._recorder = CallRecorder(self._contain(self._on_training_call))
        self._handles = [
            register_optimizer_step_pre_hook(self._contain(self._on_step_pre)),
            register_optimizer_step_post_hook(self._on_step_post),
        ]
        self._patches: list[tuple[Any, str, Any]] = []
        self._patch(torch.autograd, "backward", self._wrap_backward)
        for where in (torch.nn.utils, torch.nn.utils.clip_grad):
            for fn in ("clip_grad_norm_", "clip_grad_value_"):
                self._patch(where, fn, self._wrap_clip)

    # ------------------------------------------------------------------------------------ installing
    def _patch(self, obj: Any, attr: str, wrap: Callable[[Any], Any]) -> None:
        original = getattr(obj, attr)
        self._patches.append((obj, attr, original))
        setattr(obj, attr, wrap(original))

    def _contain(self, fn: Callable[..., None]) -> Callable[..., None]:
        """``fn`` as a hook that can never break the program: after an error of gradguard's own, every hook
        becomes a no-op (hooks cannot be removed from inside the hook loop that is running them) and the
        program continues unwatched; what was recorded until then is still written at close."""

        @functools.wraps(fn)
        def hook(*args: Any) -> None:
            if self._failed:
                return
            try:
                fn(*args)
            except Exception as exc:
                self._failed = True
                self._busy = self._recorder.paused = False
                self._say(f"stopped watching after an internal error ({type(exc).__name__}: {exc}); "
                          "the program continues unwatched")

        return hook

    def _say(self, message: str) -> None:
        if self.console:
            print(f"gradguard: {message}", file=sys.stderr, flush=True)

    def _wrap_backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            if self._busy or self._failed:
                return original(tensors, *args, **kwargs)
            loss = self._last_loss = _scalar(tensors)
            result = original(tensors, *args, **kwargs)
            after(loss)
            return result

        after = self._contain(self._after_backward)

        return backward

    def _wrap_clip(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
            if self._busy or self._failed:
                return original(parameters, *args, **kwargs)
            params = [parameters] if isinstance(parameters, Tensor) else list(parameters)  # a generator once
            before(params)
            return original(params, *args, **kwargs)

        before = self._contain(self._before_clip)
        return clip

    def _before_clip(self, params: list[Tensor]) -> None:
        for t in self.targets:
            # Stops at the first of the model's parameters (usually the first one): no per-parameter set per clip.
            if t.pending and any(id(p) in t.param_ids for p in params):
                self._record(t)

    # ------------------------------------------------------------------------------------ discovery
    def _on_training_call(self, module: nn.Module) -> None:
        """The program calls a module with trainable parameters, at the top level, in training: watch it."""
        model = unwrap(module)
        if any(t.model is model for t in (*self.targets, *self._candidates)):
            return
        if not any(p.requires_grad for p in model.parameters()):
            return
        self._start(model, module)

    def _start(self, model: nn.Module, called: nn.Module | None) -> Target | None:
        """Watch ``model`` (probe its first batch first when asked); ``None`` if the monitor refuses it."""
        self._busy, self._recorder.paused = True, True
        try:
            probed = self._probe(model, called) if self.probe_first else None
            sink = _Deferred()
            sinks: list[Sink] = [sink]
            if self.console and _rank() == 0:
                sinks.append(ConsoleSink(file=sys.stderr))
            try:
                mon = watch(model, console=False, sinks=sinks, log_every=self.log_every)
            except GradGuardError:
                return None
        finally:
            self._busy, self._recorder.paused = False, False
        target = Target(model, mon, {id(p) for p in model.parameters()}, sink, [])
        for p in model.parameters():
            if p.requires_grad:
                target.hooks.append(p.register_post_accumulate_grad_hook(functools.partial(_mark, self, target)))
        if probed is not None:
            target.probe = probed
            for f in probed.findings:
                mon.report(f)
        self._candidates.append(target)
        return target

    def _probe(self, model: nn.Module, called: nn.Module | None) -> ProbeReport | None:
        from gradguard.preflight import probe

        inputs = self._recorder.inputs_of(called) if called is not None else None
        if inputs is None:
            self._say("--probe: the model's first batch was not seen; probe skipped")
            return None
        args, kwargs = inputs
        batch: Any = dict(kwargs) if kwargs and not args else (args[0] if len(args) == 1 and not kwargs else args)
        try:
            return probe(model, batch)
        except Exception as exc:  # the model's own code runs inside the probe: any error is possible
            self._say(f"--probe skipped ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            return None

    def _confirm(self, target: Target) -> None:
        """A candidate's first step: it is a trained model. Give it its folder and say so."""
        self._candidates.remove(target)
        self.targets.append(target)
        k = len(self.targets) - 1
        target.name = program_name(target.model) or ("model" if k == 0 else f"model{k}")
        if self.log_dir is not None:
            target.folder = self.log_dir if k == 0 else self.log_dir / target.name
            target.sink.target = JsonlSink(target.folder)
            target.log = RunLog(target.folder)
        n = sum(p.numel() for p in target.model.parameters())
        self._say(f"watching `{target.name}` ({type(target.model).__name__}, {n:,} parameters"
                  + (f"; log in {target.folder}" if target.folder is not None else "") + ")")
        if target.probe is not None:
            where = ""
            if target.folder is not None:
                where = f"; {target.probe.to_html(target.folder / PROBE_REPORT)}"
            self._say(f"probe of the first batch: {len(target.probe.findings)} finding(s){where}")

    def _discover(self, params: list[Tensor]) -> Target | None:
        """The target owning ``params``: a watched one, else a module the program called (watched from now)."""
        ids = {id(p) for p in params}
        for t in (*self.targets, *self._candidates):
            if not ids.isdisjoint(t.param_ids):
                return t
        if not self._recorder.active:
            return None
        called = owner(self._recorder.modules(), params)
        if called is None:
            return None
        return self._start(unwrap(called), called)

    # ------------------------------------------------------------------------------------ boundaries
    def _after_backward(self, loss: Tensor | None) -> None:
        marked = [t for t in (*self.targets, *self._candidates) if t.pending]
        if not marked and self._recorder.active:
            known = {i for t in (*self.targets, *self._candidates) for i in t.param_ids}
            fresh = [p for p in with_gradients(self._recorder.modules()) if id(p) not in known]
            found = self._discover(fresh) if fresh else None
            if found is not None:
                found.pending = True
                marked = [found]
        for t in marked:
            t.loss = loss
            if not t.optimizers:  # no optimizer steps this model (yet): each backward pass is a step
                self._record(t)

    def _record(self, t: Target) -> None:
        if not t.pending:
            return
        if t in self._candidates:
            self._confirm(t)
        t.pending = False
        loss, t.loss, self._last_loss = t.loss, None, None
        t.step_loss = None if loss is None else loss.detach()
        self._busy, self._recorder.paused = True, True
        try:
            t.monitor.step(loss)
        finally:
            self._busy, self._recorder.paused = False, False
        t.records += 1
        if t.records == 2 and t is self.targets[0]:
            # One whole training step has run: every model the loop trains has been called by now.
            self._recorder.remove()
            for c in self._candidates:
                c.monitor.close()
                for h in c.hooks:
                    h.remove()
            self._candidates.clear()
            if not t.optimizers and not self._said_no_optimizer:
                self._said_no_optimizer = True
                self._say(f"`{t.name}` is updated without a torch.optim optimizer: each backward pass is a step"
                          + ("; --guard needs an optimizer step to guard, so this run is only monitored"
                             if self.guard_steps else ""))

    def _on_step_pre(self, opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._busy:
            return
        key = opt
        if key not in self._by_optimizer:
            params = [p for g in opt.param_groups for p in g["params"]]
            self._by_optimizer[key] = t = self._discover(params)
            if t is None:
                self._say(f"a {type(opt).__name__} steps parameters of no module the program called at the top "
                          "level before its first training step; it is not watched")
            else:
                if t.records == 0 and not t.pending and any(p.grad is not None for p in params):
                    # Found by its optimizer (its backward ran before it was watched): this step is pending.
                    t.pending, t.loss = True, self._last_loss
                self._record(t)  # before the message: the first record confirms and names the model
                t.optimizers.append(opt)
                guarded = self.guard_steps and t.guard is None
                self._say(f"steps of `{t.name}` are {type(opt).__name__}.step() calls"
                          + (" (guarded)" if guarded else ""))
                if guarded:
                    self._guard_first_step(t, opt, args[1:], kwargs)  # args[0] is the optimizer itself
                return
        t = self._by_optimizer[key]
        if t is not None:
            self._record(t)

    def _on_step_post(self, opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        stashed = self._stash.pop(id(opt), None)
        if stashed is not None:
            for p, g in stashed:
                p.grad = g

    # ------------------------------------------------------------------------------------ guard
    def _guard_first_step(self, t: Target, opt: torch.optim.Optimizer, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> None:
        from gradguard.guard import Guard

        self._busy = True
        try:
            t.guard = Guard(t.model, opt, clip=None, monitor=t.monitor)
        finally:
            self._busy = False
        current = opt.step  # bound method, or the wrapper an LR scheduler put on the instance

        def guarded(this: torch.optim.Optimizer, *a: Any, **kw: Any) -> Any:
            if self._busy or self._failed:
                return current(*a, **kw)
            self._contain(self._record)(t)
            if self._failed or not self._guarded_step(t, a, kw):
                return current(*a, **kw)
            return None

        if getattr(current, "_wrapped_by_lr_sched", False):
            # An LR scheduler checks this mark on optimizer.step to know that its own wrapper is still called.
            guarded._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self._patched_steps.append((opt, opt.__dict__.get("step")))
        # A bound method (not a plain function), so that an LR scheduler created later can wrap it.
        opt.step = types.MethodType(guarded, opt)  # type: ignore[method-assign]
        if not self._guarded_step(t, args, kwargs):
            return  # the program's own call makes this step
        # The program's own call runs next: with no gradients, every torch.optim optimizer skips each parameter.
        params = [p for g in opt.param_groups for p in g["params"]]
        self._stash[id(opt)] = [(p, p.grad) for p in params]
        for p in params:
            p.grad = None

    def _guarded_step(self, t: Target, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """``guard.step`` in place of the optimizer step; False when the guard refused and the caller must step."""
        guard = t.guard
        assert guard is not None
        closure = args[0] if args else kwargs.get("closure")
        loss = t.step_loss
        if loss is None:  # the gradients are still judged; only the loss checks have nothing to judge
            loss = torch.zeros((), device=guard.params[0].device)
        self._busy = True
        try:
            guard.step(loss, closure)
        except GradGuardError as exc:  # the guard refused (not the optimizer's own error): step unguarded
            self._failed = True
            self._say(f"--guard stopped ({exc}); this step and the later ones are the program's own, unwatched")
            return False
        finally:
            self._busy = False
        if t.log is not None:
            last = guard.steps - 1
            step = t.monitor.steps - 1
            new = []
            for e in reversed(guard.events):
                if e.step != last:
                    break
                new.append(e)
            for e in reversed(new):
                t.log.record({"type": "event", "step": step, "action": e.action, "reason": e.reason,
                              **dict(e.numbers)})
        return True

    # ------------------------------------------------------------------------------------ results
    @property
    def monitors(self) -> list[Monitor]:
        """The monitors of the watched models (``mon.findings``, ``mon.history``, ``mon.summary()``)."""
        return [t.monitor for t in self.targets]

    @property
    def findings(self) -> list[Finding]:
        """The findings of every watched model, worst first."""
        return sorted((f for t in self.targets for f in t.monitor.findings), key=lambda f: -f.rank)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, status: str = "complete", *, exit_code: int = 0, reason: str = "",
              report: bool = True) -> list[Path]:
        """Remove every hook and patch, close the monitors, write the run line and the reports. Idempotent.

        Each watched model's ``metrics.jsonl`` ends with ``{"type": "run", "status", "exit_code", "reason",
        "model" (its name), "steps", "optimizers" (class names), "guard" (``Guard.summary()``, with --guard)}``.
        Guard interventions were written as they happened: ``{"type": "event", "step", "action", "reason",
        ...numbers}`` (:class:`gradguard.GuardEvent`, ``step`` counted as the monitor counts steps).

        Args:
            status: one of :data:`RUN_STATUSES`.
            exit_code: the program's exit code.
            reason: why the run ended (an exception, a signal), empty for a complete run.
            report: write ``report.html`` in each folder (``gradguard.report.watch.render_watch_report``).

        Returns:
            The paths of the reports written.
        """
        if self._closed:
            return []
        self._closed = True
        self._recorder.remove()
        for h in self._handles:
            h.remove()
        for obj, attr, original in reversed(self._patches):
            setattr(obj, attr, original)
        for opt, own in self._patched_steps:
            if own is None:
                del opt.step
            else:
                opt.step = own  # type: ignore[method-assign]
        for stashed in self._stash.values():
            for p, g in stashed:
                p.grad = g
        self._stash.clear()
        for t in (*self.targets, *self._candidates):
            for h in t.hooks:
                h.remove()
            t.monitor.close()
        self._candidates.clear()
        paths: list[Path] = []
        for t in self.targets:
            if t.log is not None:
                line: dict[str, Any] = {"type": "run", "status": status, "exit_code": exit_code, "reason": reason,
                                        "model": t.name, "steps": t.monitor.steps,
                                        "optimizers": [type(o).__name__ for o in t.optimizers]}
                if t.guard is not None:
                    line["guard"] = t.guard.summary()
                t.log.record(line)
                t.log.close()
            if report and t.folder is not None:
                from gradguard.report.watch import render_watch_report

                try:
                    paths.append(render_watch_report(t.folder))
                except Exception as exc:  # the log is complete on disk: `gradguard report DIR` can retry
                    self._say(f"report of `{t.name}` not written ({type(exc).__name__}: {exc})")
        return paths

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close("complete" if exc[0] is None else "error")


def _mark(session: Session, target: Target, param: Tensor) -> None:
    """Post-accumulate-grad hook: a backward pass of the program reached ``target``'s parameters."""
    if not session._busy:
        target.pending = True


def _rank() -> int:
    """This process's rank under ``torchrun`` (its ``RANK`` variable), 0 otherwise."""
    import os

    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def autowatch(
    *,
    log_dir: str | Path | None = None,
    guard: bool = False,
    probe: bool = False,
    console: bool = True,
    log_every: int = 10,
) -> Session:
    """Watch whatever model the following code trains, with no change to it; ``.close()`` undoes it.

    The same as ``gradguard run`` inside Python (notebooks): the model is found from the modules called
    and the parameters that an optimizer steps or a backward pass reaches, and each step is recorded with
    ``Monitor.step(loss)`` at the first clip, optimizer step or (hand-written updates) end of a backward
    pass (see :mod:`gradguard.attach.session` for the hooks and patches used).

    Args:
        log_dir: folder for ``metrics.jsonl`` and, at ``close()``, ``report.html``; ``None`` writes nothing.
        guard: make every optimizer step a :class:`gradguard.Guard` step (skip non-finite and spiking
            updates, roll back, back off the learning rate; no clipping of its own).
        probe: run :func:`gradguard.probe` on the model's first batch before that batch's forward pass.
        console: print findings and gradguard's messages to stderr as they appear.
        log_every: steps between fetches of the statistics (``gg.watch(log_every=)``).

    Returns:
        A :class:`Session`: ``.findings``, ``.monitors``, ``.close()``; usable as a context manager.

    Example:
        >>> import gradguard as gg
        >>> session = gg.autowatch()
        >>> net = torch.nn.Linear(3, 1); opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> for _ in range(3):
        ...     opt.zero_grad(); net(torch.randn(4, 3)).pow(2).mean().backward(); opt.step()
        >>> session.monitors[0].steps
        3
        >>> _ = session.close()
    """
    return Session(log_dir=log_dir, guard=guard, probe=probe, console=console, log_every=log_every)

