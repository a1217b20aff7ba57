"""Per-step parameter statistics kept on the device in preallocated buffers.

Every step costs one fused ``torch._foreach_norm`` over the gradients (the per-tensor L2 norms, whose sum
of squares also gives the global norm and, since NaN and Inf propagate through it, a non-finite flag).
The costlier statistics — max-abs, weight norm and the update ratio ‖Δw‖/‖w‖ — are taken on *detail*
steps only (the activation schedule, every 10th step by default); the update ratio needs the weights of the
step before, so those are copied with one ``torch._foreach_copy_`` on the step preceding a detail step.
Measured on CPU (20-layer MLP, width 256): L2 norms 0.24 ms, max-abs by ``_foreach_norm(inf)`` 3.7 ms but
by a loop of ``aminmax`` 0.2 ms, exact non-finite counts 3.4 ms — so the exact counts are computed only on
steps whose flag is raised, never in the steady state.

Distributed training: norms of sharded parameters are partial. ``reduce_fn`` (if given) receives the
stacked per-tensor *squared* norms as one block of shape ``(rows, 3 · n_params)`` — gradient, weight and
update (Δw) squared norms side by side, columns in ``named_parameters()`` order, NaN where not measured —
on the logging schedule, right before they become norms, and must return the globally reduced block
(e.g. one all-reduce with ``SUM`` across FSDP shards: ``gradguard.stats.distributed.make_reduce_fn``).
It is called once per fetch, not per step. Max-abs values stay local to the rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradguard.stats import nonfinite_counts, tensor_norms
from gradguard.stats.distributed import is_dtensor, local_tensor

ReduceFn = Callable[[Tensor], Tensor]


@dataclass
class RowMeta:
    """What the host knows about a buffered step without reading the device."""

    step: int
    has_loss: bool
    detail: bool
    present: tuple[int, ...]  # indices of parameters that had a gradient
    nonfinite_counts: Tensor | None = None  # exact counts, computed only on flagged steps


class ParamStats:
    """Device-side ring of per-step parameter statistics, fetched to the host in blocks.

    Args:
        params: the watched parameters, in ``model.named_parameters()`` order.
        rows: buffered steps before a fetch is forced (the logging period).
        reduce_fn: optional reduction of stacked squared norms (see module docstring).
    """

    def __init__(self, params: Sequence[nn.Parameter], rows: int, reduce_fn: ReduceFn | None = None) -> None:
        self.params = list(params)
        self.rows = rows
        self.reduce_fn = reduce_fn
        # Checked once: per-tensor DTensor tests cost ~1 µs each, i.e. noticeable for every step.
        self._sharded = any(is_dtensor(p) for p in self.params)
        self.device: torch.device | None = None
        self.meta: list[RowMeta] = []
        self._snapshot: list[Tensor] | None = None
        self._snapshot_step = -1
        self._index_cache: dict[tuple[int, ...], Tensor] = {}

    def _allocate(self, device: torch.device) -> None:
        n, p = self.rows, len(self.params)
        nan = float("nan")
        self.device = device
        self.grad_n = torch.full((n, p), nan, device=device)
        self.weight_n = torch.full((n, p), nan, device=device)
        self.delta_n = torch.full((n, p), nan, device=device)
        self.grad_max = torch.full((n, p), nan, device=device)
        self.loss = torch.full((n,), nan, device=device)
        self._index_cache.clear()
        self._snapshot = None

    def pending(self) -> int:
        """Number of steps recorded on the device and not fetched yet."""
        return len(self.meta)

    def ensure_device(self, device: torch.device) -> bool:
        """(Re)allocate buffers on ``device``; True when that happened (callers fetch first)."""
        if self.device == device:
            return False
        self._allocate(device)
        return True

    def _index(self, present: tuple[int, ...]) -> Tensor:
        idx = self._index_cache.get(present)
        if idx is None:
            assert self.device is not None
            idx = torch.tensor(present, dtype=torch.long, device=self.device)
            self._index_cache[present] = idx
        return idx

    def record(self, step: int, loss: Tensor | None, detail: bool) -> tuple[RowMeta, Tensor]:
        """Write this step's statistics into the next free row; returns its metadata and 0-d "bad" flag.

        The flag is true when the loss or any gradient holds NaN/Inf; it stays on the device.
        """
        present = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
        # integrations (issue 6): FSDP2 gradients are DTensors; measure this rank's shard only (no collective
        # per step) and let reduce_fn combine the squared norms on the logging schedule.
        grads: list[Tensor] = [self.params[i].grad for i in present]  # type: ignore[misc]
        if self._sharded:
            grads = [local_tensor(g) for g in grads]
        row = len(self.meta)
        norms = tensor_norms(grads, 2.0)
        # Norms, not squares, are buffered: a float32 square overflows for norms > 1.8e19, which an
        # exploding run reaches long before its gradients hold an actual Inf. Squares are formed in
        # float64 on fetch.
        if len(present) == len(self.params):
            self.grad_n[row].copy_(norms)
        else:
            self.grad_n[row].index_copy_(0, self._index(present), norms)
        total = norms.sum()  # NaN/Inf in any norm (or the loss) makes the sum non-finite: one flag
        if loss is not None:
            lv = loss.detach().reshape(())
            self.loss[row].copy_(lv)
            total = total + lv
        bad = ~torch.isfinite(total)
        if detail:
            self._record_detail(row, step, present, grads)
        meta = RowMeta(step=step, has_loss=loss is not None, detail=detail, present=present)
        self.meta.append(meta)
        return meta, bad

    def _record_detail(self, row: int, step: int, present: tuple[int, ...], grads: list[Tensor]) -> None:
        # max|g| as max(-min, max) of a per-tensor aminmax: 15x faster on CPU than _foreach_norm(inf).
        mx = torch.stack([m for g in grads for m in torch.aminmax(g.detach())]).reshape(-1, 2).abs().amax(1).float()
        idx = self._index(present)
        self.grad_max[row].index_copy_(0, idx, mx)
        weights = [local_tensor(p.detach()) for p in self.params]  # local shard under FSDP2 (issue 6)
        self.weight_n[row].copy_(tensor_norms(weights, 2.0))
        if self._snapshot is not None and self._snapshot_step == step - 1:
            torch._foreach_sub_(self._snapshot, weights)
            self.delta_n[row].copy_(tensor_norms(self._snapshot, 2.0))
        self._snapshot_step = -1

    def snapshot(self, step: int) -> None:
        """Copy the current weights (called after the step before a detail step, before the optimizer)."""
        weights = [local_tensor(p.detach()) for p in self.params]  # local shard under FSDP2 (issue 6)
        if self._snapshot is None or any(
            s.shape != w.shape or s.device != w.device or s.dtype != w.dtype
            for s, w in zip(self._snapshot, weights, strict=True)
        ):
            self._snapshot = [w.clone() for w in weights]
        else:
            torch._foreach_copy_(self._snapshot, weights)
        self._snapshot_step = step

    def count_nonfinite(self, meta: RowMeta) -> None:
        """Exact NaN/Inf counts of the present gradients (two extra passes; only on flagged steps)."""
        grads = [local_tensor(self.params[i].grad) for i in meta.present]  # type: ignore[arg-type]
        meta.nonfinite_counts = nonfinite_counts(grads).cpu()

    def fetch(self) -> tuple[list[RowMeta], dict[str, Tensor]]:
        """Copy every pending row to the host (one transfer per block) and clear the ring."""
        n = len(self.meta)
        meta, self.meta = self.meta, []
        if n == 0 or self.device is None:
            return meta, {}
        # One (rows, 3·P) block of squared norms: a distributed reduce_fn reduces it with one collective.
        norms = torch.cat([self.grad_n[:n], self.weight_n[:n], self.delta_n[:n], self.grad_max[:n]], dim=1)
        # copy=True: on CPU .cpu() would alias the buffers that are reset just below.
        host = norms.to("cpu", copy=True).double()
        p3 = 3 * len(self.params)
        if self.reduce_fn is None:
            host[:, :p3] = host[:, :p3] ** 2
        else:
            dev = norms[:, :p3].double() if norms.device.type == "cuda" else norms[:, :p3]
            host[:, :p3] = self.reduce_fn(dev * dev).to("cpu").double()
        loss = self.loss[:n].float().to("cpu", copy=True)
        p = len(self.params)
        out = {
            "grad_sq": host[:, :p],
            "weight_sq": host[:, p : 2 * p],
            "delta_sq": host[:, 2 * p : 3 * p],
            "grad_max": host[:, 3 * p :],
            "loss": loss,
        }
        # Reset the rows just read so stale values never leak into a later step.
        for t in (self.grad_n, self.weight_n, self.delta_n, self.grad_max):
            t[:n].fill_(float("nan"))
        self.loss[:n].fill_(float("nan"))
        return meta, out

