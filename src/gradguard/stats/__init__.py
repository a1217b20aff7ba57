"""Pure tensor statistics: no hooks, no module state, nothing fetched to the host.

Every function here takes tensors and returns tensors on the same device, so callers decide when (and
whether) to synchronise.
"""

from gradguard.stats.activations import (
    activation_summaries,
    activation_summary,
    is_recurrent,
    saturation_kind,
    unit_activity,
    unit_dim,
    unit_peak,
)
from gradguard.stats.norms import nonfinite_counts, tensor_norms, total_norm
from gradguard.stats.spectral import activation_derivative, scaled_spectral_radius, spectral_radius
from gradguard.stats.temporal import gradient_horizon, growth_factor, time_step_norms
from gradguard.stats.windows import HostWindow, RingBuffer, SpikeRule, Window, robust_zscore, spike_threshold

__all__ = [
    "HostWindow",
    "RingBuffer",
    "SpikeRule",
    "Window",
    "activation_derivative",
    "activation_summaries",
    "activation_summary",
    "gradient_horizon",
    "growth_factor",
    "is_recurrent",
    "nonfinite_counts",
    "robust_zscore",
    "saturation_kind",
    "scaled_spectral_radius",
    "spectral_radius",
    "spike_threshold",
    "tensor_norms",
    "time_step_norms",
    "total_norm",
    "unit_activity",
    "unit_dim",
    "unit_peak",
]
