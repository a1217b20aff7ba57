"""The loss scaler's overflow skips, as the monitor reports them.

A step that a ``torch.amp.GradScaler`` skips on an fp16 overflow is routine (an ``info`` finding counting the
skips); a run of skips, or a scale that no longer amplifies anything, is a collapse (an ``error`` naming the
module whose fp16 values overflow). Reading the scaler itself is gradguard.stats.scaler's job; this module
reads only the history rows (their ``loss_scale`` and non-finite ``grad_norm``), on the logging schedule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradguard.detect.base import Origin
from gradguard.findings import Finding

#: A loss-scaler overflow skip is routine; these say it is not. With the default backoff (× 0.5) a run of
#: 20 skips in a row is a scale 2⁻²⁰ of where it stood and 20 steps without an update; a scale at or
#: below 1 that still overflows means the fp16 values overflow without any amplification, so no loss
#: scale can help.
SCALER_COLLAPSE_RUN = 20
SCALER_COLLAPSE_SCALE = 1.0


def is_overflow(row: Mapping[str, Any]) -> bool:
    """A step the loss scaler skips: scaled gradients overflowed while the loss stayed finite."""
    loss = row.get("loss")
    return (
        "loss_scale" in row and not math.isfinite(row["grad_norm"]) and (loss is None or math.isfinite(loss))
    )


class OverflowSkips:
    """Counts of the scaler's skips over the run: ``overflows`` in all, ``run`` in a row up to the latest
    row, and whether the current run's collapse was reported (once per run of skips)."""

    def __init__(self) -> None:
        self.overflows = 0
        self.run = 0
        self.collapse_reported = False

    def count(self, rows: Sequence[Mapping[str, Any]]) -> tuple[int, float, bool] | None:
        """Count the skips in ``rows``; the latest skip's ``(step, loss_scale, collapsing)`` when there is
        something to report, None when there was no skip or the collapse of this run is already reported."""
        last = None
        for r in rows:
            if is_overflow(r):
                self.overflows += 1
                self.run += 1
                last = r
            elif "loss_scale" in r:
                self.run = 0
                self.collapse_reported = False
        if last is None:
            return None
        step, scale = last["step"], last["loss_scale"]
        if self.run >= SCALER_COLLAPSE_RUN or scale <= SCALER_COLLAPSE_SCALE:
            if self.collapse_reported:  # once per run of skips: the first diagnosis stands
                return None
            self.collapse_reported = True
            return step, scale, True
        return step, scale, False

    def routine(self, step: int, scale: float, start: float) -> Finding:
        """The info finding counting the skips (``start``: the scaler's initial scale)."""
        return Finding(
            kind="nonfinite", module="", step=step, severity="info",
            message=f"the loss scaler skipped {self.overflows} step(s) on fp16 gradient overflow (latest at step "
            f"{step}, loss scale {scale:g}, started at {start:g}); routine: the skipped step is not applied and "
            "the scale backs off.",
            advice="Nothing to do while skips stay rare; many in a row mean the loss scale is collapsing.",
            evidence={"overflow_skips": self.overflows, "loss_scale": scale, "init_scale": start},
        )

    def collapse(self, step: int, scale: float, start: float, origin: Origin | None) -> Finding:
        """The error of a collapsing scale, naming the module the replay found (``origin``), if any."""
        module = origin.module if origin is not None and "replay_error" not in origin.evidence else ""
        where = f"`{module}` ({origin.phase} pass: {origin.what})" if origin is not None and module else (
            "a tensor the replay could not name")
        keep = (f" Keep `{module}` in float32 (run it under torch.autocast(device_type, enabled=False))."
                if module else "")
        evidence: dict[str, Any] = {"overflow_run": self.run, "overflow_skips": self.overflows,
                                    "loss_scale": scale, "init_scale": start}
        if origin is not None:
            evidence.update({"phase": origin.phase, **dict(origin.evidence)})
        return Finding(
            kind="nonfinite", module=module, step=step, severity="error",
            message=f"the loss scale is collapsing: {self.run} overflow skips in a row up to step "
            f"{step}, "
            f"scale {scale:g} from {start:g}, so no update is applied; the fp16 values overflow in {where}.",
            advice="Train in bfloat16 (torch.autocast(device_type, dtype=torch.bfloat16): the float32 exponent "
            "range, no loss scaling), lower the learning rate, or let the scale grow less often "
            f"(GradScaler(growth_interval=...) larger, growth_factor smaller).{keep}",
            evidence=evidence,
        )
