"""Exceptions raised at gradguard's boundaries, and the small validators that raise them.

Every message names the bad value and what is allowed, in one line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class GradGuardError(Exception):
    """Base class of every exception gradguard raises on purpose."""


class ConfigError(GradGuardError, ValueError):
    """An option, argument or name that is not allowed."""


class InputError(GradGuardError, TypeError):
    """An input of the wrong type or shape (not a module, not a tensor, a loss that is not a scalar, ...)."""


class StateError(GradGuardError, RuntimeError):
    """A call that is not allowed in the object's current state (e.g. ``step()`` after ``close()``)."""


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise :class:`ConfigError` listing them."""
    options = list(allowed)
    if value not in options:
        shown = ", ".join(repr(o) for o in options)
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {shown}")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> Any:
    """Return ``value`` if it is a finite real number in the given range, else raise.

    Raises :class:`InputError` for a non-number and :class:`ConfigError` for a number out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "an integer" if integer else "a number"
        raise InputError(f"{name}={value!r} must be {kind}, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise InputError(f"{name}={value!r} must be an integer")
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be finite")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        lb = "[" if low_inclusive and low is not None else "("
        hb = "]" if high_inclusive and high is not None else ")"
        raise ConfigError(f"{name}={value!r} is out of range; allowed: {lb}{lo}, {hi}{hb}")
    return value


def check_scalar_loss(loss: Any, *, name: str = "loss") -> Any:
    """Return ``loss`` if it is a tensor with exactly one element, else raise :class:`InputError`.

    The loss is an input (the value ``backward()`` was called on), so a per-sample or per-token loss that
    was not reduced is an :class:`InputError` everywhere: in ``Monitor.step``, ``Guard.step`` and ``probe``.
    """
    import torch  # here, not at the top: importing gradguard.errors must not import torch

    if not isinstance(loss, torch.Tensor):
        raise InputError(f"{name} must be a scalar torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise InputError(
            f"{name} must be a scalar tensor (1 element), got shape {tuple(loss.shape)}; reduce it first "
            "(e.g. loss.mean())"
        )
    return loss
