"""Norms of many tensors at once, computed with fused ``torch._foreach_*`` kernels on the device."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradguard.stats.distributed import global_norms, is_dtensor
from gradguard.stats.foreach import local_norms


def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """Per-tensor p-norms ``‖t_i‖_p = (Σ_j |t_ij|^p)^(1/p)`` as one float32 vector.

    ``norm_type`` may be ``inf`` (max-abs) or ``0`` (count of non-zeros). Uses one fused
    ``torch._foreach_norm`` launch per device; the result lives on the first tensor's device and nothing
    is copied to the host. Non-finite entries propagate (a NaN anywhere makes that tensor's norm NaN).
    DTensors (FSDP2 shards) get the norm of the full tensor via one all-reduce of the local shards' norms.

    >>> tensor_norms([torch.ones(4), torch.full((2,), 3.0)])
    tensor([2.0000, 4.2426])
    """
    if any(type(t) is not Tensor and type(t) is not torch.nn.Parameter for t in tensors) and any(
        is_dtensor(t) for t in tensors
    ):
        # Sharded (FSDP2 / DTensor) tensors: the norm of the whole tensor, from the local shards' norms and
        # one all-reduce, identical on every rank. torch's own DTensor dispatch would issue one collective
        # per tensor and return DTensors that mix badly with plain tensors in clipping and Guard decisions.
        return global_norms(tensors, norm_type)
    return local_norms(tensors, norm_type)


def total_norm(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into the norm of all tensors concatenated.

    For finite p: ``(Σ_i ‖t_i‖_p^p)^(1/p)``; for ``p = inf``: ``max_i ‖t_i‖_inf``. Matches
    ``torch.nn.utils.clip_grad_norm_``'s total norm.
    """
    if norms.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=norms.device)
    if math.isinf(norm_type):
        return norms.max()
    return torch.linalg.vector_norm(norms, norm_type)


def nonfinite_counts(tensors: Sequence[Tensor]) -> Tensor:
    """Number of NaN/Inf entries in each tensor, as a float32 vector, with two fused kernels.

    ``t - t`` is exactly 0 for every finite entry and NaN for NaN and ±Inf, and the 0-"norm" counts the
    entries that are not 0 (NaN != 0), so ``‖t - t‖_0`` is the non-finite count without a Python loop.
    """
    if len(tensors) == 0:
        return torch.zeros(0)
    diffs = torch._foreach_sub(list(tensors), list(tensors))
    return tensor_norms(diffs, 0.0)
