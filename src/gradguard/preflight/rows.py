"""What the probe measured: one record per module call, per recurrent call and for the input through time.

Plain data, filled by :mod:`gradguard.preflight.measure`, judged by :mod:`gradguard.preflight.verdict`,
shown by :mod:`gradguard.preflight.report`. The quantities and their formulae are in ``docs/probe.md``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerRow:
    """What the probe measured at one module call, in execution order.

    Forward fields describe the module's output ``y`` (its first floating tensor) as
    :func:`gradguard.stats.activation_summary` does; ``dead_frac`` is the share of units of a ReLU-like
    module that output 0 for every example (NaN for other modules). Backward fields:
    ``grad_norm = ‖∂L/∂y‖₂`` and ``grad_rms = grad_norm / √numel`` (NaN, with ``grad_flows`` False, when no
    gradient reaches ``y``), their non-finite counts, and ``param_norm``/``param_grad_norm`` over the
    module's own parameters (first call only; NaN without parameters). Neighbour ratios:
    ``std_gain = std / std of the previous row`` and ``grad_gain = grad_rms / grad_rms of the next row``.
    """

    index: int
    name: str
    type: str
    call: int
    mean: float
    std: float
    frac_zero: float
    frac_saturated: float
    nonfinite: float
    numel: float
    dead_frac: float
    grad_norm: float
    grad_rms: float
    param_norm: float
    param_grad_norm: float
    std_gain: float
    grad_gain: float
    saturation: str | None = None
    has_params: bool = False
    grad_flows: bool = False
    grad_nonfinite: float = 0.0
    param_grad_nonfinite: float = 0.0

    @property
    def label(self) -> str:
        """Display name: the qualified name, ``(model)`` for the root, ``#k`` for a repeated call."""
        base = self.name or "(model)"
        return base if self.call == 1 else f"{base}#{self.call}"


@dataclass(frozen=True)
class TimeProfile:
    """Gradient norm reaching each time step of the model's input, ``n_t = ‖∂L/∂x_t‖``.

    ``growth`` is the fitted per-step factor going back in time (:func:`gradguard.stats.growth_factor`),
    ``horizon`` the steps back from the peak before the gradient drops below 1e-3 of it
    (:func:`gradguard.stats.gradient_horizon`); ``reaches_start`` is True when it never does.
    """

    time_dim: int
    norms: list[float]
    growth: float
    horizon: float
    reaches_start: bool
    peak_step: int


@dataclass(frozen=True)
class RecurrentProfile:
    """Per-step gradients of one recurrent module call, from unrolling it with its own weights.

    ``hidden_norms[k][t] = ‖∂L/∂h^k_t‖`` for layer ``k`` under the real loss; ``input_norms[t] =
    ‖∂L/∂x_t‖``; ``last_norms[t]`` is the norm at ``h^0_t`` of the gradient sent back from the last step
    alone, the product of per-step Jacobians of Bengio et al. (1994). ``growth`` and ``horizon`` are
    measured on ``last_norms``. ``spectral_radius`` and ``scaled_radius = ρ(W_hh)·mean f'`` are per layer
    for ``nn.RNN`` (NaN otherwise); ``gate_mean`` is the mean forget gate (LSTM) or update gate (GRU).
    ``unroll_error`` is the relative max deviation of the unrolled output from the module's own; ``note``
    says why a call was not unrolled.
    """

    module: str
    call: int
    cell: str
    nonlinearity: str
    layers: int
    steps: int
    hidden_norms: list[list[float]]
    input_norms: list[float]
    last_norms: list[float]
    growth: float
    horizon: float
    reaches_start: bool
    mean_derivative: list[float]
    gate_mean: list[float]
    gate_name: str | None
    spectral_radius: list[float]
    scaled_radius: list[float]
    unroll_error: float
    note: str = ""
