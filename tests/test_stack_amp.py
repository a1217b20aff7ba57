"""gg.watch under mixed precision: fp16 autocast and torch.amp.GradScaler (on CPU, as on CUDA).

- the scaler's private state is read in one place (gradguard.stats.scaler), checked here against its
  public API so that a torch release that changes it fails loudly;
- history holds unscaled gradient norms; routine overflow skips are an info finding, not an error;
- a collapsing loss scale is an error naming the module whose fp16 values overflow;
- the replay re-runs a step under the autocast state it ran in, so an fp16 overflow is found in its layer.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard.stats.scaler import found_inf, grads_unscaled, init_scale, scale_tensor

FP16 = {"device_type": "cpu", "dtype": torch.float16}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc0=nn.Linear(6, 16), act=nn.Tanh(), fc1=nn.Linear(16, 16), head=nn.Linear(16, 3)))


def data(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 6, generator=g)
    return x, 10 * torch.randn(8, 3, generator=g)  # targets of scale 10: gradients large enough to overflow × 2¹⁶


def test_private_scaler_state_agrees_with_the_public_api() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert scale_tensor(scaler) is None  # nothing scaled yet
    assert init_scale(scaler) == 2.0**10
    skipped = 0
    for step in range(6):
        x, y = data(step)
        opt.zero_grad()
        with torch.autocast(**FP16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if step == 2:
            model.head.weight.grad[0, 0] = math.inf  # a certain overflow
        s = scale_tensor(scaler)
        assert s is not None and s.dim() == 0 and float(s) == scaler.get_scale(), "GradScaler._scale changed"
        assert not grads_unscaled(scaler)
        assert found_inf(scaler, opt) is None
        scaler.unscale_(opt)
        assert grads_unscaled(scaler), "GradScaler._per_optimizer_states[...]['stage'] changed"
        flag = found_inf(scaler, opt)
        assert flag is not None, "GradScaler found_inf_per_device changed"
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < before
        assert (float(flag) > 0) == (scaler.get_scale() < before)
    assert skipped >= 1
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert scale_tensor(disabled) is None


def test_watch_rejects_a_scaler_that_is_not_a_grad_scaler() -> None:
    with pytest.raises(gg.InputError, match=r"scaler=.*GradScaler"):
        gg.watch(mlp(), console=False, scaler=2.0**16)


def _amp_run(model: nn.Module, mon: gg.Monitor | None, scaler: torch.amp.GradScaler, steps: int,
             lr: float = 1e-3) -> tuple[list[float], list[float], list[bool]]:
    """README order: scale(loss).backward(), mon.step(loss), scaler.step(opt), scaler.update().

    Returns the losses, the true (unscaled) global gradient norms and whether the scaler skipped.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, norms, skips = [], [], []
    for step in range(steps):
        x, y = data(step)
        opt.zero_grad()
        with torch.autocast(**FP16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        s = scaler.get_scale()
        norms.append(math.sqrt(sum(float((p.grad.double() / s).pow(2).sum()) for p in model.parameters())))
        if mon is not None:
            mon.step(loss)
        scaler.step(opt)
        scaler.update()
        skips.append(scaler.get_scale() < s)
        losses.append(float(loss.detach()))
    return losses, norms, skips


def test_routine_overflow_skips_are_info_and_history_holds_unscaled_norms() -> None:
    model = mlp()
    scaler = torch.amp.GradScaler("cpu")  # default init_scale 2¹⁶
    mon = gg.watch(model, console=False, scaler=scaler)
    losses, norms, skips = _amp_run(model, mon, scaler, steps=30)
    assert 1 <= sum(skips) <= 8, skips  # measured: the scale backs off a few times, then training proceeds
    assert losses[-1] < 0.9 * losses[0]  # healthy: it learns
    hist = mon.history
    for row, want, skipped in zip(hist, norms, skips, strict=True):
        if skipped:
            assert not math.isfinite(row["grad_norm"])
        else:
            assert row["grad_norm"] == pytest.approx(want, rel=1e-5)  # ‖∇L‖, not ‖S·∇L‖
        assert row["loss_scale"] > 1
    assert not [f for f in mon.findings if f.rank >= 1], mon.findings
    (info,) = [f for f in mon.findings if f.kind == "nonfinite"]
    assert info.severity == "info" and info.evidence["overflow_skips"] == sum(skips)
    assert "loss scaler skipped" in info.message
    mon.close()


def test_unscaled_before_mon_step_is_not_divided_twice() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    mon = gg.watch(model, console=False, scaler=scaler)
    x, y = data(0)
    with torch.autocast(**FP16):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # e.g. to clip: the gradients are ∇L now
    want = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    mon.step(loss)
    assert mon.history[0]["grad_norm"] == pytest.approx(want, rel=1e-5)
    mon.close()


class Gain(nn.Module):
    """× k in float32: harmless forward, but the gradient sent back to its fp16 input is k times larger."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return x.float() * self.k


def test_collapsing_loss_scale_is_an_error_naming_the_module_that_overflows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc0=nn.Linear(6, 8), act=nn.Tanh(), head=nn.Linear(8, 3), gain=Gain(1e3)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    mon = gg.watch(model, console=False, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    _, _, skips = _amp_run(model, mon, scaler, steps=6)  # scale 16 → 0.5
    # The fault degrades training: every step is skipped, no parameter ever moves.
    assert all(skips) and all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    errors = [f for f in mon.findings if f.severity == "error"]
    assert len(errors) == 1, mon.findings
    (f,) = errors
    assert (f.kind, f.module) == ("nonfinite", "gain")
    assert "loss scale is collapsing" in f.message and f.evidence["loss_scale"] <= 1
    assert "bfloat16" in f.advice and "growth_interval" in f.advice and "learning rate" in f.advice
    mon.close()


def test_fp16_overflow_in_a_layer_is_found_in_that_layer_not_in_the_loss() -> None:
    model = mlp()
    with torch.no_grad():
        model.fc1.weight.mul_(1e5)  # fp16 output of fc1 exceeds 65504 → inf
    scaler = torch.amp.GradScaler("cpu")
    mon = gg.watch(model, console=False, scaler=scaler)
    x, _ = data(0)
    with torch.autocast(**FP16):
        out16 = model.fc1(model.act(model.fc0(x)))
    assert torch.isinf(out16).any()  # the fault is real: an inf really appears in fp16
    assert torch.isfinite(model.fc1(model.act(model.fc0(x)))).all()  # and not in float32
    losses, _, _ = _amp_run(model, mon, scaler, steps=1)
    assert not math.isfinite(losses[0])
    (f,) = [f for f in mon.findings if f.kind == "nonfinite"]
    assert (f.severity, f.module, f.evidence["phase"]) == ("error", "fc1", "forward")
    assert "autocast cpu float16" in f.message
    mon.close()


def test_bf16_autocast_without_scaler_stays_silent() -> None:
    model = mlp()
    mon = gg.watch(model, console=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(12):
        x, y = data(step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        mon.step(loss)
        opt.step()
    assert all(math.isfinite(r["grad_norm"]) and "loss_scale" not in r for r in mon.history)
    assert not [f for f in mon.findings if f.rank >= 1]
    mon.close()
