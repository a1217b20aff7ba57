"""Detection rules on synthetic observations: they fire on the pathology, stay silent on noise, and
never let NaN/Inf pass for something else."""

from __future__ import annotations

import math
import random

import pytest
import torch

from gradguard.detect import Observation, ParamInfo, dead_units, exploding, loss_spike, run_rules, saturation, vanishing

PARAMS = [ParamInfo(f"fc{i}.weight", f"fc{i}", 2, 64 * 64) for i in range(4)]
DEPTH = [p.module for p in PARAMS]


def rows(n: int, seed: int = 0, scale: list[float] | None = None, loss_sigma: float = 0.2) -> list[dict]:
    """Noisy healthy history: loss log-normal around 1, per-layer grad norms around ``scale``."""
    rng = random.Random(seed)
    scale = scale or [1.0] * len(PARAMS)
    out = []
    for step in range(n):
        r: dict = {"step": step, "loss": math.exp(rng.gauss(0, loss_sigma))}
        for p, s in zip(PARAMS, scale, strict=True):
            r[f"grad_norm/{p.name}"] = s * math.exp(rng.gauss(0, 0.2))
        r["grad_norm"] = math.sqrt(sum(r[f"grad_norm/{p.name}"] ** 2 for p in PARAMS))
        out.append(r)
    return out


def obs(rs: list[dict], new: int = 10, **kw: object) -> Observation:
    return Observation(step=rs[-1]["step"], rows=rs, new=new, params=PARAMS, depth=DEPTH, **kw)  # type: ignore[arg-type]


def test_healthy_noise_is_silent_over_many_windows() -> None:
    for seed in range(30):
        assert run_rules(obs(rows(120, seed))) == []


def test_sustained_growth_is_exploding_and_names_the_tensor_that_grew() -> None:
    rs = rows(60)
    for r in rs[-5:]:
        r["grad_norm/fc2.weight"] *= 300.0
        r["grad_norm"] = math.sqrt(sum(r[f"grad_norm/{p.name}"] ** 2 for p in PARAMS))
    (f,) = exploding.detect(obs(rs))
    assert (f.kind, f.module) == ("exploding", "fc2")
    assert f.evidence["ratio"] > 50 and "fc2.weight ×" in f.message
    assert "gg.clip.ClipNorm(1.0)" in f.advice


def test_single_outlier_is_a_spike_not_an_explosion() -> None:
    rs = rows(60)
    rs[-4]["loss"] *= 100.0
    assert exploding.detect(obs(rs)) == []
    (f,) = loss_spike.detect(obs(rs))
    assert (f.kind, f.module, f.step) == ("loss_spike", "", 56)
    assert f.evidence["factor"] > 50


def test_nan_in_the_window_does_not_poison_the_statistics() -> None:
    rs = rows(60)
    for i in (5, 20, 33, 47):
        rs[i]["loss"] = math.nan
        rs[i]["grad_norm"] = math.inf
    assert run_rules(obs(rs)) == []  # NaN/Inf neither hide nor create findings
    rs[-2]["loss"] *= 100.0
    (f,) = loss_spike.detect(obs(rs))
    assert math.isfinite(f.evidence["zscore"]) and f.step == 58


def test_vanishing_names_the_starved_layer_and_nan_is_never_vanishing() -> None:
    rs = rows(30, scale=[1e-7, 1e-5, 1e-2, 1.0])
    (f,) = vanishing.detect(obs(rs))
    assert (f.kind, f.module) == ("vanishing", "fc0")
    assert f.evidence["ratio"] < 1e-3 and "fc3" in f.message
    for r in rs:  # the same tiny layer now NaN: that is not a vanishing gradient
        r["grad_norm/fc0.weight"] = math.nan
        r["grad_norm/fc1.weight"] = 0.0  # exactly zero: dead/unused, not vanishing
    assert vanishing.detect(obs(rs)) == []


def test_depth_rules_need_three_layers() -> None:
    rs = rows(30, scale=[1e-8, 1e-8, 1e-8, 1.0])
    o = obs(rs)
    o.depth = ["fc2", "fc3"]
    assert vanishing.detect(o) == [] and exploding.detect(o) == []


def test_growth_toward_the_input_is_exploding_along_depth() -> None:
    (f,) = exploding.detect(obs(rows(30, scale=[1e4, 1e2, 1.0, 1e-1])))
    assert (f.kind, f.module) == ("exploding", "fc0") and f.evidence["ratio"] >= 1e3


def test_dead_unit_thresholds() -> None:
    def case(dead: int, samples: int = 5) -> list:
        counts = torch.ones(100)
        counts[:dead] = 0
        o = obs(rows(12), dead_window={"relu": counts}, dead_samples={"relu": samples})
        return [(f.severity, f.evidence["dead"]) for f in dead_units.detect(o)]

    assert case(100) == [("error", 100)]
    assert case(60) == [("warning", 60)]
    assert case(20) == [("info", 20)]
    assert case(5) == []
    assert case(100, samples=2) == []  # too few batches to call a unit dead


def test_saturation_thresholds_and_numbers() -> None:
    def case(frac: float) -> list:
        o = obs(
            rows(12),
            activations={"tanh": {"mean": 0.0, "std": 0.9, "frac_saturated": frac}},
            saturation_kinds={"tanh": "tanh"},
        )
        return [(f.severity, f.module) for f in saturation.detect(o)]

    assert case(0.8) == [("warning", "tanh")]
    assert case(0.3) == [("info", "tanh")]
    assert case(0.1) == []
    assert case(math.nan) == []


def test_time_growth_only_for_unbounded_outputs() -> None:
    growing = torch.tensor([0.01 * 2.0**t for t in range(20)])  # ×5e5, peak 5e3
    bounded = torch.tensor([1e-4 * 2.0**t for t in range(14)]).clamp(max=0.9)  # ratio 9e3 but ≤ 1
    (f,) = exploding.detect(obs(rows(12), time_forward={"rnn": growing}))
    assert (f.kind, f.module) == ("exploding", "rnn") and f.evidence["ratio"] > 1e5
    assert exploding.detect(obs(rows(12), time_forward={"rnn": bounded})) == []


def test_a_saturated_output_layer_is_confidence_not_a_pathology() -> None:
    o = obs(
        rows(12),
        activations={n: {"mean": 0.5, "std": 0.49, "frac_saturated": 0.9} for n in ("hidden", "out")},
        saturation_kinds={"hidden": "sigmoid", "out": "sigmoid"},
    )
    o.depth = ["fc0", "hidden", "fc1", "out"]
    assert [f.module for f in saturation.detect(o)] == ["hidden"]


def test_embedding_tables_are_left_out_of_the_depth_profile() -> None:
    emb = ParamInfo("emb.weight", "emb", 2, 50_000 * 64, sparse_rows=True)
    rs = rows(30)
    for r in rs:
        r["grad_norm/emb.weight"] = 1e-3  # RMS ≈ 2e-8: diluted by 50k rows, not vanishing
    o = obs(rs)
    o.params = [emb, *PARAMS]
    o.depth = ["emb", *DEPTH]
    assert vanishing.detect(o) == []


def test_vanishing_is_judged_at_the_input_end_not_at_one_projection_off_the_path() -> None:
    # Two attention-style blocks and a head, in forward order (13 modules: the input end is the first 3).
    # At init a block's query and key gradients are tiny (second order in two small matrices) while the
    # value projection beside them gets the full signal: the signal reached the input end, not vanishing.
    names = [f"{m}{b}" for b in range(2) for m in ("q", "k", "v", "o", "f", "g")] + ["head"]
    params = [ParamInfo(f"{n}.weight", n, 2, 64) for n in names]
    rms = {n: (1e-7 if n[0] in "qk" else 1e-2) for n in names} | {"head": 5e-2}

    def observe(values: dict[str, float]) -> Observation:
        rs = [{"step": s, **{f"grad_norm/{n}.weight": values[n] * 8.0 for n in names}} for s in range(20)]
        return Observation(step=19, rows=rs, new=10, params=params, depth=names)

    assert vanishing.detect(observe(rms)) == []
    # The whole input end starved (the signal collapsed through the depth): vanishing, at the weakest layer.
    starved = rms | {"v0": 3e-7}
    (f,) = vanishing.detect(observe(starved))
    assert (f.kind, f.module) == ("vanishing", "q0")
    assert f.evidence["ratio"] == pytest.approx(3e-7 / 5e-2, rel=1e-6)  # largest of the input end / output


def test_gradient_growth_while_the_loss_keeps_falling_is_info() -> None:
    # A one-cycle schedule at its peak: the gradient norm grows x20 while the loss goes on falling.
    rs = rows(60)
    for i, r in enumerate(rs):
        r["loss"] = 2.0 * math.exp(-i / 30)
    for r in rs[-5:]:
        for p in PARAMS:
            r[f"grad_norm/{p.name}"] *= 20.0
        r["grad_norm"] = math.sqrt(sum(r[f"grad_norm/{p.name}"] ** 2 for p in PARAMS))
    (f,) = exploding.detect(obs(rs))
    assert (f.kind, f.severity) == ("exploding", "info") and f.evidence["loss_rose"] is False
    # The same growth with the loss above its median over the reference steps (or non-finite): a warning.
    for bad in (3.0, math.nan):
        for r in rs[-3:]:
            r["loss"] = bad
        (f,) = exploding.detect(obs(rs))
        assert (f.kind, f.severity) == ("exploding", "warning") and f.evidence["loss_rose"] is True
    # Without a loss there is nothing to weigh the growth against: a warning, as before losses were known.
    for r in rs:
        del r["loss"]
    (f,) = exploding.detect(obs(rs))
    assert f.severity == "warning" and f.evidence["loss_rose"] is None
