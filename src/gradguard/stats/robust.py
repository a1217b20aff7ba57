"""Robust, NaN-proof statistics over a sliding window, kept on the device."""

from __future__ import annotations

import torch
from torch import Tensor

#: Scale that makes the median absolute deviation a consistent estimator of σ for normal data.
MAD_TO_SIGMA = 1.4826


class RingBuffer:
    """A fixed-size window of scalars on the device; empty slots and non-finite values are NaN.

    Pushing never synchronises: the write position is a host-side counter and the value is stored with
    ``torch.where`` so a NaN or Inf becomes an empty slot instead of poisoning later statistics.
    """

    def __init__(self, size: int, device: torch.device | str | None = None) -> None:
        self.size = int(size)
        self.values = torch.full((self.size,), float("nan"), dtype=torch.float32, device=device)
        self.pushes = 0

    def push(self, value: Tensor) -> None:
        """Store ``value`` (a 0-d tensor) in the oldest slot."""
        v = value.detach().reshape(()).to(self.values)
        v = torch.where(torch.isfinite(v), v, torch.full_like(v, float("nan")))
        self.values[self.pushes % self.size] = v
        self.pushes += 1

    def count(self) -> Tensor:
        """Number of finite values held (0-d tensor)."""
        return torch.isfinite(self.values).sum()

    def state_dict(self) -> dict[str, object]:
        """Explicit state, for checkpoints and rollback."""
        return {"values": self.values.clone(), "pushes": self.pushes}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` returned."""
        values = state["values"]
        assert isinstance(values, Tensor)
        self.values.copy_(values)
        self.pushes = int(state["pushes"])  # type: ignore[call-overload]


def robust_zscore(value: Tensor, window: Tensor, eps: float = 1e-12) -> Tensor:
    """Robust z-score ``z = (x − median(W)) / (1.4826 · MAD(W) + eps·|median(W)| + eps)``.

    ``MAD(W) = median(|W − median(W)|)``; NaN entries of ``W`` (empty slots) are ignored. The result is
    NaN when the window holds no finite value, so callers must require a minimum count before acting.
    A non-finite ``value`` gives a non-finite z. Median/MAD are used instead of mean/std because a single
    spike inflates the std and hides the next one (Hampel's filter).
    """
    med = torch.nanmedian(window)
    mad = torch.nanmedian((window - med).abs())
    scale = MAD_TO_SIGMA * mad + eps * med.abs() + eps
    return (value.to(window) - med) / scale
