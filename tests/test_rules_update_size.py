"""Update-size rule: a weight tensor updated ≥ 0.1 of its norm for several measured steps is a learning-rate
problem (with the learning rate that fixes it), one that does not move while the others learn is stalled;
biases, lookup tables and frozen tensors are not judged."""

from __future__ import annotations

import pytest

from gradguard.detect import Observation, ParamInfo, RuleOptions, update_size

PARAMS = [
    ParamInfo("emb.weight", "emb", 2, 1000 * 16, sparse_rows=True),
    ParamInfo("fc0.weight", "fc0", 2, 256),
    ParamInfo("fc0.bias", "fc0", 1, 16),
    ParamInfo("fc1.weight", "fc1", 2, 256),
    ParamInfo("fc2.weight", "fc2", 2, 256),
]


def history(ratios: dict[str, list[float]], n: int = 40, grads: dict[str, float] | None = None) -> list[dict]:
    out = []
    for step in range(n):
        r: dict = {"step": step, "loss": 1.0}
        for p in PARAMS:
            r[f"grad_norm/{p.name}"] = (grads or {}).get(p.name, 1.0)
        k = step // 10
        if step % 10 == 0 and k >= 1:
            for p in PARAMS:
                seq = ratios.get(p.name, [3e-3] * 10)
                r[f"update_ratio/{p.name}"] = seq[min(k - 1, len(seq) - 1)]
        out.append(r)
    return out


def obs(rs: list[dict], lrs: dict[str, float] | None = None) -> Observation:
    return Observation(step=rs[-1]["step"], rows=rs, new=10, params=PARAMS, lrs=lrs or {})


def test_large_updates_name_the_layer_and_the_learning_rate_that_fixes_them() -> None:
    rs = history({"fc1.weight": [0.4, 0.5, 0.3]}, n=31)
    (f,) = update_size.detect(obs(rs, {p.name: 1.0 for p in PARAMS}))
    assert (f.kind, f.module, f.severity) == ("exploding", "fc1", "warning")
    assert f.evidence["suggested_lr"] == pytest.approx(1.0 * 3e-3 / 0.3)  # lr · target / smallest ratio
    assert "lr 1 →" in f.advice


def test_a_peak_or_two_is_not_persistent() -> None:
    rs = history({"fc1.weight": [3e-3, 0.5, 0.3]}, n=31)
    assert update_size.detect(obs(rs)) == []


def test_biases_and_lookup_tables_are_not_judged() -> None:
    rs = history({"fc0.bias": [1.0] * 3, "emb.weight": [0.9] * 3}, n=31)
    assert update_size.detect(obs(rs)) == []


def test_stalled_layer_while_others_learn() -> None:
    rs = history({"fc2.weight": [1e-9] * 3}, n=31)
    (f,) = update_size.detect(obs(rs))
    assert (f.kind, f.module) == ("vanishing", "fc2") and "stalled" in f.message
    frozen = history({"fc2.weight": [0.0] * 3}, n=31, grads={"fc2.weight": 0.0})
    assert update_size.detect(obs(frozen)) == []  # no gradient at all: frozen, not stalled


def test_bounds_are_validated() -> None:
    from gradguard.errors import ConfigError

    with pytest.raises(ConfigError, match="update_high=0"):
        RuleOptions(update_high=0.0)
    with pytest.raises(ConfigError, match="update_target"):
        RuleOptions(update_high=0.01, update_target=0.05)


def test_large_updates_that_keep_the_loss_at_its_best_are_not_judged() -> None:
    from gradguard.detect.base import NEAR_BEST, RunMemory

    rs = history({"fc1.weight": [0.4, 0.5, 0.3]}, n=31)
    falling = [dict(r, loss=3.0 / (1 + r["step"])) for r in rs]  # learning: the last losses are its best
    run = RunMemory()
    run.update(falling)
    o = obs(falling)
    o.run = run
    assert update_size.detect(o) == []
    # The same updates once the loss has left its best level by more than NEAR_BEST: a learning-rate problem.
    risen = [dict(r, loss=r["loss"] * (1.0 if r["step"] < 28 else 1.5 * NEAR_BEST)) for r in falling]
    run = RunMemory()
    run.update(risen)
    o = obs(risen)
    o.run = run
    (f,) = update_size.detect(o)
    assert (f.kind, f.module) == ("exploding", "fc1")
