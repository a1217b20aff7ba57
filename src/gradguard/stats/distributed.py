"""Gradient statistics that stay correct under ``torch.distributed`` (DDP, FSDP2 / DTensor, HSDP).

Two situations need different treatment:

* **Replicated gradients** (``DistributedDataParallel``, or a DTensor with only ``Replicate`` placements):
  after backward every rank holds the same, already averaged gradient, so the local norm *is* the global
  norm and nothing needs to be communicated.
* **Sharded gradients** (``torch.distributed.fsdp.fully_shard``, whose parameters and gradients are
  DTensors with a ``Shard`` placement): each rank holds a slice. For a finite p the p-th power of a norm is
  additive over disjoint slices, ``‖g‖_p^p = Σ_r ‖g_r‖_p^p``, so summing the stacked p-th powers of the local
  shard norms over the ranks gives every global norm at once with **one** all-reduce; for ``p = inf`` the
  maximum is taken instead.

Everything here is pure tensor math plus at most one collective per call; no value is copied to the host,
so callers decide when (on the logging schedule) to pay for it.

Findings and decisions under ``torch.distributed`` are produced **identically on every rank**, not on rank 0
only: everything the monitor's rules and the Guard look at is either already equal on all ranks (DDP's
averaged gradients) or made equal here (reduced shard norms, :func:`allreduce_mean` of the loss). Every rank
must therefore call the reducing functions at the same points — a rank that skips one leaves the others
waiting in the collective. Only output (console, files) is restricted to rank 0, by the sinks.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard.errors import ConfigError, InputError
from gradguard.stats.foreach import local_norms

#: Imported by FSDP2's ``fully_shard`` and by ``distribute_tensor``: no DTensor exists before this module is.
_DTENSOR_MODULE = "torch.distributed.tensor"


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def is_dtensor(t: object) -> bool:
    """True if ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and gradients are).

    Looks the class up in ``sys.modules`` instead of importing it: a DTensor can only exist once
    ``torch.distributed.tensor`` is imported, and importing it costs most of ``import gradguard`` otherwise.
    """
    dtensor = getattr(sys.modules.get(_DTENSOR_MODULE), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def _placements(t: Tensor) -> tuple[Any, type, type]:
    """``(t.placements, Partial, Shard)`` for a DTensor ``t`` (its module is loaded, so the import is free)."""
    from torch.distributed.tensor import Partial, Shard

    return t.placements, Partial, Shard  # type: ignore[attr-defined]


def local_tensor(t: Tensor) -> Tensor:
    """The part of ``t`` stored on this rank: ``t.to_local()`` for a DTensor, ``t`` itself otherwise.

    Never communicates (unlike ``DTensor.full_tensor()``, which all-gathers).
    """
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def local_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`local_tensor` of each tensor, in order."""
    return [local_tensor(t) for t in tensors]


def sharded_mask(tensors: Sequence[Tensor]) -> list[bool]:
    """Which tensors are split across ranks (a DTensor with a ``Shard`` placement on some mesh dimension).

    Plain tensors and replicated DTensors are ``False``. A DTensor with a ``Partial`` placement (unreduced
    partial sums) has no additive norm and is rejected with :class:`ConfigError`.
    """
    mask = []
    for t in tensors:
        if not is_dtensor(t):
            mask.append(False)
            continue
        placements, Partial, Shard = _placements(t)
        if any(isinstance(pl, Partial) for pl in placements):
            raise ConfigError(
                f"a gradient has placements {placements}; a Partial (not yet reduced) gradient has no per-rank "
                "norm that adds up; call this after the gradient reduction (FSDP does it in backward)"
            )
        mask.append(any(isinstance(pl, Shard) for pl in placements))
    return mask


def shard_group(tensors: Sequence[Tensor]) -> Any:
    """The process group over which the sharded tensors among ``tensors`` are split, or ``None``.

    For FSDP2 on a 1-D mesh that is the mesh's group; for HSDP (a 2-D ``(replicate, shard)`` mesh) it is
    the group of the shard dimension only, because replicas already hold equal values. All sharded tensors
    must be sharded over the same single mesh dimension, otherwise :class:`ConfigError` (pass ``group=``
    to :func:`allreduce_norms` explicitly then).
    """
    groups: list[Any] = []
    for t in tensors:
        if not is_dtensor(t):
            continue
        placements, _, Shard = _placements(t)
        dims = [d for d, pl in enumerate(placements) if isinstance(pl, Shard)]
        if not dims:
            continue
        if len(dims) > 1:
            raise ConfigError(
                f"a gradient is sharded over mesh dimensions {dims} (placements {placements}); only one shard "
                "dimension is supported automatically, pass group= explicitly"
            )
        group = t.device_mesh.get_group(dims[0])  # type: ignore[attr-defined]
        if all(group is not g for g in groups):
            groups.append(group)
    if len(groups) > 1:
        raise ConfigError(
            f"gradients are sharded over {len(groups)} different process groups; pass group= explicitly"
        )
    return groups[0] if groups else None


def allreduce_sum_packed(parts: Sequence[Tensor], group: Any = None) -> list[Tensor]:
    """Sum each tensor of ``parts`` over the ranks of ``group`` with a single all-reduce.

    The parts are flattened into one buffer (so several statistics share one collective), reduced with
    ``SUM`` and split back into their original shapes. The buffer is float64 if every part is float64
    (squares of large norms overflow float32), float32 otherwise. Without an initialised process group the
    parts are returned unchanged (as copies in that dtype).
    """
    if not parts:
        return []
    shapes = [p.shape for p in parts]
    dtype = torch.float64 if all(p.dtype == torch.float64 for p in parts) else torch.float32
    buf = torch.cat([p.detach().reshape(-1).to(dtype) for p in parts])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM, group=group)
    out = []
    offset = 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(buf[offset : offset + n].reshape(shape))
        offset += n
    return out


def allreduce_norms(
    per_tensor_norms: Tensor,
    p: float = 2.0,
    group: Any = None,
    *,
    sharded: Sequence[bool] | Tensor | None = None,
) -> Tensor:
    """Global per-tensor p-norms from the norms of this rank's local shards, with one all-reduce.

    For finite ``p > 0``: ``‖g_i‖_p = (Σ_r ‖g_{i,r}‖_p^p)^(1/p)`` — the stacked p-th powers are summed over
    the ranks in one collective and the p-th root is taken afterwards. ``p = 0`` (non-zero counts) sums the
    counts. ``p = inf`` takes the element-wise maximum over ranks.

    Entries that are *not* sharded (``sharded[i]`` false: replicated parameters, DDP gradients) hold the
    same value on every rank; only rank 0 of ``group`` contributes them to the sum, so they come back
    unchanged and bit-identical on all ranks. ``sharded=None`` means every entry is sharded.

    Non-finite values propagate: a NaN on any rank makes that global norm NaN on every rank, so decisions
    based on the result are identical everywhere.

    Args:
        per_tensor_norms: 1-D float tensor of local norms (e.g. from ``gradguard.stats.foreach.local_norms`` of
            :func:`local_tensors`).
        p: the norm order the local norms were computed with.
        group: process group (``None``: the default group). Use :func:`shard_group` for FSDP/HSDP.
        sharded: per-entry flags from :func:`sharded_mask`.

    Returns:
        A float32 tensor of global norms on the same device. Without an initialised process group (or with
        one rank) the input is returned unchanged.

    Example (2 ranks, one tensor split in halves ``[3]`` and ``[4]``)::

        allreduce_norms(torch.tensor([3.0]), 2.0)  # -> tensor([5.]) on both ranks
    """
    if not isinstance(per_tensor_norms, Tensor):
        raise InputError(f"per_tensor_norms must be a torch.Tensor, got {type(per_tensor_norms).__name__}")
    if per_tensor_norms.dim() != 1:
        raise ConfigError(f"per_tensor_norms must be 1-D, got shape {tuple(per_tensor_norms.shape)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or p < 0:
        raise ConfigError(f"p must be a number >= 0 or inf, got {p!r}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return per_tensor_norms
    if torch.distributed.get_world_size(group) == 1 or per_tensor_norms.numel() == 0:
        return per_tensor_norms
    norms = per_tensor_norms.detach().float()
    if math.isinf(p):
        # max is idempotent, so replicated entries need no masking.
        out = norms.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX, group=group)
        return out
    powers = norms if p == 0 else norms.pow(p)
    if sharded is not None:
        mask = torch.as_tensor(sharded, dtype=torch.bool, device=norms.device)
        if mask.shape != norms.shape:
            raise ConfigError(f"sharded has {mask.numel()} entries but per_tensor_norms has {norms.numel()}")
        if torch.distributed.get_rank(group) != 0:
            # Replicated entries: rank 0 speaks for everyone, so the sum is that value, not world_size × it.
            powers = torch.where(mask, powers, torch.zeros_like(powers))
    (summed,) = allreduce_sum_packed([powers], group)
    return summed if p == 0 else summed.pow(1.0 / p)


def global_norms(tensors: Sequence[Tensor], p: float = 2.0, group: Any = None) -> Tensor:
    """Per-tensor p-norms of (possibly sharded) tensors as if each were whole, on every rank.

    Computes the local-shard norms with one fused ``_foreach_norm`` per device
    (:func:`gradguard.stats.foreach.local_norms` of :func:`local_tensors`) and combines them with
    :func:`allreduce_norms`: one collective if any tensor is sharded, none otherwise (DDP gradients are
    already equal on every rank).
    ``group=None`` uses :func:`shard_group` of the tensors.
    """
    norms = local_norms(local_tensors(tensors), p)
    mask = sharded_mask(tensors)
    if not any(mask):
        return norms
    if group is None:
        group = shard_group(tensors)
    return allreduce_norms(norms, p, group, sharded=mask)


def make_reduce_fn(tensors: Sequence[Tensor], group: Any = None) -> Callable[[Tensor], Tensor] | None:
    """A reduction for blocks of stacked per-tensor **squared** norms, for ``gg.watch(..., reduce_fn=...)``.

    The returned function takes a float tensor of shape ``(rows, k · n)`` — ``rows`` logged steps, ``k``
    statistics side by side, ``n = len(tensors)`` columns each, in the order of ``tensors`` — and returns the
    same block summed over the ranks of ``group`` with **one** all-reduce, replicated columns counted once
    (see :func:`allreduce_norms`). ``None`` is returned when no tensor is sharded (single process, DDP):
    then local squared norms are already global and no collective is needed.

    Args:
        tensors: the parameters (or gradients) the block's columns describe; DTensor-ness decides which
            columns are sharded.
        group: process group; ``None`` uses :func:`shard_group` of the tensors.
    """
    mask_list = sharded_mask(tensors)
    if not any(mask_list):
        return None
    grp = shard_group(tensors) if group is None else group
    n = len(mask_list)

    def reduce(block: Tensor) -> Tensor:
        if block.dim() != 2 or block.shape[1] % n:
            raise ConfigError(f"expected a (rows, k·{n}) block of squared norms, got shape {tuple(block.shape)}")
        mask = torch.as_tensor(mask_list, dtype=torch.bool, device=block.device).repeat(block.shape[1] // n)
        flat = block if block.dtype == torch.float64 else block.float()
        if torch.distributed.is_initialized() and torch.distributed.get_rank(grp) != 0:
            flat = torch.where(mask, flat, torch.zeros_like(flat))
        (out,) = allreduce_sum_packed([flat], grp)
        return out

    return reduce


def allreduce_mean(values: Tensor, group: Any = None) -> Tensor:
    """Mean over the ranks of ``group`` (one all-reduce); the input unchanged when not distributed.

    Used for the loss: with equal local batch sizes and a mean-reduced loss, the mean of the per-rank
    losses is the loss over the concatenated global batch, and every rank gets the same number — so rules
    that look at the loss (spikes, NaN) decide identically on all ranks.
    """
    if not isinstance(values, Tensor):
        raise InputError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    world = torch.distributed.get_world_size(group)
    if world == 1:
        return values
    (summed,) = allreduce_sum_packed([values], group)
    return summed / world


__all__ = [
    "allreduce_mean",
    "allreduce_norms",
    "allreduce_sum_packed",
    "global_norms",
    "is_distributed",
    "is_dtensor",
    "local_tensor",
    "local_tensors",
    "make_reduce_fn",
    "shard_group",
    "sharded_mask",
]
