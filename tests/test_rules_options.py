"""Rule options and watch()'s new options: out-of-range values are ConfigErrors naming the value and the
allowed range; findings become visible within a step of their evidence (not at the next log_every fetch)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detect import RuleOptions
from gradguard.sinks import Sink


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("spike_z", -1.0, r"\(0.0, inf\)"),
        ("level_ratio", 1.0, r"\(1.0, inf\)"),
        ("level_steps", 0, r"\[1, inf\)"),
        ("update_high", 0.0, r"\(0.0, inf\)"),
        ("update_stall", 1.5, r"\(0.0, 1.0\)"),
        ("forward_gain", 0.5, r"\(1.0, inf\)"),
        ("spike_warning", 5.0, r"\[10.0, inf\)"),
        ("spike_factor", 0.5, r"\[1.0, inf\)"),
        ("growth", 1.0, r"\(1.0, inf\)"),
        ("update_target", 0.5, r"\(0.0, 0.1\)"),
        ("update_samples", 0, r"\[1, inf\)"),
        ("forward_growth", 1.0, r"\(1.0, inf\)"),
    ],
)
def test_rule_option_out_of_range_is_a_config_error(option: str, value: float, allowed: str) -> None:
    with pytest.raises(gg.ConfigError, match=rf"{option}={value!r} is out of range; allowed: {allowed}"):
        RuleOptions(**{option: value})


def test_a_non_finite_rule_option_is_a_config_error() -> None:
    with pytest.raises(gg.ConfigError, match=r"growth=nan must be finite"):
        RuleOptions(growth=math.nan)


def test_watch_chance_options_are_validated() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(gg.ConfigError, match=r"num_classes=1 is out of range"):
        gg.watch(model, num_classes=1, console=False)
    with pytest.raises(gg.ConfigError, match=r"chance_loss=-1.0 is out of range"):
        gg.watch(model, chance_loss=-1.0, console=False)
    with pytest.raises(gg.ConfigError, match="not both"):
        gg.watch(model, num_classes=3, chance_loss=1.0, console=False)
    with pytest.raises(gg.InputError, match="rules="):
        gg.watch(model, rules={"spike_z": 3}, console=False)
    with pytest.raises(gg.InputError, match="optimizer="):
        gg.watch(model, optimizer="sgd", console=False)
    with pytest.raises(gg.ConfigError, match=r"window=1 is out of range"):
        gg.watch(model, window=1, console=False)


class Clock(Sink):
    def __init__(self) -> None:
        self.step = 0
        self.seen: list[tuple[int, gg.Finding]] = []

    def on_finding(self, finding: gg.Finding) -> None:
        self.seen.append((self.step, finding))


def test_a_mid_run_divergence_is_printed_within_the_level_steps_with_log_every_10() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    clock = Clock()
    mon = gg.watch(model, console=False, sinks=[clock], num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randint(4, (64,))
    losses = []
    for step in range(60):
        clock.step = step
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        # From step 43 on the reported loss is 3x its level (as a ruined run's would be).
        reported = loss.detach() * (3.0 if step >= 43 else 1.0)
        losses.append(float(reported))
        mon.step(reported)
        opt.step()
    best = min(losses[:43])
    assert all(v > 2 * best for v in losses[43:])  # degraded from step 43
    loud = [(s, f) for s, f in clock.seen if f.rank >= 1 and f.kind == "exploding"]
    assert loud and loud[0][0] <= 45, [(s, f.message) for s, f in clock.seen]
    assert math.isclose(mon.findings[0].evidence["chance"], math.log(4))
    mon.close()
