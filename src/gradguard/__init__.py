"""gradguard: show, detect and cure vanishing and exploding gradients in PyTorch models.

The public API is exactly what ``__all__`` lists.
"""

from gradguard import nn, stats
from gradguard.errors import ConfigError, GradGuardError, InputError, StateError
from gradguard.findings import KINDS, SEVERITIES, Finding
from gradguard.preflight import ProbeReport, probe

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "SEVERITIES",
    "ConfigError",
    "Finding",
    "GradGuardError",
    "InputError",
    "ProbeReport",
    "StateError",
    "__version__",
    "nn",
    "probe",
    "stats",
]
