"""Hugging Face Transformers: :class:`GradGuardCallback` watches a ``transformers.Trainer`` run.

``Trainer(..., callbacks=[GradGuardCallback()])`` is all the user code needed. What the Trainer does per
optimizer step (``Trainer._run_epoch`` in transformers 5.25) and why the callback events alone are not
enough:

1. for each micro-batch: ``training_step`` → ``model(**inputs)`` → loss (divided by the accumulation count
   unless the model normalised it by ``num_items_in_batch``) → ``accelerator.backward(loss)``;
2. on the last micro-batch only: ``clip_grad_norm_(model.parameters(), max_grad_norm)`` (1.0 by default),
   *then* ``on_pre_optimizer_step``, ``optimizer.step()``, ``on_optimizer_step``, the LR scheduler,
   ``model.zero_grad()``, ``global_step += 1``, ``on_step_end``, logging (``on_log``) and saving (``on_save``).

No callback runs between the last backward and the clip, and none receives the loss. So in
``on_train_begin`` (which gets the model and the optimizer) the callback registers:

* a forward hook on the model: it reads ``output.loss`` of every training forward (the per-micro-batch
  loss) and puts a gradient hook on the output tensors;
* that gradient hook fires when the micro-batch's backward starts and queues an *end-of-backward* callback
  with the autograd engine (:func:`_at_end_of_backward`); it queues itself once more on entry, so it runs
  after the callbacks other components queued during the same backward (DDP's gradient all-reduce).
  On the last micro-batch (accelerate's ``sync_gradients``) it calls ``Monitor.step(loss)``: the gradients
  are complete and not yet clipped, so the monitor records the true, pre-clip norms.

The loss given to the monitor is the loss of the whole optimizer step: the sum of the micro-batch losses
when the model received ``num_items_in_batch`` (each is then already a share of the step's token mean),
otherwise their mean. Under DDP it is then reduced over the ranks (one all-reduce per optimizer step): the
mean, or the sum where ``num_items_in_batch`` counted every rank's tokens (``average_tokens_across_devices``,
Trainer's default), so it equals the loss Trainer logs, on every rank. With ``label_smoothing_factor`` or a
``compute_loss_func`` the Trainer computes the loss outside the model; the monitor then gets none
(loss-spike detection is off, gradients are watched).

Logs: at each ``on_log`` the latest row's ``gradguard/grad_norm`` (pre-clip, equal to the Trainer's own
``grad_norm``) and ``gradguard/loss``, and ``gradguard/finding/<kind>/<module>`` = severity index
(0 info, 1 warning, 2 error) for every finding so far, are added to the logs and to
``trainer.state.log_history``. Callbacks listed before this one in the Trainer (the ``report_to``
integrations) have already handled the logs by then; pass a ``gradguard.sinks.tensorboard.TensorBoardSink``
in ``sinks=`` for a dashboard. Findings are printed on stderr as they appear (world process zero).

Resuming: ``on_save`` writes the monitor's state to ``<checkpoint>/gradguard_monitor.json``;
``on_train_begin`` of a resumed run (``global_step > 0``) reads it back, so step numbers continue at
``global_step``, the rules look back on the rows before the checkpoint (the last ``window + log_every``
rows, which also start ``monitor.history``), and findings already reported are not printed again. Trainer
does not tell callbacks which checkpoint it resumed from: the file is looked up in
``TrainingArguments.resume_from_checkpoint`` if that is a path, else in ``<output_dir>/checkpoint-<global_step>``,
where Trainer wrote it (a warning says when it is not found).

Limits: with ``fp16=True`` on CUDA the gradients at the end of backward are multiplied by the GradScaler's
loss scale (accelerate unscales them inside the clip), so gradient norms are scaled (a warning says so;
``bf16=True`` has no scaler and is exact). DeepSpeed keeps gradients outside ``param.grad`` and is refused.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.errors import ConfigError, StateError
from gradguard.findings import SEVERITIES
from gradguard.guard import Guard
from gradguard.monitor import Monitor, watch
from gradguard.monitor.provenance import tensors_in
from gradguard.sinks.console import ConsoleSink
from gradguard.stats.distributed import allreduce_mean, is_distributed

try:
    from accelerate.state import GradientState
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gradguard.integrations.transformers needs the transformers extra: pip install 'gradguard[transformers]'"
    ) from exc

#: File written into each Trainer checkpoint folder by ``on_save``.
STATE_FILE = "gradguard_monitor.json"
#: Version of the state file's layout (1: before Monitor.state_dict, still read).
STATE_VERSION = 2


class GradGuardCallback(TrainerCallback):
    """Watch a ``transformers.Trainer`` run with :func:`gradguard.watch`, seeing gradients before clipping.

    Args:
        guard: ``True`` (the :class:`gradguard.Guard` defaults) or a dict of ``Guard`` options makes every
            optimizer step of the Trainer a guarded one (skip, roll back, back off): the Trainer's torch
            optimizer is wrapped inside accelerate's optimizer wrapper (:meth:`gradguard.Guard.wrap`) and the
            step's loss is handed over with :meth:`gradguard.Guard.record_loss`. The Guard judges the
            gradients Trainer has clipped (``max_grad_norm``); the monitor sees them before the clip. The
            LR schedule is the Trainer's; the Guard's LR factor applies around each step only.
        **watch_options: options for :func:`gradguard.watch` (``log_every``, ``sample_every``, ``sinks``,
            ``log_dir``, ...). ``console`` (default True) prints findings on stderr, on the world process
            zero only.

    Attributes:
        monitor: the :class:`gradguard.Monitor` of the latest ``train()`` (``None`` before it). After
            training it is closed but readable: ``callback.monitor.findings``, ``.history``, ``.summary()``.
        guard: the :class:`gradguard.Guard` of the latest ``train()`` with ``guard=``, else ``None``
            (``callback.guard.events``, ``.summary()``).

    Raises:
        ConfigError: an unknown ``gg.watch`` option (at construction); DeepSpeed (at ``train()``).

    Example::

        cb = GradGuardCallback(log_every=20)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
        trainer.train()
        print(cb.monitor.summary())
    """

    def __init__(self, *, guard: bool | Mapping[str, Any] = False, **watch_options: Any) -> None:
        super().__init__()
        if not isinstance(guard, bool | Mapping):
            raise ConfigError(f"guard={guard!r:.60} must be True, False or a dict of gg.Guard options")
        self._guard_options: dict[str, Any] | None = (
            dict(guard) if isinstance(guard, Mapping) else {} if guard else None
        )
        self.guard: Guard | None = None
        self._wrapper: Any = None  # accelerate's optimizer wrapper whose .optimizer the guard replaced
        allowed = [k for k, p in inspect.signature(watch).parameters.items() if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(watch_options) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown gg.watch option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
            )
        console = watch_options.pop("console", True)
        if not isinstance(console, bool):
            raise ConfigError(f"console={console!r} must be True or False")
        self._console = console
        self._watch_options = watch_options
        self.monitor: Monitor | None = None
        self._handles: list[Any] = []
        self._tokens_of_all_ranks = False
        self._reset_step()

    def _reset_step(self) -> None:
        self._loss: Tensor | None = None
        self._forwards = 0
        self._summed = False  # the model normalised each micro-batch loss over the whole step
        self._queued = False  # an end-of-backward callback is queued for the current backward
        self._stepped = False  # Monitor.step ran for the current optimizer step
        self._stepping = False  # inside Monitor.step (its NaN replay runs forwards that are not training)

    # ------------------------------------------------------------------------------------------- setup
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(args, "deepspeed", None):
            raise ConfigError(
                "GradGuardCallback cannot watch DeepSpeed runs: DeepSpeed keeps gradients outside param.grad; "
                "allowed: Trainer without a deepspeed config (DDP, FSDP, single device)"
            )
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise StateError(f"on_train_begin got no model from the Trainer (got {type(model).__name__})")
        self._detach()
        if self.monitor is not None:
            self.monitor.close()
        options = dict(self._watch_options)
        console = self._console and bool(state.is_world_process_zero)
        extra = [ConsoleSink(file=sys.stderr)] if console else []
        options["sinks"] = [*options.get("sinks", ()), *extra]
        self.monitor = watch(model, console=False, **options)
        if state.global_step > 0:
            self._resume(args, state, extra)
        if getattr(kwargs.get("optimizer"), "scaler", None) is not None:
            # accelerate's optimizer wrapper holds the GradScaler of fp16 runs (on CUDA; CPU fp16 has none).
            warnings.warn(
                "GradGuardCallback with a GradScaler (fp16=True): the monitor sees gradients multiplied by the loss "
                "scale (Trainer unscales them inside the clip), so its gradient norms are scaled; use bf16=True "
                "for exact norms",
                stacklevel=2,
            )
        self._tokens_of_all_ranks = bool(getattr(args, "average_tokens_across_devices", False))
        self._reset_step()
        self._handles.append(model.register_forward_hook(self._on_forward, with_kwargs=True))
        if self._guard_options is not None:
            self._attach_guard(model, kwargs.get("optimizer"))

    def _attach_guard(self, model: nn.Module, wrapper: Any) -> None:
        inner = getattr(wrapper, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            raise StateError(
                "GradGuardCallback(guard=...) needs the Trainer's accelerate optimizer wrapper around a "
                f"torch.optim.Optimizer in on_train_begin, got {type(wrapper).__name__}"
            )
        self.guard = Guard(model, inner, monitor=self.monitor, **(self._guard_options or {}))
        self._wrapper = wrapper
        wrapper.optimizer = self.guard.wrap()  # Trainer's optimizer.step() is now the guarded step

    def _resume(self, args: Any, state: Any, consoles: list[ConsoleSink]) -> None:
        assert self.monitor is not None
        candidates = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, str) else []
        candidates.append(checkpoint_dir(args, state))
        saved = next((os.path.join(c, STATE_FILE) for c in candidates if os.path.isfile(os.path.join(c, STATE_FILE))),
                     None)
        if saved is None:
            warnings.warn(
                f"resuming at step {state.global_step} without {STATE_FILE} in {candidates[-1]}: the monitor "
                "continues the step numbers but starts with an empty history",
                stacklevel=3,
            )
            data: dict[str, Any] = {"version": STATE_VERSION, "steps": state.global_step, "rows": [], "findings": []}
        else:
            with open(saved, encoding="utf-8") as fh:
                data = json.load(fh)
            data["step" if data.get("version") == 1 else "steps"] = state.global_step
        load_monitor_state(self.monitor, data)
        for sink in consoles:
            # Findings of the run before the checkpoint were printed then: mark them seen, silently.
            sink.console.quiet = True
            for f in self.monitor.findings:
                sink.on_finding(f)
            sink.console.quiet = False

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # --------------------------------------------------------------------------------------- per step
    def _on_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if self._stepping or not (module.training and torch.is_grad_enabled()):
            return  # evaluation, generation, or the monitor's own replay
        self._queued = False  # a new micro-batch: its backward is still to come
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, Tensor) and loss.numel() == 1:
            value = loss.detach().float().reshape(())
            self._loss = value if self._loss is None else self._loss + value
            self._forwards += 1
            self._summed = kwargs.get("num_items_in_batch") is not None
        for t in tensors_in(output):
            if t.requires_grad:
                t.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad: Tensor) -> None:
        if not self._queued:
            self._queued = True
            _at_end_of_backward(self._after_backward)

    def _after_backward(self) -> None:
        # Queued at the start of this backward, so it would run before callbacks queued later in the same
        # backward (DDP's all-reduce of the gradients): queue the real work behind them.
        _at_end_of_backward(self._backward_done)

    def _backward_done(self) -> None:
        if GradientState().sync_gradients and not self._stepped:
            self._step_monitor()  # last micro-batch: complete gradients, before Trainer's clip_grad_norm_

    def _step_monitor(self) -> None:
        if self.monitor is None or self.monitor.closed:
            raise StateError("GradGuardCallback's monitor is closed; the callback was used outside train()")
        loss = self._loss
        if loss is not None and not self._summed:
            loss = loss / self._forwards
        if loss is not None and is_distributed():
            loss = allreduce_mean(loss)  # one number on every rank: the rules decide identically
            if self._summed and self._tokens_of_all_ranks:
                # num_items_in_batch counted the tokens of every rank, so each rank's loss is its share of the
                # global token mean: their sum, not their mean, is the step's loss.
                loss = loss * torch.distributed.get_world_size()
        self._stepping = True
        try:
            self.monitor.step(loss)
        finally:
            self._stepping = False
        if self.guard is not None and loss is not None:
            self.guard.record_loss(loss)
        self._stepped = True

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._stepped:
            # No output gradient was seen (no parameter got a gradient): the monitor still counts the step
            # and reports that nothing was recorded.
            self._step_monitor()
        self._reset_step()

    # -------------------------------------------------------------------------------- logs and saving
    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.monitor is None or logs is None or any(k.startswith("eval_") for k in logs):
            return
        history = self.monitor.history  # fetches what is pending: the logging schedule is the time for it
        added: dict[str, float] = {}
        if history:
            row = history[-1]
            added["gradguard/grad_norm"] = float(row["grad_norm"])
            if row.get("loss") is not None:
                added["gradguard/loss"] = float(row["loss"])
        for f in self.monitor.findings:
            added[f"gradguard/finding/{f.kind}/{f.module or 'model'}"] = float(SEVERITIES.index(f.severity))
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None or not state.is_world_process_zero:
            return
        folder = checkpoint_dir(args, state)
        if not os.path.isdir(folder):
            warnings.warn(f"no checkpoint folder {folder}: the monitor's state was not saved", stacklevel=2)
            return
        with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump(monitor_state(self.monitor), fh, default=_jsonable)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach()
        if self._wrapper is not None and self.guard is not None:
            self._wrapper.optimizer = self.guard.optimizer  # the Trainer's own optimizer back
        if self.monitor is not None:
            self.monitor.close()  # fetches what is pending and removes the monitor's hooks; stays readable


def checkpoint_dir(args: Any, state: Any) -> str:
    """The folder Trainer writes the checkpoint of ``state.global_step`` to (``<output_dir>/checkpoint-<step>``)."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _at_end_of_backward(fn: Any) -> None:
    """Run ``fn`` when the current backward pass has finished (callable only from inside a backward).

    The autograd engine's final-callback queue, the mechanism DDP and FSDP use for their post-backward
    work; callbacks queued while the queue runs are run too, in order.
    """
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def monitor_state(mon: Monitor) -> dict[str, Any]:
    """What a resumed run needs, as saved next to a checkpoint: ``Monitor.state_dict()`` and a version."""
    return {"version": STATE_VERSION, **mon.state_dict()}


def load_monitor_state(mon: Monitor, state: Mapping[str, Any]) -> None:
    """Restore :func:`monitor_state` into a fresh monitor (no step taken yet); findings reach no sink."""
    version = state.get("version")
    if version not in (1, STATE_VERSION):
        raise ConfigError(f"monitor state version {version!r} is not supported; allowed: 1, {STATE_VERSION}")
    loaded = {k: v for k, v in state.items() if k != "version"}
    if version == 1:  # written before Monitor.state_dict(): the step count was "step", no schedule
        loaded["steps"] = loaded.pop("step")
    mon.load_state_dict(loaded)


def _jsonable(obj: Any) -> Any:
    """JSON form of what ``json`` cannot write itself in a finding's evidence (tensors; anything else as text)."""
    return obj.tolist() if isinstance(obj, Tensor) else str(obj)


__all__ = ["STATE_FILE", "GradGuardCallback", "checkpoint_dir", "load_monitor_state", "monitor_state"]
