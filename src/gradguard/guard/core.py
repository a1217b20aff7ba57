"""``Guard``: a guarded optimizer step that skips bad updates, rolls back, and backs off the learning rate.

::

    guard = gg.Guard(model, optimizer)            # defaults: idle on healthy runs; see docs/guard.md
    for x, y in data:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        applied = guard.step(loss)                # replaces optimizer.step(); False when skipped

This module is the step policy (decide, apply or skip, roll back, back off). The device work of a step and
its one fetch are in :mod:`gradguard.guard.measure`, what the Guard remembers of applied steps in
:mod:`gradguard.guard.history`, what it tells the user in :mod:`gradguard.guard.events`, where snapshots
live in :mod:`gradguard.guard.snapshot`. The procedure of one step, the divergence test,
the rescue clip and the reasons for every default are in docs/guard.md.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from gradguard.clip import POLICIES, ClipPolicy, make_policy
from gradguard.errors import ConfigError, InputError, StateError, check_number, check_scalar_loss
from gradguard.findings import Finding
from gradguard.guard.events import ACTIONS, FindingSink, GuardEvent, clip_finding, rollback_finding, skip_finding
from gradguard.guard.history import Divergence
from gradguard.guard.measure import Step, measure
from gradguard.guard.snapshot import SnapshotStore, choose_mode
from gradguard.stats.distributed import is_dtensor
from gradguard.stats.scaler import found_inf as scaler_found_inf
from gradguard.stats.windows import HostWindow, SpikeRule

if TYPE_CHECKING:
    from gradguard.guard.optimizer import GuardedOptimizer

__all__ = ["ACTIONS", "SPIKE_SERIES", "FindingSink", "Guard", "GuardEvent", "Stateful"]

#: Series whose spikes ``Guard(spikes=...)`` can skip.
SPIKE_SERIES = ("loss", "grad_norm")


class Stateful(Protocol):
    """What ``Guard(scheduler=...)`` needs: an LR scheduler, or anything whose state a snapshot can hold."""

    def state_dict(self) -> dict[str, Any]:
        """The object's state."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class Guard:
    """Guarded optimizer step: skip non-finite or spiking updates, roll back, back off the LR.

    With the defaults the Guard is idle on healthy training (no routine clipping; where it never
    intervenes the run is bit-identical to an unguarded one) and acts on trouble: non-finite values and
    loss spikes are skipped; a sustained rise of the loss (``divergence``) or ``rollback_after`` skips in a
    row restore the last validated snapshot, halve the LR and engage the ``rescue`` clip, adaptive gradient
    clipping (Brock et al. 2021), for the rest of the run. The reasons are in docs/guard.md.

    Programs that update weights by hand (``p.data.add_(p.grad, alpha=-lr)``) get the same update from
    ``torch.optim.SGD(params, lr=lr)`` (momentum 0, no weight decay): ``p ← p − lr·g`` exactly, so::

        opt = torch.optim.SGD(model.parameters(), lr=lr)   # replaces the hand-written update
        guard = gg.Guard(model, opt)
        ...; loss.backward(); guard.step(loss); opt.zero_grad()

    A step costs one blocking host synchronisation (one small vector fetched with ``.tolist()``: whether
    to call ``optimizer.step()`` is host control flow); the tests behind the decision are host arithmetic.

    Every option after ``optimizer`` is keyword-only (passing ``clip, monitor, scaler, scheduler``
    positionally still works, with a ``DeprecationWarning``, until 0.3).

    Args:
        model: the model being trained (its parameters and buffers are snapshotted).
        optimizer: any ``torch.optim.Optimizer``; its parameters are the ones clipped.
        clip: the routine clipping policy applied every step: a :class:`gradguard.clip.ClipPolicy`, a
            registry name (``"zclip"`` gives the ``zclip`` package's defaults, hard cap 1.0 included), or
            ``None`` (default: no routine clipping; the norm is still measured).
        monitor: a :class:`gradguard.Monitor` (a :class:`FindingSink`: anything with ``report(Finding)``)
            to receive findings.
        scaler: a ``torch.amp.GradScaler``; the guard then unscales, steps and updates it.
        scheduler: an LR scheduler to include in snapshots (keep calling ``scheduler.step()`` yourself).
        rescue: the policy engaged after the first rollback, applied after ``clip`` from then on (default
            ``"agc"``: :class:`gradguard.clip.AGC` with λ = 0.01); ``None`` never engages one.
        spikes: the series whose spikes are skipped, from ``("loss", "grad_norm")``; default the loss only.
        divergence: the run has diverged when its last ``divergence_steps`` losses all exceed this
            multiple of its starting level (the smallest of its first ``divergence_steps`` losses); ``None``
            disables the test.
        divergence_steps: how many consecutive losses must stay up (≥ 1).
        spike_z: robust z-score above which a loss or gradient norm is a spike.
        window: number of recent applied steps the z-score is computed over.
        min_history: applied steps needed before spikes are judged.
        spike_min_excess: a spike must also exceed the window's median by this fraction of it.
        spike_jump: a spike must also be at least this many times the largest of the last 8
            applied values (a sudden jump, not a drift).
        rollback_after: consecutive skips that trigger a rollback.
        snapshot_every: good steps between snapshots (each committed after one more healthy step).
        backoff: LR multiplier applied at each rollback.
        recover_steps: good steps over which the LR factor grows back to 1.
        min_lr_factor: floor of the LR factor.
        snapshot: where rollback snapshots live: ``"device"`` (copies on the tensors' devices),
            ``"host"`` (host memory, pinned and copied asynchronously when CUDA is available), ``"disk"``
            (``snapshot_dir``), or ``"auto"`` (default): disk when ``snapshot_dir`` is given, else device
            when two snapshots of the parameters, buffers and an Adam-sized state take at most 10 % of each
            accelerator's memory, else host (always device on CPU). A snapshot costs a copy of the
            owned parameters, the buffers and the optimizer state (≈ 3× the parameters with Adam); device
            and host mode hold two (the committed one and the candidate, or the spare a capture reuses),
            disk mode only the candidate until it is written.
        snapshot_dir: directory of the snapshot file in disk mode (``torch.save``; read back with
            ``torch.load(weights_only=True)``).
        max_events: how many recent events ``events`` keeps.
        clip_report_ratio: clips of a norm ≥ ratio × the median norm of recent steps are also findings.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *positional: Any,
        clip: ClipPolicy | str | None = None,
        monitor: FindingSink | None = None,
        scaler: torch.amp.GradScaler | None = None,
        scheduler: Stateful | None = None,
        rescue: ClipPolicy | str | None = "agc",
        spikes: tuple[str, ...] = ("loss",),
        divergence: float | None = 4.0,
        divergence_steps: int = 3,
        spike_z: float = 6.0,
        window: int = 128,
        min_history: int = 16,
        spike_min_excess: float = 0.1,
        spike_jump: float = 2.0,
        rollback_after: int = 5,
        snapshot_every: int = 50,
        backoff: float = 0.5,
        recover_steps: int = 100,
        min_lr_factor: float = 1e-4,
        snapshot: str = "auto",
        snapshot_dir: str | os.PathLike[str] | None = None,
        max_events: int = 10_000,
        clip_report_ratio: float = 10.0,
    ) -> None:
        if positional:
            # Deprecated: the optional collaborators used to be positional (clip, monitor, scaler, scheduler).
            names = ("clip", "monitor", "scaler", "scheduler")
            if len(positional) > len(names):
                raise TypeError(f"Guard takes at most {2 + len(names)} positional arguments")
            warnings.warn(
                f"passing {', '.join(names[: len(positional)])} to gg.Guard positionally is deprecated; "
                "pass them by keyword (removed in 0.3)",
                DeprecationWarning,
                stacklevel=2,
            )
            given: list[Any] = [*positional, *[clip, monitor, scaler, scheduler][len(positional) :]]
            clip, monitor, scaler, scheduler = given[0], given[1], given[2], given[3]
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InputError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        clip = _policy("clip", clip)
        rescue = _policy("rescue", rescue)
        if isinstance(spikes, str) or not all(s in SPIKE_SERIES for s in spikes):
            raise ConfigError(f"spikes={spikes!r} is not allowed; use a tuple of {', '.join(map(repr, SPIKE_SERIES))}")
        if monitor is not None and not callable(getattr(monitor, "report", None)):
            raise InputError(f"monitor must have a report(Finding) method (gg.watch), got {type(monitor).__name__}")
        for name, obj, needed in (("scaler", scaler, "unscale_"), ("scheduler", scheduler, "state_dict")):
            if obj is not None and not callable(getattr(obj, needed, None)):
                raise InputError(f"{name} has no {needed}() method, got {type(obj).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.clip = clip
        self.rescue = rescue
        self.spikes = tuple(spikes)
        self.monitor = monitor
        self.scaler = scaler
        self.scheduler = scheduler
        self.spike_z = float(check_number("spike_z", spike_z, low=0.0, low_inclusive=False))
        self.window = int(check_number("window", window, low=2, integer=True))
        self.min_history = int(check_number("min_history", min_history, low=2, high=self.window, integer=True))
        self.spike_min_excess = float(check_number("spike_min_excess", spike_min_excess, low=0.0))
        self.spike_jump = float(check_number("spike_jump", spike_jump, low=1.0))
        self.rollback_after = int(check_number("rollback_after", rollback_after, low=1, integer=True))
        self.snapshot_every = int(check_number("snapshot_every", snapshot_every, low=1, integer=True))
        self.backoff = float(check_number("backoff", backoff, low=0.0, high=1.0, low_inclusive=False))
        self.recover_steps = int(check_number("recover_steps", recover_steps, low=1, integer=True))
        self.min_lr_factor = float(check_number("min_lr_factor", min_lr_factor, low=0.0, high=1.0, low_inclusive=False))
        self.clip_report_ratio = float(check_number("clip_report_ratio", clip_report_ratio, low=1.0))
        self.divergence = None if divergence is None else float(check_number("divergence", divergence, low=1.0))
        self.divergence_steps = int(check_number("divergence_steps", divergence_steps, low=1, integer=True))
        self._rule = SpikeRule(
            z=self.spike_z, min_history=self.min_history, min_excess=self.spike_min_excess, jump=self.spike_jump
        )
        # Thresholds for every window size, once: a step only indexes a list of host floats.
        self._limits = [self._rule.threshold(n) for n in range(self.min_history, self.window + 1)]
        self.max_events = int(check_number("max_events", max_events, low=1, integer=True))
        self.params: list[Tensor] = []
        self.refresh_params()
        if snapshot == "auto":
            owned = [*self.params, *self.model.buffers()]
            snapshot = "disk" if snapshot_dir is not None else choose_mode(owned)
        path = None if snapshot_dir is None else Path(snapshot_dir) / "gradguard_guard_snapshot.pt"
        self.snapshots = SnapshotStore(snapshot, path=path)
        self.events: list[GuardEvent] = []
        self.lr_factor = 1.0
        self.steps = 0
        self.applied = 0
        self.skipped = 0
        self.clipped = 0
        self.rollbacks = 0
        self.intervened = 0
        self.rescue_engaged = False
        self._pending_loss: Tensor | None = None  # losses recorded since the last real step, summed
        self._pending_count = 0
        # One divergence rollback per committed snapshot: rolling back again to the same state, with the
        # rescue engaged and the LR lowered already, would only repeat the experiment at an ever lower LR
        # (non-finite and spike skips, and their rollbacks, keep protecting the weights meanwhile).
        self._divergence = Divergence(self.divergence, self.divergence_steps)
        self._windows = HostWindow(self.window, rows=2)
        self._zero: dict[torch.device, Tensor] = {}
        self._consecutive_skips = 0
        self._good_run = 0
        self._rollbacks_since_progress = 0
        self._skip_reasons: list[str] = []
        self._good_since_snapshot = 0
        self.snapshot()

    # ----------------------------------------------------------------------------------------- state
    def refresh_params(self) -> None:
        """Re-read the parameters the optimizer owns (after ``optimizer.add_param_group``)."""
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not self.params:
            raise ConfigError("the optimizer has no parameters to guard")
        # One fused norm kernel serves plain tensors on one device; several devices or sharded tensors
        # go through gradguard.stats.tensor_norms (one kernel per device, one all-reduce).
        device = self.params[0].device
        self._fused_norms = all(p.device == device and not is_dtensor(p) for p in self.params)

    def _model_tensors(self) -> dict[str, Tensor]:
        """What a snapshot holds of the model: the parameters the optimizer owns, and every buffer.

        Only the optimizer's own parameters: a second optimizer (and its Guard) owns the others, and a
        rollback here must not rewind them. Buffers (BatchNorm statistics) belong to no optimizer and
        are restored by every Guard of the model. Owned tensors outside ``model`` are held by position.
        """
        owned = {id(p) for p in self.params}
        tensors: dict[str, Tensor] = {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in owned:
                tensors[f"param:{n}"] = p
        named = {id(t) for t in tensors.values()}
        for i, t in enumerate(self.params):
            if id(t) not in named:
                tensors[f"param:#{i}"] = t
        tensors.update({f"buffer:{n}": b for n, b in self.model.named_buffers(remove_duplicate=False)})
        return tensors

    def snapshot(self) -> None:
        """Record the current state as the rollback target now (a pending automatic candidate is dropped).

        Call it when you know the state is good (after loading a checkpoint, say); the guard's own periodic
        snapshots go through :meth:`_capture_candidate` and are promoted only once validated.
        """
        self.snapshots.discard()
        self._good_since_snapshot = 0
        self._commit(self._capture(), self.steps)

    @property
    def snapshot_mode(self) -> str:
        """Where snapshots live: ``"device"``, ``"host"`` or ``"disk"`` (see :mod:`gradguard.guard.snapshot`)."""
        return self.snapshots.mode

    @property
    def snapshot_path(self) -> Path | None:
        """The snapshot file in disk mode, else ``None``."""
        return self.snapshots.path

    @property
    def snapshot_step(self) -> int:
        """Step of the committed rollback target."""
        return self.snapshots.committed_step or 0

    @property
    def candidate_step(self) -> int | None:
        """Step of the snapshot waiting for its validating step to be committed (``None`` when none is)."""
        return self.snapshots.candidate_step

    def _capture(self) -> dict[str, Any]:
        """Copies of everything a rollback restores (no host sync in device mode)."""
        sources: dict[str, Any] = {
            "model": self._model_tensors(),
            "optimizer": self.optimizer.state_dict(),
            "guard": self._windows.state_dict(),
            # The divergence test's reference belongs to the state it judges: restored with it.
            "divergence": {"baseline": self._divergence.baseline},
        }
        if self.clip is not None:
            sources["clip"] = self.clip.state_dict()
        if self.rescue is not None:
            sources["rescue"] = self.rescue.state_dict()
        if self.scaler is not None:
            sources["scaler"] = self.scaler.state_dict()
        if self.scheduler is not None:
            sources["scheduler"] = self.scheduler.state_dict()
        state = self.snapshots.capture(sources)
        state["step"] = self.steps
        return state

    def _commit(self, state: dict[str, Any], step: int) -> None:
        self.snapshots.commit(state, step)
        self._divergence.armed = True

    def _capture_candidate(self) -> None:
        """Take the periodic snapshot as a *candidate*, right after an update.

        The state after update t is first measured by step t+1's loss and gradients (the loss of step t
        was computed with the weights before that update). A snapshot committed at once could hold the
        damage of a finite but destructive update, and every rollback would then return to it. So the
        candidate becomes the rollback target only when the next step is applied and is dropped when it
        is skipped (docs/guard.md).
        """
        self.snapshots.propose(self._capture(), self.steps)

    def _promote_candidate(self) -> None:
        if self.snapshots.candidate_step is not None:
            self.snapshots.promote()
            self._divergence.armed = True

    def restore(self) -> None:
        """Restore the last snapshot bit-exactly (model, optimizer, scaler, scheduler, clip policy, windows)."""
        state = self.snapshots.load()
        saved = state.get("model") if isinstance(state, dict) else None
        current = self._model_tensors()
        if (
            not isinstance(saved, dict)
            or set(saved) != set(current)
            or any(not isinstance(saved[k], Tensor) or saved[k].shape != t.shape for k, t in current.items())
        ):
            raise StateError(
                f"the Guard snapshot {self.snapshots.where()} was taken from a different model (parameter and "
                "buffer names or shapes differ); delete it or give this run its own snapshot_dir"
            )
        with torch.no_grad():
            for key, t in current.items():
                t.copy_(saved[key])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.clip is not None:
            self.clip.load_state_dict(state["clip"])
        if self.rescue is not None:
            self.rescue.load_state_dict(state["rescue"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._windows.load_state_dict(state["guard"])
        self._divergence.baseline = state["divergence"]["baseline"]
        self._divergence.recent.clear()

    def state_dict(self) -> dict[str, Any]:
        """The guard's state for checkpoints (its options are the constructor's arguments): counters, LR
        factor, spike windows, divergence test, the clipping policies' state and the kept events.

        Plain values and CPU tensors only, so ``torch.load(weights_only=True)`` reads a checkpoint of it.
        The snapshots are not included: :meth:`load_state_dict` commits the loaded state as the rollback
        target.
        """
        return {
            "lr_factor": self.lr_factor,
            "steps": self.steps,
            "applied": self.applied,
            "skipped": self.skipped,
            "rollbacks": self.rollbacks,
            "clipped": self.clipped,
            "intervened": self.intervened,
            "rescue_engaged": self.rescue_engaged,
            "divergence": self._divergence.state_dict(),
            "good_run": self._good_run,
            "consecutive_skips": self._consecutive_skips,
            "skip_reasons": list(self._skip_reasons),
            "rollbacks_since_progress": self._rollbacks_since_progress,
            "good_since_snapshot": self._good_since_snapshot,
            "guard": self._windows.state_dict(),
            "clip": None if self.clip is None else copy.deepcopy(self.clip.state_dict()),
            "rescue": None if self.rescue is None else copy.deepcopy(self.rescue.state_dict()),
            "events": [[e.step, e.action, e.reason, dict(e.numbers)] for e in self.events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, then commit the current model and optimizer state as
        the rollback target: load the model's and the optimizer's state first.

        Continuing after a save and a load is the run that continued without them, up to the rollback
        target (the loaded state instead of the last snapshot before the save).
        """
        self.lr_factor = float(state["lr_factor"])
        self.steps, self.applied = int(state["steps"]), int(state["applied"])
        self.skipped, self.rollbacks = int(state["skipped"]), int(state["rollbacks"])
        self._good_run = int(state["good_run"])
        self.clipped, self.intervened = int(state["clipped"]), int(state["intervened"])
        self.rescue_engaged = bool(state["rescue_engaged"])
        self._consecutive_skips = int(state.get("consecutive_skips", 0))
        self._skip_reasons = [str(r) for r in state.get("skip_reasons", [])]
        self._rollbacks_since_progress = int(state.get("rollbacks_since_progress", 0))
        self._windows.load_state_dict(state["guard"])
        if self.clip is not None and state["clip"] is not None:
            self.clip.load_state_dict(state["clip"])
        if self.rescue is not None and state.get("rescue") is not None:
            self.rescue.load_state_dict(state["rescue"])
        if "events" in state:
            self.events = [GuardEvent(int(s), str(a), str(r), dict(n)) for s, a, r, n in state["events"]]
        self.snapshots.discard()
        self._commit(self._capture(), self.steps)
        # After the commit, which re-arms the divergence test: the saved run's flag is the state.
        self._divergence.load_state_dict(state["divergence"])
        self._good_since_snapshot = int(state.get("good_since_snapshot", 0))

    # ------------------------------------------------------------------------------------------ step
    def _policies(self) -> list[ClipPolicy]:
        """The clipping applied this step: the routine ``clip``, then ``rescue`` once it is engaged."""
        active = [] if self.clip is None else [self.clip]
        if self.rescue_engaged and self.rescue is not None:
            active.append(self.rescue)
        return active

    def _measure(self, loss: Tensor, scaler: torch.amp.GradScaler | None) -> Step:
        """Everything the step decision needs, on the host: the one host sync of a step (:func:`measure`)."""
        return measure(loss, self.params, self._policies(), fused=self._fused_norms, zero=self._zeros,
                       found_inf=None if scaler is None else scaler_found_inf(scaler, self.optimizer))

    def _zeros(self, device: torch.device) -> Tensor:
        # Made once per device: a constant built on the host and moved to CUDA each step would be a
        # pageable host-to-device copy, which synchronises the stream (a second, hidden sync).
        if device not in self._zero:
            self._zero[device] = torch.zeros((), device=device)
        return self._zero[device]

    def _judge(self, m: Step, rows: tuple[bool, bool]) -> None:
        """The spike test of the loss (``rows[0]``) and the norm (``rows[1]``) against the windows of
        applied steps: host arithmetic on the fetched floats."""
        held = self._windows.held()
        if held < self.min_history or not (math.isfinite(m.loss) and math.isfinite(m.norm)):
            return
        limit = self._limits[held - self.min_history]
        for row in (0, 1):
            if rows[row] and math.isnan(m.z[row]):
                med, mad = self._windows.median_mad(row)
                top = self._windows.recent_max(row, self._rule.recent)
                m.spike[row], m.z[row] = self._rule.judge(m.norm if row else m.loss, med, mad, top, limit)
                if row == 1:
                    m.typical = med

    def record_loss(self, loss: Tensor) -> None:
        """Hand the guard this step's loss before a step that is called without one (:meth:`wrap`).

        No host sync: the tensor is kept (detached). Losses recorded on gradient-accumulation micro-steps
        are averaged at the real step. A loss that is not a one-element tensor is an ``InputError``.
        """
        loss = check_scalar_loss(loss).detach()
        if loss.dim():
            loss = loss.reshape(())
        if not loss.is_floating_point():
            loss = loss.float()
        self._pending_loss = loss if self._pending_loss is None else self._pending_loss + loss
        self._pending_count += 1

    def wrap(self) -> GuardedOptimizer:
        """This guard as a ``torch.optim.Optimizer`` whose ``step()`` is the guarded step.

        For code that calls ``optimizer.step()`` itself (HF ``Trainer``, Accelerate, Lightning's manual
        optimisation)::

            guard = gg.Guard(model, optimizer)
            opt = guard.wrap()               # hand this to the framework / call opt.step() yourself
            loss.backward(); guard.record_loss(loss); opt.step(); opt.zero_grad()

        Without a recorded loss (and no closure) only the gradients are judged.
        """
        from gradguard.guard.optimizer import GuardedOptimizer

        return GuardedOptimizer(self)

    def step(self, loss: Tensor | None, closure: Callable[[], Any] | None = None) -> bool:
        """Apply the optimizer step unless it is unsafe; returns True when the update was applied.

        Call after ``loss.backward()`` (with a scaler: after ``scaler.scale(loss).backward()``, passing the
        unscaled ``loss``), in place of ``optimizer.step()`` (and ``scaler.step``/``scaler.update``).
        ``closure`` is passed on to optimizers that need one (``LBFGS``); the checks use ``loss`` and the
        gradients present at the call. ``loss=None`` uses the losses given to :meth:`record_loss` since
        the last real step, or judges the gradients alone when there are none.

        Gradient accumulation: with an Accelerate ``AcceleratedOptimizer`` (its ``gradient_state``), a call
        on a micro-step that does not synchronise gradients only records the loss and returns False: it
        is not a step, nothing is measured, clipped or counted, and the real step judges the accumulated
        gradients with the mean of the recorded losses.

        One blocking host synchronisation per step (the fetch in :meth:`_measure`): whether to call
        ``optimizer.step()`` is host control flow, so the decision needs the numbers on the host.
        """
        if loss is not None:
            self.record_loss(loss)
        if not _is_sync_step(self.optimizer):
            return False
        pending, count = self._pending_loss, self._pending_count
        self._pending_loss, self._pending_count = None, 0
        has_loss = pending is not None
        if pending is None:
            pending = self._zeros(self.params[0].device)
        elif count > 1:
            pending = pending / count
        step = self.steps
        self.steps += 1
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        amp = scaler is not None
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        m = self._measure(pending, scaler)
        # Only the series a decision needs are tested; the others only when a skip reports them.
        self._judge(m, (has_loss and "loss" in self.spikes, "grad_norm" in self.spikes or m.clipped))
        if m.clipped:
            self._on_clip(step, m)
        reason = None
        if not math.isfinite(m.loss):
            reason = "nonfinite_loss"
        elif m.found_inf or not math.isfinite(m.norm):
            reason = "amp_overflow" if amp else "nonfinite_grad"
        elif m.spike[0] and has_loss and "loss" in self.spikes:
            reason = "loss_spike"
        elif m.spike[1] and "grad_norm" in self.spikes:
            reason = "grad_spike"
        elif has_loss and self._divergence.judge(m.loss):
            reason = "divergence"
        if reason is None:
            if m.clipped or self.lr_factor != 1.0:
                self.intervened += 1
            self._apply(step, m, closure)
            if has_loss:
                self._divergence.recent.append(m.loss)
            return True
        self.intervened += 1
        self._judge(m, (True, True))
        if scaler is not None:
            scaler.update()  # lowers the scale after an overflow; needed after every unscale_()
        self._on_skip(step, reason, m.numbers(self.lr_factor))
        return False

    def _apply(self, step: int, m: Step, closure: Callable[[], Any] | None) -> None:
        # This step's loss and gradients, measured on the state the last candidate captured, were healthy.
        self._promote_candidate()
        groups = self.optimizer.param_groups
        if self.lr_factor == 1.0:
            self.optimizer.step() if closure is None else self.optimizer.step(closure)
        else:
            saved = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] = g["lr"] * self.lr_factor
            try:
                self.optimizer.step() if closure is None else self.optimizer.step(closure)
            finally:
                for g, lr in zip(groups, saved, strict=True):
                    g["lr"] = lr
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.update()
        self._windows.push((m.loss, m.norm))
        self.applied += 1
        self._consecutive_skips = 0
        self._skip_reasons.clear()
        self._rollbacks_since_progress = 0
        self._good_run += 1
        self._good_since_snapshot += 1
        if self.lr_factor < 1.0:
            self.lr_factor *= self.backoff ** (-1.0 / self.recover_steps)
            if self.lr_factor > 1.0 - 1e-9:  # snap: repeated multiplication lands within rounding of 1
                self.lr_factor = 1.0
                self._event(step, "lr_restored", "recovered", {"lr_factor": 1.0})
        if self._good_since_snapshot >= self.snapshot_every:
            self._good_since_snapshot = 0
            self._capture_candidate()

    def _on_clip(self, step: int, m: Step) -> None:
        self.clipped += 1
        # Routine trimming (a norm always a bit above a fixed cap) is counted, not news; growth is: an
        # event and a finding only when the norm is many times the median of recent applied steps.
        if math.isfinite(m.typical) and m.norm >= self.clip_report_ratio * m.typical:
            nums = {**m.numbers(self.lr_factor), "norm_after": m.after, "typical_grad_norm": m.typical}
            self._event(step, "clip", "large_norm", nums)
            self._report(clip_finding(step, nums))

    def _on_skip(self, step: int, reason: str, numbers: dict[str, float]) -> None:
        self.skipped += 1
        self._good_run = 0
        # The state the candidate holds failed its first measurement (or the scaler is still searching
        # for a scale): never roll back to it. The next one is taken after snapshot_every good steps.
        self.snapshots.discard()
        self._event(step, "skip", reason, numbers)
        if reason == "amp_overflow":
            return  # the scaler's normal search for a usable scale, not a sign of a bad state
        if reason == "divergence":
            # A sustained rise means the state itself is bad: no further batch will fix it.
            self._skip_reasons.append(reason)
            self._rollback(step, numbers)
            return
        self._report(skip_finding(step, reason, numbers))
        self._consecutive_skips += 1
        self._skip_reasons.append(reason)
        if self._consecutive_skips >= self.rollback_after:
            self._rollback(step, numbers)

    def _rollback(self, step: int, numbers: dict[str, float]) -> None:
        reasons = list(self._skip_reasons)
        # The spike windows are kept, not restored: they hold only measurements of applied (healthy) steps,
        # which stay valid knowledge of what healthy looks like, and with window ≥ snapshot_every +
        # rollback_after they reach back past the snapshot, so the level the restored state starts from
        # is in them. Restoring them instead would leave the guard blind (fewer than min_history values)
        # after every rollback to an early snapshot. The clip policy *is* restored: it shapes the updates.
        windows = self._windows.state_dict()
        self.restore()
        self._windows.load_state_dict(windows)
        self.rollbacks += 1
        self._consecutive_skips = 0
        self._skip_reasons.clear()
        self._good_run = 0
        old = self.lr_factor
        self.lr_factor = max(self.min_lr_factor, self.lr_factor * self.backoff)
        nums = {**numbers, "to_step": float(self.snapshot_step), "skips": float(len(reasons))}
        cause = "divergence" if reasons[-1] == "divergence" else "repeated_skips"
        self._event(step, "rollback", cause, nums)
        self._event(step, "lr_backoff", cause, {"lr_factor": self.lr_factor, "previous": old})
        # The losses that made the level are the diverged state's: judge the restored state afresh.
        self._divergence.recent.clear()
        if reasons[-1] == "divergence":
            self._divergence.armed = False
        engaged = self.rescue is not None and not self.rescue_engaged
        if engaged:
            self.rescue_engaged = True
            self._event(step, "rescue", reasons[-1], {"lr_factor": self.lr_factor})
        self._report(rollback_finding(
            step, reasons, nums, to_step=self.snapshot_step, lr_factor=self.lr_factor,
            divergence=(self.divergence, self.divergence_steps),
            rescue=type(self.rescue).__name__ if engaged else None,
        ))
        self._rollbacks_since_progress += 1
        if self._rollbacks_since_progress >= 2:
            # Rolled back twice without one good step in between: if the loss level has truly moved (new
            # data, curriculum), the old window would reject every step forever, so judge from scratch.
            self._windows = HostWindow(self.window, rows=2)
            self._event(step, "reset_window", "rollback_loop", {"lr_factor": self.lr_factor})

    def _event(self, step: int, action: str, reason: str, numbers: Mapping[str, float]) -> None:
        self.events.append(GuardEvent(step, action, reason, dict(numbers)))
        if len(self.events) > self.max_events:
            del self.events[: len(self.events) - self.max_events]

    def _report(self, finding: Finding) -> None:
        if self.monitor is not None:
            self.monitor.report(finding)

    def summary(self) -> dict[str, Any]:
        """Counts for logs and reports: steps, applied, skipped, clipped (routine clips included),
        rollbacks, intervened (steps changed in any way), whether the rescue is engaged, the LR factor,
        and the kept events by ``action:reason``."""
        counts: dict[str, int] = {}
        for e in self.events:
            key = f"{e.action}:{e.reason}"
            counts[key] = counts.get(key, 0) + 1
        return {
            "steps": self.steps,
            "applied": self.applied,
            "skipped": self.skipped,
            "clipped": self.clipped,
            "rollbacks": self.rollbacks,
            "intervened": self.intervened,
            "rescue_engaged": self.rescue_engaged,
            "lr_factor": self.lr_factor,
            "events": counts,
        }

    def __repr__(self) -> str:
        clip = "None" if self.clip is None else type(self.clip).__name__
        return (
            f"Guard(clip={clip}, steps={self.steps}, applied={self.applied}, skipped={self.skipped}, "
            f"clipped={self.clipped}, rollbacks={self.rollbacks}, lr_factor={self.lr_factor:.3g})"
        )


def _is_sync_step(optimizer: torch.optim.Optimizer) -> bool:
    """False on a gradient-accumulation micro-step of Accelerate (``gradient_state.sync_gradients``)."""
    state = getattr(optimizer, "gradient_state", None)
    return state is None or bool(getattr(state, "sync_gradients", True))


def _policy(option: str, value: ClipPolicy | str | None) -> ClipPolicy | None:
    """A clipping option as a policy: a policy as given, a registry name with its defaults, or ``None``."""
    if isinstance(value, str):
        return _policy_by_name(value)
    if value is not None and not isinstance(value, ClipPolicy):
        raise InputError(f"{option} must be a gradguard.clip policy, a name or None, got {type(value).__name__}")
    return value


def _policy_by_name(name: str) -> ClipPolicy:
    """A registered policy with its default options; ``"value"`` and ``"norm"`` need a threshold."""
    required = {"value": "gg.clip.ClipValue(c)", "norm": "gg.clip.ClipNorm(max_norm)"}
    if name in required:
        raise ConfigError(
            f"clip={name!r} needs a threshold; pass {required[name]} instead "
            f"(names usable without options: {', '.join(n for n in POLICIES if n not in required)})"
        )
    return make_policy(name)
