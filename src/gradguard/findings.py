"""The one vocabulary every part of gradguard speaks: :class:`Finding` and :data:`KINDS`.

Monitor, probe, guard and lab all report what they see as findings, so sinks and reports need to know
exactly one type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gradguard.errors import ConfigError

#: Pathologies gradguard can name. Order is stable and used for sorting reports.
KINDS: tuple[str, ...] = ("exploding", "vanishing", "nonfinite", "dead_units", "saturation", "loss_spike")

#: Severities, least to most severe.
SEVERITIES: tuple[str, ...] = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One diagnosed pathology.

    Args:
        kind: one of :data:`KINDS`.
        module: qualified module name as in ``model.named_modules()``; ``""`` means the whole model.
        step: the training step (or ``0`` for a probe) at which it was last observed.
        severity: one of :data:`SEVERITIES`.
        message: one sentence stating what was measured, with the numbers.
        advice: the concrete remedy, naming the gradguard call or torch setting to use.
        evidence: the numbers behind the message.
    """

    kind: str
    module: str
    step: int
    severity: str
    message: str
    advice: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"Finding kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.severity not in SEVERITIES:
            raise ConfigError(f"Finding severity {self.severity!r} is not one of {', '.join(SEVERITIES)}")

    @property
    def key(self) -> tuple[str, str]:
        """Identity used for deduplication: the same pathology in the same module."""
        return (self.kind, self.module)

    @property
    def rank(self) -> int:
        """Index of the severity in :data:`SEVERITIES` (higher is worse)."""
        return SEVERITIES.index(self.severity)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "kind": self.kind,
            "module": self.module,
            "step": self.step,
            "severity": self.severity,
            "message": self.message,
            "advice": self.advice,
            "evidence": dict(self.evidence),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """Inverse of :meth:`to_dict`."""
        return cls(
            kind=data["kind"],
            module=data["module"],
            step=int(data["step"]),
            severity=data["severity"],
            message=data["message"],
            advice=data["advice"],
            evidence=dict(data.get("evidence", {})),
        )
