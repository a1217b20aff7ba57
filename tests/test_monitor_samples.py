"""gradguard.monitor.samples.SampledActivations against naive references: per-unit maxima over a window,
the history columns of a sampled step, and the output-change alerts."""

from __future__ import annotations

from typing import Any

import torch

from gradguard.monitor.activations import Sample
from gradguard.monitor.samples import SampledActivations
from gradguard.stats.activations import SUMMARY_FIELDS


def _sample(step: int, summaries: dict[str, dict[str, float]], activity: dict[str, torch.Tensor]) -> Sample:
    names = list(summaries)
    matrix = torch.tensor([[summaries[n].get(f, 0.0) for f in SUMMARY_FIELDS] for n in names], dtype=torch.float64)
    return Sample(step=step, matrix=matrix, rows={n: [i] for i, n in enumerate(names)}, activity=activity,
                  order=dict.fromkeys(names))


def test_dead_window_peaks_are_the_per_unit_maxima_of_the_last_dead_window_samples() -> None:
    torch.manual_seed(0)
    acts = SampledActivations(dead_window=3)
    history: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for step in range(7):
        activity = {"a": torch.rand(5).relu(), "b": torch.rand(2, 3)}
        nan_b = step == 4  # a sample with a non-finite output is not evidence of dead units
        summaries = {"a": {"frac_zero": 0.0}, "b": {"frac_zero": 0.0, "nonfinite": 1.0 if nan_b else 0.0}}
        acts.absorb(_sample(step, summaries, activity), None, lambda reason: None)
        history["a"].append(activity["a"])
        if not nan_b:
            history["b"].append(activity["b"])
    peaks = acts.dead_peaks()
    for name, seen in history.items():
        reference = torch.stack(seen[-3:]).amax(0)
        torch.testing.assert_close(peaks[name], reference, rtol=0, atol=0)
        assert len(acts.dead[name]) == 3
    assert acts.depth == ["a", "b"]


def test_a_sampled_row_gets_its_act_columns_and_changes_raise_alerts() -> None:
    acts = SampledActivations(dead_window=5)
    alerts: list[str] = []
    row: dict[str, Any] = {"step": 0}
    acts.absorb(_sample(0, {"relu": {"frac_zero": 0.2}}, {}), row, alerts.append)
    assert row["act/relu/frac_zero"] == 0.2 and {f"act/relu/{f}" for f in SUMMARY_FIELDS} <= set(row)
    assert alerts == []  # nothing to compare with yet
    # +0.05: below the alert shift of a tenth of the outputs (the dead-unit rule's info level); +0.3: above.
    acts.absorb(_sample(1, {"relu": {"frac_zero": 0.25}}, {}), None, alerts.append)
    assert alerts == []
    acts.absorb(_sample(2, {"relu": {"frac_zero": 0.55}}, {}), None, alerts.append)
    assert alerts == ["the outputs of `relu` changed"]
    acts.absorb(_sample(3, {"relu": {"frac_zero": 0.55, "nonfinite": 2.0}}, {}), None, alerts.append)
    assert alerts[-1] == "non-finite outputs of `relu`"
    assert acts.latest["relu"]["nonfinite"] == 2.0
