"""Pre-flight probe: diagnose a model on one batch before training (``gg.probe``, ``gradguard probe``).

Usage::

    report = gg.probe(model, x)                                  # loss: fixed random projection of the output
    report = gg.probe(model, x, targets=y, loss_fn=loss_fn)      # or your loss
    report = gg.probe(rnn_model, x, time_dim=1)                  # plus ‖∂L/∂x_t‖ per step of the input
    for f in report.findings:                                    # gg.Finding: kind, module, severity, advice
        print(f.severity, f.kind, f.module, f.advice)
    print(report.to_markdown()); report.to_html("probe.html")

Modules, in the order data flows: ``state`` (leave the model as found), ``loss`` (the probe loss),
``recurrent`` (step-by-step unrolling), ``measure`` (hooks, one backward pass, the records of ``rows``),
``verdict`` (findings and remedies), ``report`` (:class:`ProbeReport`, Markdown and HTML), ``core``
(:func:`probe`), ``command`` (the CLI). ``docs/probe.md`` says what is measured and how it is judged,
and why the package is called ``preflight``.
"""

from gradguard.preflight.core import probe
from gradguard.preflight.loss import LOSS_KINDS, projection_loss
from gradguard.preflight.report import ProbeReport
from gradguard.preflight.rows import LayerRow, RecurrentProfile, TimeProfile
from gradguard.preflight.verdict import diagnose

__all__ = ["LOSS_KINDS", "LayerRow", "ProbeReport", "RecurrentProfile", "TimeProfile", "diagnose", "probe",
           "projection_loss"]
