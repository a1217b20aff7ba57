"""Gradient clipping policies: objects with explicit state that measure, clip in place, and report.

Every policy is called on a parameter iterable after ``loss.backward()`` and before ``optimizer.step()``::

    policy = gg.clip.ZClip()
    result = policy(model.parameters())   # ClipResult(norm_before, norm_after, threshold, clipped)

Measuring and acting happen in one call and the measurement is returned, never thrown away. Every
decision stays on the device: a policy never calls ``.item()`` and never branches in Python on a tensor
value, so it adds no host synchronisation to a training step. The only Python branches are on host-side
counters (e.g. "is this still ZClip's warm-up?"), which the host knows without asking
the device.

Non-finite gradients: the clipping arithmetic matches PyTorch (a NaN norm makes every gradient NaN, an Inf
norm zeroes the finite entries), but a non-finite norm is never written into a policy's history, so one bad
step does not poison later thresholds. :class:`gradguard.Guard` skips such steps anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gradguard.errors import ConfigError, InputError, check_choice, check_number
from gradguard.stats import tensor_norms, total_norm
from gradguard.stats.distributed import is_dtensor

__all__ = [
    "AGC",
    "POLICIES",
    "AutoClip",
    "ClipNorm",
    "ClipPolicy",
    "ClipResult",
    "ClipValue",
    "PolicyInfo",
    "ZClip",
    "make_policy",
]

#: Added to a norm before dividing by it, exactly as ``torch.nn.utils.clip_grad_norm_`` does.
NORM_EPS = 1e-6


class ClipResult(NamedTuple):
    """What a policy measured and did, as 0-d tensors on the gradients' device (nothing synced).

    Attributes:
        norm_before: global norm of the gradients before clipping (the policy's ``norm_type``, 2 by default).
        norm_after: global norm after clipping.
        threshold: the limit applied this step: a norm for norm-based policies (``inf`` = no limit), the
            element bound ``c`` for :class:`ClipValue`, the ratio λ for :class:`AGC`, and the largest
            per-tensor limit for per-tensor policies.
        clipped: bool, True when any gradient was changed; also True when the norm is not finite (the
            gradients could not be bounded), so a NaN never reads as "nothing to do".
    """

    norm_before: Tensor
    norm_after: Tensor
    threshold: Tensor
    clipped: Tensor


def _collect(parameters: Iterable[Tensor] | Tensor) -> list[Tensor]:
    """Materialise ``parameters`` once, refusing what cannot be clipped.

    An empty iterable is an error rather than a silent no-op: the usual cause is a generator such as
    ``model.parameters()`` that was already consumed by an earlier pass.
    """
    if isinstance(parameters, Tensor):
        return [parameters]
    if not isinstance(parameters, Iterable):
        raise InputError(f"parameters must be a tensor or an iterable of tensors, got {type(parameters).__name__}")
    params = list(parameters)
    if not params:
        raise ConfigError(
            "parameters is empty; a generator such as model.parameters() can be iterated only once — "
            "pass model.parameters() afresh each call, or list(model.parameters())"
        )
    for p in params:
        if not isinstance(p, Tensor):
            raise InputError(f"parameters must hold tensors, got an element of type {type(p).__name__}")
    return params


def _grads(parameters: Iterable[Tensor] | Tensor) -> list[Tensor]:
    return [p.grad for p in _collect(parameters) if p.grad is not None]


def _plain(t: Tensor) -> Tensor:
    """A DTensor result (from FSDP2-sharded gradients) as the plain full tensor, equal on every rank.

    Guard fetches a ClipResult to the host, which a DTensor refuses; ``full_tensor()`` is a no-op
    redistribution for replicated values and an all-reduce for partial ones (FSDP2 integration).
    """
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _empty_result(norm_type: float, threshold: float) -> ClipResult:
    zero = torch.zeros(())
    return ClipResult(zero, zero.clone(), torch.tensor(float(threshold)), torch.tensor(False))


def _check_norm_type(norm_type: float) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, int | float) or not norm_type > 0:
        raise ConfigError(f"norm_type={norm_type!r} is not allowed; use a number > 0 or float('inf')")
    return float(norm_type)


def _coef(norm: Tensor, limit: Tensor | float) -> tuple[Tensor, Tensor]:
    """Scale factor ``c / (‖g‖ + 1e-6)`` where ``‖g‖`` exceeds the limit c, else exactly 1; and the flag.

    PyTorch uses ``min(1, c / (‖g‖ + 1e-6))``, which also shrinks norms in the band (c − 1e-6, c] by up
    to 1e-6/c relative; taking 1 there leaves gradients already within the limit untouched and is
    otherwise identical. A NaN norm counts as over the limit so the factor is NaN, as in PyTorch.
    """
    over = ~(norm <= limit)
    return torch.where(over, limit / (norm + NORM_EPS), 1.0), over


def _by_device(grads: list[Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault(g.device, []).append(i)
    return groups


def _mul_(grads: list[Tensor], coef: Tensor) -> None:
    """``g ← coef · g`` for every gradient, one fused kernel per device (as torch's clip groups them)."""
    for device, idx in _by_device(grads).items():
        torch._foreach_mul_([grads[i] for i in idx], coef.to(device))


def _scale_(grads: list[Tensor], coefs: Tensor) -> None:
    """Multiply each gradient by its own coefficient (a vector with one entry per gradient), fused per device."""
    groups = _by_device(grads)
    if len(groups) == 1:  # the usual case: one unbind instead of a Python index per gradient
        torch._foreach_mul_(grads, coefs.to(grads[0].device).unbind())
        return
    for device, idx in groups.items():
        local = coefs.to(device)
        torch._foreach_mul_([grads[i] for i in idx], [local[i] for i in idx])


class ClipPolicy:
    """Base class: ``__call__(parameters) -> ClipResult``, ``state_dict()``, ``load_state_dict()``."""

    #: Registry name (see :data:`POLICIES`).
    name: str = ""

    def __call__(self, parameters: Iterable[Tensor] | Tensor) -> ClipResult:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Explicit state: options and any history, as plain values and tensors."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class ClipValue(ClipPolicy):
    """Element-wise clipping ``g ← clamp(g, −c, c)`` (Keras ``clipvalue``).

    Same arithmetic as ``torch.nn.utils.clip_grad_value_`` (NaN stays NaN, ±Inf becomes ±c).
    ``threshold`` in the result is ``c``; ``clipped`` is True when some ``|g| > c``; the norms are
    ``norm_type`` norms of all gradients before and after.

    >>> w = torch.nn.Parameter(torch.zeros(3)); w.grad = torch.tensor([-3.0, 0.2, 5.0])
    >>> ClipValue(1.0)([w]).clipped, w.grad
    (tensor(True), tensor([-1.0000,  0.2000,  1.0000]))
    """

    name = "value"

    def __init__(self, clip_value: float, norm_type: float = 2.0) -> None:
        self.clip_value = float(check_number("clip_value", clip_value, low=0.0, low_inclusive=False))
        self.norm_type = _check_norm_type(norm_type)

    def __call__(self, parameters: Iterable[Tensor] | Tensor) -> ClipResult:
        grads = _grads(parameters)
        if not grads:
            return _empty_result(self.norm_type, self.clip_value)
        before = total_norm(tensor_norms(grads, self.norm_type), self.norm_type)
        # max |g| from one min/max pass per tensor: no gradient-sized temporary (an |g| copy costs a fresh
        # allocation on CPU) and the fused inf-norm kernel is ~15x slower than this on CPU.
        extremes = torch.stack([torch.stack(torch.aminmax(g)) for g in grads])
        peak = torch.maximum(extremes[:, 1].max(), -extremes[:, 0].min())
        torch._foreach_clamp_min_(grads, -self.clip_value)
        torch._foreach_clamp_max_(grads, self.clip_value)
        after = total_norm(tensor_norms(grads, self.norm_type), self.norm_type)
        threshold = torch.full((), self.clip_value, device=before.device)
        return ClipResult(before, after, threshold, _plain(~(peak <= self.clip_value)))

    def state_dict(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value, "norm_type": self.norm_type}


class ClipNorm(ClipPolicy):
    """Norm clipping ``g ← g · c / (‖g‖_p + 1e-6)`` when ``‖g‖_p > c`` (Pascanu et al. 2013).

    ``per="global"``: one norm over all gradients, as ``torch.nn.utils.clip_grad_norm_`` and Keras
    ``global_clipnorm``; results are identical to torch's for every ``norm_type`` including ``inf`` and
    non-finite gradients (outside the 1e-6-wide band described in :func:`_coef`). ``per="tensor"``: each
    tensor is clipped by its own norm, as Keras ``clipnorm``, which changes the direction of
    the overall update but keeps one exploding layer from shrinking the others' steps.

    Args:
        max_norm: c > 0.
        norm_type: p (``float('inf')`` for the max-norm).
        per: ``"global"`` or ``"tensor"``.
    """

    name = "norm"

    def __init__(self, max_norm: float, norm_type: float = 2.0, per: str = "global") -> None:
        self.max_norm = float(check_number("max_norm", max_norm, low=0.0, low_inclusive=False))
        self.norm_type = _check_norm_type(norm_type)
        self.per = check_choice("per", per, ("global", "tensor"))

    def __call__(self, parameters: Iterable[Tensor] | Tensor) -> ClipResult:
        grads = _grads(parameters)
        if not grads:
            return _empty_result(self.norm_type, self.max_norm)
        norms = tensor_norms(grads, self.norm_type)
        before = total_norm(norms, self.norm_type)
        if self.per == "global":
            # Multiply unconditionally, as torch does: an `if clipped:` would force a device sync.
            coef, clipped = _coef(before, self.max_norm)
            _mul_(grads, coef)
            after = before * coef
        else:
            coefs, over = _coef(norms, self.max_norm)
            _scale_(grads, coefs)
            after = total_norm(norms * coefs, self.norm_type)
            clipped = over.any()
        threshold = torch.full((), self.max_norm, device=before.device)
        return ClipResult(before, after, threshold, clipped)

    def state_dict(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type, "per": self.per}


#: Stand-in for +inf in a history (see :class:`_History`): the largest float32, so that differences of
#: stored values stay finite (inf − inf would be NaN).
_HELD_INF = torch.finfo(torch.float32).max
#: Windows of at least this many values take the incremental order statistic (:func:`_next_order_stat`);
#: smaller ones are cheaper to select afresh. Measured on CPU (1 thread): a 40 × 1000 window costs
#: ~500 µs by two ``topk`` against ~200 µs incrementally; a 1 × 1000 window ~20 µs against ~100 µs.
_INCREMENTAL_MIN = 4096


class _History:
    """Norm history on the device: one row per column (tensor), one slot per call, float32.

    The write position and the number of filled slots are host-side counters (as in
    :class:`gradguard.stats.Window`), so the quantile's interpolation position is computed on the
    host. ``capacity=None`` grows without bound (doubling). A non-finite norm counts as ``+inf``: it is a
    very large norm, so it can only raise a high quantile, never turn the threshold into NaN. It is held
    as the largest float32 (:data:`_HELD_INF`) and reported as ``inf``.

    The lower order statistic of the quantile is found by selection (:func:`_order_stats`) or, once a
    large ring is full, updated from the previous call's (:func:`_next_order_stat`); the upper neighbour
    then follows from it (:func:`_next_above`). Both ways give the same values bit for bit.
    """

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.values: Tensor | None = None  # (columns, slots)
        self.pushes = 0
        self._lower: tuple[int, int, Tensor] | None = None  # (pushes, position, order statistic)

    def push(self, row: Tensor) -> None:
        row = row.detach().float().reshape(-1)
        row = _held(row)
        if self.values is None or self.values.shape[0] != row.numel():
            slots = self.capacity if self.capacity is not None else 64
            self.values = torch.zeros((row.numel(), slots), device=row.device)
            self.pushes = 0
            self._lower = None
        elif self.capacity is None and self.pushes >= self.values.shape[1]:
            self.values = torch.cat([self.values, torch.zeros_like(self.values)], dim=1)
        self.values[:, self.pushes % self.values.shape[1]] = row
        self.pushes += 1

    def quantile(self, q: float) -> Tensor:
        """Per-column q-quantile with linear interpolation, as ``numpy.percentile`` / ``torch.quantile``.

        With the n recorded values sorted, position ``q·(n−1)`` is interpolated between its neighbours.
        """
        assert self.values is not None and self.pushes > 0
        slots = self.values.shape[1]
        n = min(self.pushes, slots)
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        held = self.values[:, :n]
        last = self._lower
        above: Tensor | None = None
        if last is not None and last[:2] == (self.pushes, lo):
            below = last[2]
        elif last is not None and last[1] == lo and last[0] == self.pushes - 1 and last[0] >= slots:
            # The ring was full at the last call and one push has replaced one value per column since.
            below = _next_order_stat(held, last[2], lo)
        else:
            below, above = _order_stats(held, lo, hi)
        if self.capacity is not None and held.numel() >= _INCREMENTAL_MIN:
            self._lower = (self.pushes, lo, below)
        weight = pos - lo
        if weight == 0.0:  # a host float: no interpolation, and no 0 · inf
            return _reported(below)
        if above is None:
            above = _next_above(held, below, hi)
        # An infinite upper neighbour makes the quantile infinite (interpolating towards it would give a
        # huge finite number, and torch.lerp gives NaN for inf − inf).
        return torch.where(above == _HELD_INF, math.inf, torch.lerp(below, above, weight))

    def state_dict(self) -> dict[str, Any]:
        """``values``: ``(slots, columns)`` with ``inf`` for non-finite norms; ``pushes``: calls so far."""
        return {"values": None if self.values is None else _reported(self.values).t().clone(), "pushes": self.pushes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = state["values"]
        self.values = None if values is None else _held(values).t().contiguous()
        self.pushes = int(state["pushes"])
        self._lower = None


def _held(norms: Tensor) -> Tensor:
    """Norms as a history holds them: NaN and ±inf become :data:`_HELD_INF` (one kernel; isfinite + where
    took ~35 µs per call on CPU)."""
    return torch.nan_to_num(norms, nan=_HELD_INF, posinf=_HELD_INF, neginf=_HELD_INF)


def _reported(held: Tensor) -> Tensor:
    """The inverse of :func:`_held` for reading out: :data:`_HELD_INF` becomes ``inf``."""
    return torch.where(held == _HELD_INF, math.inf, held)


def _order_stats(held: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """The ``lo``-th and ``hi``-th smallest values (0-based, ``hi`` is ``lo`` or ``lo + 1``) of each row.

    Selected, not sorted: ``topk`` keeps the smaller tail that holds both positions (the ``n − lo``
    largest, or the ``hi + 1`` smallest) unsorted, and a second ``topk`` of 2 on that tail reads the two
    neighbours. Re-sorting a 1000-value history on every call cost ~15× more than this on CPU.
    """
    n = held.shape[1]
    if n - lo <= hi + 1:
        tail = held.topk(n - lo, dim=1, sorted=False).values  # sorted positions lo … n−1
        two = tail.topk(min(2, n - lo), dim=1, largest=False).values  # ascending: lo, lo + 1
        return two[:, 0], two[:, -1]
    tail = held.topk(hi + 1, dim=1, largest=False, sorted=False).values  # sorted positions 0 … hi
    two = tail.topk(2, dim=1).values  # descending: hi, hi − 1 = lo
    return two[:, 1], two[:, 0]


def _signs(held: Tensor, pivot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``s = sign(pivot − held)`` per entry (+1 below the row's pivot, 0 equal, −1 above) and, per row,
    ``Σs`` = (#below − #above) and ``Σ|s|`` = (#below + #above).

    Float arithmetic throughout: on CPU, comparisons into bool tensors and ``torch.where`` on them cost
    5–20× more per element than ``sub``/``sign``/``sum``. ``x − y`` is 0 only when ``x = y`` (gradual
    underflow), and held values lie in [0, max float32], so no difference overflows.
    """
    s = torch.sign(pivot[:, None] - held)
    return s, s.sum(1), s.abs().sum(1)


def _successor(held: Tensor, s: Tensor) -> Tensor:
    """Per row, the smallest entry above the pivot of ``s``: entries at or below it are pushed to
    ≥ the largest float32 (``+ (s + 1)·max``; the entries above get ``+ 0``, exactly themselves)."""
    return torch.add(held, s + 1.0, alpha=_HELD_INF).amin(1)


def _next_order_stat(held: Tensor, last: Tensor, k: int) -> Tensor:
    """The k-th smallest entry of each row, given ``last``: the k-th smallest before one entry per row
    was replaced (a full ring, one push).

    Replacing one entry moves every rank by at most one, so the new k-th value is ``last``, the largest
    entry below it or the smallest entry above it. With b = #(< last) and e = #(≤ last) counted now: if
    b > k it is the predecessor (then b = k + 1), if e ≤ k the successor (then e = k), else ``last``
    itself. Ties, zeros and held infinities are all exact (no arithmetic on the selected values).
    """
    n = held.shape[1]
    s, net, unequal = _signs(held, last)
    # #(< last) = (Σ|s| + Σs)/2 > k, and #(≤ last) = n − (Σ|s| − Σs)/2 ≤ k.
    use_pred = unequal + net > 2 * k
    use_succ = unequal - net >= 2 * (n - k)
    # Largest entry below the pivot: entries at or above it are pushed to ≤ −(largest float32) + x ≤ 0.
    pred = torch.sub(held, 1.0 - s, alpha=_HELD_INF).amax(1)
    return torch.where(use_pred, pred, torch.where(use_succ, _successor(held, s), last))


def _next_above(held: Tensor, lower: Tensor, k: int) -> Tensor:
    """The k-th smallest entry of each row, given ``lower``: the (k−1)-th smallest — itself if it occurs
    more than k times at or below it (#(≤ lower) > k), otherwise the smallest entry above it."""
    n = held.shape[1]
    s, net, unequal = _signs(held, lower)
    return torch.where(unequal - net < 2 * (n - k), lower, _successor(held, s))


class AutoClip(ClipPolicy):
    """AutoClip (Seetharaman et al. 2020): clip to the p-th percentile of the history of gradient norms.

    Default (the paper and its reference code): each step appends the current global 2-norm to the
    history, then clips to ``percentile(history, p)``, so the current norm takes part in its own
    threshold and the first step is never clipped (the percentile of one value is itself). ``history=None``
    keeps every step, as the paper does; an integer keeps the last ``history`` steps.

    ``include_current=False`` and ``per="tensor"`` give the semantics of the ``autoclip`` package's
    ``QuantileClip`` (see :meth:`quantile_clip`): the threshold is the quantile of the *previous* norms
    only (no clipping at all on the first step), and with ``per="tensor"`` each tensor keeps its own
    history and threshold. The difference matters after a jump: the paper's rule lets a spike raise its
    own threshold a little, QuantileClip's does not.

    A non-finite norm is recorded as ``+inf`` (a huge norm: it can raise a high quantile, never make it
    NaN; the package would record NaN and stop clipping for the rest of the window). With
    ``per="tensor"`` the columns follow the order of the tensors that have a gradient; if that set changes
    between calls (a frozen layer, an unused branch) the history starts afresh.

    Args:
        percentile: p in [0, 100].
        history: number of past norms kept (``None``: all).
        include_current: the paper's rule (True) or QuantileClip's (False).
        per: ``"global"`` or ``"tensor"``.
    """

    name = "autoclip"

    def __init__(
        self,
        percentile: float = 10.0,
        history: int | None = None,
        include_current: bool = True,
        per: str = "global",
    ) -> None:
        self.percentile = float(check_number("percentile", percentile, low=0.0, high=100.0))
        if history is not None:
            check_number("history", history, low=1, integer=True)
        self.history = history
        self.include_current = bool(include_current)
        self.per = check_choice("per", per, ("global", "tensor"))
        self._history = _History(history)

    @classmethod
    def quantile_clip(
        cls, quantile: float = 0.9, history_length: int = 1000, global_threshold: bool = False
    ) -> AutoClip:
        """The ``autoclip`` package's ``QuantileClip(quantile, history_length, global_threshold)``."""
        check_number("quantile", quantile, low=0.0, high=1.0)
        return cls(
            percentile=100.0 * quantile,
            history=history_length,
            include_current=False,
            per="global" if global_threshold else "tensor",
        )

    def __call__(self, parameters: Iterable[Tensor] | Tensor) -> ClipResult:
        grads = _grads(parameters)
        if not grads:
            return _empty_result(2.0, math.inf)
        norms = tensor_norms(grads, 2.0)
        before = total_norm(norms, 2.0)
        current = before.reshape(1) if self.per == "global" else norms
        q = self.percentile / 100.0
        if self.include_current:
            self._history.push(current)
            limit = self._history.quantile(q)
        elif self._history.pushes == 0:
            limit = torch.full_like(current, math.inf)
            self._history.push(current)
        else:
            limit = self._history.quantile(q)
            self._history.push(current)
        coefs, over = _coef(current, limit)
        if self.per == "global":
            # One-element vectors: 0-d views, not reductions (each kernel is a few µs on CPU).
            coef = coefs.reshape(())
            _mul_(grads, coef)
            return ClipResult(before, before * coef, limit.reshape(()), over.reshape(()))
        _scale_(grads, coefs)
        return ClipResult(before, total_norm(norms * coefs, 2.0), limit.max(), over.any())

    def state_dict(self) -> dict[str, Any]:
        return {
            "percentile": self.percentile,
            "history": self.history,
            "include_current": self.include_current,
            "per": self.per,
            "norms": self._history.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history.load_state_dict(state["norms"])


class AGC(ClipPolicy):
    """Adaptive gradient clipping, unit-wise (Brock, De, Smith & Simonyan 2021, NFNets).

    For each unit i (one output row of a Linear weight, one filter of a Conv weight; a whole bias or
    other 1-d tensor is one unit)::

        if ‖G_i‖ / max(‖W_i‖, eps) > λ:   G_i ← λ · max(‖W_i‖, eps) / ‖G_i‖ · G_i

    The paper does not clip the final linear layer; pass it in ``exclude`` (modules or parameters), e.g.
    ``AGC(0.01, exclude=[model.head])``. Excluded parameters are neither measured nor clipped.

    ``threshold`` in the result is λ; norms are global 2-norms of the included gradients.

    Args:
        clip_factor: λ > 0 (0.01 in the paper for batch 4096; larger for small batches).
        eps: floor on the weight norm, so zero-initialised units can still move.
        exclude: modules or parameters to leave alone.
    """

    name = "agc"

    def __init__(
        self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Iterable[nn.Module | Tensor] = ()
    ) -> None:
        self.clip_factor = float(check_number("clip_factor", clip_factor, low=0.0, low_inclusive=False))
        self.eps = float(check_number("eps", eps, low=0.0))
        self._excluded: set[int] = set()
        for item in exclude:
            if isinstance(item, nn.Module):
                self._excluded.update(id(p) for p in item.parameters())
            elif isinstance(item, Tensor):
                self._excluded.add(id(item))
            else:
                raise InputError(f"exclude must hold modules or parameters, got {type(item).__name__}")

    def __call__(self, parameters: Iterable[Tensor] | Tensor) -> ClipResult:
        params = [p for p in _collect(parameters) if p.grad is not None and id(p) not in self._excluded]
        if not params:
            return _empty_result(2.0, self.clip_factor)
        # Tensors are grouped by ndim: a group's unit norms are computed in the broadcast shape of its
        # gradients ((out, 1, ...) for ndim ≥ 2; one 0-d norm per tensor of ndim ≤ 1, all from one
        # _foreach_norm), concatenated into one vector for the rule (five kernels, whatever the number of
        # units), and split back into views that _foreach_mul_ applies directly: per tensor only the three
        # passes AGC needs (‖W_i‖, ‖G_i‖, the scaling), no reshapes, no sync, no Python loop over units.
        # The unit vectors are small, so they are combined out of place: a DTensor norm (FSDP2 shards) is a
        # partial sum that in-place arithmetic would have to redistribute, which DTensor refuses.
        groups: dict[int, list[Tensor]] = {}
        for p in params:
            groups.setdefault(max(p.ndim, 1), []).append(p)
        norms_before: list[Tensor] = []
        norms_after: list[Tensor] = []
        lowest: list[Tensor] = []
        with torch.no_grad():
            for ndim, ps in groups.items():
                gs: list[Tensor] = [p.grad for p in ps]  # type: ignore[misc]
                if ndim == 1:
                    w_units = torch.stack(torch._foreach_norm(ps))
                    g_units = torch.stack(torch._foreach_norm(gs))
                else:
                    dims = tuple(range(1, ndim))
                    w_units = torch.cat([torch.linalg.vector_norm(p, dim=dims, keepdim=True) for p in ps])
                    g_units = torch.cat([torch.linalg.vector_norm(g, dim=dims, keepdim=True) for g in gs])
                limit = w_units.clamp_min(self.eps) * self.clip_factor
                # λ·max(‖W_i‖, eps) / ‖G_i‖ capped at 1: exactly 1 for a unit within its limit, NaN for a
                # NaN unit (clamp propagates NaN), 0 for an infinite one — what the rule's "if" gives.
                coef = (limit / g_units.clamp_min(NORM_EPS)).clamp_max(1.0)
                torch._foreach_mul_(gs, coef.unbind() if ndim == 1 else coef.split([g.shape[0] for g in gs]))
                # The units partition every gradient, so the global norms follow from the unit norms.
                norms_before.append(torch.linalg.vector_norm(g_units))
                norms_after.append(torch.linalg.vector_norm(g_units * coef))
                lowest.append(coef.min())
            before = torch.linalg.vector_norm(torch.stack(norms_before))
            after = torch.linalg.vector_norm(torch.stack(norms_after))
            clipped = ~(torch.stack(lowest).min() >= 1.0)  # a factor below 1, or NaN (a non-finite unit)
        threshold = torch.full((), self.clip_factor, device=before.device)
        return ClipResult(_plain(before), _plain(after), threshold, _plain(clipped))

    def state_dict(self) -> dict[str, Any]:
        return {"clip_factor": self.clip_factor, "eps": self.eps}


class ZClip(ClipPolicy):
    """ZClip (Kumar et al. 2025): clip when the gradient norm is a z-score outlier of its EMA statistics.

    Thresholds equal the ``zclip`` 1.0.0 package's step for step, with its defaults:

    * warm-up (first ``warmup_steps`` calls): record the global 2-norm ``g``; clip to ``max_grad_norm``
      only. At the end of warm-up μ = mean and σ² = population variance of the recorded norms.
    * afterwards ``z = (g − μ) / (σ + eps)``. If ``z > z_thresh`` the step is a spike and the adaptive
      limit is ``μ + z_thresh·σ / (z / z_thresh)`` times ``clip_factor`` (``clip_option="adaptive_scaling"``)
      or ``μ`` (``"mean"``); ``mode="percentile"`` always limits to ``μ + z_thresh·σ``.
    * the limit applied is ``min(adaptive limit, max_grad_norm)`` (no adaptive limit when not a spike).
    * then ``μ ← α μ + (1−α) x``, ``σ² ← α σ² + (1−α)(x − μ)²`` with the *updated* μ, where x is the
      adaptive limit on a spike and g otherwise (not updated on a spike if ``skip_update_on_spike``).

    Two deliberate differences from the package: the statistics live on the device as float64 tensors
    (no ``.item()``), and a non-finite norm is neither recorded in warm-up nor folded into μ, σ² (the
    package would make them NaN for the rest of the run). ``threshold`` in the result is the limit
    applied (``inf`` when none).
    """

    name = "zclip"

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = 1.0,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ) -> None:
        self.alpha = float(check_number("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False))
        self.z_thresh = float(check_number("z_thresh", z_thresh, low=0.0, low_inclusive=False))
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, low=0.0, low_inclusive=False)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.eps = float(check_number("eps", eps, low=0.0))
        self.warmup_steps = int(check_number("warmup_steps", warmup_steps, low=1, integer=True))
        self.mode = check_choice("mode", mode, ("zscore", "percentile"))
        self.clip_option = check_choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
        self.clip_factor = float(check_number("clip_factor", clip_factor, low=0.0, low_inclusive=False))
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self.steps = 0
        self._warmup: Tensor | None = None
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    def _limit(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """(adaptive limit or inf, spike flag) for norm ``g`` given the current μ, σ²."""
        assert self.mean is not None and self.var is not None
        std = self.var.sqrt()
        inf = torch.full_like(g, math.inf)
        if self.mode == "percentile":
            limit = self.mean + self.z_thresh * std
            spike = g > limit
        else:
            z = (g - self.mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                limit = (self.mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor
            else:
                limit = self.mean
        return torch.where(spike, limit, inf), spike

    def __call__(self, parameters: Iterable[Tensor] | Tensor) -> ClipResult:
        grads = _grads(parameters)
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        if not grads:
            return _empty_result(2.0, cap)
        before = total_norm(tensor_norms(grads, 2.0), 2.0)
        g = before.double()
        finite = g.isfinite()
        step = self.steps
        self.steps += 1
        if step < self.warmup_steps:
            if self._warmup is None:
                self._warmup = torch.full((self.warmup_steps,), math.nan, dtype=torch.float64, device=g.device)
            self._warmup[step] = torch.where(finite, g, torch.full_like(g, math.nan))
            if step + 1 == self.warmup_steps:
                self.mean = torch.nanmean(self._warmup)
                self.var = torch.nanmean((self._warmup - self.mean) ** 2)
                self._warmup = None
            limit = torch.full_like(g, cap)
            spike = torch.zeros((), dtype=torch.bool, device=g.device)
        else:
            adaptive, spike = self._limit(g)
            limit = adaptive.clamp(max=cap)
            x = torch.where(spike, adaptive, g)
            update = finite & ~spike if self.skip_update_on_spike else finite
            assert self.mean is not None and self.var is not None
            new_mean = self.alpha * self.mean + (1 - self.alpha) * x
            new_var = self.alpha * self.var + (1 - self.alpha) * (x - new_mean) ** 2
            self.mean = torch.where(update, new_mean, self.mean)
            self.var = torch.where(update, new_var, self.var)
        # Same rule as the package: scale by limit/(g + 1e-6) only when g exceeds the limit.
        over = g > limit
        coef = torch.where(over, limit / (g + NORM_EPS), torch.ones_like(g))
        _mul_(grads, coef.float())
        after = before * coef.to(before.dtype)
        return ClipResult(before, after, limit.to(before.dtype), over | ~finite)

    def state_dict(self) -> dict[str, Any]:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {"steps": self.steps, "warmup": copy(self._warmup), "mean": copy(self.mean), "var": copy(self.var)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        for key, attr in (("warmup", "_warmup"), ("mean", "mean"), ("var", "var")):
            value = state[key]
            setattr(self, attr, None if value is None else value.clone())


@dataclass(frozen=True)
class PolicyInfo:
    """Registry record of a clipping policy, so the CLI and the lab can list and build them by name."""

    name: str
    factory: Callable[..., ClipPolicy]
    summary: str
    reference: str


#: Every clipping policy by name (read-only).
POLICIES: Mapping[str, PolicyInfo] = MappingProxyType(
    {
        "value": PolicyInfo("value", ClipValue, "element-wise clamp to [-c, c]", "Keras clipvalue"),
        "norm": PolicyInfo("norm", ClipNorm, "global or per-tensor p-norm", "Pascanu et al. 2013"),
        "autoclip": PolicyInfo("autoclip", AutoClip, "percentile of the norm history", "Seetharaman et al. 2020"),
        "agc": PolicyInfo("agc", AGC, "unit-wise gradient/weight norm ratio", "Brock et al. 2021"),
        "zclip": PolicyInfo("zclip", ZClip, "EMA z-score of the global norm", "Kumar et al. 2025"),
    }
)


def make_policy(name: str, **options: Any) -> ClipPolicy:
    """Build a registered policy by name, e.g. ``make_policy("norm", max_norm=1.0)``."""
    check_choice("clip policy", name, POLICIES)
    return POLICIES[name].factory(**options)
