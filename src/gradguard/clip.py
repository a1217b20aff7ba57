"""Gradient clipping policies: objects with explicit state that measure, clip in place, and report.

Every policy is called on a parameter iterable after ``loss.backward()`` and before ``optimizer.step()``::

    policy = gg.clip.ZClip()
    result = policy(model.parameters())   # ClipResult(norm_before, norm_after, clipped, norm_limit, ...)

========================  ===================================================  =========================
policy                    rule                                                 reference
========================  ===================================================  =========================
:class:`ClipValue`        ``g ← clamp(g, −c, c)``                              Keras ``clipvalue``
:class:`ClipNorm`         ``g ← g · c / ‖g‖`` when ``‖g‖ > c``                 Pascanu et al. 2013
:class:`AutoClip`         ``c_t`` = q-quantile of the history of ``‖g‖``       Seetharaman et al. 2020
:class:`AGC`              per unit ``‖G_i‖ ≤ λ · max(‖W_i‖, ε)``               Brock et al. 2021
:class:`ZClip`            ``c_t`` from the EMA z-score of ``‖g‖``              Kumar et al. 2025
========================  ===================================================  =========================

No policy calls ``.item()`` or branches in Python on a tensor value, so none adds a host synchronisation to
a training step. A non-finite norm is never written into a policy's statistics. docs/remedies.md gives the
formulas, the papers and the design decisions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gradguard.errors import ConfigError, InputError, check_choice, check_number
from gradguard.stats import tensor_norms, total_norm
from gradguard.stats.distributed import is_dtensor
from gradguard.stats.foreach import by_device

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

    Each kind of limit has its own field; a limit the policy does not impose is ``inf``.

    Attributes:
        norm_before: global norm ``‖g‖_p`` of the gradients before clipping (the policy's ``norm_type``).
        norm_after: global norm after clipping.
        clipped: bool, True when any gradient was changed; also True when the norm is not finite (the
            gradients could not be bounded), so a NaN never reads as "nothing to do".
        norm_limit: the limit ``c`` on the global norm this step (:class:`ClipNorm` with ``per="global"``,
            :class:`AutoClip` with ``per="global"``, :class:`ZClip`); ``inf`` when none applied.
        tensor_norm_limit: the largest of the per-tensor norm limits (``per="tensor"``).
        value_limit: the element bound ``c`` of :class:`ClipValue`.
        ratio_limit: the bound λ on ``‖G_i‖ / max(‖W_i‖, ε)`` of :class:`AGC`.
    """

    norm_before: Tensor
    norm_after: Tensor
    clipped: Tensor
    norm_limit: Tensor
    tensor_norm_limit: Tensor
    value_limit: Tensor
    ratio_limit: Tensor

    @property
    def threshold(self) -> Tensor:
        """Deprecated: use :attr:`norm_limit` (or the field of the policy's own kind of limit).

        The one limit the policy imposed, in its own unit: ``min`` of the four limit fields, which is
        :attr:`norm_limit` for the global-norm policies (the common case) and the value the field had
        before it was split for :class:`ClipValue`, :class:`AGC` and ``per="tensor"``.
        """
        warnings.warn(
            "ClipResult.threshold is deprecated; use norm_limit, tensor_norm_limit, value_limit or ratio_limit",
            DeprecationWarning,
            stacklevel=2,
        )
        return torch.stack([self.norm_limit, self.tensor_norm_limit, self.value_limit, self.ratio_limit]).amin()


def _result(
    before: Tensor,
    after: Tensor,
    clipped: Tensor,
    *,
    norm_limit: Tensor | float | None = None,
    tensor_norm_limit: Tensor | float | None = None,
    value_limit: Tensor | float | None = None,
    ratio_limit: Tensor | float | None = None,
) -> ClipResult:
    """A :class:`ClipResult` with the given limits and ``inf`` for the others (one shared 0-d tensor)."""
    device = before.device
    inf = torch.full((), math.inf, device=device)

    def limit(value: Tensor | float | None) -> Tensor:
        if value is None:
            return inf
        return value if isinstance(value, Tensor) else torch.full((), value, device=device)

    return ClipResult(
        before, after, clipped, limit(norm_limit), limit(tensor_norm_limit), limit(value_limit), limit(ratio_limit)
    )


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
    """A DTensor result (FSDP2-sharded gradients) as the plain full tensor, equal on every rank."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _empty_result(**limits: float | None) -> ClipResult:
    zero = torch.zeros(())
    return _result(zero, zero.clone(), torch.tensor(False), **limits)


def _check_norm_type(norm_type: float) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, int | float) or not norm_type > 0:
        raise ConfigError(f"norm_type={norm_type!r} is not allowed; use a number > 0 or float('inf')")
    return float(norm_type)


def _coef(norm: Tensor, limit: Tensor | float) -> tuple[Tensor, Tensor]:
    """Scale factor ``c / (‖g‖ + 1e-6)`` where ``‖g‖`` exceeds the limit c, else exactly 1; and the flag.

    PyTorch takes ``min(1, c / (‖g‖ + 1e-6))``, which also shrinks norms in the band (c − 1e-6, c] by up
    to 1e-6/c relative; 1 there leaves gradients already within the limit untouched. A NaN norm counts
    as over the limit, so the factor is NaN, as in PyTorch.
    """
    over = ~(norm <= limit)
    return torch.where(over, limit / (norm + NORM_EPS), 1.0), over


def _mul_(grads: list[Tensor], coef: Tensor) -> None:
    """``g ← coef · g`` for every gradient, one fused kernel per device."""
    for device, idx in by_device(grads).items():
        torch._foreach_mul_([grads[i] for i in idx], coef.to(device))


def _scale_(grads: list[Tensor], coefs: Tensor) -> None:
    """Multiply each gradient by its own coefficient (one entry of ``coefs`` per gradient), fused per device."""
    groups = by_device(grads)
    if len(groups) == 1:  # the usual case: one unbind instead of a Python index per gradient
        torch._foreach_mul_(grads, coefs.to(grads[0].device).unbind())
        return
    for device, idx in groups.items():
        local = coefs.to(device)
        torch._foreach_mul_([grads[i] for i in idx], [local[i] for i in idx])


class ClipPolicy:
    """Base class: ``__call__(parameters) -> ClipResult``, ``state_dict()``, ``load_state_dict()``.

    Options are constructor arguments; :meth:`state_dict` holds only what a policy learnt from the run.
    """

    #: Registry name (see :data:`POLICIES`).
    name: str = ""

    def __call__(self, parameters: Iterable[Tensor] | Tensor) -> ClipResult:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The state learnt from the run (histories, statistics), as plain values and tensors; no options."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: the next call clips as the saved policy's would."""


class ClipValue(ClipPolicy):
    """Element-wise clipping ``g ← clamp(g, −c, c)`` (Keras ``clipvalue``; Mikolov 2012).

    Same arithmetic as ``torch.nn.utils.clip_grad_value_`` (NaN stays NaN, ±Inf becomes ±c). The result's
    ``value_limit`` is ``c``; ``clipped`` is True when some ``|g| > c``; the norms are ``norm_type`` norms of
    all gradients before and after.

    >>> w = torch.nn.Parameter(torch.zeros(3)); w.grad = torch.tensor([-3.0, 0.2, 5.0])
    >>> ClipValue(1.0)([w]).clipped, w.grad
    (tensor(True), tensor([-1.0000,  0.2000,  1.0000]))
    """

    name = "value"

    def __init__(self, clip_value: float, *, norm_type: float = 2.0) -> None:
        self.clip_value = float(check_number("clip_value", clip_value, low=0.0, low_inclusive=False))
        self.norm_type = _check_norm_type(norm_type)

    def __call__(self, parameters: Iterable[Tensor] | Tensor) -> ClipResult:
        grads = _grads(parameters)
        if not grads:
            return _empty_result(value_limit=self.clip_value)
        before = total_norm(tensor_norms(grads, self.norm_type), self.norm_type)
        # max |g| from one min/max pass per tensor: no gradient-sized |g| temporary.
        extremes = torch.stack([torch.stack(torch.aminmax(g)) for g in grads])
        peak = torch.maximum(extremes[:, 1].max(), -extremes[:, 0].min())
        torch._foreach_clamp_min_(grads, -self.clip_value)
        torch._foreach_clamp_max_(grads, self.clip_value)
        after = total_norm(tensor_norms(grads, self.norm_type), self.norm_type)
        return _result(before, after, _plain(~(peak <= self.clip_value)), value_limit=self.clip_value)


class ClipNorm(ClipPolicy):
    """Norm clipping ``g ← g · c / (‖g‖_p + 1e-6)`` when ``‖g‖_p > c`` (Pascanu, Mikolov & Bengio 2013).

    ``per="global"``: one norm over all gradients, as ``torch.nn.utils.clip_grad_norm_`` and Keras
    ``global_clipnorm`` (identical results for every ``norm_type``, ``inf`` and non-finite gradients
    included, outside the 1e-6-wide band docs/remedies.md describes); the result's ``norm_limit`` is c.
    ``per="tensor"``: each tensor is clipped by its own norm, as Keras ``clipnorm``; the result's
    ``tensor_norm_limit`` is c.

    Args:
        max_norm: c > 0.
        norm_type: p (``float('inf')`` for the max-norm).
        per: ``"global"`` or ``"tensor"``.
    """

    name = "norm"

    def __init__(self, max_norm: float, *, norm_type: float = 2.0, per: str = "global") -> None:
        self.max_norm = float(check_number("max_norm", max_norm, low=0.0, low_inclusive=False))
        self.norm_type = _check_norm_type(norm_type)
        self.per = check_choice("per", per, ("global", "tensor"))

    def __call__(self, parameters: Iterable[Tensor] | Tensor) -> ClipResult:
        grads = _grads(parameters)
        field = "norm_limit" if self.per == "global" else "tensor_norm_limit"
        if not grads:
            return _empty_result(**{field: self.max_norm})
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
        return _result(before, after, clipped, **{field: self.max_norm})


class _History:
    """Norm history on the device: one row per column (tensor), one slot per call, float32.

    The write position and the number of filled slots are host-side counters, so the quantile's
    interpolation position is a host float. ``capacity=None`` grows without bound (doubling). A
    non-finite norm is stored as ``+inf``: a very large norm, which can raise a high quantile but never
    turn it into NaN.
    """

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.values: Tensor | None = None  # (columns, slots)
        self.pushes = 0

    def push(self, row: Tensor) -> None:
        row = torch.nan_to_num(row.detach().float().reshape(-1), nan=math.inf, posinf=math.inf)
        if self.values is None or self.values.shape[0] != row.numel():
            slots = self.capacity if self.capacity is not None else 64
            self.values = torch.zeros((row.numel(), slots), device=row.device)
            self.pushes = 0
        elif self.capacity is None and self.pushes >= self.values.shape[1]:
            self.values = torch.cat([self.values, torch.zeros_like(self.values)], dim=1)
        self.values[:, self.pushes % self.values.shape[1]] = row
        self.pushes += 1

    def quantile(self, q: float) -> Tensor:
        """Per-column q-quantile with linear interpolation, as ``numpy.quantile`` / ``torch.quantile``.

        With the n recorded values sorted as x_(0) ≤ … ≤ x_(n−1) and ``h = q·(n−1)``:
        ``x_(⌊h⌋) + (h − ⌊h⌋)·(x_(⌊h⌋+1) − x_(⌊h⌋))``. The two order statistics are selected, not sorted:
        ``topk`` keeps the smaller tail that holds both (the n − ⌊h⌋ largest or the ⌊h⌋ + 2 smallest values,
        unsorted) and a second ``topk`` of 2 reads them from it. An infinite upper neighbour makes the
        quantile infinite.
        """
        assert self.values is not None and self.pushes > 0
        n = min(self.pushes, self.values.shape[1])
        window = self.values[:, :n]
        pos = q * (n - 1)
        lo = math.floor(pos)
        if n - lo < lo + 2:
            tail = window.topk(n - lo, dim=1, sorted=False).values  # sorted positions lo … n−1
            two = tail.topk(min(2, n - lo), dim=1, largest=False).values  # ascending: lo, lo + 1
            below, above = two[:, 0], two[:, -1]
        else:
            tail = window.topk(lo + 2, dim=1, largest=False, sorted=False).values  # positions 0 … lo + 1
            two = tail.topk(2, dim=1).values  # descending: lo + 1, lo
            below, above = two[:, -1], two[:, 0]
        weight = pos - lo
        if weight == 0.0:  # a host float: no interpolation, and no 0 · inf
            return below
        return torch.where(above == math.inf, math.inf, torch.lerp(below, above, weight))

    def state_dict(self) -> dict[str, Any]:
        """``values``: the ring as ``(slots, columns)`` (``inf`` for non-finite norms); ``pushes``: calls so far."""
        return {"values": None if self.values is None else self.values.t().clone(), "pushes": self.pushes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = state["values"]
        self.values = None if values is None else values.detach().float().t().contiguous()
        self.pushes = int(state["pushes"])


class AutoClip(ClipPolicy):
    """AutoClip (Seetharaman, Wichern, Pardo & Le Roux 2020): clip to the q-quantile of the norm history.

    ``c_t = quantile_q({‖g_s‖ : s ∈ H_t})`` and ``g_t ← g_t · c_t / (‖g_t‖ + 1e-6)`` when ``‖g_t‖ > c_t``
    (global 2-norms). Default, the paper's rule: ``H_t`` holds every step up to and including t
    (``history=None``; an integer keeps the last ``history`` steps), so the first step is never clipped.
    ``include_current=False`` and ``per="tensor"`` give the ``autoclip`` package's ``QuantileClip``
    (:meth:`quantile_clip`): ``H_t`` holds the previous steps only (no clipping on the first), and each
    tensor keeps its own history and limit. A non-finite norm is recorded as ``+inf``. The result's
    ``norm_limit`` (``per="global"``) or ``tensor_norm_limit`` (the largest per-tensor limit) is ``c_t``.

    Args:
        quantile: q in [0, 1] (the paper's 10th percentile is 0.1).
        history: number of past norms kept (``None``: all).
        include_current: the paper's rule (True) or QuantileClip's (False).
        per: ``"global"`` or ``"tensor"``; with ``"tensor"`` the columns follow the tensors that have a
            gradient, and the history starts afresh if their number changes.
        percentile: deprecated, ``percentile=p`` is ``quantile=p/100``.
    """

    name = "autoclip"

    def __init__(
        self,
        quantile: float = 0.1,
        *,
        history: int | None = None,
        include_current: bool = True,
        per: str = "global",
        percentile: float | None = None,
    ) -> None:
        if percentile is not None:
            warnings.warn("AutoClip(percentile=p) is deprecated; use quantile=p/100", DeprecationWarning, stacklevel=2)
            quantile = float(check_number("percentile", percentile, low=0.0, high=100.0)) / 100.0
        self.quantile = float(check_number("quantile", quantile, low=0.0, high=1.0))
        if history is not None:
            check_number("history", history, low=1, integer=True)
        self.history = history
        self.include_current = bool(include_current)
        self.per = check_choice("per", per, ("global", "tensor"))
        self._history = _History(history)

    @property
    def percentile(self) -> float:
        """Deprecated: ``100 · quantile``."""
        warnings.warn("AutoClip.percentile is deprecated; use AutoClip.quantile", DeprecationWarning, stacklevel=2)
        return 100.0 * self.quantile

    @classmethod
    def quantile_clip(
        cls, quantile: float = 0.9, *, history_length: int = 1000, global_threshold: bool = False
    ) -> AutoClip:
        """The ``autoclip`` package's ``QuantileClip(quantile, history_length, global_threshold)``.

        ``AutoClip(quantile, history=history_length, include_current=False, per=...)``: the limit is the
        quantile of the previous ``history_length`` norms, per tensor unless ``global_threshold``.
        """
        return cls(
            quantile,
            history=history_length,
            include_current=False,
            per="global" if global_threshold else "tensor",
        )

    def __call__(self, parameters: Iterable[Tensor] | Tensor) -> ClipResult:
        grads = _grads(parameters)
        field = "norm_limit" if self.per == "global" else "tensor_norm_limit"
        if not grads:
            return _empty_result(**{field: math.inf})
        norms = tensor_norms(grads, 2.0)
        before = total_norm(norms, 2.0)
        current = before.reshape(1) if self.per == "global" else norms
        if self.include_current:
            self._history.push(current)
            limit = self._history.quantile(self.quantile)
        elif self._history.pushes == 0:
            limit = torch.full_like(current, math.inf)
            self._history.push(current)
        else:
            limit = self._history.quantile(self.quantile)
            self._history.push(current)
        coefs, over = _coef(current, limit)
        if self.per == "global":
            coef = coefs.reshape(())  # a one-element vector: a 0-d view, not a reduction
            _mul_(grads, coef)
            return _result(before, before * coef, over.reshape(()), norm_limit=limit.reshape(()))
        _scale_(grads, coefs)
        return _result(before, total_norm(norms * coefs, 2.0), over.any(), tensor_norm_limit=limit.max())

    def state_dict(self) -> dict[str, Any]:
        return {"norms": self._history.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history.load_state_dict(state["norms"])


def _unit_norms(tensors: list[Tensor], big: list[int], small: list[int]) -> Tensor:
    """AGC's unit norms ``‖t_i‖_2`` as one vector: the rows (norm over every dim but the first) of each
    tensor ``tensors[big[k]]`` in turn, then one norm per tensor of ndim ≤ 1 (``small``, one fused kernel)."""
    parts = [torch.linalg.vector_norm(tensors[i], dim=tuple(range(1, tensors[i].ndim))) for i in big]
    if small:
        parts.append(torch.stack(torch._foreach_norm([tensors[i] for i in small])))
    return torch.cat(parts)


class AGC(ClipPolicy):
    """Adaptive gradient clipping, unit-wise (Brock, De, Smith & Simonyan 2021, NFNets).

    For each unit i (one output row of a Linear weight, one filter of a Conv weight; a bias or other
    tensor of ndim ≤ 1 is one unit)::

        if ‖G_i‖ / max(‖W_i‖, ε) > λ:   G_i ← λ · max(‖W_i‖, ε) / ‖G_i‖ · G_i

    The paper does not clip the final linear layer; pass it in ``exclude`` (modules or parameters), e.g.
    ``AGC(0.01, exclude=[model.head])``. Excluded parameters are neither measured nor clipped. The result's
    ``ratio_limit`` is λ; its norms are global 2-norms of the included gradients.

    Args:
        max_ratio: λ > 0, the largest allowed ``‖G_i‖ / max(‖W_i‖, ε)`` (0.01 in the paper at batch 4096;
            larger for small batches).
        eps: ε, the floor on the weight norm, so that zero-initialised units can still move.
        exclude: modules or parameters to leave alone.
        clip_factor: deprecated name of ``max_ratio``.
    """

    name = "agc"

    def __init__(
        self,
        max_ratio: float = 0.01,
        *,
        eps: float = 1e-3,
        exclude: Iterable[nn.Module | Tensor] = (),
        clip_factor: float | None = None,
    ) -> None:
        if clip_factor is not None:
            warnings.warn("AGC(clip_factor=) is deprecated; use max_ratio=", DeprecationWarning, stacklevel=2)
            max_ratio = clip_factor
        self.max_ratio = float(check_number("max_ratio", max_ratio, low=0.0, low_inclusive=False))
        self.eps = float(check_number("eps", eps, low=0.0))
        self._excluded: set[int] = set()
        for item in exclude:
            if isinstance(item, nn.Module):
                self._excluded.update(id(p) for p in item.parameters())
            elif isinstance(item, Tensor):
                self._excluded.add(id(item))
            else:
                raise InputError(f"exclude must hold modules or parameters, got {type(item).__name__}")

    @property
    def clip_factor(self) -> float:
        """Deprecated: :attr:`max_ratio`."""
        warnings.warn("AGC.clip_factor is deprecated; use AGC.max_ratio", DeprecationWarning, stacklevel=2)
        return self.max_ratio

    def __call__(self, parameters: Iterable[Tensor] | Tensor) -> ClipResult:
        params = [p for p in _collect(parameters) if p.grad is not None and id(p) not in self._excluded]
        if not params:
            return _empty_result(ratio_limit=self.max_ratio)
        grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        with torch.no_grad():
            # All unit norms in one vector for the rule (a handful of kernels whatever the number of
            # tensors), and views of it, shaped to broadcast, scale the gradients in one fused multiply.
            big = [i for i, p in enumerate(params) if p.ndim > 1]
            small = [i for i, p in enumerate(params) if p.ndim <= 1]
            w_all = _unit_norms(params, big, small)
            g_all = _unit_norms(grads, big, small)
            # min(1, λ·max(‖W_i‖, ε) / ‖G_i‖): 1 within the limit, NaN for a NaN unit, 0 for an infinite one.
            # Out of place: a DTensor norm (FSDP2 shard) is a partial sum that in-place ops would refuse.
            coef = (w_all.clamp_min(self.eps) * self.max_ratio / g_all.clamp_min(NORM_EPS)).clamp_max(1.0)
            pieces = coef.split([params[i].shape[0] for i in big] + ([len(small)] if small else []))
            scales = [c.view(-1, *(1,) * (params[i].ndim - 1)) for c, i in zip(pieces, big, strict=False)]
            if small:
                scales += pieces[-1].unbind()
            torch._foreach_mul_([grads[i] for i in big + small], scales)
            # The units partition every gradient, so the global norms follow from the unit norms.
            before = _plain(torch.linalg.vector_norm(g_all))
            after = _plain(torch.linalg.vector_norm(g_all * coef))
            clipped = _plain(~(coef.min() >= 1.0))  # a factor below 1, or NaN (a non-finite unit)
        return _result(before, after, clipped, ratio_limit=self.max_ratio)


class ZClip(ClipPolicy):
    """ZClip (Kumar et al. 2025): clip when the gradient norm is a z-score outlier of its EMA statistics.

    With ``g`` the global 2-norm and μ, σ² its exponential moving mean and variance::

        z = (g − μ) / (σ + eps);   spike  ⇔  z > z_thresh
        adaptive limit = clip_factor · (μ + z_thresh·σ / (z / z_thresh))   (clip_option="adaptive_scaling")
                       = μ                                                (clip_option="mean")
                       = μ + z_thresh·σ, spike ⇔ g > μ + z_thresh·σ       (mode="percentile")
        limit applied = min(adaptive limit if spike else inf, max_grad_norm)
        μ ← α μ + (1−α) x,   σ² ← α σ² + (1−α)(x − μ)²    (the updated μ; x = adaptive limit on a spike, else g)

    The first ``warmup_steps`` calls only record ``g`` and clip to ``max_grad_norm``; then μ and σ² are
    the mean and population variance of the recorded norms. ``skip_update_on_spike`` freezes μ, σ² on
    spikes. Limits equal the ``zclip`` 1.0.0 package's step for step; differences: μ, σ² stay on the
    device (float64, no ``.item()``), and a non-finite norm is neither recorded nor folded into them.
    The result's ``norm_limit`` is the limit applied (``inf`` when none).

    ``z_thresh`` and ``clip_factor`` keep the package's names. ``z_thresh`` is a threshold on this EMA
    z-score, which reacts within a few steps and has no small-sample correction; the Guard's ``spike_z``
    is a threshold on the robust median/MAD z-score of a window (:mod:`gradguard.stats.windows`), corrected
    for the window's size: two estimators, two names. ``clip_factor`` scales the adaptive limit; it is not
    AGC's λ (:attr:`AGC.max_ratio`).
    """

    name = "zclip"

    def __init__(
        self,
        *,
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
            return _empty_result(norm_limit=cap)
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
        # As the package: scale by limit/(g + 1e-6) only when g exceeds the limit.
        over = g > limit
        coef = torch.where(over, limit / (g + NORM_EPS), torch.ones_like(g))
        _mul_(grads, coef.float())
        after = before * coef.to(before.dtype)
        return _result(before, after, over | ~finite, norm_limit=limit.to(before.dtype))

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
        "autoclip": PolicyInfo("autoclip", AutoClip, "quantile of the norm history", "Seetharaman et al. 2020"),
        "agc": PolicyInfo("agc", AGC, "unit-wise gradient/weight norm ratio", "Brock et al. 2021"),
        "zclip": PolicyInfo("zclip", ZClip, "EMA z-score of the global norm", "Kumar et al. 2025"),
    }
)


def make_policy(name: str, **options: Any) -> ClipPolicy:
    """Build a registered policy by name, e.g. ``make_policy("norm", max_norm=1.0)``; see :data:`POLICIES`."""
    check_choice("clip policy", name, POLICIES)
    return POLICIES[name].factory(**options)
