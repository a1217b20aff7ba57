"""A watched model stays picklable and deep-copyable; a copy never feeds the original's monitor."""

from __future__ import annotations

import copy
import io
import math
from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

import gradguard as gg


def model_and_batch() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc0=nn.Linear(4, 8), act=nn.ReLU(), head=nn.Linear(8, 2)))
    return model, torch.randn(6, 4)


def save_load(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)  # the whole module, as the word-language-model example does every epoch
    buf.seek(0)
    loaded: nn.Module = torch.load(buf, weights_only=False)
    return loaded


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_watched_model_is_copied_with_inert_hooks_at_any_point_of_a_step(how: str) -> None:
    model, x = model_and_batch()
    mon = gg.watch(model, console=False, sample_every=1)  # activation hooks attached at every step
    copier = save_load if how == "torch.save" else copy.deepcopy
    copies = [copier(model)]  # before the first forward, hooks armed
    model(x).pow(2).mean().backward()
    copies.append(copier(model))  # between forward and mon.step
    mon.step()
    copies.append(copier(model))  # after the step
    for twin in copies:
        torch.testing.assert_close(twin(x), model(x))
        twin(x).sum().backward()  # a training step of the copy, in train mode, with gradients
    for p in model.parameters():
        p.grad = None
    mon.close()


def _run(with_ema: bool, bad: bool) -> gg.Monitor:
    model, x = model_and_batch()
    mon = gg.watch(model, console=False, sample_every=1)
    ema = copy.deepcopy(model)  # an EMA model, updated from the original and run on other batches
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        if with_ema:
            ema(torch.randn(5, 4) * 100).sum().backward()  # different batch size and scale
        batch = x.clone()
        if bad and step == 2:
            batch[0, 0] = math.nan
        loss = model(batch).pow(2).mean()
        loss.backward()
        mon.step(loss)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(p, 0.1)
    return mon


def test_an_ema_copy_does_not_feed_the_original_monitor() -> None:
    alone, with_ema = _run(False, False).history, _run(True, False).history
    for a, b in zip(alone, with_ema, strict=True):
        assert set(a) == set(b)
        for key in a:
            if key.startswith("act/"):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key  # the copy's forwards are not counted
    f = next(f for f in _run(True, True).findings if f.kind == "nonfinite")
    # One forward of the original in the step: the replay does not see the copy's as micro-batches.
    assert "micro_batch" not in f.evidence and "in the data" in f.message and f.step == 2
