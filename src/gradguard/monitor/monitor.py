"""The training monitor that ``gg.watch(model)`` returns (:mod:`gradguard.monitor.entry`): the step pipeline.

Data flows one way: hooks and per-step fused statistics (device) → fetched on the logging schedule
(host) → rows (:mod:`gradguard.monitor.rows`), history (:mod:`gradguard.monitor.history`) and sinks →
detection rules → findings. The steady state costs one fused norm over the gradients per step (see
:mod:`gradguard.monitor.params`); activation hooks exist only on sampled steps
(:mod:`gradguard.monitor.activations`, read by :mod:`gradguard.monitor.samples`); provenance of a NaN/Inf is
found by replaying the step (:mod:`gradguard.monitor.provenance`); the loss scaler's skips are counted by
:mod:`gradguard.monitor.scaler`. docs/monitor.md ("Code map") lists every module.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.adapt import unwrap_compiled
from gradguard.detect import Observation, ParamInfo, RuleOptions, RunMemory, Sentinel, run_rules
from gradguard.detect.base import Origin
from gradguard.detect.forward import is_norm
from gradguard.errors import ConfigError, InputError, StateError, check_scalar_loss
from gradguard.findings import KINDS, Finding
from gradguard.monitor.activations import ActivationTap, Sample
from gradguard.monitor.chance import is_cross_entropy
from gradguard.monitor.history import History
from gradguard.monitor.hooks import (
    CompiledEntry,
    RootPreHook,
    WeakHook,
    compiled_in_place,
    dynamo_compiled_something,
    in_backward,
)
from gradguard.monitor.options import check_options
from gradguard.monitor.params import ParamStats, ReduceFn, RowMeta
from gradguard.monitor.provenance import (
    Call,
    autocast_state,
    localize_step,
    replaying_as,
    restore_buffers,
    snapshot_buffers,
    tensors_in,
)
from gradguard.monitor.rows import history_row
from gradguard.monitor.samples import SampledActivations
from gradguard.monitor.scaler import OverflowSkips, is_overflow
from gradguard.monitor.schedule import Sampling
from gradguard.monitor.summary import MonitorSummary, parameter_table
from gradguard.sinks.base import Sink
from gradguard.sinks.console import ConsoleSink
from gradguard.sinks.jsonl import JsonlSink
from gradguard.stats.distributed import make_reduce_fn
from gradguard.stats.scaler import grads_unscaled, init_scale, scale_tensor

#: The default sampling schedule (``watch(sample_every=None)``, see gradguard.monitor.schedule.Sampling and
#: docs/monitor.md): a sampled step every DENSE_EVERY steps for the first ``dead_window`` sampled steps and
#: for as many after each alert, every SPARSE_EVERY steps otherwise. Dense long enough to give the
#: dead-unit rule its ``dead_window`` sampled batches (and the update-size rule its consecutive ratios);
#: sparse at the period that brings the sampled-step work (activation hooks and summaries, max|g|, ‖w‖,
#: the weight copy for ‖Δw‖) to a fifth of its fixed-period cost.
DENSE_EVERY = 10
SPARSE_EVERY = 50

#: Alerts from a detail row: the largest update ratio ‖Δw‖/‖w‖ grew this many times since the previous
#: detail step (a sampled step's own alerts: gradguard.monitor.samples.ALERT_SHIFT).
ALERT_UPDATE_GROWTH = 2.0


#: Steps after watch() at which the rules run at every step: nothing is known about the run yet, and a run
#: that is bad from its first step must be visible within a few steps (one fetch per step, 16 in all).
EARLY_STEPS = 16


class Monitor:
    """Watches one model during training; create it with :func:`watch`.

    Usage (``mon.step`` after ``backward()`` and before ``optimizer.step()``)::

        mon = gg.watch(model)
        for x, y in data:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
        print(mon.summary())

    See :func:`watch` for the options.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        log_every: int = 10,
        sample_every: int | None = None,
        detail_every: int | None = None,
        window: int = 200,
        dead_window: int = 5,
        log_dir: str | os.PathLike[str] | None = None,
        console: bool | None = None,
        sinks: Iterable[Sink] = (),
        replay: bool | None = None,
        reduce_fn: ReduceFn | None = None,
        max_calls: int = 8,
        scaler: torch.amp.GradScaler | None = None,
        history_limit: int = 1000,
        num_classes: int | None = None,
        chance_loss: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        rules: RuleOptions | None = None,
    ) -> None:
        chance, chance_source, console, replay, sink_list = check_options(
            model, log_every=log_every, sample_every=sample_every, detail_every=detail_every, window=window,
            dead_window=dead_window, max_calls=max_calls, history_limit=history_limit, num_classes=num_classes,
            chance_loss=chance_loss, optimizer=optimizer, rules=rules, console=console, replay=replay,
            reduce_fn=reduce_fn, scaler=scaler, log_dir=log_dir, sinks=sinks,
        )
        self.model = model
        # torch.compile(m) wraps m: names, parameters, activation hooks and replay use m itself, while
        # the root hooks go on the wrapper, whose own hooks run eagerly around the compiled forward.
        module, self._wrapped = unwrap_compiled(model)
        self._module = module
        self._entry: CompiledEntry | None = None
        named = list(module.named_parameters())
        if not named:
            raise ConfigError(
                f"watch() got a {type(model).__name__} with no parameters; allowed: a module with at least one "
                "parameter (there is no gradient to watch)"
            )
        self.log_every = log_every
        if sample_every is None:
            dense = DENSE_EVERY * dead_window
            self.sample_every = Sampling(DENSE_EVERY, SPARSE_EVERY, start=dense, hold=dense)
        else:
            self.sample_every = Sampling(sample_every)
        # Detail statistics follow the sampled steps (the same schedule object) unless given their own period.
        self.detail_every = self.sample_every if detail_every is None else Sampling(detail_every)
        self.replay_enabled = replay is not False
        self.max_calls = max_calls
        self.scaler = scaler
        self.window = window
        self.optimizer = optimizer
        self.rules = rules if rules is not None else RuleOptions()
        # What the rules remember of the whole run; the chance level is inferred later when not given.
        self._run = RunMemory(chance, chance_source)
        self._infer_chance = chance is None
        self._width: int | None = None
        self._sentinel = Sentinel(self.rules, EARLY_STEPS, chance)
        self._input_std: Tensor | None = None  # of the sampled step in progress
        self._sample_input: Tensor | None = None  # of the last sampled step, until the next fetch
        self._latest_input_std: float | None = None

        owner: dict[int, str] = {}
        lookup: set[int] = set()
        for mname, m in module.named_modules():
            for _, p in m.named_parameters(recurse=False):
                owner.setdefault(id(p), mname)
                if isinstance(m, nn.Embedding | nn.EmbeddingBag):
                    lookup.add(id(p))
        self.params = [
            ParamInfo(n, owner.get(id(p), ""), p.dim(), p.numel(), id(p) in lookup, str(p.dtype)) for n, p in named
        ]
        self._names = [p.name for p in self.params]
        self._keys = {
            stat: [f"{stat}/{n}" for n in self._names]
            for stat in ("grad_norm", "nonfinite", "grad_max", "weight_norm", "update_ratio")
        }
        if reduce_fn is None:
            # Sharded (FSDP2/DTensor) parameters get the one-collective reduction of
            # the squared-norm block automatically; None (no collective) for replicated/DDP/single process.
            reduce_fn = make_reduce_fn([p for _, p in named])
        self._stats = ParamStats([p for _, p in named], rows=log_every, reduce_fn=reduce_fn)
        self._tap = ActivationTap(module, {n: m for n, m in module.named_modules() if n != ""})
        self._saturation_kinds = {n: k for n, k in self._tap.kinds.items() if k is not None}
        self._norm_layers = frozenset(n for n, m in model.named_modules() if is_norm(m))

        self.sinks: list[Sink] = []
        if log_dir is not None:
            self.sinks.append(JsonlSink(log_dir))
        if console is not False:
            self.sinks.append(ConsoleSink())
        self.sinks.extend(sink_list)

        self._step = 0
        self._history = History(history_limit)  # mon.history, bounded (gradguard.monitor.history)
        self._window: deque[dict[str, Any]] = deque(maxlen=window + log_every)
        self._findings: dict[tuple[str, str], Finding] = {}
        self._samples: list[Sample] = []
        self._acts = SampledActivations(dead_window)  # what the sampled steps measured (monitor.samples)
        self._calls: list[Call] = []
        self._forwards = 0  # training forwards seen since the last step (kept: the first max_calls)
        self._eager_done = False
        self._compiled_seen = False
        self._warned: set[str] = set()
        self._skips = OverflowSkips()  # the loss scaler's overflow skips (gradguard.monitor.scaler)
        self._replaying = False
        self._bad_episode = False
        self._origin: tuple[int, Origin | None, dict[str, float]] | None = None
        self._closed = False
        self._host_every_step = False  # the step's norms reached the host at the step itself (CPU)
        self._top_update: float | None = None  # largest ‖Δw‖/‖w‖ of the latest detail step
        # Weak, picklable hooks (gradguard.monitor.hooks): no reference cycle through the model's hook dicts,
        # and a copy of the model gets inert hooks.
        self._root_pre_hook = RootPreHook(self, "_root_pre")
        self._root_handles = [
            model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True),
            model.register_forward_hook(WeakHook(self, "_root_post"), with_kwargs=True),
        ]
        self._adopt_in_place_compile()
        if self.sample_every(0):
            self._arm(0)

    def _adopt_in_place_compile(self) -> None:
        """After ``model.compile()`` observe the model through an eager entry around its compiled call."""
        if self._wrapped or self._entry is not None or not compiled_in_place(self._module):
            return
        self._entry = CompiledEntry(self._module._compiled_call_impl, self)
        self._module._compiled_call_impl = self._entry
        self._wrapped = True
        # Hooks attached when the graph was compiled stay (they do nothing there, and removing them would
        # recompile it); the eager pass then finds them in place.
        self._tap.frozen = bool(self._tap.handles)

    def _arm(self, step: int) -> None:
        # Hooks traced into a compiled graph do nothing (and a graph guards on their number), so a compiled
        # model's sampled step is summarised by the extra eager forward of _eager_pass, with the hooks
        # attached only around it.
        self._tap.arm(step, attach=not self._wrapped)
        self._eager_done = False

    # ----------------------------------------------------------------- replay recording (root hooks)
    def _training_call(self) -> bool:
        return not self._replaying and torch.is_grad_enabled() and self._module.training and not in_backward()

    def _root_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Keep *references* to the inputs and the RNG and autocast state before the forward: enough to
        # replay the step bit-for-bit (dropout masks included) if a NaN/Inf is flagged. No copy, no sync.
        if not self._training_call():
            return
        if self._tap.armed and self._input_std is None:
            # The scale the first layer receives, for the forward-growth rule (a device scalar; read on fetch).
            x = next((t for t in tensors_in((args, kwargs)) if t.is_floating_point() and t.numel() > 1), None)
            if x is not None:
                self._input_std = x.detach().float().std()
        self._forwards += 1
        if self._wrapped or compiled_in_place(self._module):
            self._compiled_seen = True
        if not self.replay_enabled or len(self._calls) >= self.max_calls:
            return
        cuda = None
        # No CUDA tensor can exist before CUDA is initialised: skip walking the inputs on CPU-only runs.
        if torch.cuda.is_initialized() and any(t.is_cuda for t in tensors_in((args, kwargs))):
            cuda = torch.cuda.get_rng_state_all()
        self._calls.append(
            Call(args=args, kwargs=dict(kwargs), rng_cpu=torch.get_rng_state(), rng_cuda=cuda,
                 autocast=autocast_state())
        )

    def _root_post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._width is None and type(output) is Tensor and output.dim() in (2, 3) and output.is_floating_point():
            self._width = int(output.shape[-1])  # classes of (N, C) or (N, T, C) logits, if a classifier's
        if not self._training_call():
            return
        if self._wrapped and self._tap.armed and not self._eager_done:
            self._eager_done = True  # the first forward of the step stands for its micro-batches
            self._eager_pass(args, kwargs)
        # Remember the gradient that reaches each output: replaying the backward from it needs no loss_fn.
        if not self._calls or self._forwards > self.max_calls:
            return  # this forward was not kept
        call = self._calls[-1]
        outs = [output] if type(output) is Tensor else list(tensors_in(output))
        call.outputs = [t.detach() for t in outs]
        call.output_grads = [None] * len(outs)
        for i, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(functools.partial(_keep_grad, call.output_grads, i))

    def _eager_pass(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Summarise a sampled step of a compiled model: one extra forward of the original module, eager.

        Dynamo does not run hooks added after compilation and does not re-check them, so the activation
        hooks cannot observe the compiled forward; they observe this one instead. Cost, on sampled steps
        only (every ``sample_every``-th): one forward without autograd (no backward, no saved tensors),
        a copy of the model's buffers (restored after, so BatchNorm statistics advance once per step) and
        a fork of the RNG (the user's random stream is unchanged). Per-time-step gradient profiles of
        recurrent modules need a backward and are not measured on compiled models.
        """
        tap = self._tap
        buffers = snapshot_buffers(self._module)
        call = Call(args=args, kwargs=kwargs, rng_cpu=None, autocast=autocast_state())
        self._replaying = True
        tap.eager = True
        attached = bool(tap.handles)  # hooks frozen in place stay; others come off before the next call
        tap.attach()
        try:
            with replaying_as(call), torch.no_grad():
                self._module._call_impl(*args, **kwargs)  # the eager path, even after module.compile()
        except Exception as exc:  # the model's own code runs here: never break the user's step
            self._warn_once("eager_pass", f"gradguard: the eager forward that summarises activations of the "
                            f"compiled model failed ({type(exc).__name__}: {exc}); activation statistics are "
                            "missing for this step.")
        finally:
            if not attached:
                tap.detach()
            tap.eager = False
            self._replaying = False
            restore_buffers(buffers)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ----------------------------------------------------------------- the per-step entry point
    def step(self, loss: Tensor | None = None) -> None:
        """Record this step's statistics. Call after ``loss.backward()`` and before ``optimizer.step()``.

        Args:
            loss: the scalar loss tensor of this step (optional; enables loss-spike detection), unscaled
                (not ``scaler.scale(loss)``). With gradient accumulation pass the step's total (the sum or
                mean of the micro-batch losses, detached or not) or the last micro-batch's loss: the
                replay checks every kept micro-batch on its own, and this value only decides whether the
                loss is blamed when every micro-batch's forward and backward replayed finite.

        Raises:
            StateError: after :meth:`close`.
            InputError: ``loss`` is not a tensor, or has more than one element.
        """
        if self._closed:
            raise StateError("Monitor.step() called after close(); create a new monitor with gg.watch(model)")
        if loss is not None:
            check_scalar_loss(loss)
        step = self._step
        if self._infer_chance and loss is not None and self._width is not None:
            self._infer_chance = False
            if self._width >= 2 and is_cross_entropy(loss):
                self._run.chance = self._sentinel.chance = math.log(self._width)
                self._run.chance_source = f"ln {self._width}, inferred from the output width"
        present, grads = self._stats.gradients()
        if not grads:
            self._no_gradients(step)
            return
        device = grads[0].device
        if self._stats.device is not None and device != self._stats.device:
            self._flush()  # the model moved: read the old device's rows before re-allocating
        self._stats.ensure_device(device)
        scale = None
        if self.scaler is not None:
            scale = scale_tensor(self.scaler)
        # After scaler.unscale_(opt) the gradients are ∇L already; before it they are S · ∇L.
        unscale = scale is not None and not grads_unscaled(self.scaler)  # type: ignore[arg-type]
        detail = self.detail_every(step)
        meta, values = self._stats.record(step, loss, detail, present, grads, scale=scale, unscale=unscale)
        if detail:
            self.detail_every.taken(step)
        if self._forwards == 0 and self._module.training:
            self._adopt_in_place_compile()
            self._traced_forward(step)
        if self.detail_every(step + 1):
            self._stats.snapshot(step)  # weights before the optimizer step feed the next update ratio
        sample = self._tap.disarm()
        if sample is not None:
            self._samples.append(sample)
            self._sample_input, self._input_std = self._input_std, None
            if self.sample_every is not self.detail_every:
                self.sample_every.taken(sample.step)
        force = False
        self._host_every_step = device.type == "cpu" and self._stats.reduce_fn is None
        if self._host_every_step:
            # Reading a CPU tensor is a memory load, not a device synchronisation, so the non-finite flag
            # is checked at every step and a NaN is localised on the very step it appears. On accelerators
            # the flag waits for the logging schedule (see _flush), and so it does with a distributed
            # reduce_fn: the flag of a local shard may differ between ranks, and a flush made on one rank
            # only would wait forever in the collective. Summed as Python floats (float64) so that large
            # finite norms cannot overflow into a false alarm.
            host = values.tolist()
            flagged = not math.isfinite(sum(host))
            if flagged and meta.scaled and (loss is None or math.isfinite(host[-1])):
                force = True  # a loss-scaler overflow: counted by _flush, not replayed as a NaN
            elif flagged or self._bad_episode:
                force = self._check_nonfinite(meta, flagged, loss)
            if not flagged:
                # The same host floats feed the tripwire that runs the rules before the schedule (see
                # gradguard.detect.sentinel): a finding is visible within a step of the evidence.
                norms = host[:-1] if loss is not None else host
                gn = math.sqrt(math.fsum(v * v for v in norms))
                force = self._sentinel.check(step, host[-1] if loss is not None else None, gn) or force
        elif step < EARLY_STEPS and self._stats.reduce_fn is None:
            # Accelerators: one fetch per step at the start only, then the logging schedule. Not with a
            # distributed reduce_fn, whose collective belongs to the logging schedule.
            force = True
        if force and step >= EARLY_STEPS:
            self.sample_every.alert(step + 1, "a loss or gradient-norm jump, or a non-finite value")
        if self.sample_every(step + 1):
            self._arm(step + 1)
        self._step += 1
        if force or self._stats.pending() >= self.log_every:
            self._flush()
        self._calls.clear()
        self._forwards = 0

    def _traced_forward(self, step: int) -> None:
        """No training forward passed the root hooks eagerly, but the root pre-hook ran inside a compiled
        graph (``torch.compile(model)`` after ``gg.watch(model)``): use the arguments it kept.

        The forward is then known only by its last call's inputs: the sampled step's activations come
        from the eager pass run here (weights not yet updated), and the replay checks that forward only,
        without its RNG state, autocast state or output gradients. A model that calls its submodules
        directly (an ``nn.ModuleDict``) never passes the root hooks either, and nothing changes for it.
        """
        hook = self._root_pre_hook
        if self._entry is not None:
            return
        if not hook.traced or hook.traced_args is None:
            if not hook.traced and dynamo_compiled_something():
                # Compiled before gg.watch: dynamo does not re-check hooks, so ours never run, not even traced.
                self._warn_once(
                    "unseen_forward",
                    f"gradguard: mon.step() at step {step} found gradients but saw no training forward of the "
                    "watched model. If it runs compiled (torch.compile(model) called before gg.watch(model)), "
                    "dynamo ignores hooks added after compilation: gradient statistics are complete, but "
                    "activation statistics and the NaN/Inf replay are not available; watch the compiled wrapper "
                    "instead: mon = gg.watch(compiled). (A model that calls its submodules directly, e.g. an "
                    "nn.ModuleDict, is not replayed either.)",
                )
            return
        _, args, kwargs = hook.traced_args
        hook.traced_args = None
        self._tap.frozen = True  # hooks stay as the graph was compiled with them: no recompilation
        self._compiled_seen = True
        self._forwards = 1
        if self.replay_enabled:
            self._calls = [Call(args=args, kwargs=dict(kwargs), rng_cpu=None)]
        if self._tap.armed:
            self._eager_pass(args, kwargs)
        self._warn_once(
            "traced_forward",
            f"gradguard: at step {step} the watched model ran compiled (torch.compile(model) after gg.watch(model)), "
            "where the monitor's hooks cannot run. Gradient statistics are complete; activations come from an extra "
            "eager forward, and a NaN/Inf replay covers the forward pass of the last micro-batch only. Watch the "
            "compiled wrapper for all of it: compiled = torch.compile(model); mon = gg.watch(compiled).",
        )

    def _check_nonfinite(self, meta: RowMeta, flagged: bool, loss: Tensor | None) -> bool:
        """Replay the step once per non-finite episode; True when the caller must flush now."""
        if not flagged:
            self._bad_episode = False
            return False
        if self._bad_episode:
            return False
        self._bad_episode = True
        self._stats.count_nonfinite(meta)
        origin = None
        if self.replay_enabled and (self._calls or self._compiled()):
            loss_value = float(loss.detach().float()) if loss is not None else None
            self._replaying = True
            try:
                origin = self._localize(loss_value)
            finally:
                self._replaying = False
        counts: dict[str, float] = {}
        if meta.nonfinite_counts is not None:
            for j, c in zip(meta.present, meta.nonfinite_counts.tolist(), strict=True):
                counts[self.params[j].name] = c
        self._origin = (meta.step, origin, counts)
        return True

    def _localize(self, loss_value: float | None) -> Origin | None:
        """Replay the recorded forwards (gradguard.monitor.provenance.localize_step): never raises."""
        return localize_step(self._module, self._calls, loss_value, forwards=self._forwards,
                             compiled=self._compiled())

    def _compiled(self) -> bool:
        """The step's forward ran compiled (seen through the wrapper, or unseen under compilation)."""
        return self._compiled_seen or "unseen_forward" in self._warned

    def _no_gradients(self, step: int) -> None:
        # A usage problem, not a pathology of the gradients: a warning, not a finding.
        self._tap.disarm()
        if self.sample_every(step + 1):
            self._arm(step + 1)
        self._step += 1
        self._calls.clear()
        self._forwards = 0
        self._warn_once(
            "no_gradients",
            f"gradguard: mon.step() at step {step} found no gradient on any of the {len(self.params)} parameters; "
            "nothing was recorded for this step. Call loss.backward() before mon.step(), and mon.step() before "
            "optimizer.zero_grad().",
        )

    # ----------------------------------------------------------------- logging schedule
    def _flush(self) -> None:
        """The logging schedule: fetch what the device holds, then rows, history, sinks, alerts and rules."""
        metas, host = self._stats.fetch()
        samples, self._samples = self._samples, []
        if not metas and not samples:
            return
        rows = self._rows_of(metas, host, samples)
        self._account_nonfinite(metas, rows)
        self._remember(rows)
        self._emit(rows, samples)
        origin, self._origin = self._origin, None
        if not rows:
            return
        self._alert_on_rows(rows)
        self._judge(rows, samples, origin)

    def _rows_of(self, metas: Sequence[RowMeta], host: Mapping[str, Tensor], samples: Sequence[Sample]
                 ) -> list[dict[str, Any]]:
        """History rows of the fetched steps, with the activation summaries of their sampled steps."""
        lists = {k: v.tolist() for k, v in host.items()}  # Python floats once, not per element
        rows = [history_row(i, m, lists, self._keys) for i, m in enumerate(metas)]
        by_step = {r["step"]: r for r in rows}
        for sample in samples:
            self._acts.absorb(sample, by_step.get(sample.step), self._alert_now)
        return rows

    def _account_nonfinite(self, metas: Sequence[RowMeta], rows: Sequence[dict[str, Any]]) -> None:
        """Loss-scaler skips, and (on accelerators, where the flag is read here) a new non-finite episode."""
        if self.scaler is not None:
            self._scaler_rows(rows)
        bad = next((m for m, r in zip(metas, rows, strict=True) if self._row_bad(r)), None)
        if bad is None:
            self._bad_episode = False
            return
        if self._origin is not None or self._bad_episode:
            return
        self._bad_episode = True
        origin = None
        if self.replay_enabled and (self._calls or self._compiled()):
            self._replaying = True
            try:
                origin = self._localize(None)
            finally:
                self._replaying = False
        self._origin = (bad.step, origin, {})

    def _remember(self, rows: Sequence[dict[str, Any]]) -> None:
        """Bounded history (gradguard.monitor.history), the rules' window and the run memory."""
        self._history.mark(r["step"] for r in rows if not math.isfinite(r["grad_norm"]))
        self._history.keep(rows, self._step)
        self._window.extend(rows)
        if rows:
            self._run.update(rows)

    def _emit(self, rows: Sequence[dict[str, Any]], samples: Sequence[Sample]) -> None:
        """Hand the new rows (and the latest time profiles) to the sinks."""
        for sink in self.sinks:
            for r in rows:
                sink.on_step(r)
            if samples:
                for name, prof in self._acts.time_forward.items():
                    sink.on_histogram(samples[-1].step, f"time_forward/{name}", prof)

    def _alert_on_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """Alerts from the fetched rows: a non-finite value; on accelerators (whose steps do not reach the
        host one by one) the tripwire of gradguard.detect.sentinel run over the fetched rows."""
        if any(not math.isfinite(r["grad_norm"]) for r in rows):
            self.sample_every.alert(self._step, "a non-finite gradient")
        elif not self._host_every_step:
            fired = [self._sentinel.check(r["step"], r["loss"], r["grad_norm"]) for r in rows]  # each row, in order
            if any(fired) and rows[-1]["step"] >= EARLY_STEPS:
                self.sample_every.alert(self._step, "a loss or gradient-norm jump")
        for r in rows:
            if self._keys["weight_norm"][0] not in r:
                continue  # not a detail row
            top = max((r.get(k, 0.0) for k in self._keys["update_ratio"]), default=0.0)
            if not (math.isfinite(top) and top > 0):
                continue
            if self._top_update is not None and top >= ALERT_UPDATE_GROWTH * self._top_update:
                self.sample_every.alert(self._step, "an update-ratio jump")
            self._top_update = top

    def _judge(self, rows: Sequence[dict[str, Any]], samples: Sequence[Sample],
               origin: tuple[int, Origin | None, dict[str, float]] | None) -> None:
        """Run the detection rules on the window and record their findings."""
        nonfinite_step, found, counts = origin if origin else (None, None, {})
        if samples and self._sample_input is not None:
            self._latest_input_std, self._sample_input = float(self._sample_input), None
        lrs: dict[str, float] = {}
        if self.optimizer is not None:
            by_id = {id(p): float(g["lr"]) for g in self.optimizer.param_groups for p in g["params"]
                     if isinstance(g.get("lr"), int | float)}
            lrs = {n: by_id[id(p)] for n, p in self.model.named_parameters() if id(p) in by_id}
        obs = Observation(
            step=rows[-1]["step"],
            rows=list(self._window),
            new=len(rows),
            params=self.params,
            depth=self._acts.depth,
            activations=self._acts.latest,
            saturation_kinds=self._saturation_kinds,
            dead_window=self._acts.peaks if self._acts.peaks is not None else self._acts.dead_peaks(),
            dead_samples={n: len(d) for n, d in self._acts.dead.items()},
            time_forward=self._acts.time_forward,
            time_grad=self._acts.time_grad,
            origin=found,
            nonfinite_step=nonfinite_step,
            nonfinite_counts=counts,
            window=self.window,
            input_std=self._latest_input_std,
            norm_layers=self._norm_layers,
            options=self.rules,
            run=self._run,
            lrs=lrs,
        )
        for f in run_rules(obs):
            self._update_finding(f)

    def _row_bad(self, row: Mapping[str, Any]) -> bool:
        loss = row.get("loss")
        if loss is not None and not math.isfinite(loss):
            return True
        return not math.isfinite(row["grad_norm"]) and not is_overflow(row)

    def _scaler_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Count the scaler's overflow skips (info); a collapsing loss scale is an error naming the producer."""
        latest = self._skips.count(rows)
        if latest is None:
            return
        step, scale, collapse = latest
        start = init_scale(self.scaler)  # type: ignore[arg-type]
        if collapse:
            origin = None
            if self.replay_enabled and self._calls and step == self._step - 1:
                self._replaying = True
                try:
                    origin = self._localize(None)
                finally:
                    self._replaying = False
            self._update_finding(self._skips.collapse(step, scale, start, origin))
            return
        old = self._findings.get(("nonfinite", ""))
        if old is not None and old.rank > 0:
            return  # a real non-finite diagnosis stands; the routine count must not replace it
        self._update_finding(self._skips.routine(step, scale, start))

    def _alert_now(self, reason: str) -> None:
        """Bring the next sampled step forward (gradguard.monitor.schedule.Sampling.alert)."""
        self.sample_every.alert(self._step, reason)

    def _update_finding(self, finding: Finding) -> None:
        old = self._findings.get(finding.key)
        if old is not None and old.step == finding.step and old.rank > finding.rank:
            # The same event seen by a second reporter (the Guard skipping the NaN step this monitor already
            # localised): a less severe, less specific account must not replace the diagnosis.
            return
        self._findings[finding.key] = finding
        if old is None or finding.rank > old.rank:
            # A rule newly at (or past) its threshold: watch closely until it is confirmed or gone. At info,
            # once per kind: the dense phase samples every module, so another module of a kind already
            # reported adds nothing (a net whose ReLUs die one layer after another would stay dense).
            if finding.rank >= 1 or not any(k[0] == finding.kind for k in self._findings if k != finding.key):
                self.sample_every.alert(self._step, f"{finding.severity} {finding.kind}")
            if finding.rank >= 1:
                # The step a warning or error first appeared is kept whole in the history; the rules
                # re-report a standing finding at every fetch, and marking each of those would let the
                # archive of whole rows grow with the run.
                self._history.mark((finding.step,))
        if old is None or (old.severity, old.message) != (finding.severity, finding.message):
            for sink in self.sinks:
                sink.on_finding(finding)

    # ----------------------------------------------------------------- public read side
    def report(self, finding: Finding) -> None:
        """Add a finding produced elsewhere (Guard, integrations) to this monitor's findings and sinks."""
        if not isinstance(finding, Finding):
            raise InputError(f"report() needs a gradguard.Finding, got {type(finding).__name__}")
        self._update_finding(finding)

    @property
    def steps(self) -> int:
        """Number of ``step()`` calls so far (the next step's index)."""
        return self._step

    @property
    def step_count(self) -> int:
        """Deprecated alias of :attr:`steps` (kept for one release)."""
        warnings.warn("Monitor.step_count is deprecated; use Monitor.steps", DeprecationWarning, stacklevel=2)
        return self._step

    def flush(self) -> None:
        """Fetch what is pending on the device now and hand it to the rules and the sinks.

        The monitor does this by itself on its logging schedule and when ``history``/``findings`` are read;
        call it before reading a sink's output (e.g. ``metrics.jsonl``) mid-run. Idempotent; after
        :meth:`close` nothing is pending and it does nothing.
        """
        if not self._closed:
            self._flush()

    @property
    def findings(self) -> list[Finding]:
        """Deduplicated findings (one per kind and module, newest state), worst first. Fetches pending stats."""
        self._flush()
        return sorted(self._findings.values(), key=lambda f: (-f.rank, KINDS.index(f.kind), f.module))

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per recorded step (``step``, ``loss``, ``grad_norm``, ``grad_norm/<param>``, ...), oldest first.

        Bounded (``watch(history_limit=...)``): the newest ``history_limit`` steps in full, older ones
        downsampled to at most as many more, evenly spread, with their global scalars only, except the
        steps of warnings, errors and non-finite values, kept whole (see gradguard.monitor.history
        and docs/monitor.md); ``log_dir`` keeps every step's global scalars on disk.

        Keys: ``grad_norm/<p>`` and ``nonfinite/<p>`` every step for each parameter that had a gradient;
        on sampled steps also ``grad_max/<p>``, ``weight_norm/<p>``, ``update_ratio/<p>`` (from the second
        sampled step on) and ``act/<module>/<field>`` for the fields of
        :data:`gradguard.stats.activations.SUMMARY_FIELDS`. ``loss`` is ``None`` when ``step()`` got no loss.
        Reading it fetches whatever is still pending on the device.
        """
        self._flush()
        return self._history.rows()

    @property
    def time_profiles(self) -> dict[str, dict[str, Tensor]]:
        """Latest per-time-step profiles of recurrent modules: ``{"forward"|"grad": {module: vector}}``."""
        self._flush()
        return {"forward": dict(self._acts.time_forward), "grad": dict(self._acts.time_grad)}

    def summary(self) -> MonitorSummary:
        """Per parameter the latest and median gradient norm over the rules' window, the latest weight norm
        and update ratio, and the findings: a dict (``steps``, ``parameters``, ``findings``) whose ``str()``
        is the table (gradguard.monitor.summary), so ``print(mon.summary())`` prints it."""
        findings = self.findings
        table = parameter_table([p.name for p in self.params], list(self._window))
        return MonitorSummary(steps=self._step, parameters=table, findings=findings)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (state only; the options are the constructor's): the step count, the
        rules' window of history rows, the findings, the rules' memory of the run and the sampling schedule.
        Plain JSON-able values, except tensors that a finding's evidence may hold. Fetches what is pending."""
        self.flush()
        state: dict[str, Any] = {
            "steps": self._step,
            "rows": [dict(r) for r in self._window],
            "findings": [f.to_dict() for f in self._findings.values()],
            "run": dict(vars(self._run)),
            "sampling": self.sample_every.state_dict(),
        }
        if self.detail_every is not self.sample_every:
            state["detail"] = self.detail_every.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into this monitor, which must not have taken a step; findings reach
        no sink (they were reported in the run that found them).

        Raises:
            StateError: the monitor has taken steps.
            InputError: ``state`` is not a mapping with the keys :meth:`state_dict` writes.
        """
        if self._step != 0:
            raise StateError(f"load_state_dict needs a fresh monitor, this one has taken {self._step} steps")
        missing = [k for k in ("steps", "rows", "findings") if not isinstance(state, Mapping) or k not in state]
        if missing:
            raise InputError(f"state={str(state)[:60]!r} lacks {', '.join(missing)}; allowed: a Monitor.state_dict()")
        step = int(state["steps"])
        rows = [dict(r) for r in state["rows"]]
        self._step = step
        self._history.keep(rows, self._step)
        self._window.extend(rows)
        for d in state["findings"]:
            f = Finding.from_dict(d)
            self._findings[f.key] = f
        vars(self._run).update(state.get("run", {}))
        if "sampling" in state:
            self.sample_every.load_state_dict(state["sampling"])
        else:  # a state without a schedule: sample the step that comes next
            self.sample_every.alert(step, "resumed")
        if "detail" in state and self.detail_every is not self.sample_every:
            self.detail_every.load_state_dict(state["detail"])
        # The activation tap was armed for step 0 at construction; arm it for the step that comes next instead.
        self._tap.disarm()
        if self.sample_every(step):
            self._arm(step)

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Fetch what is pending, remove every hook and close the sinks. Idempotent."""
        if self._closed:
            return
        self._flush()
        for h in self._root_handles:
            h.remove()
        self._root_handles.clear()
        if self._entry is not None:
            if self._module._compiled_call_impl is self._entry:
                self._module._compiled_call_impl = self._entry.inner
            self._entry = None
        self._tap.frozen = False
        self._tap.disarm()
        self._calls.clear()
        for sink in self.sinks:
            sink.close()
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort: never leave hooks on a model whose monitor is gone. Only remove handles here: no
        # torch computation in a finaliser (at interpreter exit that aborts inside torch).
        try:
            if not self._closed:
                for h in [*self._root_handles, *self._tap.handles]:
                    h.remove()
        except Exception:
            pass


def _keep_grad(grads: list[Tensor | None], i: int, g: Tensor) -> None:
    """Tensor hook: remember the gradient that reached a model output (a reference, no copy)."""
    grads[i] = g.detach()
