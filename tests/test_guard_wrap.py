"""The Guard as an optimizer wrapper (``guard.wrap()``), under Accelerate's gradient accumulation, with two
optimizers on one model, and the recipe for programs that update weights by hand.

Each guarded path is compared with a reference written without it: the plain ``guard.step(loss)`` loop, a
hand-written accumulation loop, the hand-written SGD update.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gradguard as gg


def _data(steps: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 6, generator=g) for _ in range(steps)]
    return [(x, torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] + 0.1 * torch.randn(16, 1, generator=g)) for x in xs]


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


class _Recorder(gg.clip.ClipNorm):
    """ClipNorm with a limit never reached, recording the gradient norm of every call."""

    def __init__(self) -> None:
        super().__init__(1e9)
        self.norms: list[float] = []

    def __call__(self, parameters: Any) -> gg.clip.ClipResult:
        result = super().__call__(parameters)
        self.norms.append(float(result.norm_before))
        return result


POISON = {12, 13}  # non-finite losses at these steps: skipped by either path


def test_wrap_steps_exactly_like_guard_step() -> None:
    data = _data(30)
    ref, net = _net(), _net()
    ref_opt, opt = torch.optim.Adam(ref.parameters(), lr=1e-2), torch.optim.Adam(net.parameters(), lr=1e-2)
    ref_guard, guard = gg.Guard(ref, ref_opt), gg.Guard(net, opt)
    wrapped = guard.wrap()
    assert isinstance(wrapped, torch.optim.Optimizer)
    assert wrapped.param_groups is opt.param_groups and wrapped.state is opt.state
    sched = torch.optim.lr_scheduler.StepLR(wrapped, step_size=10, gamma=0.5)  # schedulers accept it
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=10, gamma=0.5)
    for t, (x, y) in enumerate(data):
        for model, o, g, s in ((ref, ref_opt, ref_guard, ref_sched), (net, wrapped, guard, sched)):
            o.zero_grad()
            loss = nn.functional.mse_loss(model(x), y) * (math.nan if t in POISON else 1.0)
            loss.backward()
            if g is ref_guard:
                g.step(loss)
            else:
                g.record_loss(loss)
                o.step()
            s.step()
    for a, b in zip(ref.parameters(), net.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [(e.step, e.reason) for e in guard.events] == [(e.step, e.reason) for e in ref_guard.events]
    assert guard.skipped == 2 and guard.steps == 30
    assert wrapped.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)


def test_wrap_with_a_closure_evaluates_it_once_and_returns_its_loss() -> None:
    (x, y), = _data(1)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    wrapped = gg.Guard(net, opt).wrap()
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss

    first = wrapped.step(closure)
    assert calls == 1 and isinstance(first, Tensor)
    assert float(nn.functional.mse_loss(net(x), y).detach()) < float(first.detach())
    lbfgs_net = _net()
    lbfgs = torch.optim.LBFGS(lbfgs_net.parameters(), lr=0.5)
    wrapped = gg.Guard(lbfgs_net, lbfgs).wrap()

    def lbfgs_closure() -> Tensor:
        lbfgs.zero_grad()
        loss = nn.functional.mse_loss(lbfgs_net(x), y)
        loss.backward()
        return loss

    start = float(lbfgs_closure().detach())
    for _ in range(5):
        wrapped.step(lbfgs_closure)
    assert float(lbfgs_closure().detach()) < 0.5 * start


def test_without_a_loss_the_gradients_alone_are_judged() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = gg.Guard(net, opt)
    wrapped = guard.wrap()
    for t, (x, y) in enumerate(_data(10)):
        wrapped.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        if t == 5:
            net[0].weight.grad[0, 0] = math.inf  # type: ignore[index]
        wrapped.step()
    assert [(e.step, e.reason) for e in guard.events if e.action == "skip"] == [(5, "nonfinite_grad")]
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------------------------------ Accelerate
@pytest.fixture
def accelerator() -> Iterator[Any]:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    yield accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("call", ["wrap", "guard.step"], ids=["wrapped-optimizer", "guard-step-every-micro-step"])
def test_accelerate_accumulation_guards_real_steps_only(accelerator: Any, call: str) -> None:
    data = _data(8)
    # Reference: two micro-batches accumulated by hand (loss / 2 each), then one optimizer step.
    ref = _net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_norms = []
    for k in range(0, len(data), 2):
        ref_opt.zero_grad()
        for x, y in data[k : k + 2]:
            (nn.functional.mse_loss(ref(x), y) / 2).backward()
        ref_norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])))
        ref_opt.step()
    net = _net()
    model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    recorder = _Recorder()
    guard = gg.Guard(model, opt, clip=recorder)
    wrapped = guard.wrap()
    for x, y in data:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            if call == "wrap":
                guard.record_loss(loss)
                wrapped.step()
                wrapped.zero_grad()
            else:
                guard.step(loss)
                opt.zero_grad()
    assert guard.steps == guard.applied == 4, "only the real (synchronising) steps count"
    assert recorder.norms == pytest.approx(ref_norms, rel=1e-6), "never a partial gradient"
    for a, b in zip(ref.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------- ownership
class _TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.b = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.bn(self.a(x))))


def test_two_optimizers_on_one_model_do_not_rewind_each_other() -> None:
    torch.manual_seed(0)
    model = _TwoPart()
    opt_a = torch.optim.SGD(model.a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model.b.parameters(), lr=0.1)
    guard_a = gg.Guard(model, opt_a, snapshot_every=1000)
    guard_b = gg.Guard(model, opt_b, snapshot_every=1000)
    snap_a = [p.detach().clone() for p in model.a.parameters()]
    data = _data(20)
    for t, (x, y) in enumerate(data):
        opt_a.zero_grad()
        opt_b.zero_grad()
        loss = nn.functional.mse_loss(model(x[:, :4]), y)
        loss.backward()
        b_before = [p.detach().clone() for p in model.b.parameters()]
        rolled = guard_a.rollbacks
        guard_a.step(loss * math.nan if t >= 10 else loss)  # a's guard fails from step 10 on
        if guard_a.rollbacks > rolled:
            # a's rollback restored a's parameters (and the buffers) and left b's where they were
            assert all(torch.equal(p, s) for p, s in zip(model.a.parameters(), snap_a, strict=True))
            assert all(torch.equal(p, s) for p, s in zip(model.b.parameters(), b_before, strict=True))
        guard_b.step(loss)
    assert guard_a.rollbacks >= 1 and guard_b.rollbacks == 0 and guard_b.applied == 20
    keys = set(guard_a._model_tensors())
    assert keys == {"param:a.weight", "param:a.bias", "buffer:bn.running_mean", "buffer:bn.running_var",
                    "buffer:bn.num_batches_tracked"}


# ------------------------------------------------------------------------------- hand-written updates
def test_hand_written_sgd_update_equals_torch_sgd_under_the_guard() -> None:
    """The recipe in Guard's docstring: ``p.data.add_(p.grad, alpha=-lr)`` is ``torch.optim.SGD(lr=lr)``."""
    lr = 0.05
    data = _data(25)
    by_hand, by_sgd = _net(), _net()
    opt = torch.optim.SGD(by_sgd.parameters(), lr=lr)
    guard = gg.Guard(by_sgd, opt)
    for x, y in data:
        for p in by_hand.parameters():
            p.grad = None
        nn.functional.mse_loss(by_hand(x), y).backward()
        for p in by_hand.parameters():
            p.data.add_(p.grad, alpha=-lr)
        opt.zero_grad()
        loss = nn.functional.mse_loss(by_sgd(x), y)
        loss.backward()
        guard.step(loss)
    assert guard.intervened == 0
    for a, b in zip(by_hand.parameters(), by_sgd.parameters(), strict=True):
        assert torch.equal(a, b)


def test_positional_options_are_deprecated_but_still_work() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    policy = gg.clip.ClipNorm(1.0)
    with pytest.warns(DeprecationWarning, match="by keyword"):
        guard = gg.Guard(net, opt, policy)
    assert guard.clip is policy
    with pytest.raises(TypeError):
        gg.Guard(net, opt, None, None, None, None, None)
