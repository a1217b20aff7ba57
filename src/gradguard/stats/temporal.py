"""Profiles over time steps: per-step norms, the per-step growth factor and the gradient horizon.

Back-propagation through time multiplies the gradient by one Jacobian ``∂h_t/∂h_{t−1} = diag(f'_t)·W``
per step (Pascanu et al. 2013; docs/pathologies.md), so the norm of ``∂L/∂h_{t−k}`` behaves like ``c·g^k``
for some per-step growth factor ``g``: vanishing when ``g < 1``, exploding when ``g > 1``. These functions
measure ``g`` and how far back the gradient stays usable from such a profile. All of them take and return
tensors and never synchronise with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Default relative level below which a gradient no longer carries usable signal (the horizon's cut-off).
HORIZON_THRESHOLD = 1e-3

#: Points of a profile below this fraction of the peak are left out of the growth fit: in float32 they
#: are dominated by round-off (ε ≈ 1.2e−7) rather than by the Jacobian product.
FIT_FLOOR = 1e-6


def time_step_norms(x: Tensor, time_dim: int) -> Tensor:
    """L2 norm of each time slice, ``n_t = ‖x[..., t, ...]‖₂`` over every dimension but ``time_dim``.

    Returns a float32 vector of length ``x.shape[time_dim]`` on ``x``'s device (accumulated in float64, so
    it is finite whenever the norm itself fits in float32); non-finite entries propagate into their step's
    norm.

    >>> time_step_norms(torch.ones(2, 3, 4), time_dim=1)
    tensor([2.8284, 2.8284, 2.8284])
    """
    x = x.detach()
    steps = x.shape[time_dim]
    flat = x.movedim(time_dim, 0).reshape(steps, -1)
    # Accumulate in float64: an exploding gradient's Σx² overflows float32 long before its norm does.
    return torch.linalg.vector_norm(flat, 2, dim=1, dtype=torch.float64).float()


def _steps_back(norms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Peak index ``p`` (of the finite entries), relative profile ``n_t / n_p`` and ``k = p − t``."""
    n = norms.detach().float().reshape(-1)
    finite = n.isfinite()
    # argmax over finite entries only; a profile with no finite entry gives peak 0 and NaN everywhere.
    peak_idx = torch.where(finite, n, n.new_full((), -1.0)).argmax()
    rel = n / n[peak_idx]
    k = peak_idx - torch.arange(n.numel(), device=n.device)
    return peak_idx, rel, k


def gradient_horizon(norms: Tensor, threshold: float = HORIZON_THRESHOLD) -> Tensor:
    """How many steps back from its peak a gradient profile stays at or above ``threshold`` × the peak.

    With ``p = argmax_t n_t`` and ``r_k = n_{p−k} / n_p``, let ``k₀`` be the first ``k ≥ 1`` with
    ``r_k < threshold``. The horizon is ``k₀ − 1`` plus the log-linear interpolation
    ``(ln r_{k₀−1} − ln threshold) / (ln r_{k₀−1} − ln r_{k₀})`` of where the profile crosses the
    threshold, a float in ``[k₀ − 1, k₀)``. If the profile never falls below it, the horizon is ``p``
    itself (the gradient reached the first step), which callers detect as ``horizon == argmax``.
    A non-finite entry between the first step and the peak counts as usable signal (it is above any
    threshold); the result is NaN when no entry is finite or the peak is 0.

    >>> gradient_horizon(torch.tensor([1e-4, 1e-2, 1.0]))  # 0.01 at k=1, 1e-4 at k=2
    tensor(1.5000)
    """
    peak_idx, rel, k = _steps_back(norms)
    # NaN compares False, so map it to +inf: a NaN step does not end the horizon (it is not "small").
    rel_ok = torch.where(rel.isnan(), torch.full_like(rel, float("inf")), rel)
    below = (k >= 1) & (rel_ok < threshold)
    big = torch.full_like(rel, float(norms.numel() + 1))
    k0 = torch.where(below, k.float(), big).min()
    never = k0 > norms.numel()
    k0_idx = (peak_idx - k0.clamp(max=float(norms.numel())).long()).clamp(min=0)
    prev_idx = (k0_idx + 1).clamp(max=norms.numel() - 1)
    log_prev = rel_ok[prev_idx].clamp(min=threshold).log()
    log_below = rel_ok[k0_idx].log()
    frac = (log_prev - torch.log(torch.tensor(threshold, device=rel.device))) / (log_prev - log_below)
    # ln(0) = −inf makes frac exactly 0 for a profile that falls to zero, which is the right limit.
    frac = torch.nan_to_num(frac, nan=0.0).clamp(0.0, 1.0 - 1e-6)
    horizon = torch.where(never, peak_idx.float(), k0 - 1.0 + frac)
    bad = ~(norms.detach().float().isfinite().any()) | (norms.detach().float().reshape(-1)[peak_idx] <= 0)
    return torch.where(bad, torch.full_like(horizon, float("nan")), horizon)


def growth_factor(norms: Tensor, floor: float = FIT_FLOOR) -> Tensor:
    """Per-step growth factor ``g`` of a gradient profile going back in time from its peak.

    Fits ``ln n_{p−k} = a + k·ln g`` by ordinary least squares over ``k = 0, 1, ...`` from the peak ``p``
    back to the first step, keeping only the points whose norm is finite and at least ``floor`` × the
    peak. ``g < 1``: the gradient shrinks by that factor per step back (vanishing); ``g > 1``: it grows.
    Returns NaN with fewer than two usable points. When the peak is at the first step (the gradient
    grows all the way back) the fit runs over the steps *after* the peak, reversed, i.e. it is the
    factor by which the gradient grows per step back as well.

    >>> growth_factor(torch.tensor([0.125, 0.25, 0.5, 1.0]))
    tensor(0.5000)
    """
    n = norms.detach().float().reshape(-1)
    steps = torch.arange(n.numel(), device=n.device).float()
    peak_idx, rel, _ = _steps_back(n)
    last = n.numel() - 1
    # Backward-in-time axis: k = last − t, so that the slope is always "per step back".
    k = last - steps
    before_peak = steps <= peak_idx
    after_peak = steps >= peak_idx
    use_before = peak_idx > 0
    side = torch.where(use_before, before_peak, after_peak)
    ok = side & n.isfinite() & (n > 0) & (rel >= floor)
    w = ok.float()
    y = torch.where(ok, n.clamp(min=torch.finfo(torch.float32).tiny).log(), torch.zeros_like(n))
    count = w.sum()
    k_mean = (w * k).sum() / count.clamp(min=1.0)
    y_mean = (w * y).sum() / count.clamp(min=1.0)
    cov = (w * (k - k_mean) * (y - y_mean)).sum()
    var = (w * (k - k_mean) ** 2).sum()
    slope = cov / var
    g = slope.exp()
    return torch.where(count >= 2, g, torch.full_like(g, float("nan")))
