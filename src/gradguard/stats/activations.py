"""Summaries of a module's output: scale, sparsity, saturation and per-unit activity."""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Output summary fields, in the order :func:`activation_summary` returns them.
SUMMARY_FIELDS: tuple[str, ...] = ("mean", "std", "frac_zero", "frac_saturated", "nonfinite", "numel")

#: Saturation is where the activation's derivative is below ~4% of its peak:
#: sigmoid: y(1−y) < 0.0099 (peak 0.25) when y < 0.01 or y > 0.99; tanh: 1 − y² < 0.02 when |y| > 0.99.
SATURATION_MARGIN = 0.01

_SIGMOID_LIKE = (nn.Sigmoid, nn.Hardsigmoid)
_TANH_LIKE = (nn.Tanh, nn.Hardtanh, nn.Softsign)


def saturation_kind(module: nn.Module) -> str | None:
    """``"sigmoid"`` for outputs in (0, 1), ``"tanh"`` for outputs in (−1, 1), else ``None``."""
    if isinstance(module, _SIGMOID_LIKE):
        return "sigmoid"
    if isinstance(module, _TANH_LIKE):
        return "tanh"
    return None


def activation_summary(x: Tensor, saturation: str | None = None) -> Tensor:
    """Summary of a tensor as a float32 vector ordered as :data:`SUMMARY_FIELDS`.

    ``mean`` and ``std`` (population, ddof=0) are over the finite entries only, so one NaN does not hide
    the scale of the rest; ``frac_zero`` counts exact zeros (dead ReLU outputs); ``frac_saturated`` is
    the share of entries in the flat region of ``saturation`` (see :data:`SATURATION_MARGIN`), 0 when
    ``saturation`` is None; ``nonfinite`` counts NaN/Inf entries.
    Moments are taken of ``x / max|x|`` and scaled back, so that outputs beyond float32's square range
    (|x| > 1.8e19) still get a finite std.
    """
    x = x.detach().float().reshape(-1)
    finite = x.isfinite()
    n_finite = finite.sum().float()
    xf = x.where(finite, x.new_zeros(()))
    denom = n_finite.clamp(min=1.0)
    # Moments of x / s with s = max |x| over the finite entries, scaled back: float32 squares overflow
    # beyond |x| ≈ 1.8e19, exactly the outputs of a blowing-up layer whose scale we must report.
    scale = xf.abs().amax().clamp(min=torch.finfo(torch.float32).tiny) if x.numel() else x.new_ones(())
    xs = xf / scale
    mean_s = xs.sum() / denom
    var_s = ((xs - mean_s) ** 2).where(finite, x.new_zeros(())).sum() / denom
    mean, std = mean_s * scale, var_s.sqrt() * scale
    frac_zero = (x == 0).sum().float() / max(x.numel(), 1)
    if saturation == "sigmoid":
        sat = ((x < SATURATION_MARGIN) | (x > 1 - SATURATION_MARGIN)) & finite
    elif saturation == "tanh":
        sat = (x.abs() > 1 - SATURATION_MARGIN) & finite
    else:
        sat = torch.zeros_like(x, dtype=torch.bool)
    frac_sat = sat.sum().float() / denom
    nonfinite = x.numel() - n_finite
    numel = x.new_tensor(float(x.numel()))
    return torch.stack([v.reshape(()).float() for v in (mean, std, frac_zero, frac_sat, nonfinite, numel)])


def unit_activity(x: Tensor, unit_dim: int = -1) -> Tensor:
    """Per-unit count of strictly positive entries, reducing every dimension but ``unit_dim``.

    A unit (feature of a Linear output, channel of a Conv output) whose count stays 0 over a window of
    batches never fired: a dead ReLU. Use ``unit_dim=1`` for channels-first convolution outputs.
    """
    x = x.detach()
    pos = (x > 0).movedim(unit_dim, -1).reshape(-1, x.shape[unit_dim])
    return pos.sum(0).float()

