"""Rollback exactness, end to end: state equals the snapshot bit for bit, and the trajectory resumes exactly.

A small model with BatchNorm (buffers), Adam (step counts and both moments), a LambdaLR schedule and a
CPU ``GradScaler`` is trained under ``gg.Guard`` + ``gg.watch``. Non-finite losses are injected until
the guard rolls back (``rollback_after`` in a row); then

1. parameters, buffers, the optimizer's ``state_dict`` (``step``, ``exp_avg``, ``exp_avg_sq``, param
   groups), the scheduler's and the scaler's ``state_dict`` equal the copies taken right after the
   snapshot, bit for bit (``torch.equal`` on every tensor, ``==`` on every number);
2. continuing from the rollback with the same data (the batches from the snapshot's step on) follows,
   bit for bit on CPU, the trajectory of a run that never saw the fault: same loss at every step, same
   final weights and optimizer state.

The second check uses ``backoff=1.0`` and ``rescue=None`` so the guard neither lowers the learning rate
nor engages its rescue clipping after the rollback: it isolates what is restored from the remedy applied
on top (with the default backoff the resumed run
must differ, which the last test measures).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradguard as gg

SNAPSHOT_EVERY = 6
STEPS = 30


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x)))).squeeze(-1)


def batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=g)
    return x, torch.sin(x[:, 0]) + 0.5 * x[:, 1]


class Run:
    """Model, Adam, LambdaLR, CPU GradScaler, monitor and guard, with a step function that can be poisoned."""

    def __init__(self, **guard_options: Any) -> None:
        torch.manual_seed(0)
        self.model = Net()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1.0 + 0.05 * s))
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=4)
        self.mon = gg.watch(self.model, console=False)
        self.guard = gg.Guard(self.model, self.opt, monitor=self.mon, scaler=self.scaler, scheduler=self.sched,
                              snapshot_every=SNAPSHOT_EVERY, **guard_options)
        self.losses: list[Tensor] = []

    def step(self, data_step: int, poison: bool = False) -> bool:
        x, y = batch(data_step)
        self.opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.model(x), y)
        if poison:
            loss = loss * float("nan")
        self.scaler.scale(loss).backward()
        self.mon.step(loss)
        applied = self.guard.step(loss)
        if applied:
            self.losses.append(loss.detach().clone())
        return applied

    def state(self) -> dict[str, Any]:
        """Everything a rollback must restore, deep-copied."""
        return copy.deepcopy({
            "params": dict(self.model.named_parameters()),
            "buffers": dict(self.model.named_buffers()),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
        })


def assert_bit_equal(a: Any, b: Any, path: str = "") -> None:
    """Recursive equality: tensors with ``torch.equal`` (same dtype and shape too), numbers with ``==``."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_bit_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bit_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    elif callable(a):
        assert callable(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _train_to_snapshot(run: Run) -> tuple[int, dict[str, Any]]:
    """Train (stepping the schedule after each step) until the guard's second periodic snapshot is committed.

    The guard captures a snapshot inside ``guard.step``, after that step's update and before that step's
    ``scheduler.step()``, and commits it when the next step is applied. Returns the data step right after
    the snapshot (which this function has already trained on: it is the step that committed it) and a
    copy of the state as the snapshot saw it.
    """
    step = 0
    while True:
        assert run.step(step)
        step += 1
        taken = run.guard.candidate_step == run.guard.steps and run.guard.steps >= 2 * SNAPSHOT_EVERY
        copy_ = run.state() if taken else None
        run.sched.step()
        if copy_ is not None:
            assert run.guard.snapshot_step < step  # not the rollback target yet
            assert run.step(step)
            run.sched.step()
            assert run.guard.snapshot_step == step and run.guard.candidate_step is None
            return step, copy_


def test_rollback_restores_every_piece_of_state_bit_for_bit() -> None:
    run = Run()
    step, snap = _train_to_snapshot(run)
    # Move every piece of state away from the snapshot: good steps (weights, BN statistics, Adam moments
    # and step counts, schedule position, scaler growth tracker) ...
    for k in range(1, 3):
        assert run.step(step + k)
        run.sched.step()
    moved = run.state()
    assert moved["scaler"] != snap["scaler"]  # its growth tracker moved (and the poisoned steps halve its scale)
    with pytest.raises(AssertionError):
        assert_bit_equal(moved, snap)
    # ... then non-finite losses until the guard rolls back (the scaler also lowers its scale on each).
    rollbacks = run.guard.rollbacks
    for k in range(run.guard.rollback_after):
        assert not run.step(step + 3 + k, poison=True)
    assert run.guard.rollbacks == rollbacks + 1
    assert any(e.action == "rollback" for e in run.guard.events[-3:])
    assert_bit_equal(run.state(), snap)


def test_resumed_trajectory_equals_a_run_that_never_saw_the_fault() -> None:
    ref = Run(backoff=1.0, rescue=None)
    for s in range(STEPS):
        assert ref.step(s)
        ref.sched.step()
    # The same run, moved on by two good steps after its last snapshot, then poisoned until the guard
    # rolls back; the schedule is stepped after every call, as a training loop does.
    run = Run(backoff=1.0, rescue=None)
    resume, _ = _train_to_snapshot(run)  # also trained on data step `resume`
    assert run.step(resume + 1)
    run.sched.step()
    for s in range(resume + 2, resume + 2 + run.guard.rollback_after):
        assert not run.step(s, poison=True)
        run.sched.step()  # after the rollback this is the schedule step of the snapshot's own step
    assert run.guard.rollbacks == 1 and run.guard.lr_factor == 1.0
    del run.losses[-2:]  # the two good steps after the snapshot were undone by the rollback
    # Continue with the same data as the clean run from the snapshot on.
    for s in range(resume, STEPS):
        assert run.step(s)
        run.sched.step()
    assert len(run.losses) == len(ref.losses) == STEPS
    for s, (a, b) in enumerate(zip(run.losses, ref.losses, strict=True)):
        assert torch.equal(a, b), f"loss differs at step {s}: {float(a)!r} vs {float(b)!r}"
    assert_bit_equal(run.state(), ref.state())


def test_default_backoff_changes_the_resumed_trajectory() -> None:
    """Control for the test above: with the default backoff (0.5) the resumed run must not match the
    clean one, so equality above comes from exact restoration and not from a comparison that cannot fail."""
    ref = Run()
    for s in range(STEPS):
        assert ref.step(s)
        ref.sched.step()
    run = Run()
    resume, _ = _train_to_snapshot(run)
    for s in range(resume + 1, resume + 1 + run.guard.rollback_after):
        assert not run.step(s, poison=True)
        run.sched.step()
    assert run.guard.rollbacks == 1 and run.guard.lr_factor == pytest.approx(0.5)
    del run.losses[-1:]  # the committing step after the snapshot was undone by the rollback
    for s in range(resume, STEPS):
        assert run.step(s)
        run.sched.step()
    assert len(run.losses) == STEPS
    assert not torch.equal(run.losses[-1], ref.losses[-1])
