"""Pre-flight probe: diagnose a model on one batch before training (``gg.probe``).

Usage::

    report = gg.probe(model, x)                      # default loss: fixed random projection of the output
    report = gg.probe(model, x, y, loss_fn)          # or your loss
    report = gg.probe(rnn_model, x, time_dim=1)      # plus ‖∂L/∂x_t‖ per step of the input
    for f in report.findings:                        # gg.Finding: kind, module, severity, message, advice
        print(f.severity, f.kind, f.module, f.advice)
    report.layers                                    # LayerRow per module call, in execution order
    report.recurrent                                 # RecurrentProfile per nn.RNN/LSTM/GRU call
    print(report.to_markdown()); report.to_html("probe.html")

or from a shell: ``gradguard probe models.py:make_model --input-shape 32x50x1 --time-dim 1 --out DIR``.

Cost: one forward and one backward pass with statistics, measured at about 2× one training step
(``BENCHMARKS.md``, section Probe). Recurrent modules are additionally unrolled step by step in Python to
get the per-step hidden-state gradients; that costs more (about 3× a fused training step for a 2-layer
LSTM over 200 steps, more for longer or narrower sequences). Pass ``unroll=False`` to skip it.

Layout: ``core`` (the probe and its report types), ``recurrent`` (unrolling), ``verdict`` (findings and
advice), ``render`` (Markdown/HTML), ``command`` (the CLI). The package is called ``preflight`` rather
than ``probe`` so that the public function ``gg.probe`` does not shadow a subpackage of the same name.
"""

from gradguard.preflight.core import LayerRow, ProbeReport, RecurrentProfile, TimeProfile, probe, projection_loss
from gradguard.preflight.verdict import diagnose

__all__ = ["LayerRow", "ProbeReport", "RecurrentProfile", "TimeProfile", "diagnose", "probe", "projection_loss"]
