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


def test_probe_of_a_compiled_model_measures_the_module_it_wraps() -> None:
    # The seed-S2 network: twelve sigmoids at a small init, a vanishing gradient the probe must name.
    torch.manual_seed(0)
    layers = [m for _ in range(12) for m in (nn.Linear(32, 32), nn.Sigmoid())]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05)
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    eager = gg.probe(model, x, targets=y, loss_fn=nn.functional.cross_entropy)
    compiled = gg.probe(torch.compile(model, backend="eager"), x, targets=y, loss_fn=nn.functional.cross_entropy)
    assert compiled.options["compiled"] and not eager.options["compiled"]
    assert [r.label for r in compiled.layers] == [r.label for r in eager.layers]
    assert {(f.kind, f.severity) for f in compiled.findings} == {(f.kind, f.severity) for f in eager.findings}
    assert any(f.kind == "vanishing" and f.severity != "info" for f in compiled.findings)
