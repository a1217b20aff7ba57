"""The Guard on a torch.compile'd model: the same decisions and the same weights as on the eager model."""

from __future__ import annotations

import torch
from torch import nn

import gradguard as gg


def _run(compiled: bool, poison: set[int], steps: int = 12) -> tuple[list[bool], nn.Module, gg.Guard]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    net = torch.compile(model, backend="eager") if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(net, opt)
    gen = torch.Generator().manual_seed(1)
    applied = []
    for step in range(steps):
        x = torch.randn(32, 8, generator=gen)
        if step in poison:
            x[0, 0] = float("nan")
        loss = nn.functional.mse_loss(net(x), x[:, :1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        applied.append(guard.step(loss))
    return applied, model, guard


def test_compiled_model_is_guarded_exactly_like_the_eager_one() -> None:
    poison = {3, 6, 7, 8, 9, 10}  # one bad batch, then five in a row: a rollback
    eager, eager_model, eager_guard = _run(False, poison)
    comp, comp_model, comp_guard = _run(True, poison)
    assert comp == eager and not comp[3] and comp_guard.rollbacks == eager_guard.rollbacks == 1
    for a, b in zip(eager_model.parameters(), comp_model.parameters(), strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
