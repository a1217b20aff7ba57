"""The lab: vanishing and exploding gradients from the literature, as experiments with checked claims.

``gradguard lab list`` shows the registry (:mod:`gradguard.lab.registry`); ``gradguard lab run ID`` runs
experiments (:mod:`gradguard.lab.runner`) into a folder of results: ``config.json``, ``metrics.json`` with
checked claims, PNG figures and ``report.html``.
"""

from gradguard.lab.claims import Claim
from gradguard.lab.experiment import ExperimentInfo, Result, RunContext

__all__ = ["Claim", "ExperimentInfo", "Result", "RunContext"]
