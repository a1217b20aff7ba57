"""What the Guard tells the user: its events (``guard.events``) and the findings it reports to a monitor.

Every intervention is a :class:`GuardEvent`; the ones a user must act on are also a
:class:`gradguard.findings.Finding` for ``Guard(monitor=...)``, with the message and advice built here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gradguard.findings import Finding

__all__ = ["ACTIONS", "FindingSink", "GuardEvent", "clip_finding", "rollback_finding", "skip_finding"]

#: Actions a :class:`GuardEvent` can record.
ACTIONS = ("skip", "clip", "rollback", "lr_backoff", "lr_restored", "reset_window", "rescue")


class FindingSink(Protocol):
    """What ``Guard(monitor=...)`` needs: a :class:`gradguard.Monitor`, or anything that takes findings."""

    def report(self, finding: Finding) -> None:
        """Receive one finding."""


@dataclass(frozen=True)
class GuardEvent:
    """One intervention of a :class:`gradguard.Guard`.

    Attributes:
        step: index of the ``guard.step()`` call (0-based).
        action: one of :data:`ACTIONS`.
        reason: why: ``nonfinite_loss``, ``nonfinite_grad``, ``amp_overflow``, ``loss_spike``,
            ``grad_spike``, ``divergence``, ``large_norm`` (a clip of a norm far above the recent median;
            routine clips are only counted), ``repeated_skips``, ``recovered``, ``rollback_loop``.
        numbers: the measurements behind it (loss, grad_norm, threshold, z-scores, lr_factor ...).
    """

    step: int
    action: str
    reason: str
    numbers: Mapping[str, float] = field(default_factory=dict)


def skip_finding(step: int, reason: str, numbers: Mapping[str, float]) -> Finding:
    """The finding of a skipped step (non-finite values or a spike)."""
    kind = "nonfinite" if reason.startswith("nonfinite") else "loss_spike"
    what = {
        "nonfinite_loss": f"loss {numbers['loss']}",
        "nonfinite_grad": f"gradient norm {numbers['grad_norm']}",
        "loss_spike": f"loss {numbers['loss']:.4g} (robust z {numbers['z_loss']:.1f})",
        "grad_spike": f"gradient norm {numbers['grad_norm']:.4g} (robust z {numbers['z_grad_norm']:.1f})",
    }[reason]
    return Finding(
        kind, "", step, "warning", f"Guard skipped step {step}: {what}",
        "Lower the learning rate, clip gradients (gg.clip) or inspect the batch at this step.", dict(numbers),
    )


def rollback_finding(
    step: int, reasons: list[str], numbers: Mapping[str, float], *, to_step: int, lr_factor: float,
    divergence: tuple[float | None, int], rescue: str | None,
) -> Finding:
    """The finding of a rollback after ``reasons`` (the skips that led to it, the last one its cause);
    ``divergence`` is the test's ``(factor, steps)``, ``rescue`` the name of a rescue clip engaged now."""
    growth = not any(r.startswith("nonfinite") for r in reasons)
    factor, steps = divergence
    why = (
        f"the loss stayed above {factor:g}x its starting level for {steps} steps"
        if reasons[-1] == "divergence"
        else f"{len(reasons)} skipped steps ({', '.join(sorted(set(reasons)))})"
    )
    engaged = f"; rescue clipping {rescue} engaged" if rescue else ""
    return Finding(
        "exploding" if growth else "nonfinite", "", step, "error",
        f"Guard rolled back to step {to_step} after {why}; learning-rate factor now {lr_factor:.3g}{engaged}",
        "Training is unstable at this learning rate: lower it, clip gradients, or re-initialise (gg.init).",
        dict(numbers),
    )


def clip_finding(step: int, numbers: Mapping[str, float]) -> Finding:
    """The finding of a clip of a norm far above the recent median (``numbers`` holds both)."""
    norm, typical = numbers["grad_norm"], numbers["typical_grad_norm"]
    return Finding(
        "exploding", "", step, "warning",
        f"gradient norm {norm:.3g} ({norm / typical:.1f}× the recent median {typical:.3g}) was clipped to "
        f"{numbers['threshold']:.3g}",
        "Clipping is containing growing gradients; consider a lower learning rate or gg.init schemes.",
        dict(numbers),
    )
