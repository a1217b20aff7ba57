"""Spectral radius of recurrent weights, plain and with the activation's derivative folded in.

For a simple recurrence ``h_t = f(W h_{t−1} + U x_t + b)`` back-propagation through time multiplies by
``diag(f'_t)·W`` each step, so the gradient's per-step factor is governed by the spectral radius
``ρ(W) = max_i |λ_i(W)|`` scaled by the typical derivative ``f'`` (Pascanu, Mikolov & Bengio 2013, "On the
difficulty of training recurrent neural networks"; docs/pathologies.md). ``ρ(W)·mean f' < 1`` predicts vanishing,
``> 1`` makes exploding possible.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradguard.errors import InputError, check_choice

#: Nonlinearities whose derivative can be read off their output ``y = f(z)``.
DERIVATIVE_FROM_OUTPUT = ("tanh", "sigmoid", "relu", "identity")


def spectral_radius(w: Tensor) -> Tensor:
    """``ρ(W) = max_i |λ_i(W)|`` of a square matrix, as a float32 0-d tensor on ``w``'s device.

    Uses a dense eigen-decomposition in float64 (``torch.linalg.eigvals``), exact up to round-off and
    cheap for recurrent sizes (a 1024×1024 matrix takes well under a second on a CPU core).

    >>> spectral_radius(torch.tensor([[0.0, 2.0], [-2.0, 0.0]]))
    tensor(2.)
    """
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise InputError(f"spectral_radius needs a square matrix, got shape {tuple(w.shape)}")
    eig = torch.linalg.eigvals(w.detach().double())
    return eig.abs().max().float()


def activation_derivative(y: Tensor, nonlinearity: str) -> Tensor:
    """Element-wise derivative ``f'(z)`` recovered from the output ``y = f(z)``.

    tanh: ``1 − y²``; sigmoid: ``y(1 − y)``; relu: ``1[y > 0]``; identity: 1.
    """
    check_choice("nonlinearity", nonlinearity, DERIVATIVE_FROM_OUTPUT)
    y = y.detach()
    if nonlinearity == "tanh":
        return 1.0 - y * y
    if nonlinearity == "sigmoid":
        return y * (1.0 - y)
    if nonlinearity == "relu":
        return (y > 0).to(y.dtype)
    return torch.ones_like(y)


def scaled_spectral_radius(w: Tensor, mean_derivative: Tensor | float) -> Tensor:
    """``ρ(mean f' · W) = mean f' · ρ(W)``: the per-step factor of back-propagation through time.

    ``mean_derivative`` is the average of ``f'`` over batch, time and units (see
    :func:`activation_derivative`); replacing ``diag(f'_t)`` by its mean is the usual first-order estimate.
    """
    return spectral_radius(w) * torch.as_tensor(mean_derivative, dtype=torch.float32, device=w.device)
