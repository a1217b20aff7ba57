"""Pre-flight probe: diagnose a model on one batch before training (``gg.probe``).

The package is called ``preflight`` rather than ``probe`` so that the public function ``gg.probe`` does
not shadow a subpackage of the same name.
"""

from gradguard.preflight.core import LayerRow, ProbeReport, RecurrentProfile, TimeProfile, probe, projection_loss
from gradguard.preflight.verdict import diagnose

__all__ = ["LayerRow", "ProbeReport", "RecurrentProfile", "TimeProfile", "diagnose", "probe", "projection_loss"]
