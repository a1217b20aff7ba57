"""gradguard: show, detect and cure vanishing and exploding gradients in PyTorch models.

The public API is exactly what ``__all__`` lists. Names backed by torch load on first use (PEP 562 module
``__getattr__``), so that ``import gradguard`` and the ``gradguard`` command's ``--help`` import no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradguard.errors import ConfigError, GradGuardError, InputError, StateError
from gradguard.findings import KINDS, SEVERITIES, Finding

if TYPE_CHECKING:
    from gradguard import clip, init, nn, stats
    from gradguard.attach import autowatch
    from gradguard.guard import Guard, GuardEvent
    from gradguard.monitor import Monitor, watch
    from gradguard.penalty import l2_penalty
    from gradguard.preflight import ProbeReport, probe

__version__ = "0.1.0"

#: Public name -> the module that defines it (a submodule is its own entry).
_LAZY: dict[str, str] = {
    "Guard": "gradguard.guard",
    "autowatch": "gradguard.attach",
    "GuardEvent": "gradguard.guard",
    "Monitor": "gradguard.monitor",
    "ProbeReport": "gradguard.preflight",
    "clip": "gradguard.clip",
    "init": "gradguard.init",
    "l2_penalty": "gradguard.penalty",
    "nn": "gradguard.nn",
    "probe": "gradguard.preflight",
    "stats": "gradguard.stats",
    "watch": "gradguard.monitor",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'gradguard' has no attribute {name!r}")
    module = importlib.import_module(where)
    value = module if where == f"gradguard.{name}" else getattr(module, name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "KINDS",
    "SEVERITIES",
    "ConfigError",
    "Finding",
    "GradGuardError",
    "Guard",
    "GuardEvent",
    "InputError",
    "Monitor",
    "ProbeReport",
    "StateError",
    "__version__",
    "autowatch",
    "clip",
    "init",
    "l2_penalty",
    "nn",
    "probe",
    "stats",
    "watch",
]
