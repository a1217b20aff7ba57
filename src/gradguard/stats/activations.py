"""Summaries of module outputs: scale, sparsity, saturation and per-unit activity.

One implementation serves one tensor (:func:`activation_summary`, the probe) and many at once
(:func:`activation_summaries`, the monitor's sampled steps): the outputs become the rows of one matrix
reduced row-wise, so a whole network costs a fixed number of kernels rather than a dozen per module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from gradguard.nn import LSTM as GGLSTM

#: Output summary fields, in the order :func:`activation_summary` returns them.
SUMMARY_FIELDS: tuple[str, ...] = ("mean", "std", "frac_zero", "frac_saturated", "nonfinite", "numel")

#: Saturation is where the activation's derivative is below ~4% of its peak:
#: sigmoid: y(1−y) < 0.0099 (peak 0.25) when y < 0.01 or y > 0.99; tanh: 1 − y² < 0.02 when |y| > 0.99.
SATURATION_MARGIN = 0.01

_SIGMOID_LIKE = (nn.Sigmoid, nn.Hardsigmoid)
_TANH_LIKE = (nn.Tanh, nn.Hardtanh, nn.Softsign)
_KIND_CODE = {None: 0, "sigmoid": 1, "tanh": 2}


def saturation_kind(module: nn.Module) -> str | None:
    """``"sigmoid"`` for outputs in (0, 1), ``"tanh"`` for outputs in (−1, 1), else ``None``."""
    if isinstance(module, _SIGMOID_LIKE):
        return "sigmoid"
    if isinstance(module, _TANH_LIKE):
        return "tanh"
    return None


def is_recurrent(module: nn.Module) -> bool:
    """True if ``module``'s first output is a sequence of hidden states, one per time step.

    That is ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (any ``nn.RNNBase``), :class:`gradguard.nn.LSTM`, and modules
    that declare ``gradguard_recurrent = True`` (the mirrors of Keras recurrent layers in
    :mod:`gradguard.adapt`), so that adapters need no torch RNN base class. Whether gradguard can also
    re-run the recurrence step by step is a different question (``gradguard.preflight.recurrent.cell_spec``).
    """
    return isinstance(module, nn.RNNBase | GGLSTM) or bool(getattr(module, "gradguard_recurrent", False))


def unit_dim(output: Tensor, module: nn.Module, *, after_conv: bool = False) -> int:
    """The dimension of ``output`` whose entries are the units: a Linear's features, a convolution's channels.

    Convolution outputs are channels-first, ``(N, C, *spatial)``, for Conv1d, Conv2d and Conv3d alike: the
    units are dimension 1 when ``module`` is a convolution, when it is an element-wise layer applied to one
    (``after_conv``: a ReLU after a Conv1d sees ``(N, C, L)`` too), and for every 4-d or 5-d output (images,
    volumes). Everything else keeps units last: Linear outputs and ``(N, T, F)`` or ``(T, N, F)`` sequences.
    A 1-d or 2-d output has its units last in every case.
    """
    channels_first = isinstance(module, nn.modules.conv._ConvNd) or after_conv or output.dim() in (4, 5)
    return 1 if channels_first and output.dim() >= 3 else -1


def activation_summary(x: Tensor, saturation: str | None = None) -> Tensor:
    """Summary of a tensor as a float32 vector ordered as :data:`SUMMARY_FIELDS`.

    ``mean`` and ``std`` (population, ddof=0) are over the finite entries only, so one NaN does not hide
    the scale of the rest; ``frac_zero`` counts exact zeros (dead ReLU outputs) among all entries;
    ``frac_saturated`` is the share of finite entries in the flat region of ``saturation`` (see
    :data:`SATURATION_MARGIN`), 0 when ``saturation`` is None; ``nonfinite`` counts NaN/Inf entries.
    It is row 0 of :func:`activation_summaries` of ``[x]``.
    """
    return activation_summaries([x], [saturation])[0]


def activation_summaries(xs: Sequence[Tensor] | Tensor, saturation: Sequence[str | None]) -> Tensor:
    """Row ``i`` is the :func:`activation_summary` of ``xs[i]`` with ``saturation[i]``.

    The moments are those of ``x / s`` with ``s = max |x|`` over the row's finite entries, scaled back by
    ``s``: ``mean = s · mean(x/s)``, ``std = s · std(x/s)``. Float32 squares overflow beyond
    ``|x| ≈ 1.8e19``, exactly the outputs of a blowing-up layer whose scale must still be reported.

    Args:
        xs: tensors on one device (any shapes; each is flattened), or one ``(m, L)`` matrix whose rows
            are the tensors (nothing to flatten or pad).
        saturation: per tensor, ``None``, ``"sigmoid"`` or ``"tanh"``.

    Returns:
        float32 tensor of shape ``(len(xs), 6)``, fields :data:`SUMMARY_FIELDS`.
    """
    m = len(xs)
    if m == 0:
        return torch.zeros(0, len(SUMMARY_FIELDS))
    if isinstance(xs, Tensor):
        buf, valid = xs.detach().reshape(m, -1).float(), None
        lengths = [buf.shape[1]] * m
    else:
        buf, valid, lengths = _rows(xs)
    device = buf.device
    n = torch.tensor(lengths, device=device, dtype=torch.float32)
    finite = torch.isfinite(buf) if valid is None else torch.isfinite(buf) & valid
    zero = buf.new_zeros(())
    xf = torch.where(finite, buf, zero)
    n_fin = finite.sum(1).float()
    denom = n_fin.clamp(min=1.0)
    tiny = torch.finfo(torch.float32).tiny
    scale = xf.abs().amax(1).clamp(min=tiny) if buf.shape[1] else buf.new_ones(m)  # amax of 0 columns fails
    xs_ = xf / scale[:, None]
    mean_s = xs_.sum(1) / denom
    dev = torch.where(finite, xs_ - mean_s[:, None], zero)
    var_s = (dev * dev).sum(1) / denom
    zeros = buf == 0 if valid is None else (buf == 0) & valid
    frac_zero = zeros.sum(1).float() / n.clamp(min=1.0)
    if any(k is not None for k in saturation):
        codes = torch.tensor([_KIND_CODE[k] for k in saturation], device=device)[:, None]
        sig = (buf < SATURATION_MARGIN) | (buf > 1 - SATURATION_MARGIN)
        tnh = buf.abs() > 1 - SATURATION_MARGIN
        sat = (((codes == 1) & sig) | ((codes == 2) & tnh)) & finite
        frac_sat = sat.sum(1).float() / denom
    else:
        frac_sat = torch.zeros(m, device=device)  # no sigmoid/tanh-like row: nothing can saturate
    return torch.stack([mean_s * scale, var_s.sqrt() * scale, frac_zero, frac_sat, n - n_fin, n], dim=1)


def _rows(xs: Sequence[Tensor]) -> tuple[Tensor, Tensor | None, list[int]]:
    """``(matrix, valid mask or None, lengths)``: the tensors flattened into the rows of one matrix."""
    flats = [x.detach().reshape(-1) for x in xs]
    lengths = [f.numel() for f in flats]
    if all(k == lengths[0] for k in lengths):
        # Equal lengths (the monitor's fixed-size samples): one stack, no padding and no padding mask.
        return torch.stack(flats).float(), None, lengths
    # Rows padded to the longest tensor; ``valid`` masks the padding out of every count.
    buf = pad_sequence([f.float() for f in flats], batch_first=True)
    device = buf.device
    valid = torch.arange(buf.shape[1], device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return buf, valid, lengths


def unit_activity(x: Tensor, unit_dim: int = -1) -> Tensor:
    """Per-unit count of strictly positive entries, reducing every dimension but ``unit_dim``.

    A unit (feature of a Linear output, channel of a Conv output, see :func:`unit_dim`) whose count stays 0
    over a window of batches never fired: a dead ReLU.
    """
    x = x.detach()
    pos = (x > 0).movedim(unit_dim, -1).reshape(-1, x.shape[unit_dim])
    return pos.sum(0).float()


def unit_peak(x: Tensor, unit_dim: int = -1) -> Tensor:
    """Per-unit maximum of ``x`` over every dimension but ``unit_dim`` (float32).

    For ReLU outputs (≥ 0) a unit never fired on the batch exactly when its peak is 0, which is when
    :func:`unit_activity` counts 0, with one reduction instead of a comparison and a count. NaN
    propagates (a NaN unit is not "dead").
    """
    x = x.detach()
    dims = [d for d in range(x.dim()) if d != unit_dim % x.dim()]
    return x.amax(dim=dims).float() if dims else x.float()
