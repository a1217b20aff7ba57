"""Lightning: :class:`GradGuardCallback` watches (and optionally guards) a ``lightning.pytorch.Trainer`` run.

Where it hooks in (Lightning 2.6, automatic optimization, read from ``lightning/pytorch/plugins/precision``):
the trainer calls ``optimizer.step(closure)``; the closure runs ``training_step``, then
``on_before_backward(loss)``, ``backward``, ``on_after_backward``. With AMP (``precision="16-mixed"``) the
``GradScaler`` unscales the gradients right after the closure; then ``on_before_optimizer_step`` runs, then
Lightning's own ``gradient_clip_val`` clipping, then the parameter update. So:

* the loss is taken in ``on_before_backward`` (summed over accumulated micro-batches, which Lightning has
  already divided by ``accumulate_grad_batches``; divided by the AMP scale where it was scaled);
* the monitor is stepped in ``on_before_optimizer_step``: after backward, after AMP unscaling, before any
  clipping and before the update — it sees the true, raw gradient. (Exception: optimizers that unscale
  inside ``step()``, e.g. ``Adam(fused=True)`` under AMP — Lightning skips ``unscale_`` for them, so the
  monitor then sees gradients times the loss scale, and ``guard=`` refuses them.)
* with ``guard=``, :class:`gradguard.Guard` runs right after the monitor, in the same hook: it clips,
  decides, and applies the update itself (``optimizer.step()`` with its LR factor) or skips it, rolls
  back, backs off. It then sets every gradient to ``None``: torch optimizers skip parameters without a
  gradient, so Lightning's own update that follows is a no-op (no double step, no momentum drift). This is
  the one way a callback can veto a step in automatic optimization (Lightning has no "skip" return value;
  zeroing gradients instead would still move Adam/momentum states).

Logging: every history row's ``loss``, ``grad_norm``, ``grad_norm/<param>`` and ``update_ratio/<param>``
goes to the trainer's loggers as ``gradguard/<name>`` at the row's step (equal to ``trainer.global_step``
of that optimizer step); a ``TensorBoardLogger`` additionally gets activation histograms and findings as
text through :class:`gradguard.sinks.tensorboard.TensorBoardSink`; findings are printed (rank 0) and
logged as ``gradguard/finding/<kind>/<module>`` = severity index (0 info, 1 warning, 2 error).

Distributed (``strategy="ddp"`` and friends): DDP averages gradients in backward, so every rank's monitor
sees the same gradient; the loss is all-reduced (mean over ranks, one small collective per optimizer step)
before it reaches the monitor and the Guard. Gradient statistics, findings and Guard decisions are
therefore **identical on every rank** (not rank 0 only), which is what keeps the Guard's skip and
rollback from desynchronising the replicas; printing and logger output happen on rank 0 only. NaN replay
(which re-runs a forward/backward on one rank) is off when the world size is > 1. Activation summaries
describe each rank's own micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard.errors import ConfigError, InputError, StateError
from gradguard.findings import SEVERITIES, Finding
from gradguard.sinks.base import Sink
from gradguard.stats.distributed import allreduce_mean, is_distributed

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gradguard.integrations.lightning needs the lightning extra: pip install 'gradguard[lightning]'"
    ) from exc

#: History entries sent to the trainer's loggers by default (prefix match).
DEFAULT_LOG_KEYS: tuple[str, ...] = ("loss", "grad_norm", "update_ratio/")


class LoggerSink(Sink):
    """Forward monitor history rows and findings to Lightning loggers (``logger.log_metrics``).

    Args:
        loggers: the trainer's loggers (``trainer.loggers``); Lightning's loggers write on rank 0 only.
        keys: history-entry prefixes to forward.
        prefix: metric-name prefix.
    """

    def __init__(self, loggers: Sequence[Any], keys: Sequence[str] = DEFAULT_LOG_KEYS, prefix: str = "gradguard/"):
        self.loggers = list(loggers)
        self.keys = tuple(keys)
        self.prefix = prefix

    def on_step(self, record: Mapping[str, Any]) -> None:
        metrics = {
            f"{self.prefix}{k}": float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith(self.keys)
        }
        if metrics:
            for lg in self.loggers:
                lg.log_metrics(metrics, step=int(record.get("step", 0)))

    def on_finding(self, finding: Finding) -> None:
        name = f"{self.prefix}finding/{finding.kind}/{finding.module or 'model'}"
        for lg in self.loggers:
            lg.log_metrics({name: float(SEVERITIES.index(finding.severity))}, step=int(finding.step))


def _unscale_factor(trainer: Any) -> Tensor | None:
    """The AMP loss scale Lightning multiplied the loss by before ``on_before_backward`` (None if none)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    # ``_scale`` is the device tensor behind ``get_scale()``; reading it via get_scale() would sync the host.
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else torch.tensor(float(scaler.get_scale()))


class GradGuardCallback(Callback):
    """Watch a Lightning run with gradguard; optionally guard its optimizer steps.

    Args:
        monitor: ``True`` (default) creates a monitor with ``gg.watch(pl_module, **watch_options)`` in
            ``on_fit_start``; an existing ``gg.Monitor`` is used as given; ``False`` disables monitoring.
        guard: ``None`` (default) no Guard; ``{}`` a ``gg.Guard`` with its defaults (no routine clipping,
            spike skips, divergence rollback, then adaptive clipping); a dict of ``gg.Guard`` keyword
            options (e.g. ``{"clip": gg.clip.ClipNorm(1.0),
            "rollback_after": 3}``). Requires automatic optimization and one optimizer, and replaces the
            Trainer's ``gradient_clip_val`` (put the clipping policy in ``guard["clip"]``).
        watch_options: options for ``gg.watch`` (``log_every``, ``sample_every``, ``sinks``, ...).
        log_keys: history-entry prefixes sent to the trainer's loggers (``()`` logs nothing).
        sync_loss: all-reduce the loss (mean over ranks) before the monitor and Guard see it, so both
            decide identically on every rank. Only matters when ``torch.distributed`` runs > 1 rank.

    Attributes:
        monitor: the :class:`gradguard.Monitor` (``None`` before ``fit`` or with ``monitor=False``). After
            ``fit`` it is closed but readable: ``callback.monitor.findings``, ``.history``, ``.summary()``.
        guard: the :class:`gradguard.Guard` or ``None``; ``callback.guard.events`` lists its interventions.

    Findings are produced identically on every rank (see the module docstring); only printing and logging
    are restricted to rank 0.

    Example::

        cb = GradGuardCallback(guard={})
        trainer = lightning.pytorch.Trainer(max_epochs=3, callbacks=[cb])
        trainer.fit(model, loader)
        print(cb.monitor.summary(), list(cb.guard.events))
    """

    def __init__(
        self,
        monitor: Any = True,
        guard: Mapping[str, Any] | None = None,
        *,
        watch_options: Mapping[str, Any] | None = None,
        log_keys: Sequence[str] = DEFAULT_LOG_KEYS,
        sync_loss: bool = True,
    ) -> None:
        super().__init__()
        import gradguard as gg

        if not isinstance(monitor, (bool, gg.Monitor)):
            raise InputError(f"monitor must be True, False or a gradguard.Monitor, got {type(monitor).__name__}")
        if guard is not None and not isinstance(guard, Mapping):
            raise InputError(
                f"guard must be None (off), {{}} (Guard defaults) or a dict of gg.Guard options, got {guard!r:.80}"
            )
        if guard is not None and ({"model", "optimizer", "monitor"} & set(guard)):
            raise ConfigError(
                f"guard options {sorted({'model', 'optimizer', 'monitor'} & set(guard))} are set by the callback; "
                "pass only Guard settings such as clip, spike_z, rollback_after"
            )
        if watch_options is not None and not isinstance(watch_options, Mapping):
            raise InputError(f"watch_options must be a dict of gg.watch options, got {type(watch_options).__name__}")
        if isinstance(monitor, gg.Monitor) and watch_options:
            raise ConfigError("watch_options apply only when the callback creates the monitor (monitor=True)")
        if isinstance(log_keys, str) or not all(isinstance(k, str) for k in log_keys):
            raise InputError(f"log_keys must be a sequence of strings, got {log_keys!r}")
        if not isinstance(sync_loss, bool):
            raise InputError(f"sync_loss must be True or False, got {sync_loss!r}")
        self._monitor_option = monitor
        self._guard_options = None if guard is None else dict(guard)
        self._watch_options = dict(watch_options or {})
        self.log_keys = tuple(log_keys)
        self.sync_loss = sync_loss
        self.monitor: Any = monitor if isinstance(monitor, gg.Monitor) else None
        self.guard: Any = None
        self._owns_monitor = monitor is True
        self._loss: Tensor | None = None

    # ------------------------------------------------------------------------------------------- setup
    def _sinks(self, trainer: Any) -> list[Sink]:
        sinks: list[Sink] = []
        loggers = list(trainer.loggers)
        if self.log_keys and loggers:
            sinks.append(LoggerSink(loggers, self.log_keys))
        for lg in loggers:
            if type(lg).__name__ == "TensorBoardLogger":
                from gradguard.sinks.tensorboard import TensorBoardSink

                # Share the logger's writer: scalars, histograms and findings land in the same run.
                sinks.append(TensorBoardSink(lg.experiment, prefixes=()))
        return sinks

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        import gradguard as gg

        distributed = is_distributed()
        if self._owns_monitor:
            options: dict[str, Any] = {
                "console": bool(trainer.is_global_zero),
                # Replay re-runs forward/backward on the rank that saw the NaN: with collectives inside
                # (DDP, FSDP) the other ranks would not join it.
                "replay": not distributed,
            }
            options.update(self._watch_options)
            options["sinks"] = [*self._sinks(trainer), *options.get("sinks", ())]
            self.monitor = gg.watch(pl_module, **options)
        if self._guard_options is not None:
            if not pl_module.automatic_optimization:
                raise ConfigError(
                    "guard= needs automatic optimization; with manual optimization call guard.step(loss) "
                    "yourself in place of optimizer.step()"
                )
            if len(trainer.optimizers) != 1:
                raise ConfigError(f"guard= supports exactly one optimizer, the module has {len(trainer.optimizers)}")
            if trainer.gradient_clip_val:
                raise ConfigError(
                    f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip after the Guard already "
                    "stepped; put the policy in the Guard instead: guard={'clip': gg.clip.ClipNorm(...)}"
                )
            optimizer = trainer.optimizers[0]
            if isinstance(optimizer, torch.optim.LBFGS):
                raise ConfigError("guard= cannot drive LBFGS (it re-evaluates the closure inside step())")
            if _unscale_factor(trainer) is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
                # Fused optimizers unscale inside step(), so Lightning does not unscale before this hook: the
                # Guard would judge gradients multiplied by the loss scale.
                raise ConfigError(
                    f"guard= with AMP needs an optimizer Lightning unscales before the step; "
                    f"{type(optimizer).__name__}(fused=True) unscales inside step(): use fused=False"
                )
            # The scaler is Lightning's: it already unscaled, and it steps/updates after this hook.
            self.guard = gg.Guard(pl_module, optimizer, monitor=self.monitor, **self._guard_options)
        self._loss = None

    # --------------------------------------------------------------------------------------- per step
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        value = loss.detach().float()
        scale = _unscale_factor(trainer)
        if scale is not None:
            value = value / scale.to(value.device)
        self._loss = value if self._loss is None else self._loss + value

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        loss, self._loss = self._loss, None
        if loss is not None and self.sync_loss and is_distributed():
            loss = allreduce_mean(loss)
        if self.monitor is not None:
            if self.monitor.closed:
                raise StateError("the callback's monitor was closed during fit; create a new GradGuardCallback")
            self.monitor.step(loss)
        if self.guard is not None:
            if loss is None:
                raise StateError("the Guard needs the loss, but no backward pass was seen in this step")
            self.guard.step(loss)
            # The Guard applied (or deliberately skipped) the update; make Lightning's update a no-op.
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None and self._owns_monitor:
            self.monitor.close()  # fetches what is pending (on every rank alike), then closes the sinks


__all__ = ["DEFAULT_LOG_KEYS", "GradGuardCallback", "LoggerSink"]
