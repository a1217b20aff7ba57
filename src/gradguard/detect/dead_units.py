"""Dead units: ReLU outputs that were never positive over a window of sampled steps.

A unit whose output stays ≤ 0 (its peak is 0) for every input of :data:`MIN_SAMPLES` sampled batches
gets no gradient through the ReLU and cannot recover by itself (Lu et al. 2019, "Dying ReLU and
Initialization"). Reported as ``error`` when a whole layer is dead (the signal is cut), ``warning`` from
:data:`WARN_FRACTION`, ``info`` from :data:`INFO_FRACTION` (He-initialised ReLU nets routinely carry a
few dead units).

Above ``info`` only when the units stayed off over :data:`WARN_SAMPLES` sampled batches and their number
is at its highest so far (none has revived): units come back when the layers before them learn (a deep
default-initialised net at its initial plateau has half of its deep units off, and they revive as it
leaves the plateau), so a layer that is recovering by itself is info. A whole dead layer stays an error
at once: it passes no gradient to the layers before it, so nothing can revive it. So is any share while the gradient
vanishes along the depth (the ``vanishing`` test of :mod:`gradguard.detect.vanishing`): units that are off
because the signal has collapsed with depth are that finding's symptom, not ReLUs that died. And so is a
partial share while the loss holds at its best (:func:`gradguard.detect.base.loss_near_best`): the net is
learning around them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradguard.detect.base import Observation, fmt, loss_near_best
from gradguard.detect.exploding import DEPTH_RATIO, depth_profile
from gradguard.findings import Finding

MIN_SAMPLES = 3
#: Sampled batches a unit must stay off before the share is more than info (the monitor's default window).
WARN_SAMPLES = 5
INFO_FRACTION = 0.1
WARN_FRACTION = 0.5


def detect(obs: Observation) -> list[Finding]:
    """One ``dead_units`` finding per ReLU-like module with a large share of never-firing units."""
    if obs.new == 0:
        return []
    names = [
        n for n, peaks in obs.dead_window.items() if obs.dead_samples.get(n, 0) >= MIN_SAMPLES and peaks.numel() > 0
    ]
    prof = depth_profile(obs)
    collapsed = len(prof) >= 3 and prof[0][1] / prof[-1][1] <= 1.0 / DEPTH_RATIO
    out = []
    for name, dead in zip(names, _dead_counts([obs.dead_window[n] for n in names]), strict=True):
        samples = obs.dead_samples[name]
        units = obs.dead_window[name].numel()
        frac = dead / units
        if frac < INFO_FRACTION:
            continue
        severity = "error" if dead == units else "warning" if frac >= WARN_FRACTION else "info"
        if obs.run is not None:
            before = obs.run.dead_counts.get(name)
            obs.run.dead_counts[name] = max(dead, before or 0)
            if dead < units and (samples < WARN_SAMPLES or before is None or dead < before):
                severity = "info"
        if dead < units and (collapsed or loss_near_best(obs)):
            severity = "info"
        out.append(
            Finding(
                kind="dead_units",
                module=name,
                step=obs.step,
                severity=severity,
                message=(
                    f"{dead} of {units} units ({fmt(100 * frac)}%) of `{name}` never fired (output > 0) in the "
                    f"last {samples} sampled batches."
                ),
                advice=(
                    "Re-initialise with gg.init.apply(model, 'he_normal') and small positive biases, lower the "
                    "learning rate, or use an activation that cannot die (torch.nn.LeakyReLU(0.01), nn.ELU)."
                ),
                evidence={"dead": dead, "units": units, "fraction": frac, "samples": samples},
            )
        )
    return out


def _dead_counts(peaks: list[Tensor]) -> list[int]:
    """Number of units with peak ≤ 0 in each vector (NaN ≤ 0 is False: a NaN unit is not called dead).

    One comparison and one segment sum for all modules together (a cumulative sum read at each module's
    end), not three small kernels per module.
    """
    if not peaks:
        return []
    if all(p.shape == peaks[0].shape for p in peaks):  # the usual case: layers of one width
        return torch.stack(peaks).reshape(len(peaks), -1).le(0).sum(1).tolist()
    ends = torch.tensor([p.numel() for p in peaks]).cumsum(0) - 1
    cum = torch.cat([p.reshape(-1) for p in peaks]).le(0).cumsum(0)[ends]
    return torch.diff(cum, prepend=cum.new_zeros(1)).tolist()
