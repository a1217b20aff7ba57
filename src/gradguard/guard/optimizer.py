"""``GuardedOptimizer``: a :class:`gradguard.Guard` seen as a ``torch.optim.Optimizer``.

Code that calls ``optimizer.step()`` itself (HF ``Trainer``, Accelerate, Lightning's manual optimisation)
is guarded by handing it ``guard.wrap()`` in place of the optimizer; the loss, when known, reaches the
guard through :meth:`gradguard.Guard.record_loss` before the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gradguard.guard.core import Guard

__all__ = ["GuardedOptimizer"]


class GuardedOptimizer(torch.optim.Optimizer):
    """The guard's optimizer, whose ``step()`` is the guarded step (made by :meth:`gradguard.Guard.wrap`).

    Everything else (``param_groups``, ``state``, ``defaults``, ``zero_grad``, ``state_dict``,
    ``load_state_dict``, ``add_param_group``) is the wrapped optimizer's own, so schedulers and checkpoints
    see the real optimizer. ``step(closure)`` evaluates ``closure`` (under grad mode) when given and
    records its loss, then runs :meth:`gradguard.Guard.step` with the losses recorded since the last real
    step; it returns the loss the closure returned, as ``Optimizer.step`` does.

    The base class's ``__init__`` is not called on purpose: this object holds no parameters of its own.
    """

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.optimizer = guard.optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self.guard.refresh_params()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            self.guard.step(None)
            return None
        with torch.enable_grad():
            result = closure()
        if isinstance(result, torch.Tensor):
            self.guard.record_loss(result)
        calls = 0

        def again() -> Any:
            # The optimizer's first call gets the evaluation already made (its gradients are the ones
            # judged); optimizers that evaluate more than once (LBFGS line search) get fresh ones.
            nonlocal calls
            calls += 1
            if calls == 1:
                return result
            with torch.enable_grad():
                return closure()

        self.guard.step(None, again)
        return result

    def __repr__(self) -> str:
        return f"GuardedOptimizer({self.optimizer!r})"
