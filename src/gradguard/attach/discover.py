"""Finding the model of an unmodified training program: which ``nn.Module`` owns the trained parameters.

The program never tells gradguard its model. What can be observed without editing it: the modules it
calls (a global module forward pre-hook, :func:`torch.nn.modules.module.register_module_forward_pre_hook`),
and the parameters it trains (those of the optimizer it steps, or those a backward pass gave a gradient).
The model is the called module that owns the most of those parameters and, among equals, the smallest
one: an outer wrapper that owns the same parameters plus others (a GAN's two networks in one container)
is not preferred over the network itself.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle


@dataclass
class Called:
    """A module the program called at the top level (not from inside another module), first call only."""

    module: weakref.ReferenceType[nn.Module]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class CallRecorder:
    """Records the outermost module calls of a program, until :meth:`remove`.

    The global forward pre-hook sees every module call, inner ones included; a global forward hook with
    ``always_call=True`` (it runs also when the forward raises) keeps the nesting depth, so that only calls
    at depth 0 are candidates. References to the inputs of each candidate's first call are kept (no copy):
    they are the "first batch" that ``--probe`` measures. No backward hook is installed (global module
    backward hooks break in-place operations on module outputs).

    Args:
        on_training_call: called with each module whose first top-level call is a training call (gradients
            enabled, ``module.training``, at least one parameter that requires a gradient), before its
            forward runs.
    """

    def __init__(self, on_training_call: Callable[[nn.Module], None]) -> None:
        self.on_training_call = on_training_call
        self.calls: dict[int, Called] = {}
        self._offered: set[int] = set()
        self._depth = 0
        self.paused = False
        self._handles: list[RemovableHandle] = [
            register_module_forward_pre_hook(self._pre),
            register_module_forward_hook(self._post, always_call=True),
        ]

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._depth == 0 and not self.paused:
            key = id(module)
            if key not in self.calls:
                self.calls[key] = Called(weakref.ref(module), args, {})
            # Not only the first call: a sanity-check forward under no_grad() may come before training.
            if (key not in self._offered and torch.is_grad_enabled() and module.training
                    and any(p.requires_grad for p in module.parameters())):
                self._offered.add(key)
                self.on_training_call(module)
        self._depth += 1

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._depth = max(self._depth - 1, 0)

    def modules(self) -> list[nn.Module]:
        """The live candidate modules, in the order they were first called."""
        return [m for c in self.calls.values() if (m := c.module()) is not None]

    def inputs_of(self, module: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The inputs of ``module``'s first top-level call, or ``None`` when it was never called at the top."""
        c = self.calls.get(id(module))
        return None if c is None or c.module() is not module else (c.args, c.kwargs)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Remove both global hooks and drop the recorded inputs. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.calls.clear()
        self._offered.clear()


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel``/``DataParallel`` wrapper (same parameters, plain names)."""
    if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return module.module
    return module


def owner(candidates: Iterable[nn.Module], params: Iterable[Tensor]) -> nn.Module | None:
    """The called module owning the most of ``params`` (ties: the fewest parameters); ``None`` if none owns any.

    It is returned as called (a ``DistributedDataParallel`` wrapper stays one: its inputs are the recorded
    ones); :func:`unwrap` gives the model to watch.

    Score of a module ``m`` for the trained set ``P``: ``(|params(m) ∩ P|, −|params(m)|)``, maximised.
    """
    wanted = {id(p) for p in params}
    best: tuple[int, int] | None = None
    found = None
    for m in candidates:
        own = [id(p) for p in m.parameters()]
        score = (sum(i in wanted for i in own), -len(own))
        if score[0] > 0 and (best is None or score > best):
            best, found = score, m
    return found


def with_gradients(candidates: Iterable[nn.Module]) -> list[Tensor]:
    """The parameters of ``candidates`` that hold a gradient (what the last backward pass trained)."""
    seen: dict[int, Tensor] = {}
    for m in candidates:
        for p in m.parameters():
            if p.requires_grad and p.grad is not None:
                seen.setdefault(id(p), p)
    return list(seen.values())


def program_name(module: nn.Module) -> str | None:
    """The program's own name for ``module`` (``model``, ``netD``): a local variable of the innermost caller
    frame outside torch and gradguard that holds it, else a global of ``__main__``; ``None`` if neither does."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    frame = sys._getframe(1)
    while frame is not None:
        if not frame.f_code.co_filename.startswith(skip):
            for name, value in frame.f_locals.items():
                if value is module and not name.startswith("_"):
                    return name
        frame = frame.f_back  # type: ignore[assignment]
    main = sys.modules.get("__main__")
    for name, value in (vars(main) if main is not None else {}).items():
        if value is module and not name.startswith("_"):
            return name
    return None
