"""Pure tensor statistics: no hooks, no module state, nothing fetched to the host.

Every function here takes tensors and returns tensors on the same device, so callers decide when (and
whether) to synchronise.
"""

from gradguard.stats.activations import activation_summary, saturation_kind, unit_activity
from gradguard.stats.norms import nonfinite_counts, tensor_norms, total_norm
from gradguard.stats.robust import RingBuffer, robust_zscore

__all__ = [
    "RingBuffer",
    "activation_summary",
    "nonfinite_counts",
    "robust_zscore",
    "saturation_kind",
    "tensor_norms",
    "total_norm",
    "unit_activity",
]
