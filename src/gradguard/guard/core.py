"""``Guard``: a guarded optimizer step that skips bad updates, rolls back, and backs off the learning rate.

::

    guard = gg.Guard(model, optimizer)            # defaults: idle on healthy runs; see docs/guard.md
    for x, y in data:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        applied = guard.step(loss)                # replaces optimizer.step(); False when skipped

The procedure of one step, the divergence test, the rescue clip and the reasons for every default are in
docs/guard.md.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from gradguard.clip import POLICIES, ClipPolicy, make_policy
from gradguard.errors import ConfigError, InputError, StateError, check_number
from gradguard.findings import Finding
from gradguard.guard.snapshot import SnapshotStore, choose_mode
from gradguard.stats import tensor_norms, total_norm
from gradguard.stats.scaler import found_inf as scaler_found_inf
from gradguard.stats.windows import SpikeRule, Window

if TYPE_CHECKING:
    from gradguard.guard.optimizer import GuardedOptimizer

__all__ = ["ACTIONS", "SPIKE_SERIES", "FindingSink", "Guard", "GuardEvent"]

#: Actions a :class:`GuardEvent` can record.
ACTIONS = ("skip", "clip", "rollback", "lr_backoff", "lr_restored", "reset_window", "rescue")
#: Series whose spikes ``Guard(spikes=...)`` can skip.
SPIKE_SERIES = ("loss", "grad_norm")

# Positions in the vector fetched once per step (loss and norm first: the pair a window stores).
_LOSS, _NORM, _ZLOSS, _ZNORM, _LSPIKE, _NSPIKE, _NMED, _THRESH, _CLIPPED, _FOUND_INF, _AFTER = range(11)


class FindingSink(Protocol):
    """What ``Guard(monitor=...)`` needs: a :class:`gradguard.Monitor`, or anything that takes findings."""

    def report(self, finding: Finding) -> None:
        """Receive one finding."""


@dataclass(frozen=True)
class GuardEvent:
    """One intervention of a :class:`Guard`.

    Attributes:
        step: index of the ``guard.step()`` call (0-based).
        action: one of :data:`ACTIONS`.
        reason: why: ``nonfinite_loss``, ``nonfinite_grad``, ``amp_overflow``, ``loss_spike``,
            ``grad_spike``, ``divergence``, ``large_norm`` (a clip of a norm far above the recent median;
            routine clips are only counted), ``repeated_skips``, ``recovered``, ``rollback_loop``.
        numbers: the measurements behind it (loss, grad_norm, threshold, z-scores, lr_factor ...).
    """

    step: int
    action: str
    reason: str
    numbers: Mapping[str, float] = field(default_factory=dict)


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
            owned parameters, the buffers and the optimizer state (≈ 3× the parameters with Adam), twice
            for the one step a new snapshot waits to be committed.
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
        scaler: Any = None,
        scheduler: Any = None,
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
        # Thresholds for every window size, once: a step only indexes a tuple of host floats.
        self._limits = [self._rule.threshold(n) for n in range(self.min_history, self.window + 1)]
        check_number("max_events", max_events, low=1, integer=True)
        self.params: list[Tensor] = []
        self.refresh_params()
        if snapshot == "auto":
            owned = [*self.params, *self.model.buffers()]
            snapshot = "disk" if snapshot_dir is not None else choose_mode(owned)
        path = None if snapshot_dir is None else Path(snapshot_dir) / "gradguard_guard_snapshot.pt"
        self.snapshots = SnapshotStore(snapshot, path=path)
        device = self.params[0].device
        self.max_events = int(max_events)
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
        # Divergence test, on host floats the step fetches anyway: the last applied losses and the run's
        # starting level (the smallest of its first ``divergence_steps`` losses).
        self._recent_losses: deque[float] = deque(maxlen=self.divergence_steps)
        self._baseline_level: float | None = None
        # One divergence rollback per committed snapshot: rolling back again to the same state, with the
        # rescue engaged and the LR lowered already, would only repeat the experiment at an ever lower LR
        # (non-finite and spike skips, and their rollbacks, keep protecting the weights meanwhile).
        self._divergence_armed = True
        self._windows = Window(self.window, rows=2, device=device)
        self._consts: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
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

    def _guard_state(self) -> dict[str, Any]:
        return self._windows.state_dict()

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
            "guard": self._guard_state(),
            # The divergence test's reference belongs to the state it judges: restored with it.
            "divergence": {"baseline": self._baseline_level},
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
        self._divergence_armed = True

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
            self._divergence_armed = True
        self.snapshots.promote()

    def _discard_candidate(self) -> None:
        self.snapshots.discard()

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
        self._baseline_level = state["divergence"]["baseline"]
        self._recent_losses.clear()

    def state_dict(self) -> dict[str, Any]:
        """The guard's own state (counters, LR factor, windows, clip policy) for checkpoints."""
        return {
            "lr_factor": self.lr_factor,
            "steps": self.steps,
            "applied": self.applied,
            "skipped": self.skipped,
            "rollbacks": self.rollbacks,
            "clipped": self.clipped,
            "intervened": self.intervened,
            "rescue_engaged": self.rescue_engaged,
            "divergence": {
                "armed": self._divergence_armed,
                "recent": list(self._recent_losses),
                "baseline": self._baseline_level,
            },
            "good_run": self._good_run,
            "guard": copy.deepcopy(self._guard_state()),
            "clip": None if self.clip is None else copy.deepcopy(self.clip.state_dict()),
            "rescue": None if self.rescue is None else copy.deepcopy(self.rescue.state_dict()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.lr_factor = float(state["lr_factor"])
        self.steps, self.applied = int(state["steps"]), int(state["applied"])
        self.skipped, self.rollbacks = int(state["skipped"]), int(state["rollbacks"])
        self._good_run = int(state["good_run"])
        self.clipped, self.intervened = int(state["clipped"]), int(state["intervened"])
        self.rescue_engaged = bool(state["rescue_engaged"])
        div = state["divergence"]
        self._recent_losses = deque(map(float, div["recent"]), maxlen=self.divergence_steps)
        self._divergence_armed = bool(div["armed"])
        self._baseline_level = None if div["baseline"] is None else float(div["baseline"])
        self._windows.load_state_dict(state["guard"])
        if self.clip is not None and state["clip"] is not None:
            self.clip.load_state_dict(state["clip"])
        if self.rescue is not None and state.get("rescue") is not None:
            self.rescue.load_state_dict(state["rescue"])

    # ------------------------------------------------------------------------------------------ step
    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        # Made once per device: a constant built on the host and moved to CUDA each step would be a
        # pageable host-to-device copy, which synchronises the stream (a second, hidden sync).
        if device not in self._consts:
            self._consts[device] = (
                torch.zeros((), device=device),
                torch.full((), math.inf, device=device),
                torch.tensor([math.nan, math.nan, 0.0, 0.0, math.nan], device=device),  # z, z, spikes, median
            )
        return self._consts[device]

    def _policies(self) -> list[ClipPolicy]:
        """The clipping applied this step: the routine ``clip``, then ``rescue`` once it is engaged."""
        active = [] if self.clip is None else [self.clip]
        if self.rescue_engaged and self.rescue is not None:
            active.append(self.rescue)
        return active

    def _diverged(self, loss: float) -> bool:
        """Sustained rise: the last ``divergence_steps`` losses (this one included) all exceed
        ``divergence`` × the run's starting level, the smallest of its first ``divergence_steps`` losses.

        The smallest of the recent losses must be above, so one outlier batch never trips it; the start,
        not the best loss so far, is the reference, because the best so far of a noisy loss drifts into
        its low tail (docs/guard.md). ``x > b + (f − 1)·|b|`` judges negative losses by the same margin.
        Host floats only.
        """
        if self.divergence is None or not self._divergence_armed:
            return False
        recent = [*self._recent_losses, loss][-self.divergence_steps :]
        if len(recent) < self.divergence_steps:
            return False
        if self._baseline_level is None:
            self._baseline_level = min(recent)
        base = self._baseline_level
        return min(recent) > base + (self.divergence - 1.0) * abs(base)

    def _measure(self, loss: Tensor) -> Tensor:
        """Everything the step decision needs, as one device vector (see the ``_LOSS`` ... indices)."""
        loss_d = loss.detach().reshape(()).float()
        device = loss_d.device
        zero, inf, unjudged = self._constants(device)
        policies = self._policies()
        if policies:
            results = [policy(self.params) for policy in policies]
            norm, threshold = results[0].norm_before.float(), results[-1].threshold.float()
            clipped = torch.stack([r.clipped for r in results]).any().float()
            after = results[-1].norm_after.float()
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = total_norm(tensor_norms(grads, 2.0), 2.0) if grads else zero
            threshold, clipped, after = inf, zero, norm
        current = torch.stack([loss_d, norm.to(device)])
        held = self._windows.held()  # host counter: only applied (finite) steps are pushed
        if held >= self.min_history:
            limit = self._limits[held - self.min_history]  # a host float: comparing with it does not sync
            spikes, z, med = self._rule.test(current, self._windows, limit)
            judged = torch.cat([z, spikes.float(), med[1:]])
        else:
            judged = unjudged
        found_inf = zero
        if self.scaler is not None and self.scaler.is_enabled():
            flags = scaler_found_inf(self.scaler, self.optimizer)  # the one home of GradScaler's private state
            if flags is not None:
                found_inf = flags.to(device).float().reshape(())
        tail = torch.stack([threshold.to(device), clipped.to(device), found_inf, after.to(device)])
        return torch.cat([current, judged, tail])

    def record_loss(self, loss: Tensor) -> None:
        """Hand the guard this step's loss before a step that is called without one (:meth:`wrap`).

        No host sync: the tensor is kept (detached). Losses recorded on gradient-accumulation micro-steps
        are averaged at the real step.
        """
        if not isinstance(loss, Tensor):
            raise InputError(f"loss must be a tensor (the value you called backward() on), got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ConfigError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        loss = loss.detach().reshape(()).float()
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
        """
        if loss is not None:
            self.record_loss(loss)
        if not _is_sync_step(self.optimizer):
            return False
        if self._pending_loss is None:
            loss, has_loss = self._constants(self.params[0].device)[0], False
        else:
            loss, has_loss = self._pending_loss / self._pending_count, True
        self._pending_loss, self._pending_count = None, 0
        step = self.steps
        self.steps += 1
        amp = self.scaler is not None and self.scaler.is_enabled()
        if amp:
            self.scaler.unscale_(self.optimizer)
        measured = self._measure(loss)
        values = measured.tolist()  # the one host sync of the step (see module docstring)
        numbers = {
            "loss": values[_LOSS],
            "grad_norm": values[_NORM],
            "threshold": values[_THRESH],
            "z_loss": values[_ZLOSS],
            "z_grad_norm": values[_ZNORM],
            "lr_factor": self.lr_factor,
        }
        clipped = bool(values[_CLIPPED]) and math.isfinite(values[_NORM])
        if clipped:
            self._on_clip(step, numbers, values[_AFTER], values[_NMED])
        reason = None
        if not math.isfinite(values[_LOSS]):
            reason = "nonfinite_loss"
        elif values[_FOUND_INF] or not math.isfinite(values[_NORM]):
            reason = "amp_overflow" if amp else "nonfinite_grad"
        elif values[_LSPIKE] and has_loss and "loss" in self.spikes:
            reason = "loss_spike"
        elif values[_NSPIKE] and "grad_norm" in self.spikes:
            reason = "grad_spike"
        elif has_loss and self._diverged(values[_LOSS]):
            reason = "divergence"
        if reason is None:
            if clipped or self.lr_factor != 1.0:
                self.intervened += 1
            self._apply(step, measured, closure)
            if has_loss:
                self._recent_losses.append(values[_LOSS])
            return True
        self.intervened += 1
        if amp:
            self.scaler.update()  # lowers the scale after an overflow; needed after every unscale_()
        self._on_skip(step, reason, numbers)
        return False

    def _apply(self, step: int, measured: Tensor, closure: Callable[[], Any] | None) -> None:
        # This step's loss and gradients, measured on the state the last candidate captured, were healthy.
        self._promote_candidate()
        groups = self.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        if self.lr_factor != 1.0:
            for g in groups:
                g["lr"] = g["lr"] * self.lr_factor
        try:
            self.optimizer.step() if closure is None else self.optimizer.step(closure)
        finally:
            for g, lr in zip(groups, saved, strict=True):
                g["lr"] = lr
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.update()
        # Push the device copies: building new tensors from the fetched floats would copy host→device.
        self._windows.push(measured[_LOSS : _NORM + 1])
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

    def _on_clip(self, step: int, numbers: dict[str, float], after: float, typical: float) -> None:
        self.clipped += 1
        # Routine trimming (a norm always a bit above a fixed cap) is counted, not news; growth is: an
        # event and a finding only when the norm is many times the median of recent applied steps.
        if math.isfinite(typical) and numbers["grad_norm"] >= self.clip_report_ratio * typical:
            nums = {**numbers, "norm_after": after, "typical_grad_norm": typical}
            self._event(step, "clip", "large_norm", nums)
            self._report(
                "exploding",
                step,
                "warning",
                f"gradient norm {numbers['grad_norm']:.3g} ({numbers['grad_norm'] / typical:.1f}× the recent "
                f"median {typical:.3g}) was clipped to {numbers['threshold']:.3g}",
                "Clipping is containing growing gradients; consider a lower learning rate or gg.init schemes.",
                nums,
            )

    def _on_skip(self, step: int, reason: str, numbers: dict[str, float]) -> None:
        self.skipped += 1
        self._good_run = 0
        # The state the candidate holds failed its first measurement (or the scaler is still searching
        # for a scale): never roll back to it. The next one is taken after snapshot_every good steps.
        self._discard_candidate()
        self._event(step, "skip", reason, numbers)
        if reason == "amp_overflow":
            return  # the scaler's normal search for a usable scale, not a sign of a bad state
        if reason == "divergence":
            # A sustained rise means the state itself is bad: no further batch will fix it.
            self._skip_reasons.append(reason)
            self._rollback(step, numbers)
            return
        kind = "nonfinite" if reason.startswith("nonfinite") else "loss_spike"
        what = {
            "nonfinite_loss": f"loss {numbers['loss']}",
            "nonfinite_grad": f"gradient norm {numbers['grad_norm']}",
            "loss_spike": f"loss {numbers['loss']:.4g} (robust z {numbers['z_loss']:.1f})",
            "grad_spike": f"gradient norm {numbers['grad_norm']:.4g} (robust z {numbers['z_grad_norm']:.1f})",
        }[reason]
        self._report(
            kind,
            step,
            "warning",
            f"Guard skipped step {step}: {what}",
            "Lower the learning rate, clip gradients (gg.clip) or inspect the batch at this step.",
            numbers,
        )
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
        windows = self._guard_state()
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
        self._recent_losses.clear()
        if reasons[-1] == "divergence":
            self._divergence_armed = False
        engaged = self.rescue is not None and not self.rescue_engaged
        if engaged:
            self.rescue_engaged = True
            self._event(step, "rescue", reasons[-1], {"lr_factor": self.lr_factor})
        growth = not any(r.startswith("nonfinite") for r in reasons)
        why = (
            f"the loss stayed above {self.divergence:g}x its starting level for {self.divergence_steps} steps"
            if reasons[-1] == "divergence"
            else f"{len(reasons)} skipped steps ({', '.join(sorted(set(reasons)))})"
        )
        rescue = f"; rescue clipping {type(self.rescue).__name__} engaged" if engaged else ""
        self._report(
            "exploding" if growth else "nonfinite",
            step,
            "error",
            f"Guard rolled back to step {self.snapshot_step} after {why}; learning-rate factor now "
            f"{self.lr_factor:.3g}{rescue}",
            "Training is unstable at this learning rate: lower it, clip gradients, or re-initialise (gg.init).",
            nums,
        )
        self._rollbacks_since_progress += 1
        if self._rollbacks_since_progress >= 2:
            # Rolled back twice without one good step in between: if the loss level has truly moved (new
            # data, curriculum), the old window would reject every step forever, so judge from scratch.
            self._windows = Window(self.window, rows=2, device=self._windows.values.device)
            self._event(step, "reset_window", "rollback_loop", {"lr_factor": self.lr_factor})

    def _event(self, step: int, action: str, reason: str, numbers: Mapping[str, float]) -> None:
        self.events.append(GuardEvent(step, action, reason, dict(numbers)))
        if len(self.events) > self.max_events:
            del self.events[: len(self.events) - self.max_events]

    def _report(
        self, kind: str, step: int, severity: str, message: str, advice: str, evidence: Mapping[str, float]
    ) -> None:
        if self.monitor is not None:
            self.monitor.report(Finding(kind, "", step, severity, message, advice, dict(evidence)))

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
