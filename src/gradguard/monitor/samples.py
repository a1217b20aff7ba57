"""What the sampled steps measured: per-module output summaries, dead-unit windows, time profiles.

A sampled step's :class:`gradguard.monitor.activations.Sample` reaches the host on the logging schedule;
:class:`SampledActivations` keeps what the detection rules read of it (the latest summaries, each ReLU-like
unit's activity over the last ``dead_window`` sampled steps, the per-time-step profiles of recurrent
modules, the modules' order along the depth) and adds the summaries to the history row of their step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from gradguard.monitor.activations import Sample, pool_summaries
from gradguard.stats.activations import SUMMARY_FIELDS

#: Alerts from a sampled step: a module's share of zero or of saturated outputs rose by this much since its
#: previous sampled step (a tenth of the outputs: the dead-unit rule's info level). Its output scale is not
#: compared across steps: the forward-growth rule judges the growth along the depth within one step, and the
#: scale of a deep layer's small outputs drifts by ×2 between sampled steps of healthy training.
ALERT_SHIFT = 0.1


class SampledActivations:
    """The sampled steps' measurements, as the detection rules read them (see the module's docstring)."""

    def __init__(self, dead_window: int) -> None:
        self.dead_window = dead_window
        self.latest: dict[str, dict[str, float]] = {}  # per module, the latest pooled summary
        self._keys: dict[str, list[str]] = {}  # per module, its history columns act/<module>/<field>
        self.time_forward: dict[str, Tensor] = {}
        self.time_grad: dict[str, Tensor] = {}
        self.depth: list[str] = []
        self.dead: dict[str, deque[Tensor]] = {}
        self.peaks: dict[str, Tensor] | None = None  # dead_peaks() of the windows as they stand

    def absorb(self, sample: Sample, row: dict[str, Any] | None, alert: Callable[[str], None]) -> None:
        """Take in a sampled step's summaries (into ``row``, its history row, when it was fetched with it);
        ``alert(reason)`` when a module's outputs changed (see :data:`ALERT_SHIFT`)."""
        if sample.order:
            self.depth = list(sample.order)
        if sample.matrix is not None:
            host = sample.matrix.cpu()  # one host transfer for every module's summaries
            values = host.tolist()
            for name, idx in sample.rows.items():
                if len(idx) == 1:
                    pooled = dict(zip(SUMMARY_FIELDS, values[idx[0]], strict=True))
                else:
                    pooled = pool_summaries(host[idx])
                self._alert_on_change(name, pooled, alert)
                self.latest[name] = pooled
                if row is not None:
                    keys = self._keys.get(name)
                    if keys is None:
                        keys = self._keys[name] = [f"act/{name}/{field}" for field in SUMMARY_FIELDS]
                    row.update(zip(keys, pooled.values(), strict=True))
                act = sample.activity.get(name)
                if act is not None and pooled["nonfinite"] == 0:
                    # A NaN output is "not > 0" everywhere; counting it would call live units dead.
                    self.dead.setdefault(name, deque(maxlen=self.dead_window)).append(act.cpu())
                    self.peaks = None  # recomputed at the next judgement, once per sampled step
        for name, prof in sample.time_forward.items():
            self.time_forward[name] = prof.cpu()
        for name, prof in sample.time_grad.items():
            self.time_grad[name] = prof.cpu()

    def _alert_on_change(self, name: str, pooled: Mapping[str, float], alert: Callable[[str], None]) -> None:
        """Alert when a module's outputs changed since its previous sampled step (see ALERT_SHIFT)."""
        prev = self.latest.get(name)
        if pooled["nonfinite"] > 0:
            alert(f"non-finite outputs of `{name}`")
            return
        if prev is None:
            return
        if (pooled["frac_zero"] - prev["frac_zero"] >= ALERT_SHIFT
                or pooled["frac_saturated"] - prev["frac_saturated"] >= ALERT_SHIFT):
            alert(f"the outputs of `{name}` changed")

    def dead_peaks(self) -> dict[str, Tensor]:
        """Per ReLU-like module, each unit's peak output over its window of sampled steps.

        Modules whose windows hold tensors of the same shapes are reduced together: one stack and one
        ``amax`` for all of them instead of two kernels per module.
        """
        groups: dict[tuple[torch.Size, ...], list[str]] = {}
        for name, d in self.dead.items():
            if d:
                groups.setdefault(tuple(t.shape for t in d), []).append(name)
        out: dict[str, Tensor] = {}
        for shapes, names in groups.items():
            block = torch.stack([t for n in names for t in self.dead[n]])
            peaks = block.reshape(len(names), len(shapes), *shapes[0]).amax(1)
            out.update(zip(names, peaks.unbind(0), strict=True))
        self.peaks = out
        return out
