"""Reading a ``torch.amp.GradScaler`` without a host synchronisation.

The public ``GradScaler.get_scale()`` returns a Python float, i.e. it waits for the device. The scale
itself is a device tensor, and whether a step overflowed is a device tensor too; reading them as tensors
costs nothing until a caller fetches them on its logging schedule. Those tensors are private attributes
of the scaler, so every access to them is in this module and nowhere else; ``tests/test_stack_amp.py``
checks them against the public API and fails loudly when a torch release changes them.

Loss scaling: the backward runs on ``S · L``, so the gradients held between ``backward()`` and
``scaler.unscale_`` / ``scaler.step`` are ``S · ∇L``; a step whose scaled gradients hold an Inf is
skipped and ``S`` is multiplied by the backoff factor (0.5), and after ``growth_interval`` finite steps
it grows by the growth factor (2) (Micikevicius et al. 2018, "Mixed Precision Training").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradguard.errors import InputError


def check_scaler(scaler: Any) -> None:
    """Raise :class:`InputError` unless ``scaler`` is a ``torch.amp.GradScaler`` (or the CUDA alias)."""
    if not isinstance(scaler, torch.amp.GradScaler):
        raise InputError(f"scaler={scaler!r:.60} must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")


def scale_tensor(scaler: torch.amp.GradScaler) -> Tensor | None:
    """The current loss scale ``S`` as a 0-d device tensor (no sync); ``None`` before the first
    ``scaler.scale(loss)`` or when the scaler is disabled."""
    if not scaler.is_enabled():
        return None
    scale = scaler._scale
    return None if scale is None else scale.reshape(())


def init_scale(scaler: torch.amp.GradScaler) -> float:
    """The scale the scaler started from (``init_scale``, 2¹⁶ by default)."""
    return float(scaler._init_scale)


def grads_unscaled(scaler: torch.amp.GradScaler) -> bool:
    """True when ``scaler.unscale_(optimizer)`` already ran this iteration for some optimizer, i.e. the
    ``.grad`` tensors hold ``∇L``, not ``S · ∇L`` (the state is reset by ``scaler.update()``)."""
    unscaled = torch.amp.grad_scaler.OptState.UNSCALED
    return any(state.get("stage") is unscaled for state in scaler._per_optimizer_states.values())


def found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """Sum over devices of the scaler's "found an Inf/NaN" flags for ``optimizer`` (a device tensor, > 0
    when ``scaler.step(optimizer)`` skips or skipped the step); ``None`` before ``unscale_``/``step``
    ran for it this iteration."""
    state = scaler._per_optimizer_states.get(id(optimizer))
    per_device = state.get("found_inf_per_device") if state else None
    if not per_device:
        return None
    flags = [f.to(next(iter(per_device.values())).device) for f in per_device.values()]
    return torch.stack(flags).sum()
