"""Precision, not vanishing: a model cast to bfloat16/float16 and trained with a plain optimizer (no fp32 master
weights) drops every step below half an ulp of its weights; the monitor must say so instead of reporting a
stalled layer, and stay silent on the same program in fp32 or under autocast (fp32 weights)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detect import Observation, ParamInfo, update_size
from gradguard.findings import Finding

STEPS = 60
#: "Lost": at most a tenth of the fp32 run's movement survives (≥ 90 % of the step's norm dropped).
LOST = 0.1


def train(dtype: torch.dtype, lr: float, *, autocast: bool = False) -> tuple[dict[str, float], list[Finding]]:
    """An MLP classifier trained with plain SGD through gg.watch; returns each weight matrix's total relative
    change ‖w_end − w_0‖/‖w_0‖ (in fp32 arithmetic) and the monitor's findings."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)).to(dtype)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.dim() == 2}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.randn(256, 20), torch.randint(0, 5, (256,))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with gg.watch(model, optimizer=opt, console=False) as mon:
        for _ in range(STEPS):
            i = torch.randint(0, 256, (32,))
            with cast:
                out = model(x[i].to(dtype))
            loss = nn.functional.cross_entropy(out.float(), y[i])
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    params = dict(model.named_parameters())
    change = {n: float((params[n].detach().float() - w0).norm() / w0.norm()) for n, w0 in start.items()}
    return change, list(mon.findings)


def precision(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.evidence.get("cause") == "precision"]


@pytest.mark.parametrize(("dtype", "lr", "bits"), [(torch.bfloat16, 1e-4, 8), (torch.float16, 1e-5, 11)])
def test_cast_model_whose_steps_are_rounded_away_is_reported_as_precision(dtype: torch.dtype, lr: float,
                                                                         bits: int) -> None:
    low, low_findings = train(dtype, lr)
    ref, ref_findings = train(torch.float32, lr)
    # The effect is real: every weight matrix of the cast copy moves at most a tenth of the fp32 copy.
    for name in ref:
        assert low[name] <= LOST * ref[name], (name, low[name], ref[name])
    (f, *_) = precision(low_findings)
    assert f.kind == "vanishing" and f.severity == "warning"
    assert f.evidence["dtype"] == str(dtype) and f.evidence["threshold"] == 2.0 ** -bits
    assert "rounding" in f.message and str(dtype).removeprefix("torch.") in f.message and f"2^-{bits}" in f.message
    assert "autocast" in f.advice and "learning rate" in f.advice
    # Same program, fp32 weights: the steps arrive and the run is healthy, so nothing is reported.
    assert ref_findings == []


def test_autocast_keeps_fp32_master_weights_and_stays_silent() -> None:
    auto, findings = train(torch.float32, 1e-4, autocast=True)
    ref, _ = train(torch.float32, 1e-4)
    for name in ref:  # bf16 compute, fp32 storage: the steps land (within bf16 noise of the gradient)
        assert auto[name] == pytest.approx(ref[name], rel=0.2)
    assert precision(findings) == []


def test_larger_learning_rate_lifts_the_steps_above_the_threshold() -> None:
    # lr 0.1: per-element steps ≈ 1e-2·|w|, above bf16's half ulp (≤ |w|·2^-8 ≈ 4e-3·|w|).
    low, findings = train(torch.bfloat16, 0.1)
    ref, _ = train(torch.float32, 0.1)
    for name in ref:
        assert low[name] == pytest.approx(ref[name], rel=0.2)
    assert precision(findings) == []


# Rule level: hand-made histories where the monitor's numbers are known exactly.
PARAMS = [ParamInfo(f"fc{i}.weight", f"fc{i}", 2, 256, dtype="torch.bfloat16") for i in range(4)]


def history(ratio: float, *, grad: float = 1.0, weight: float = 10.0, n: int = 31) -> list[dict]:
    rows = []
    for step in range(n):
        r: dict = {"step": step, "loss": 1.0}
        for p in PARAMS:
            r[f"grad_norm/{p.name}"] = grad
            if step % 10 == 0 and step:
                r[f"weight_norm/{p.name}"] = weight
                r[f"update_ratio/{p.name}"] = ratio
        rows.append(r)
    return rows


def detect(rows: list[dict], params: list[ParamInfo], lr: float | None) -> list[Finding]:
    lrs = {p.name: lr for p in params} if lr is not None else {}
    return update_size.detect(Observation(step=rows[-1]["step"], rows=rows, new=10, params=params, lrs=lrs))


def test_whole_model_frozen_by_rounding_is_one_finding_naming_every_tensor() -> None:
    # lr·‖g‖/‖w‖ = 1e-3 · 1 / 10 = 1e-4 implied; nothing arrives.
    (f,) = detect(history(0.0), PARAMS, 1e-3)
    assert f.evidence["cause"] == "precision" and f.evidence["implied_ratio"] == pytest.approx(1e-4)
    assert set(f.evidence["tensors"]) == {p.name for p in PARAMS} and "3 more tensors" in f.message


def test_without_the_learning_rate_only_exact_zeros_count_and_the_message_says_so() -> None:
    (f,) = detect(history(0.0), PARAMS, None)
    assert f.evidence["cause"] == "precision" and "learning rate is unknown" in f.message
    assert detect(history(1e-6), PARAMS, None) == []  # something moved: no evidence of rounding


def test_steps_that_arrive_and_fp32_tensors_are_not_precision() -> None:
    assert detect(history(1e-4), PARAMS, 1e-3) == []  # the implied ratio arrives in full
    fp32 = [ParamInfo(p.name, p.module, 2, 256) for p in PARAMS]
    assert detect(history(0.0), fp32, 1e-3) == []  # lost steps in fp32 are not rounding (and nothing learns)
    assert detect(history(0.0), PARAMS, 0.0) == []  # lr 0 moves nothing in any precision


def test_a_stalled_low_precision_tensor_says_precision_may_be_the_cause() -> None:
    rows = history(3e-3)
    for r in rows:
        if "update_ratio/fc3.weight" in r:
            r["update_ratio/fc3.weight"] = 1e-9  # not exactly 0: without lr only the stall test can judge
    params = [ParamInfo(p.name, p.module, 2, 256) for p in PARAMS[:3]] + [PARAMS[3]]
    (f,) = detect(rows, params, None)  # no learning rate: rounding cannot be confirmed, stall can
    assert f.module == "fc3" and "stalled" in f.message and "precision may be the cause" in f.message
    assert f.evidence["possible_cause"] == "precision" and "cause" not in f.evidence and "autocast" in f.advice


def deep_sigmoid(dtype: torch.dtype) -> tuple[dict[str, float], list[Finding]]:
    """A 12-layer sigmoid MLP (default init: the gradient shrinks ≈ ×1/7 per layer) trained with SGD for 40
    steps; returns each hidden layer's last weight-gradient norm and the findings."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(12):
        layers += [nn.Linear(32 if i else 20, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 5)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(256, 20), torch.randint(0, 5, (256,))
    with gg.watch(model, optimizer=opt, console=False) as mon:
        for _ in range(40):
            i = torch.randint(0, 256, (32,))
            loss = nn.functional.cross_entropy(model(x[i].to(dtype)).float(), y[i])
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    grads = {n.removesuffix(".weight"): float(p.grad.float().norm())  # type: ignore[union-attr]
             for n, p in model.named_parameters() if p.dim() == 2}
    return grads, list(mon.findings)


def test_fp16_gradients_that_underflow_to_exact_zeros_are_named() -> None:
    half, half_findings = deep_sigmoid(torch.float16)
    full, full_findings = deep_sigmoid(torch.float32)
    zero = [m for m, g in half.items() if g == 0]
    # Measured: the input end's gradients are exact zeros in fp16, tiny but non-zero in fp32.
    assert len(zero) >= 2 and all(full[m] > 0 for m in zero)
    (f,) = [f for f in half_findings if "underflow" in f.evidence]
    assert f.evidence["cause"] == "precision" and set(f.evidence["underflow"]) == set(zero)
    assert "float16 underflow" in f.message and "GradScaler" in f.advice and "bfloat16" in f.advice
    # The fp32 run is a plain depth collapse: vanishing, with no precision cause.
    vanish = [f for f in full_findings if f.kind == "vanishing"]
    assert vanish and all("cause" not in f.evidence for f in vanish)
