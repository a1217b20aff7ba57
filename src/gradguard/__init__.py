"""gradguard: show, detect and cure vanishing and exploding gradients in PyTorch models.

The public API is exactly what ``__all__`` lists.
"""

from gradguard import clip, init, nn, stats
from gradguard.attach import autowatch
from gradguard.errors import ConfigError, GradGuardError, InputError, StateError
from gradguard.findings import KINDS, SEVERITIES, Finding
from gradguard.guard import Guard, GuardEvent
from gradguard.monitor import Monitor, watch
from gradguard.penalty import l2_penalty
from gradguard.preflight import ProbeReport, probe

__version__ = "0.1.0"

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
