"""What detection rules receive: host-side statistics gathered by the monitor (rules never touch hooks)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class ParamInfo:
    """A watched parameter: qualified name, owning module, shape facts used to normalise its norms.

    ``sparse_rows`` marks lookup tables (``nn.Embedding``): a batch touches only a few rows, so their
    per-element gradient RMS is diluted by the vocabulary size and says nothing about depth.
    """

    name: str
    module: str
    ndim: int
    numel: int
    sparse_rows: bool = False


@dataclass(frozen=True)
class Origin:
    """Producer of a NaN/Inf, as found by the monitor's replay (see ``gradguard.monitor.provenance``)."""

    module: str
    phase: str
    what: str
    evidence: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Observation:
    """Everything the rules may look at, on the host, at one fetch.

    Attributes:
        step: the newest step fetched.
        rows: recent history rows, oldest first (at most the monitor's window plus the new rows).
        new: how many of ``rows`` (at the end) arrived since the rules last ran.
        params: watched parameters in ``named_parameters()`` order.
        depth: module names in the order their forward finished on the last sampled step (input first).
        activations: per module, the pooled output summary of the latest sampled step.
        saturation_kinds: per module, ``"sigmoid"``/``"tanh"`` when its output can saturate.
        dead_window: per ReLU-like module, each unit's peak output over the window (0: never fired).
        dead_samples: per module, how many sampled steps ``dead_window`` covers.
        time_forward: per recurrent module, RMS of its output at each time step (latest sampled step).
        time_grad: per recurrent module, ‖∂L/∂h_t‖ at each time step (latest sampled step).
        origin: the replay's answer when a non-finite value was flagged in the new rows.
        nonfinite_step: the first new step whose loss or gradients held NaN/Inf, if any.
    """

    step: int
    rows: Sequence[Mapping[str, Any]]
    new: int
    params: Sequence[ParamInfo]
    depth: Sequence[str] = ()
    activations: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    saturation_kinds: Mapping[str, str] = field(default_factory=dict)
    dead_window: Mapping[str, Tensor] = field(default_factory=dict)
    dead_samples: Mapping[str, int] = field(default_factory=dict)
    time_forward: Mapping[str, Tensor] = field(default_factory=dict)
    time_grad: Mapping[str, Tensor] = field(default_factory=dict)
    origin: Origin | None = None
    nonfinite_step: int | None = None
    nonfinite_counts: Mapping[str, float] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # derived values shared by rules within one fetch

    @property
    def new_rows(self) -> Sequence[Mapping[str, Any]]:
        return self.rows[len(self.rows) - self.new :] if self.new else ()

    @property
    def old_rows(self) -> Sequence[Mapping[str, Any]]:
        return self.rows[: len(self.rows) - self.new]


def finite(x: Any) -> bool:
    """True for a real, finite number (``None`` and NaN/Inf are not)."""
    return isinstance(x, int | float) and math.isfinite(x)


def finite_values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """The finite values of ``key`` in ``rows`` (NaN/Inf/missing are dropped, so they never poison a window)."""
    # Inlined test (runs thousands of times per fetch): x - x == 0 holds exactly for finite numbers.
    return [float(v) for r in rows if (v := r.get(key)) is not None and v - v == 0]


def fmt(x: float) -> str:
    """Compact number for messages: 3 significant digits."""
    return f"{x:.3g}"
