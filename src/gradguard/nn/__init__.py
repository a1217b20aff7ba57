"""Modules torch lacks, and the module kinds the remedies treat alike."""

from torch import nn

from gradguard.nn.lstm import LSTM

#: Normalisation layers: their parameters are the scale γ and shift β of normalised activations, which
#: initialisation leaves at γ = 1, β = 0 and weight decay leaves alone (decaying them would fight the
#: normalisation).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)

__all__ = ["LSTM", "NORM_LAYERS"]
