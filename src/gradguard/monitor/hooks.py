"""What every monitor hook shares: a weak, picklable callable, and where a hook is called from.

A hook is a :class:`WeakHook`: it holds its owner (monitor or activation tap) through a weak reference,
so the model, the monitor and the tensors it gathered never form a reference cycle (torch aborts when
the garbage collector clears tensors in such a cycle at interpreter exit). Pickling or deep-copying the
model (``torch.save(model)``, an EMA copy) copies each hook as :class:`DeadHook`, so the copy stays
usable and its forwards never reach the original's monitor.

Under ``torch.compile`` a hook body is traced by dynamo; :meth:`WeakHook.__call__` returns before doing
anything when :func:`torch.compiler.is_compiling` is true, so a hook compiles to nothing: no graph break,
no guard, no recompilation, whatever the order of ``gg.watch`` and ``torch.compile``.
"""

from __future__ import annotations

import copy
import sys
import weakref
from typing import Any

import torch
from torch import nn


class DeadHook:
    """The stand-in a copied model gets for a monitor hook: does nothing."""

    def __call__(self, *args: Any) -> None:
        return None


class WeakHook:
    """``hook(*args)`` calls ``getattr(owner, method)(*bound, *args)`` while ``owner`` is alive and eager.

    Args:
        owner: the object whose method runs (held weakly).
        method: its name.
        bound: leading arguments (e.g. the module's qualified name).
    """

    def __init__(self, owner: object, method: str, *bound: Any) -> None:
        self._ref = weakref.ref(owner)
        self._method = method
        self._bound = bound
        self.traced = False

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            # Traced by dynamo: compile to nothing but this flag (an attribute store dynamo replays after
            # the graph; no graph break, no guard), which tells the owner its model runs compiled.
            self.traced = True
            return None
        target = self._ref()
        if target is None:
            return None
        return getattr(target, self._method)(*self._bound, *args)

    def __reduce__(self) -> tuple[type[DeadHook], tuple[()]]:
        return DeadHook, ()

    def __deepcopy__(self, memo: dict[int, Any]) -> DeadHook:
        return DeadHook()


class CompiledEntry:
    """Stands in for ``module._compiled_call_impl`` after ``module.compile()``: runs ``owner``'s root
    hooks eagerly around the compiled call (the module's own hooks run inside the compiled graph).

    Args:
        inner: the compiled call it wraps (restored by the owner's ``close()``).
        owner: the monitor (held weakly), with ``_root_pre(module, args, kwargs)`` and
            ``_root_post(module, args, kwargs, output)``.
    """

    def __init__(self, inner: Any, owner: object) -> None:
        self.inner = inner
        self._ref = weakref.ref(owner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner: Any = self._ref()
        if owner is None:
            return self.inner(*args, **kwargs)
        owner._root_pre(None, args, kwargs)
        output = self.inner(*args, **kwargs)
        owner._root_post(None, args, kwargs, output)
        return output

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        # A copy of the module gets the compiled call alone: never the monitor's entry.
        return _same, (self.inner,)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.inner, memo)


def _same(obj: Any) -> Any:
    return obj


class RootPreHook(WeakHook):
    """The root's pre-hook: traced by dynamo, it also keeps its last call's arguments (an attribute store
    dynamo replays after the graph: references to the graph's inputs, no graph break, no guard), so a model
    compiled after ``gg.watch`` still has inputs to replay and to summarise activations from."""

    def __init__(self, owner: object, method: str) -> None:
        super().__init__(owner, method)
        self.traced_args: tuple[Any, ...] | None = None

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            self.traced = True
            self.traced_args = args
            return None
        return super().__call__(*args)


def graph_task() -> int:
    """The autograd engine's current graph task (``-1`` outside any backward)."""
    return torch._C._current_graph_task_id()


def in_backward(outer: int = -1) -> bool:
    """True inside a backward other than ``outer``, e.g. when ``torch.utils.checkpoint`` recomputes a forward.

    ``outer`` is the graph task a replay started in: an integration may replay from an end-of-backward
    callback, where the engine's task is still current, and the replay's own forward is no recomputation.
    """
    return graph_task() not in (-1, outer)


def compiled_in_place(module: nn.Module) -> bool:
    """True after ``module.compile()`` (its ``__call__`` then runs a compiled ``_call_impl``)."""
    return getattr(module, "_compiled_call_impl", None) is not None



def dynamo_compiled_something() -> bool:
    """True once torch.compile has compiled any frame in this process (dynamo's own counters)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return utils is not None and utils.counters["frames"]["ok"] > 0
