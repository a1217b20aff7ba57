"""One spike test: the monitor's loss_spike and exploding rules call stats.windows.SpikeRule (the Guard's
test) with the watch(window=...) window, and agree with it on the same values."""

from __future__ import annotations

import math
import random

from gradguard.detect import Observation, ParamInfo, exploding, loss_spike
from gradguard.stats import SpikeRule

PARAMS = [ParamInfo(f"fc{i}.weight", f"fc{i}", 2, 32 * 32) for i in range(3)]


def rows(n: int, seed: int = 0, sigma: float = 0.2, grad: list[float] | None = None) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for step in range(n):
        g = 1.0 if grad is None else grad[step]
        r: dict = {"step": step, "loss": math.exp(rng.gauss(0, sigma))}
        for p in PARAMS:
            r[f"grad_norm/{p.name}"] = g * math.exp(rng.gauss(0, 0.1))
        r["grad_norm"] = math.sqrt(sum(r[f"grad_norm/{p.name}"] ** 2 for p in PARAMS))
        out.append(r)
    return out


def test_loss_spike_is_the_spike_rule_on_log_losses_over_the_watch_window() -> None:
    rs = rows(120)
    rs[-1]["loss"] = 300.0
    for window in (64, 100):  # (small windows need far larger z: spike_threshold(6, 16) is 76)
        (f,) = loss_spike.detect(Observation(step=119, rows=rs, new=1, params=PARAMS, window=window))
        past = [r["loss"] for r in rs[-1 - window : -1]]
        ((spike, z, _),) = SpikeRule(min_excess=0.0, jump=1.0).scan([math.log(300.0)], [math.log(v) for v in past])
        assert spike and f.evidence["window"] == window and math.isclose(f.evidence["zscore"], z, rel_tol=1e-9)
        assert f.severity == "warning"  # ×300 the median


def test_gradient_norm_spike_agrees_with_the_guards_rule() -> None:
    rs = rows(80)
    rs[-1]["grad_norm"] = 50.0
    rs[-1]["loss"] = 1.0
    (f,) = loss_spike.detect(Observation(step=79, rows=rs, new=1, params=PARAMS, window=50))
    past = [r["grad_norm"] for r in rs[-51:-1]]
    ((spike, z, _),) = SpikeRule().scan([50.0], past)
    assert spike and f.evidence["metric"] == "grad_norm" and math.isclose(f.evidence["zscore"], z, rel_tol=1e-9)


def test_tiny_batch_single_batches_are_info_at_most() -> None:
    # Batches of 2-8: single batches up to ~50x the median loss are ordinary; never a warning.
    for seed in range(10):
        rs = rows(200, seed, sigma=1.0)
        for i in range(20, 200, 37):
            rs[i]["loss"] = 50.0 * sorted(r["loss"] for r in rs[:i])[i // 2]
        for end in range(20, 200):
            for f in loss_spike.detect(Observation(step=end - 1, rows=rs[:end], new=1, params=PARAMS)):
                assert f.severity == "info", f.message


def test_short_history_is_never_judged() -> None:
    rs = rows(10)
    rs[-1]["loss"] = 1e6
    assert loss_spike.detect(Observation(step=9, rows=rs, new=1, params=PARAMS)) == []


def test_slow_climb_is_silent_and_a_sudden_explosion_is_not() -> None:
    # A plateau exit: the gradient norm climbs x20 over 100 steps (healthy).
    climb = [1.0] * 50 + [20 ** (i / 100) for i in range(100)]
    rs = rows(150, grad=climb)
    for end in range(20, 151):
        assert exploding.detect(Observation(step=end - 1, rows=rs[:end], new=1, params=PARAMS)) == []
    burst = [1.0] * 60 + [30.0] * 3
    rs = rows(63, grad=burst)
    (f,) = exploding.detect(Observation(step=62, rows=rs, new=1, params=PARAMS))
    assert f.kind == "exploding" and f.evidence["ratio"] > 20
