"""Windowed statistics and the one definition of a spike, shared by the monitor's rules and the Guard.

A *window* is the last ``size`` values of one or more scalar series (loss, global gradient norm), kept on
the device in one ``(rows, size)`` tensor whose empty slots are NaN. A value ``x`` is a **spike** against a
window ``W`` of ``n`` finite values when all three hold (the reasoning is in docs/detection.md):

1. ``robust_zscore(x, W) > spike_threshold(z, n)``: as rare as a ``z``-σ Gaussian event, with the threshold
   corrected for a median and MAD estimated from only ``n`` values (Student-t prediction interval);
2. ``x > median(W) + min_excess · |median(W)|``: a plateau whose MAD is ~0 cannot turn a 1-ulp wobble into
   an infinite z-score;
3. ``x > m + (jump − 1) · |m|`` with ``m`` the largest of the last ``recent`` (8) values: a sudden jump to
   ``jump`` times the recent maximum, not a drift. Healthy training drifts (a deep net leaving its
   plateau, LR warm-up) and against a quiet window every step of such a climb is a many-MAD outlier; the
   recent maximum moves with the climb, so only a jump on top of it is a spike.

Different estimators keep different names: :class:`gradguard.clip.ZClip`'s EMA z-score is not this test.
"""

from __future__ import annotations

import bisect
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradguard.errors import StateError, check_number

#: Scale that makes the median absolute deviation a consistent estimator of σ for normal data.
MAD_TO_SIGMA = 1.4826
#: Asymptotic efficiency of the MAD as an estimator of a Gaussian σ (its variance is 1.3605·σ²/n against
#: σ²/(2n) for the standard deviation): a MAD from n points is worth about 0.3675·n points of a std.
MAD_EFFICIENCY = 0.3675


def robust_zscore(value: Tensor, window: Tensor, eps: float = 1e-12) -> Tensor:
    """Robust z-score ``z = (x − median(W)) / (1.4826 · MAD(W) + eps·|median(W)| + eps)`` along the last dim.

    ``MAD(W) = median(|W − median(W)|)``; NaN entries of ``W`` (empty slots) are ignored. The result is
    NaN when the window holds no finite value. Median/MAD, not mean/std, because a single spike inflates
    the std and hides the next one (Hampel's filter). ``value`` broadcasts against ``W``'s leading dims.
    """
    med = torch.nanmedian(window, dim=-1).values
    mad = torch.nanmedian((window - med.unsqueeze(-1)).abs(), dim=-1).values
    scale = MAD_TO_SIGMA * mad + eps * med.abs() + eps
    return (value.to(window) - med) / scale


def spike_threshold(z: float, n: int) -> float:
    """Robust z-score a new value must exceed to be as rare as a ``z``-σ Gaussian event, when the median
    and MAD it is scored against come from only ``n`` samples.

    ``T(z, n) = sqrt(1 + π/(2n)) · t⁻¹_ν(Φ(z))`` with ``ν = max(1, MAD_EFFICIENCY · (n − 1))``: the
    prediction-interval form of a studentised deviate. The scale is estimated, so the deviate follows
    Student's t with the degrees of freedom a MAD of n points is worth; ``πσ²/(2n)`` is the variance of
    the sample median. ``T → z`` as ``n → ∞``; with z = 6, ``T`` is 76 at n = 16, 9.6 at n = 64, 7.5 at
    n = 128. ``inf`` where no finite z-score is that rare.
    """
    return float(spike_thresholds(z, (n,))[0])


@functools.lru_cache(maxsize=64)
def spike_thresholds(z: float, counts: tuple[int, ...]) -> tuple[float, ...]:
    """:func:`spike_threshold` for several window sizes at once (vectorised bisection; cached)."""
    n = np.asarray(counts, dtype=np.float64)
    nu = np.maximum(1.0, MAD_EFFICIENCY * (n - 1.0))
    log_norm = np.array([math.lgamma((v + 1) / 2) - math.lgamma(v / 2) for v in nu]) - 0.5 * np.log(nu * math.pi)
    tail = 0.5 * math.erfc(z / math.sqrt(2.0))
    # log Φ̄(z); past z ≈ 37 erfc underflows and the asymptotic series is exact to double precision.
    target = math.log(tail) if tail > 0 else -z * z / 2 - math.log(z * math.sqrt(2 * math.pi)) + math.log1p(-1 / z**2)
    # t tails are heavier than the normal's, so the answer is ≥ z: bisection on log x over [z, 1e300]
    # (80 halvings: relative error below 1e-12).
    lo = np.full_like(nu, math.log(max(z, 1e-3)))
    hi = np.full_like(nu, math.log(1e300))
    unreachable = _log_t_survival(np.exp(hi), nu, log_norm) > target
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        above = _log_t_survival(np.exp(mid), nu, log_norm) > target
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    limits = np.where(unreachable, math.inf, np.sqrt(1.0 + math.pi / (2.0 * n)) * np.exp(hi))
    return tuple(limits.tolist())


@functools.cache
def _gauss_legendre() -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of a 256-point Gauss–Legendre rule on (0, 1), for the t-tail integral below
    (built on first use: ``import gradguard`` should not pay for it)."""
    x, w = np.polynomial.legendre.leggauss(256)
    return 0.5 * (x + 1.0), 0.5 * w


def _log_t_survival(x: np.ndarray, nu: np.ndarray, log_norm: np.ndarray) -> np.ndarray:
    """``log P(T > x)`` for Student's t with ``nu`` ≥ 1 degrees of freedom and ``x`` > 0, elementwise.

    ``∫ₓ^∞ f(t) dt = ∫₀¹ f(x/s) · x/s² ds`` (``t = x/s``): the integrand behaves like ``s^(ν−1)`` near 0
    and is smooth for ``ν ≥ 1``, so a fixed Gauss–Legendre rule is accurate. Evaluated in logs so that
    tails of 1e-300 do not underflow.
    """
    gl_x, gl_w = _gauss_legendre()
    x, nu, log_norm = x[:, None], nu[:, None], log_norm[:, None]
    log_t = np.log(x) - np.log(gl_x)
    log_f = log_norm - (nu + 1) / 2 * np.logaddexp(0.0, 2 * log_t - np.log(nu)) + np.log(x) - 2 * np.log(gl_x)
    m = log_f.max(axis=1, keepdims=True)
    return (m + np.log(np.sum(gl_w * np.exp(log_f - m), axis=1, keepdims=True)))[:, 0]


@dataclass(frozen=True)
class SpikeRule:
    """The spike test of this module's docstring, with its options validated once.

    Args:
        z: the Gaussian rarity a spike must reach (σ units), before the small-sample correction.
        min_history: finite window values needed before anything is judged.
        min_excess: a spike exceeds the window's median by at least this fraction of it.
        jump: a spike exceeds ``jump`` × the recent maximum ``m`` (``m + (jump − 1)·|m|``).
        recent: how many of the newest window values ``m`` is taken over.
    """

    z: float = 6.0
    min_history: int = 16
    min_excess: float = 0.1
    jump: float = 2.0
    recent: int = 8

    def __post_init__(self) -> None:
        check_number("spike_z", self.z, low=0.0, low_inclusive=False)
        check_number("min_history", self.min_history, low=2, integer=True)
        check_number("spike_min_excess", self.min_excess, low=0.0)
        check_number("spike_jump", self.jump, low=1.0)
        check_number("recent", self.recent, low=1, integer=True)

    def threshold(self, n: int) -> float:
        """The z-score limit for a window of ``n`` finite values (``inf`` below ``min_history``)."""
        return math.inf if n < self.min_history else spike_threshold(self.z, n)

    def test(self, current: Tensor, window: Window, limit: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(spike, z, median)`` of ``current[i]`` against row ``i`` of ``window``, on the device.

        ``limit`` is :meth:`threshold` of the window's size (a host float, so comparing does not sync).
        """
        z = robust_zscore(current, window.values)
        med = torch.nanmedian(window.values, dim=-1).values
        top = window.recent_max(self.recent)
        spike = (
            (z > limit)
            & (current > med + self.min_excess * med.abs())
            & (current > top + (self.jump - 1.0) * top.abs())
        )
        return spike, z, med

    def judge(self, value: float, median: float, mad: float, top: float, limit: float) -> tuple[bool, float]:
        """:meth:`test` of one value on host floats: ``(spike, z)`` given the window's median, its MAD and
        the recent maximum ``top`` (for a caller that keeps its window on the host, as the Guard does: its
        values reach the host with its one fetch per step, and a few float operations replace a dozen
        device kernels). ``z`` is :func:`robust_zscore`'s formula.
        """
        eps = 1e-12
        z = (value - median) / (MAD_TO_SIGMA * mad + eps * abs(median) + eps)
        spike = (
            z > limit
            and value > median + self.min_excess * abs(median)
            and value > top + (self.jump - 1.0) * abs(top)
        )
        return spike, z

    def scan(self, values: list[float], window: list[float]) -> list[tuple[bool, float, float]]:
        """Host-side convenience for the monitor's rules: ``(spike, z, x / median)`` of each value against
        the same window of finite floats, oldest first (never a spike below ``min_history`` values)."""
        if len(window) < self.min_history or not values:
            return [(False, math.nan, math.nan)] * len(values)
        ring = HostWindow(len(window), rows=1)
        for v in window:
            ring.push((v,))
        med, mad = ring.median_mad(0)
        top, limit = ring.recent_max(0, self.recent), self.threshold(len(window))
        out = []
        for x in values:
            spike, z = self.judge(x, med, mad, top, limit)
            out.append((spike, z, x / med if med > 0 else math.inf))
        return out


class Window:
    """The last ``size`` values of ``rows`` scalar series, as one ``(rows, size)`` device tensor.

    Empty slots are NaN and a pushed non-finite value is stored as NaN (an empty slot), so it never
    poisons later statistics. Pushing never synchronises: the slot comes from a host counter.
    """

    def __init__(
        self, size: int, *, rows: int = 1, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        self.size = int(check_number("size", size, low=2, integer=True))
        self.values = torch.full((rows, self.size), math.nan, dtype=dtype, device=device)
        self.pushes = 0

    def push(self, value: Tensor) -> None:
        """Store ``value`` (``rows`` numbers) in the oldest slot."""
        v = value.detach().reshape(-1).to(self.values)
        self.values[:, self.pushes % self.size] = torch.where(v.isfinite(), v, math.nan)
        self.pushes += 1

    def held(self) -> int:
        """Slots written so far (at most ``size``); a host counter, so reading it does not sync."""
        return min(self.pushes, self.size)

    def recent_max(self, k: int) -> Tensor:
        """Per row, the largest of the last ``k`` pushed values (of all of them while fewer were pushed).

        The slots come from the host counter: one or two slices and reductions, no index tensor, no sync.
        """
        k = min(k, self.held())
        end = self.pushes % self.size  # one past the newest slot
        if end >= k:
            return self.values[:, end - k : end].amax(1)
        older = self.values[:, self.size - (k - end) :].amax(1)  # wrapped: the oldest of the k are at the end
        return older if end == 0 else torch.maximum(older, self.values[:, :end].amax(1))

    def count(self) -> Tensor:
        """Finite values held per row."""
        return self.values.isfinite().sum(dim=-1)

    def state_dict(self) -> dict[str, Any]:
        """Explicit state, for checkpoints and rollback."""
        return {"values": self.values.clone(), "pushes": self.pushes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.values.copy_(state["values"])
        self.pushes = int(state["pushes"])


class RingBuffer(Window):
    """Deprecated alias of a one-row :class:`Window` (``RingBuffer(size)`` → ``Window(size)``); removed in 0.3."""

    def __init__(self, size: int, device: torch.device | str | None = None) -> None:
        warnings.warn("gradguard.stats.RingBuffer is deprecated; use gradguard.stats.Window(size)", DeprecationWarning,
                      stacklevel=2)
        super().__init__(size, device=device)


class HostWindow:
    """The last ``size`` values of ``rows`` scalar series as host floats (:class:`Window`'s host twin, for
    values that are on the host already: the Guard's fetched loss and gradient norm, the monitor's rows).

    Each row is kept twice: in push order (a ring of slots, for the recent maximum and for the state) and
    sorted (``bisect``), so the median is one index and the MAD a walk over half the window, with no
    array built per step. Callers push finite values (a non-finite one is left out of the sorted order but
    would still count in :meth:`recent_max`).
    """

    def __init__(self, size: int, rows: int) -> None:
        self.size = size
        self.slots = [[math.nan] * size for _ in range(rows)]
        self.sorted: list[list[float]] = [[] for _ in range(rows)]
        self.pushes = 0

    def push(self, values: Sequence[float]) -> None:
        """Store one value per row in the oldest slot."""
        slot = self.pushes % self.size
        for ring, order, v in zip(self.slots, self.sorted, values, strict=True):
            old = ring[slot]
            if math.isfinite(old):
                del order[bisect.bisect_left(order, old)]
            ring[slot] = v
            if math.isfinite(v):
                bisect.insort(order, v)
        self.pushes += 1

    def held(self) -> int:
        """Slots written so far (at most ``size``)."""
        return min(self.pushes, self.size)

    def median_mad(self, row: int) -> tuple[float, float]:
        """Median and median absolute deviation of a row's values, both the lower middle value as
        ``torch.nanmedian``'s (NaN when the row is empty).

        With ``s`` sorted and the median ``s[k]``, the deviations are two sorted runs outward from it,
        ``L_i = s[k] − s[k−i]`` and ``R_j = s[k+1+j] − s[k]``; the MAD is the largest of the ``k + 1``
        smallest of both, found by bisecting how many of them come from ``L``.
        """
        s = self.sorted[row]
        n = len(s)
        if n == 0:
            return math.nan, math.nan
        k = (n - 1) // 2
        med, take, right = s[k], k + 1, n - k - 1
        lo, hi = max(0, take - right), take  # i deviations from L, take − i from R
        while lo < hi:
            i = (lo + hi) // 2
            if med - s[k - i] < s[k + take - i] - med:  # L_i < R_(take−i−1): take more from L
                lo = i + 1
            else:
                hi = i
        from_l = med - s[k - lo + 1] if lo > 0 else -math.inf
        from_r = s[k + take - lo] - med if lo < take else -math.inf
        return med, max(from_l, from_r)

    def recent_max(self, row: int, k: int) -> float:
        """The largest of the row's last ``k`` pushed values."""
        ring, end = self.slots[row], self.pushes % self.size
        k = min(k, self.held())
        if end >= k:
            return max(ring[end - k : end])
        return max(ring[self.size - (k - end) :] + ring[:end])

    def state_dict(self) -> dict[str, Any]:
        """Explicit state: the slots as a CPU tensor (so ``torch.load(weights_only=True)`` reads it)."""
        return {"values": torch.tensor(self.slots, dtype=torch.float64), "pushes": self.pushes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a device ``gradguard.stats.Window``'s state is read too)."""
        values = torch.as_tensor(state["values"]).detach().to("cpu", torch.float64)
        if tuple(values.shape) != (len(self.slots), self.size):
            raise StateError(
                f"window state of shape {tuple(values.shape)} does not fit this window "
                f"({len(self.slots)} rows × {self.size} values)"
            )
        self.slots = values.tolist()
        self.pushes = int(state["pushes"])
        held = self.slots if self.pushes >= self.size else [ring[: self.pushes] for ring in self.slots]
        self.sorted = [sorted(v for v in ring if math.isfinite(v)) for ring in held]
