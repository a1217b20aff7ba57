"""Fused ``torch._foreach_*`` kernels over lists of tensors that may live on several devices.

The bottom of :mod:`gradguard.stats`: plain local tensors only, no collectives (sharded tensors are
handled one level up, in :mod:`gradguard.stats.norms` and :mod:`gradguard.stats.distributed`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def by_device(tensors: Sequence[Tensor]) -> dict[torch.device, list[int]]:
    """Indices of ``tensors`` grouped by device, in first-seen order: one fused kernel runs per group.

    >>> by_device([torch.zeros(1), torch.zeros(2)])
    {device(type='cpu'): [0, 1]}
    """
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


def local_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """Per-tensor p-norms ``‖t_i‖_p = (Σ_j |t_ij|^p)^(1/p)`` of local tensors as one float32 vector.

    One ``torch._foreach_norm`` launch per device (:func:`by_device`); the result lives on the first
    tensor's device and nothing is copied to the host. ``norm_type`` may be ``inf`` (max-abs) or ``0``
    (count of non-zeros). A DTensor is not expanded here: use :func:`gradguard.stats.tensor_norms`.
    """
    if len(tensors) == 0:
        return torch.zeros(0)
    groups = by_device(tensors)
    if len(groups) == 1:
        return torch.stack(torch._foreach_norm(list(tensors), norm_type)).float()
    out_device = tensors[0].device
    out = torch.empty(len(tensors), dtype=torch.float32, device=out_device)
    for idx in groups.values():
        norms = torch._foreach_norm([tensors[i] for i in idx], norm_type)
        out[torch.tensor(idx, device=out_device)] = torch.stack(norms).float().to(out_device)
    return out


__all__ = ["by_device", "local_norms"]
