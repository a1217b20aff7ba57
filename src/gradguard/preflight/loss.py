"""The probe's loss: the user's, one inferred from the targets, or a fixed random projection of the output."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradguard.errors import ConfigError, InputError, check_scalar_loss

#: Names of the losses :func:`gradguard.probe` can use, as recorded in ``ProbeReport.loss_kind``.
LOSS_KINDS = ("projection", "loss_fn", "mse", "cross_entropy")


def float_tensors(obj: Any) -> list[Tensor]:
    """Floating-point tensors in a nested output (tuples, lists, dicts, PackedSequence), in order."""
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in float_tensors(v)]
    if isinstance(obj, tuple | list):
        return [t for v in obj for t in float_tensors(v)]
    return []


def projection_loss(output: Any, seed: int = 0) -> Tensor:
    """The default probe loss ``L = Σ_i r_i · y_i`` with fixed ``r_i ~ N(0, 1)``.

    Every floating tensor ``y`` of the output gets ``∂L/∂y = r``: unit-variance gradient on every output
    element, independent of what the model computes, so that the probe measures how the network
    transports a gradient rather than a particular task. ``r`` comes from a private
    ``torch.Generator(seed)`` (on the CPU, then moved), so the global random state is not touched.
    """
    tensors = float_tensors(output)
    if not tensors:
        raise InputError("the model output contains no floating-point tensor to differentiate")
    gen = torch.Generator().manual_seed(int(seed))
    total = tensors[0].new_zeros((), dtype=torch.float32)
    for y in tensors:
        r = torch.randn(tuple(y.shape), generator=gen).to(device=y.device)
        total = total + (r * y.float()).sum()
    return total


def _first_output(output: Any) -> Tensor:
    return float_tensors(output)[0]


def _cross_entropy(output: Any, targets: Tensor) -> Tensor:
    return F.cross_entropy(_first_output(output), targets)


def _mse(output: Any, targets: Tensor) -> Tensor:
    return F.mse_loss(_first_output(output), targets)


def probe_loss(output: Any, targets: Tensor | None, loss_fn: Callable[..., Tensor] | None,
               seed: int) -> tuple[Tensor, str]:
    """``(scalar loss, its kind in LOSS_KINDS)`` for the model's ``output``.

    ``loss_fn(output, targets)`` (or ``loss_fn(output)``) when given; else cross-entropy for integer
    ``targets``, MSE for floating ``targets`` of the first output's shape, and :func:`projection_loss`
    without targets. A loss that is not a one-element tensor is an :class:`~gradguard.errors.InputError`.
    """
    if loss_fn is None and targets is None:
        return projection_loss(output, seed), "projection"
    if loss_fn is not None:
        loss = loss_fn(output) if targets is None else loss_fn(output, targets)
        return check_scalar_loss(loss).reshape(()), "loss_fn"
    assert targets is not None
    tensors = float_tensors(output)
    if not tensors:
        raise InputError("the model output contains no floating-point tensor to compare with targets")
    if not targets.is_floating_point():
        return _cross_entropy(output, targets).reshape(()), "cross_entropy"
    if tuple(targets.shape) != tuple(tensors[0].shape):
        raise ConfigError(
            f"targets of shape {tuple(targets.shape)} do not match the output shape {tuple(tensors[0].shape)}; "
            "pass loss_fn= to say how to compare them"
        )
    return _mse(output, targets).reshape(()), "mse"
