"""Weight penalties added to the loss: L2 (Krogh & Hertz 1992; weight decay for SGD)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradguard.errors import InputError, check_number
from gradguard.nn import NORM_LAYERS

__all__ = ["l2_penalty", "penalised_parameters"]


def penalised_parameters(
    model: nn.Module, *, exclude_bias: bool = True, exclude_norm: bool = True
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs the sum ``Σ w²`` of :func:`l2_penalty` runs over.

    A bias is any parameter whose own name starts with ``bias`` (``bias``, ``bias_ih_l0`` ...).
    Frozen parameters (``requires_grad=False``) are never penalised.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen = []
    for prefix, module in model.named_modules():
        if exclude_norm and isinstance(module, NORM_LAYERS):
            continue
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or (exclude_bias and name.startswith("bias")):
                continue
            chosen.append((f"{prefix}.{name}" if prefix else name, p))
    return chosen


def l2_penalty(model: nn.Module, lam: float, *, exclude_bias: bool = True, exclude_norm: bool = True) -> Tensor:
    """L2 weight penalty ``(λ/2)·Σ w²`` over the model's weights, to add to the loss: ``L = L0 + penalty``.

    Its gradient is ``λ·w``, i.e. plain weight decay for SGD (for Adam, ``AdamW``'s decoupled decay is not
    the same thing; Loshchilov & Hutter 2019). Biases and normalisation-layer parameters are excluded by
    default; shared parameters are counted once.

    Args:
        model: the network.
        lam: λ ≥ 0.
        exclude_bias: skip parameters named ``bias*``.
        exclude_norm: skip parameters of normalisation layers (:data:`gradguard.nn.NORM_LAYERS`).

    Returns:
        A 0-d tensor on the parameters' device, differentiable.

    >>> net = torch.nn.Linear(2, 1); _ = net.weight.data.fill_(3.0)
    >>> l2_penalty(net, 0.1)
    tensor(0.9000, grad_fn=<MulBackward0>)
    """
    check_number("lam", lam, low=0.0)
    params = penalised_parameters(model, exclude_bias=exclude_bias, exclude_norm=exclude_norm)
    unique = list({id(p): p for _, p in params}.values())
    if not unique:
        return torch.zeros(())
    # Σ over tensors of the dot product w·w: exact gradient λ·w even at w = 0 (a norm's gradient is not).
    total = torch.stack([torch.vdot(p.reshape(-1), p.reshape(-1)) for p in unique]).sum()
    return total * (lam / 2.0)
