"""Seeded fault injectors for the reliability campaigns.

A :class:`Fault` says what goes wrong, where and when; an :class:`Injector` makes it happen inside an
ordinary training loop through five calls::

    inj = Injector(fault, model, optimizer)
    for step in range(steps):
        inj.begin(step)                     # arms hooks / raises the LR on the fault's steps
        x, y = inj.batch(step, *task.batch(step))
        loss = inj.loss(step, loss_fn(model(x), y))
        loss.backward()
        ...                                 # monitor.step(loss), guard.step(loss) or optimizer.step()
        inj.end(step)                       # disarms

Fault classes (:data:`FAULT_KINDS`):

- ``input_nan`` / ``input_inf``: one element of the step's input batch is multiplied by NaN / +Inf;
- ``activation_nan`` / ``activation_inf``: a forward hook on the named module multiplies one element of
  its output by NaN / +Inf (see :func:`_poison`). The hook stays armed for the whole step, so a replay
  of the step (the monitor's provenance search) sees the same fault, as it would a real numerical bug;
- ``grad_nan`` / ``grad_inf``: a tensor hook on one parameter of the named module multiplies one element
  of its gradient by NaN / +Inf during the backward pass;
- ``loss_nan`` / ``loss_inf``: the loss is multiplied by a NaN / +Inf scalar (a poisoned loss term:
  the loss value and every gradient become non-finite);
- ``outlier_batch``: the step's inputs (and float targets) are multiplied by :data:`OUTLIER_SCALE`;
- ``lr_jump``: every parameter group's learning rate is multiplied by :data:`LR_JUMP` for
  :data:`LR_JUMP_STEPS` steps starting at the fault's step (a schedule bug: the LR returns afterwards).

Everything random (element positions, which parameter) comes from the fault's own seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

FAULT_KINDS: tuple[str, ...] = (
    "input_nan",
    "input_inf",
    "activation_nan",
    "activation_inf",
    "grad_nan",
    "grad_inf",
    "loss_nan",
    "loss_inf",
    "outlier_batch",
    "lr_jump",
)

#: Fault classes placed in a module: the monitor must name that module.
MODULE_FAULTS = frozenset({"activation_nan", "activation_inf", "grad_nan", "grad_inf"})

#: Finding kinds that count as "the right kind" for each fault class.
EXPECTED_KINDS: dict[str, frozenset[str]] = {
    **{k: frozenset({"nonfinite"}) for k in FAULT_KINDS if k not in ("outlier_batch", "lr_jump")},
    "outlier_batch": frozenset({"loss_spike", "exploding"}),
    "lr_jump": frozenset({"loss_spike", "exploding"}),
}

OUTLIER_SCALE = 1000.0
LR_JUMP = 100.0
LR_JUMP_STEPS = 5


@dataclass(frozen=True)
class Fault:
    """One injected fault.

    Attributes:
        kind: one of :data:`FAULT_KINDS`.
        step: the training step it happens at.
        module: the module it is placed in (``MODULE_FAULTS`` only, else ``""``).
        seed: seed of every random choice the injector makes (element, parameter).
    """

    kind: str
    step: int
    module: str = ""
    seed: int = 0

    @property
    def value(self) -> float:
        """The non-finite value written (NaN or +Inf), NaN for the other classes."""
        return float("inf") if self.kind.endswith("_inf") else float("nan")

    @property
    def expected_kinds(self) -> frozenset[str]:
        return EXPECTED_KINDS[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw_faults(
    rng: np.random.Generator, kind: str, act_modules: Sequence[str], grad_modules: Sequence[str], steps: int
) -> Fault:
    """A random fault of class ``kind``: a step in the middle 60 % of the run, a module where relevant.

    The first 20 % of steps are left clean so the detectors and the guard have a history to compare with
    (Guard judges spikes after 16 steps); the last 20 % so that the run has time to recover.
    """
    step = int(rng.integers(int(0.2 * steps), int(0.8 * steps)))
    module = ""
    if kind in ("activation_nan", "activation_inf"):
        module = str(rng.choice(list(act_modules)))
    elif kind in ("grad_nan", "grad_inf"):
        module = str(rng.choice(list(grad_modules)))
    return Fault(kind, step, module, int(rng.integers(2**31 - 1)))


def _poison(t: Tensor, value: float, gen: torch.Generator) -> Tensor:
    """``t`` with one random element replaced by ``t·value`` (NaN, or ±Inf; NaN where ``t`` is 0).

    A product rather than an assignment, so that autograd sees the fault like a real overflow: the
    gradient through the poisoned element is ``g·value``, non-finite, as the derivative of an overflowed
    ``exp`` would be. (An assignment would cut the element from the graph and the fault could never
    reach the weights.)
    """
    i = int(torch.randint(t.numel(), (1,), generator=gen))
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    mask[i] = True
    return torch.where(mask.view(t.shape), t * value, t)


class Injector:
    """Applies one :class:`Fault` to a training loop (see the module docstring for the protocol)."""

    def __init__(self, fault: Fault | None, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.fault = fault
        self.model = model
        self.optimizer = optimizer
        self._handles: list[Any] = []
        self._saved_lr: list[float] | None = None
        self.fired = 0  # how many times the fault actually wrote a value (forward/backward/replays)
        if fault is not None and fault.kind in MODULE_FAULTS:
            modules = dict(model.named_modules())
            if fault.module not in modules:
                raise KeyError(f"model has no module {fault.module!r}")
            self._target = modules[fault.module]

    def _active(self, step: int) -> bool:
        return self.fault is not None and step == self.fault.step

    def _gen(self) -> torch.Generator:
        assert self.fault is not None
        return torch.Generator().manual_seed(self.fault.seed)

    def begin(self, step: int) -> None:
        """Arm the fault's hooks or raise the LR for this step."""
        f = self.fault
        if f is None:
            return
        if f.kind == "lr_jump" and f.step <= step < f.step + LR_JUMP_STEPS:
            self._saved_lr = [g["lr"] for g in self.optimizer.param_groups]
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * LR_JUMP
        if not self._active(step):
            return
        if f.kind in ("activation_nan", "activation_inf"):
            self._handles.append(self._target.register_forward_hook(self._forward_hook))
        elif f.kind in ("grad_nan", "grad_inf"):
            params = [p for p in self._target.parameters(recurse=True) if p.requires_grad]
            p = params[int(torch.randint(len(params), (1,), generator=self._gen()))]
            self._handles.append(p.register_hook(self._grad_hook))

    def _forward_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        # A fresh generator each call: the replay of the step poisons the same element as the original.
        assert self.fault is not None
        self.fired += 1
        if isinstance(output, Tensor):
            return _poison(output, self.fault.value, self._gen())
        first, *rest = output  # nn.LSTM / nn.MultiheadAttention return tuples: poison the main output
        return (_poison(first, self.fault.value, self._gen()), *rest)

    def _grad_hook(self, grad: Tensor) -> Tensor:
        assert self.fault is not None
        self.fired += 1
        return _poison(grad, self.fault.value, self._gen())

    def batch(self, step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch of ``step``, corrupted on the fault's step for input and outlier faults."""
        f = self.fault
        if not self._active(step) or f is None:
            return x, y
        if f.kind in ("input_nan", "input_inf"):
            self.fired += 1
            return _poison(x, f.value, self._gen()), y
        if f.kind == "outlier_batch":
            self.fired += 1
            return x * OUTLIER_SCALE, (y * OUTLIER_SCALE if y.is_floating_point() else y)
        return x, y

    def loss(self, step: int, loss: Tensor) -> Tensor:
        """The loss of ``step``, poisoned on the fault's step for loss faults."""
        f = self.fault
        if self._active(step) and f is not None and f.kind in ("loss_nan", "loss_inf"):
            self.fired += 1
            return loss * torch.full((), f.value, device=loss.device, dtype=loss.dtype)
        return loss

    def end(self, step: int) -> None:
        """Disarm the hooks and restore the LR raised by :meth:`begin`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._saved_lr is not None:
            self.fired += 1
            for g, lr in zip(self.optimizer.param_groups, self._saved_lr, strict=True):
                g["lr"] = lr
            self._saved_lr = None
