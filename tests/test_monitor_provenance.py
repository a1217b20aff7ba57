"""Non-finite provenance: the replay names the module that *produced* a NaN/Inf, and leaves no trace."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn
from zoo import LogLayer

import gradguard as gg


def nonfinite(mon: gg.Monitor) -> gg.Finding:
    found = [f for f in mon.findings if f.kind == "nonfinite"]
    assert len(found) == 1, mon.findings
    return found[0]


class BadAfter(nn.Module):
    """Produces NaN in its forward (where its input is positive) after ``at`` calls."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls > self.at:
            return torch.where(x > 0, torch.full_like(x, math.nan), x)
        return x


def test_forward_nan_is_blamed_on_producer_not_on_modules_that_pass_it_on() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            fc0=nn.Linear(5, 8),
            relu=nn.ReLU(inplace=True),
            block=nn.Sequential(nn.Linear(8, 8), BadAfter(at=2), nn.Tanh()),
            head=nn.Linear(8, 2),
        )
    )
    mon = gg.watch(model, console=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(4):
        x = torch.randn(6, 5)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        mon.step(loss)
        opt.step()
        # measured: step 2's loss is the first non-finite one
        assert math.isfinite(float(loss.detach())) == (step < 2)
    f = nonfinite(mon)
    assert (f.module, f.step, f.evidence["phase"], f.severity) == ("block.1", 2, "forward", "error")
    assert "forward pass of `block.1`" in f.message and "inputs were finite" in f.message
    assert "gg.Guard(model, opt)" in f.advice


def test_nan_in_custom_module_after_inplace_relu() -> None:
    torch.manual_seed(0)
    layers = OrderedDict(fc=nn.Linear(4, 6), relu=nn.ReLU(inplace=True), log=LogLayer(), head=nn.Linear(6, 1))
    model = nn.Sequential(layers)
    with torch.no_grad():
        model.fc.bias.fill_(-0.5)  # some ReLU outputs are exactly 0 → log(0) = -inf → NaN downstream
    mon = gg.watch(model, console=False)
    x = torch.randn(8, 4)
    loss = model(x).sum()
    loss.backward()
    mon.step(loss)
    assert not math.isfinite(float(loss.detach()))
    assert nonfinite(mon).module == "log"


def test_loss_outside_the_model_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 3)))
    mon = gg.watch(model, console=False)
    out = model(torch.randn(5, 4))
    assert torch.isfinite(out).all() and (out < 0).any()
    loss = torch.log(out).mean()  # NaN born in the loss function, not in the model
    loss.backward()
    mon.step(loss)
    f = nonfinite(mon)
    assert (f.module, f.evidence["phase"]) == ("", "forward")
    assert "outputs were finite but the loss was nan" in f.message
    assert "loss function produced it" in f.advice


def test_loss_outside_the_model_backward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 3)))
    mon = gg.watch(model, console=False)
    out = model(torch.randn(5, 4))
    loss = torch.sqrt((out - out.detach()).abs().sum())  # forward √0 = 0, derivative ∞·0 = NaN
    loss.backward()
    assert math.isfinite(float(loss.detach())) and not torch.isfinite(model.fc.weight.grad).all()
    mon.step(loss)
    f = nonfinite(mon)
    assert (f.module, f.evidence["phase"]) == ("", "backward")
    assert "gradient the loss sent back" in f.message


def test_nan_in_the_input_batch_is_not_blamed_on_a_module() -> None:
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 3)))
    mon = gg.watch(model, console=False)
    x = torch.randn(5, 4)
    x[2, 1] = math.nan
    model(x).sum().backward()
    mon.step()
    f = nonfinite(mon)
    assert f.module == "" and "input batch itself held 1 non-finite" in f.message


def test_gradient_accumulation_replays_every_forward_of_the_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), bad=BadAfter(at=1), head=nn.Linear(4, 1)))
    mon = gg.watch(model, console=False)
    for _ in range(2):  # the second micro-batch produces the NaN
        model(torch.randn(3, 4)).sum().backward()
    mon.step()
    assert nonfinite(mon).module == "bad"


class Flaky(nn.Module):
    """Dropout + BatchNorm (RNG and buffers the replay must restore) and a NaN born at the 2nd call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.bad = BadAfter(at=1)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bad(self.drop(self.bn(self.fc(x)))))


def test_replay_changes_no_parameter_grad_buffer_or_rng_state() -> None:
    torch.manual_seed(0)
    a = Flaky()
    b = Flaky()
    b.load_state_dict(a.state_dict())
    mon = gg.watch(b, console=False)
    for _ in range(2):
        x = torch.randn(6, 4)
        state = torch.get_rng_state()
        a(x).sum().backward()
        after_a = torch.get_rng_state()
        torch.set_rng_state(state)
        b(x).sum().backward()
        mon.step()
        assert torch.equal(torch.get_rng_state(), after_a), "the replay must restore the RNG state"
        for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0, equal_nan=True, msg=n)
            assert torch.equal(pa, pb)
        for ba, bb in zip(a.buffers(), b.buffers(), strict=True):
            assert torch.equal(ba, bb)
    assert nonfinite(mon).module == "bad"
    assert b.bad.calls == a.bad.calls + 1  # the replay ran the model once more, with hooks removed after


@pytest.mark.parametrize("replay", [True, False])
def test_nan_never_counts_as_vanishing_and_never_poisons_later_statistics(replay: bool) -> None:
    from zoo import inf_in_backward

    s = inf_in_backward()
    mon = gg.watch(s.model, console=False, replay=replay, log_every=4)
    s.run(mon, steps=8)
    kinds = {f.kind for f in mon.findings}
    assert "vanishing" not in kinds
    assert "nonfinite" in kinds
    hist = mon.history
    assert not math.isfinite(hist[5]["grad_norm"])
    assert hist[5]["nonfinite/fc.weight"] > 0  # exact count, taken on the flagged step
    assert hist[4]["nonfinite/fc.weight"] == 0.0


class FailsOnReplay(nn.Module):
    """NaN at the first call; raises on any later call (as a model with one-shot side effects might)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("iterator exhausted")
        return self.fc(x) * math.nan


def test_a_failing_replay_is_reported_and_does_not_break_training() -> None:
    model = FailsOnReplay()
    mon = gg.watch(model, console=False)
    model(torch.randn(2, 3)).sum().backward()
    mon.step()  # must not raise
    f = nonfinite(mon)
    assert "replay that localises it failed (RuntimeError: iterator exhausted)" in f.message
