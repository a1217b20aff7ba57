"""One step's measurement: the device work of a guarded step and its one fetch to the host.

One ``torch.stack`` gathers the loss, the gradient norms (per tensor, from one fused ``_foreach_norm``, or
the clipping policies' measurements), the clip flags and the scaler's found-inf, and one ``.tolist()``
brings them to the host: the decision to call ``optimizer.step()`` is host control flow, so it needs the
numbers there. The global norm ``sqrt(Σ‖g_i‖²)`` is then host arithmetic on the fetched floats
(docs/guard.md, "What one step does").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gradguard.clip import ClipPolicy
from gradguard.stats import tensor_norms, total_norm

__all__ = ["Step", "measure"]


class Step:
    """The host numbers of one step, from the one fetched vector (spike results filled in by the Guard)."""

    __slots__ = ("after", "clipped", "found_inf", "loss", "norm", "spike", "threshold", "typical", "z")

    def __init__(self, loss: float, norm: float, threshold: float, after: float, clipped: bool,
                 found_inf: bool) -> None:
        self.loss, self.norm, self.threshold, self.after = loss, norm, threshold, after
        self.clipped, self.found_inf = clipped, found_inf
        self.spike = [False, False]  # loss, gradient norm
        self.z = [math.nan, math.nan]
        self.typical = math.nan  # median gradient norm of the window

    def numbers(self, lr_factor: float) -> dict[str, float]:
        """The measurements of an event."""
        return {"loss": self.loss, "grad_norm": self.norm, "threshold": self.threshold, "z_loss": self.z[0],
                "z_grad_norm": self.z[1], "lr_factor": lr_factor}


def measure(
    loss: Tensor, params: Sequence[Tensor], policies: Sequence[ClipPolicy], *, fused: bool,
    zero: Callable[[torch.device], Tensor], found_inf: Tensor | None,
) -> Step:
    """Clip with ``policies`` (in order) or measure the gradients of ``params``, and fetch what the
    decision needs, with ``loss`` (a 0-d tensor) and the scaler's ``found_inf`` flags.

    ``fused``: every parameter is a plain tensor on one device, so one ``_foreach_norm`` serves (else
    :func:`gradguard.stats.tensor_norms`: a kernel per device, an all-reduce for sharded tensors).
    ``zero(device)`` is a cached 0-d zero (a constant made per step would be a host-to-device copy).
    """
    device = params[0].device  # where the norms are: only a loss computed elsewhere has to move
    parts = [loss]
    if policies:
        results = [policy(params) for policy in policies]
        last = results[-1]
        # the limit the last policy imposed, in its own unit (the others are inf): min over the four fields
        parts += [results[0].norm_before, last.norm_after, last.norm_limit, last.tensor_norm_limit,
                  last.value_limit, last.ratio_limit]
        parts += [r.clipped for r in results]
    else:
        grads = [p.grad for p in params if p.grad is not None]
        if not fused:
            parts.append(total_norm(tensor_norms(grads, 2.0), 2.0) if grads else zero(device))
        elif grads:
            parts += torch._foreach_norm(grads, 2.0)
    if found_inf is not None:
        parts.append(found_inf.reshape(()))
    if policies or not fused or found_inf is not None or loss.device != device:
        parts = [t if t.device == device else t.to(device) for t in parts]
    values = torch.stack(parts).tolist()
    found = bool(values.pop()) if found_inf is not None else False
    if policies:
        loss_v, norm, after = values[:3]
        threshold = min(values[3:7])
        clipped = any(values[7:]) and math.isfinite(norm)
    else:
        loss_v = values[0]
        norm = math.hypot(*values[1:])
        threshold, after, clipped = math.inf, norm, False
    return Step(loss_v, norm, threshold, after, clipped, found)
