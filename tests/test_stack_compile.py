"""gg.watch under torch.compile: every order of watch and compile, no graph break or recompilation on
non-sampled steps, activation statistics equal to eager, NaN provenance by eager replay.

Compiled with ``backend="aot_eager"`` (dynamo and AOTAutograd, no code generation) to stay quick; one slow
test uses Inductor where a C++ compiler is available.
"""

from __future__ import annotations

import math
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from zoo import LogLayer

import gradguard as gg

RTOL = 1e-5
STEPS = 6
SAMPLE_EVERY = 3  # sampled steps 0 and 3; the others must not change the compiled graph


def make_model() -> nn.Module:
    """Positive weights and inputs keep ``log`` finite; a negative batch makes it NaN (in `log` itself)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(fc0=nn.Linear(4, 8), act=nn.ReLU(), shift=nn.Softplus(), log=LogLayer(), head=nn.Linear(8, 1))
    )
    return model


def batch(step: int, bad_at: int | None = None) -> Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.rand(5, 4, generator=g)
    return torch.full_like(x, math.nan) if step == bad_at else x


def train(
    model: nn.Module, call: nn.Module, mon: gg.Monitor | None, steps: int = STEPS, bad_at: int | None = None
) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = call(batch(step, bad_at)).pow(2).mean()
        loss.backward()
        if mon is not None:
            mon.step(loss)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def reset() -> CompileCounterWithBackend:
    torch._dynamo.reset()
    counters.clear()
    return CompileCounterWithBackend("aot_eager")


def _wrap(model: nn.Module, backend: CompileCounterWithBackend) -> tuple[nn.Module, gg.Monitor]:
    compiled = torch.compile(model, backend=backend)
    return compiled, gg.watch(compiled, console=False, sample_every=SAMPLE_EVERY)


def _in_place(model: nn.Module, backend: CompileCounterWithBackend) -> tuple[nn.Module, gg.Monitor]:
    model.compile(backend=backend)
    return model, gg.watch(model, console=False, sample_every=SAMPLE_EVERY)


def _in_place_late(model: nn.Module, backend: CompileCounterWithBackend) -> tuple[nn.Module, gg.Monitor]:
    mon = gg.watch(model, console=False, sample_every=SAMPLE_EVERY)
    model.compile(backend=backend)
    return model, mon


def _after_first_run(model: nn.Module, backend: CompileCounterWithBackend) -> tuple[nn.Module, gg.Monitor]:
    compiled = torch.compile(model, backend=backend)
    compiled(batch(99)).sum().backward()  # compiled (and run) before gg.watch
    model.zero_grad()
    return compiled, gg.watch(compiled, console=False, sample_every=SAMPLE_EVERY)


ORDERS: dict[str, Callable[[nn.Module, CompileCounterWithBackend], tuple[nn.Module, gg.Monitor]]] = {
    "watch(torch.compile(m))": _wrap,
    "m.compile(); watch(m)": _in_place,
    "watch(m); m.compile()": _in_place_late,
    "compiled ran, then watch": _after_first_run,
}


def eager_reference() -> list[dict[str, object]]:
    model = make_model()
    mon = gg.watch(model, console=False, sample_every=SAMPLE_EVERY)
    train(model, model, mon)
    return mon.history


@pytest.mark.parametrize("order", list(ORDERS))
def test_every_order_matches_eager_without_graph_break_or_recompile(order: str) -> None:
    bare = reset()
    model = make_model()
    train(model, torch.compile(model, backend=bare), None)
    frames_bare = bare.frame_count
    assert frames_bare == 1

    backend = reset()
    model = make_model()
    call, mon = ORDERS[order](model, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "hooks lost" warning in any of these orders
        train(model, call, mon)
    assert backend.frame_count == frames_bare, "the monitor recompiled the model"
    assert not counters["graph_break"], dict(counters["graph_break"])
    hist, ref = mon.history, eager_reference()
    assert [r["step"] for r in hist] == list(range(STEPS))
    for row, want in zip(hist, ref, strict=True):
        # Names are the original module's (no `_orig_mod.` prefix), values equal eager's.
        assert set(row) == set(want) or (order == "watch(m); m.compile()" and row["step"] == 0)
        for key, value in row.items():
            if key.startswith(("grad_norm", "act/")) and key in want:
                assert value == pytest.approx(want[key], rel=RTOL, abs=1e-7), key
    sampled = [r for r in hist if r["step"] % SAMPLE_EVERY == 0 and r["step"] > 0]
    assert sampled and all("act/log/mean" in r for r in sampled)
    assert not [f for f in mon.findings if f.rank >= 1]
    mon.close()


def test_watch_before_torch_compile_keeps_statistics_and_warns_about_what_is_lost() -> None:
    backend = reset()
    model = make_model()
    mon = gg.watch(model, console=False, sample_every=SAMPLE_EVERY)
    call = torch.compile(model, backend=backend)
    with pytest.warns(RuntimeWarning, match=r"after gg.watch\(model\).*forward pass of the last micro-batch only"):
        train(model, call, mon)
    assert backend.frame_count == 1 and not counters["graph_break"]
    ref = eager_reference()
    for row, want in zip(mon.history, ref, strict=True):
        assert set(row) == set(want)
        for key in want:
            if key.startswith(("grad_norm", "act/")):
                assert row[key] == pytest.approx(want[key], rel=RTOL, abs=1e-7), key
    mon.close()


def test_watch_before_torch_compile_still_localises_a_nan_batch() -> None:
    model = make_model()
    mon = gg.watch(model, console=False)
    call = torch.compile(model, backend=reset())
    with pytest.warns(RuntimeWarning, match="ran compiled"):
        losses = train(model, call, mon, steps=3, bad_at=2)
    assert not math.isfinite(losses[2])
    (f,) = [f for f in mon.findings if f.kind == "nonfinite"]
    assert (f.step, f.module) == (2, "") and "in the data" in f.message and "eager replay reproduced it" in f.message
    mon.close()


def test_watch_of_the_inner_module_after_it_ran_compiled_warns_instead_of_losing_silently() -> None:
    model = make_model()
    call = torch.compile(model, backend=reset())
    call(batch(99)).sum().backward()  # compiled before gg.watch: dynamo will not see hooks added now
    model.zero_grad()
    mon = gg.watch(model, console=False)
    with pytest.warns(RuntimeWarning, match="saw no training forward.*gg.watch\\(compiled\\)"):
        losses = train(model, call, mon, steps=3, bad_at=2)
    assert not math.isfinite(losses[2])
    assert len(mon.history) == 3 and all(math.isfinite(r["grad_norm"]) for r in mon.history[:2])
    (f,) = [f for f in mon.findings if f.kind == "nonfinite"]
    assert "could not be replayed" in f.message and "gg.watch(torch.compile(model))" in f.message
    mon.close()


def test_nan_batch_under_compile_is_localised_by_an_eager_replay() -> None:
    reset()
    model = make_model()
    call, mon = _wrap(model, CompileCounterWithBackend("aot_eager"))
    losses = train(model, call, mon, steps=3, bad_at=2)
    assert not math.isfinite(losses[2]) and all(math.isfinite(v) for v in losses[:2])
    (f,) = [f for f in mon.findings if f.kind == "nonfinite"]
    assert (f.step, f.module, f.severity) == (2, "", "error")
    assert "in the data" in f.message and "eager replay reproduced it" in f.message
    assert f.evidence["eager_replay"] == "reproduced"
    mon.close()


def test_nan_born_in_a_layer_under_compile_names_the_layer() -> None:
    reset()
    model = make_model()
    model.shift = nn.Identity()  # log now sees the ReLU output: log(0) = -inf for dead entries
    with torch.no_grad():
        model.fc0.bias.fill_(-10.0)  # every ReLU output is 0 → log(0) = -inf
    call, mon = _wrap(model, CompileCounterWithBackend("aot_eager"))
    losses = train(model, call, mon, steps=1)
    assert not math.isfinite(losses[0])
    (f,) = [f for f in mon.findings if f.kind == "nonfinite"]
    assert (f.module, f.evidence["phase"]) == ("log", "forward")
    assert "eager replay reproduced it" in f.message
    mon.close()


class CompiledOnlyNaN(nn.Module):
    """NaN only in compiled code: what a divergence between compiled and eager code looks like."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return x * math.nan
        return x


def test_nan_that_eager_does_not_reproduce_says_so_and_blames_no_compiler() -> None:
    reset()
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), odd=CompiledOnlyNaN(), head=nn.Linear(4, 1)))
    assert torch.isfinite(model(batch(0))).all()  # eager is finite
    call, mon = _wrap(model, CompileCounterWithBackend("aot_eager"))
    losses = train(model, call, mon, steps=1)
    assert not math.isfinite(losses[0])
    (f,) = [f for f in mon.findings if f.kind == "nonfinite"]
    assert "could not reproduce" in f.message and "compiler" not in f.message.lower()
    assert f.evidence["replay_error"] == "could not reproduce in eager"
    mon.close()


def test_dropout_under_compile_is_named_as_the_reason_replay_cannot_be_faithful() -> None:
    reset()
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), drop=nn.Dropout(0.5), odd=CompiledOnlyNaN()))
    call, mon = _wrap(model, CompileCounterWithBackend("aot_eager"))
    train(model, call, mon, steps=1)
    (f,) = [f for f in mon.findings if f.kind == "nonfinite"]
    assert "could not reproduce" in f.message and "dropout" in f.message
    mon.close()


@pytest.mark.slow  # Inductor's C++ code generation: minutes on a shared 2-core CPU
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="Inductor needs a C++ compiler")
def test_inductor_compiled_model_is_watched_like_eager() -> None:
    torch._dynamo.reset()
    counters.clear()
    model = make_model()
    compiled = torch.compile(model)  # Inductor, the default backend
    mon = gg.watch(compiled, console=False, sample_every=SAMPLE_EVERY)
    train(model, compiled, mon)
    assert not counters["graph_break"]
    ref = eager_reference()
    for row, want in zip(mon.history, ref, strict=True):
        assert row["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        if "act/log/mean" in want:
            assert row["act/log/mean"] == pytest.approx(want["act/log/mean"], rel=1e-4)
    mon.close()
