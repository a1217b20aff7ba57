"""Per-step parameter statistics kept on the device in a preallocated ring of rows.

Every step costs one fused ``torch._foreach_norm`` over the gradients — the per-tensor L2 norms, whose
sum of squares also gives the global norm and, since NaN and Inf propagate through it, a non-finite flag
— and one ``torch.stack`` that writes those norms and the loss into the step's row. No Python loop over
the parameters runs in this path beyond collecting their ``.grad`` tensors.

Non-finite counts are exact without a per-step count: a finite norm proves the tensor has no NaN/Inf
(count 0), and a non-finite one is counted exactly (:meth:`ParamStats.count_nonfinite`, two passes) on the
very step it appears, before the optimizer changes the gradients — on CPU, where reading the flag is a
memory load. On accelerators reading it would synchronise every step, so there the count of a flagged
tensor is recorded as NaN ("some") and the flag is read on the logging schedule.

Max-abs, the weight norm and the update ratio ‖Δw‖/‖w‖ are taken on *detail* steps (the sampled steps
by default, see docs/monitor.md; ``detail_every=1`` for every step). They are not per-step by default
because each is a full pass over memory the step does not otherwise touch at that moment, and the
training step is memory-bound at the monitor's scale: each of them costs about as much as the per-step
L2 norms, the update ratio several times that (a copy of the weights, then subtract and norm), and
``_foreach_norm(inf)`` for max-abs many times more than a per-tensor ``aminmax`` (BENCHMARKS.md, "Monitor
overhead"). The update ratio needs the weights of the step before, so they are copied with one
``torch._foreach_copy_`` on the step preceding a detail step.

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
    scaled: bool = False  # a loss scaler was active: its scale is in the row


class ParamStats:
    """Device-side ring of per-step parameter statistics, fetched to the host in blocks.

    Row layout of the per-step buffer: ``P`` gradient norms (``named_parameters()`` order, NaN for a
    parameter without a gradient) followed by the loss (NaN, or ignored when the step had none).

    Args:
        params: the watched parameters, in ``model.named_parameters()`` order.
        rows: buffered steps before a fetch is forced (the logging period).
        reduce_fn: optional reduction of stacked squared norms (see module docstring).
    """

    def __init__(self, params: Sequence[nn.Parameter], rows: int, reduce_fn: ReduceFn | None = None) -> None:
        self.params = list(params)
        self.rows = rows
        self.reduce_fn = reduce_fn
        # Checked once: a per-tensor DTensor test on every step would add a Python call per parameter.
        self._sharded = any(is_dtensor(p) for p in self.params)
        self._all = tuple(range(len(self.params)))
        self.device: torch.device | None = None
        self.meta: list[RowMeta] = []
        self._snapshot: list[Tensor] | None = None
        self._snapshot_step = -1
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        self._fast = False

    def _allocate(self, device: torch.device) -> None:
        n, p = self.rows, len(self.params)
        nan = float("nan")
        self.device = device
        self.step_n = torch.full((n, p + 1), nan, device=device)  # gradient norms | loss
        self.weight_n = torch.full((n, p), nan, device=device)
        self.delta_n = torch.full((n, p), nan, device=device)
        self.grad_max = torch.full((n, p), nan, device=device)
        self._no_loss = torch.full((), nan, device=device)
        self.scale_n = torch.full((n,), nan, device=device)
        self._index_cache.clear()
        self._snapshot = None
        # One device for every parameter: the norms can be stacked straight into a row of the buffer.
        # Otherwise (model parallel) tensor_norms groups them by device first.
        self._fast = not self._sharded and all(p.device == device for p in self.params)

    def pending(self) -> int:
        """Number of steps recorded on the device and not fetched yet."""
        return len(self.meta)

    def ensure_device(self, device: torch.device) -> bool:
        """(Re)allocate buffers on ``device``; True when that happened (callers fetch first)."""
        if self.device == device:
            return False
        self._allocate(device)
        return True

    def gradients(self) -> tuple[tuple[int, ...], list[Tensor]]:
        """``(indices, tensors)`` of the parameters that hold a gradient now, in parameter order."""
        grads = [p.grad for p in self.params]
        if all(g is not None for g in grads):
            return self._all, grads  # type: ignore[return-value]
        present = tuple(i for i, g in enumerate(grads) if g is not None)
        return present, [grads[i] for i in present]  # type: ignore[misc]

    def _index(self, present: tuple[int, ...]) -> Tensor:
        idx = self._index_cache.get(present)
        if idx is None:
            assert self.device is not None
            idx = torch.tensor(present, dtype=torch.long, device=self.device)
            self._index_cache[present] = idx
        return idx

    def record(
        self, step: int, loss: Tensor | None, detail: bool, present: tuple[int, ...], grads: list[Tensor],
        *, scale: Tensor | None = None, unscale: bool = True,
    ) -> tuple[RowMeta, Tensor]:
        """Write this step's statistics into the next free row (``present``/``grads`` from :meth:`gradients`).

        ``scale`` is a loss scaler's current scale ``S`` (a device tensor): it is recorded, and with
        ``unscale`` the gradients are taken to be ``S · ∇L`` and their norms and max-abs divided by ``S``
        (on the device, no sync).

        Returns the row's metadata and a device vector holding this step's gradient norms and loss: it is
        non-finite exactly when the loss or a gradient holds NaN/Inf (one flag, read by the caller only
        where reading is free). Nothing is copied to the host.
        """
        inv = None
        if scale is not None:
            self.scale_n[len(self.meta)].copy_(scale)
            if unscale:
                inv = scale.to(self.step_n.dtype).reciprocal()
        row = len(self.meta)
        # Every torch call counts here (each one is slower right after a backward pass has
        # flushed the caches), so the common case takes no reshape, device move or grad-mode switch.
        lv = self._no_loss if loss is None else loss.detach()
        if lv.dim():
            lv = lv.reshape(())
        if lv.device != self.step_n.device:
            lv = lv.to(self.step_n.device)
        if self._sharded:
            # FSDP2 gradients are DTensors; measure this rank's shard only (no
            # collective per step) and let reduce_fn combine the squared norms on the logging schedule.
            grads = [local_tensor(g) for g in grads]
        # Norms, not squares, are buffered: a float32 square overflows for norms > 1.8e19, which an
        # exploding run reaches long before its gradients hold an actual Inf. Squares are formed in
        # float64 on fetch. Gradients do not require grad, so no autograd graph is built here.
        norms = torch._foreach_norm(grads) if self._fast else list(tensor_norms(grads, 2.0))
        if len(present) == len(self.params):
            values = torch.stack([*norms, lv], out=self.step_n[row])  # one write: P norms and the loss
            if inv is not None:
                values[:-1].mul_(inv)
        else:
            values = torch.stack([*norms, lv]).to(self.step_n.dtype)
            if inv is not None:
                values[:-1].mul_(inv)
            self.step_n[row].fill_(float("nan"))  # parameters without a gradient read NaN
            self.step_n[row].index_copy_(0, self._index((*present, len(self.params))), values)
        if detail:
            with torch.no_grad():
                self._record_detail(row, step, present, grads, inv)
        if loss is None:
            values = values[:-1]
        meta = RowMeta(step=step, has_loss=loss is not None, detail=detail, present=present, scaled=scale is not None)
        self.meta.append(meta)
        return meta, values

    def _weights(self) -> list[Tensor]:
        # Called under torch.no_grad(), so the parameters need no detach(); local shard under FSDP2.
        return [local_tensor(p) for p in self.params] if self._sharded else list(self.params)

    def _record_detail(
        self, row: int, step: int, present: tuple[int, ...], grads: list[Tensor], inv: Tensor | None
    ) -> None:
        # max|g| as max(-min, max) of a per-tensor aminmax: far cheaper on CPU than _foreach_norm(inf).
        mx = torch.stack([m for g in grads for m in torch.aminmax(g)]).reshape(-1, 2).abs().amax(1)
        if inv is not None:
            mx = mx * inv.to(mx.dtype)
        if len(present) == len(self.params):
            self.grad_max[row].copy_(mx)
        else:
            self.grad_max[row].fill_(float("nan"))
            self.grad_max[row].index_copy_(0, self._index(present), mx.to(self.grad_max.dtype))
        weights = self._weights()
        self._norms_into(self.weight_n[row], weights)
        if self._snapshot is not None and self._snapshot_step == step - 1:
            torch._foreach_sub_(self._snapshot, weights)
            self._norms_into(self.delta_n[row], self._snapshot)
        else:
            self.delta_n[row].fill_(float("nan"))  # no weights of the step before: no update ratio
        self._snapshot_step = -1

    def _norms_into(self, out: Tensor, tensors: list[Tensor]) -> None:
        if self._fast:
            torch.stack(torch._foreach_norm(tensors), out=out)
        else:
            out.copy_(tensor_norms(tensors, 2.0))

    def snapshot(self, step: int) -> None:
        """Copy the current weights (called after the step before a detail step, before the optimizer)."""
        with torch.no_grad():
            weights = self._weights()
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
        p = len(self.params)
        p3 = 3 * p
        # One (rows, 3·P) block of norms (gradient, weight, update) then max|g| and the loss; a fresh
        # tensor, so the ring rows need no reset: every row is rewritten before it is read again (the
        # detail columns only on detail rows, which are the only ones read back).
        block = torch.cat(
            [self.step_n[:n, :p], self.weight_n[:n], self.delta_n[:n], self.grad_max[:n], self.step_n[:n, p:],
             self.scale_n[:n, None]], dim=1,
        )
        host = block.to("cpu", torch.float64)
        if self.reduce_fn is None:
            host[:, :p3].square_()
        else:
            plain = [i for i, m in enumerate(meta) if not m.detail]
            if plain:
                block[plain, p:p3] = float("nan")  # not measured on those steps (see the module docstring)
            # A distributed reduce_fn reduces the squared norms with one collective.
            dev = block[:, :p3].double() if block.device.type == "cuda" else block[:, :p3]
            host[:, :p3] = self.reduce_fn(dev * dev).to("cpu").double()
        out = {
            "grad_sq": host[:, :p],
            "weight_sq": host[:, p : 2 * p],
            "delta_sq": host[:, 2 * p : p3],
            "grad_max": host[:, p3 : 4 * p],
            "loss": host[:, 4 * p],
            "scale": host[:, 4 * p + 1],
        }
        return meta, out
