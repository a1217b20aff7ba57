"""NaN provenance with gradient accumulation, and statistics under activation checkpointing.

With accumulation a step makes several forwards; the replay checks each kept micro-batch on its own and
names the first that produced the NaN/Inf (counted from 0), whatever loss is passed to ``mon.step``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from zoo import LogLayer

import gradguard as gg

MICRO = 4


def model_with_log() -> nn.Module:
    """``log`` of a Softplus output: finite for any finite input, NaN only for a NaN/negative shift."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(fc0=nn.Linear(4, 8), soft=nn.Softplus(), log=LogLayer(), head=nn.Linear(8, 1))
    )


def micro_batch(i: int) -> Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(i))


def accumulate(
    model: nn.Module, batches: list[Tensor], *, loss_fn: Callable[[Tensor, int], Tensor] | None = None,
    before: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """One optimizer step of gradient accumulation; returns (total loss, last micro-batch loss)."""
    total = torch.zeros(())
    last = total
    for i, x in enumerate(batches):
        if before is not None:
            before(i)
        out = model(x)
        last = (loss_fn(out, i) if loss_fn else out.pow(2).mean()) / len(batches)
        last.backward()
        total = total + last.detach()
    return total, last


def nonfinite(mon: gg.Monitor) -> gg.Finding:
    (f,) = [f for f in mon.findings if f.kind == "nonfinite"]
    return f


@pytest.mark.parametrize("passed", ["total", "last", "none"])
@pytest.mark.parametrize("k", range(MICRO))
def test_nan_input_in_micro_batch_k_is_named_as_data_of_micro_batch_k(k: int, passed: str) -> None:
    model = model_with_log()
    mon = gg.watch(model, console=False)
    batches = [micro_batch(i) for i in range(MICRO)]
    batches[k][1, 2] = math.nan
    total, last = accumulate(model, batches)
    assert not math.isfinite(float(total))
    mon.step({"total": total, "last": last, "none": None}[passed])
    f = nonfinite(mon)
    assert (f.module, f.severity, f.evidence["micro_batch"], f.evidence["forwards"]) == ("", "error", k, MICRO)
    assert "in the data" in f.message and f"micro-batch {k} of {MICRO}" in f.message
    assert "Clean the data" in f.advice
    mon.close()


@pytest.mark.parametrize("k", [1, 3])
def test_nan_born_in_a_layer_in_micro_batch_k_names_the_layer_and_k(k: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc0=nn.Linear(4, 4), log=LogLayer(), head=nn.Linear(4, 1)))
    with torch.no_grad():
        model.fc0.weight.copy_(torch.eye(4))
        model.fc0.bias.zero_()
    mon = gg.watch(model, console=False)
    batches = [micro_batch(i).abs() + 0.1 for i in range(MICRO)]  # positive: log finite
    batches[k][2, 1] = -1.0  # finite input, log of a negative entry: NaN born in `log`
    total, _ = accumulate(model, batches)
    assert not math.isfinite(float(total))
    mon.step(total)
    f = nonfinite(mon)
    assert (f.module, f.evidence["phase"], f.evidence["micro_batch"]) == ("log", "forward", k)
    assert f"micro-batch {k} of {MICRO}" in f.message
    mon.close()


@pytest.mark.parametrize("k", [0, 2])
def test_nan_born_in_the_loss_of_micro_batch_k_blames_the_loss_at_k(k: int) -> None:
    model = model_with_log()
    mon = gg.watch(model, console=False)

    def loss_fn(out: Tensor, i: int) -> Tensor:
        return torch.sqrt(out.pow(2).mean() - (1e6 if i == k else 0.0))  # sqrt(negative): NaN value and gradient

    total, _ = accumulate(model, [micro_batch(i) for i in range(MICRO)], loss_fn=loss_fn)
    mon.step(total)
    f = nonfinite(mon)
    assert (f.module, f.evidence["phase"], f.evidence["micro_batch"]) == ("", "forward", k)
    assert "the loss" in f.message and "clamp its input" in f.advice
    mon.close()


def test_nan_loss_with_finite_gradients_blames_the_loss_without_guessing_a_micro_batch() -> None:
    model = model_with_log()
    mon = gg.watch(model, console=False)

    def loss_fn(out: Tensor, i: int) -> Tensor:
        return torch.log(out.pow(2).mean() - (1e6 if i == 1 else 0.0))  # NaN value, finite gradient 1/x

    total, _ = accumulate(model, [micro_batch(i) for i in range(MICRO)], loss_fn=loss_fn)
    mon.step(total)
    f = nonfinite(mon)
    assert f.module == "" and "micro_batch" not in f.evidence and f.evidence["forwards"] == MICRO
    assert "finite in every forward" in f.message and "clamp its input" in f.advice
    mon.close()


def test_nan_beyond_max_calls_says_the_forward_was_not_kept() -> None:
    model = model_with_log()
    mon = gg.watch(model, console=False, max_calls=2)
    batches = [micro_batch(i) for i in range(MICRO)]
    batches[3][0, 0] = math.nan
    total, _ = accumulate(model, batches)
    mon.step(total)
    f = nonfinite(mon)
    assert f.module == "" and "keeps the first 2" in f.message and "born in a later one" in f.message
    assert "the loss" not in f.message.split(";")[0]
    mon.close()


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.block = nn.Sequential(OrderedDict(fc=nn.Linear(4, 8), act=nn.Tanh(), log=LogLayer()))
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.reentrant is None:
            return self.head(self.block(x))
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


def _train_checkpointed(reentrant: bool | None, bias: float = 2.0) -> tuple[gg.Monitor, list[float]]:
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    with torch.no_grad():
        model.block.fc.bias.fill_(bias)  # tanh output > 0 unless the bias is negative: log finite
    mon = gg.watch(model, console=False, sample_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    for step in range(4):
        x = 0.1 * micro_batch(step).requires_grad_(reentrant is True)  # reentrant needs a grad input
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        mon.step(loss)
        opt.step()
        losses.append(float(loss.detach()))
    return mon, losses


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointing_counts_each_module_once_and_matches_plain_forward(reentrant: bool) -> None:
    ref, _ = _train_checkpointed(None)
    mon, _ = _train_checkpointed(reentrant)
    for row, want in zip(mon.history, ref.history, strict=True):
        assert set(row) == set(want)
        for key in want:
            if key.startswith(("act/", "grad_norm")):
                assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert any("act/block.log/numel" in r for r in mon.history)
    mon.close()
    ref.close()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_replay_through_checkpointed_block_names_the_producer(reentrant: bool) -> None:
    mon, losses = _train_checkpointed(reentrant, bias=-5.0)  # tanh < 0 → log NaN inside the block
    assert not math.isfinite(losses[0])
    f = nonfinite(mon)
    assert (f.module, f.evidence["phase"], f.step) == ("block.log", "forward", 0)
    mon.close()
