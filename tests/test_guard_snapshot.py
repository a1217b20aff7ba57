"""The snapshot store on its own, and the Guard's rollback bit-for-bit in every snapshot mode.

On a CPU-only machine host and device memory are the same and pinning is unavailable: these tests check
exactness and the store's bookkeeping in every mode; the memory claims of the host mode hold on CUDA
only (documented in docs/guard.md).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard.errors import ConfigError, StateError
from gradguard.guard.snapshot import SNAPSHOT_MODES, SnapshotStore, choose_mode


def _bit_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        # Bit for bit; NaN slots (empty history of a clip policy) equal NaN.
        same = torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
        assert same, path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            _bit_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _bit_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (path, a, b)


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 5)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _sources(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": dict(model.state_dict(keep_vars=True)), "optimizer": opt.state_dict(), "step": 3}


def _store(mode: str, tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(mode, path=tmp_path / "snap.pt" if mode == "disk" else None)


@pytest.mark.parametrize("mode", SNAPSHOT_MODES)
def test_store_keeps_an_exact_copy_that_survives_being_loaded(mode: str, tmp_path: Path) -> None:
    model, opt = _trained()
    store = _store(mode, tmp_path)
    expected = copy.deepcopy(_sources(model, opt))
    store.commit(store.capture(_sources(model, opt)), step=3)
    assert store.committed_step == 3
    with torch.no_grad():  # move everything away: the snapshot must not alias the live tensors
        for t in model.state_dict().values():
            t.add_(1)
    for s in opt.state.values():
        s["exp_avg"].mul_(3)
    for _ in range(2):  # loading twice gives the same copy: load() never hands out the snapshot itself
        loaded = store.load()
        _bit_equal(loaded, expected, mode)
        loaded["model"]["0.weight"].zero_()
    if mode != "device":
        assert all(t.device.type == "cpu" for t in loaded["model"].values())


def test_candidate_is_committed_only_when_promoted(tmp_path: Path) -> None:
    model, opt = _trained()
    store = SnapshotStore("device")
    first = copy.deepcopy(_sources(model, opt))
    store.commit(store.capture(_sources(model, opt)), step=3)
    with torch.no_grad():
        model[0].weight.add_(1)
    store.propose(store.capture(_sources(model, opt)), step=7)
    assert store.candidate_step == 7 and store.committed_step == 3
    store.discard()
    assert store.candidate_step is None
    _bit_equal(store.load(), first)  # the dropped candidate never became the target
    second = copy.deepcopy(_sources(model, opt))
    store.propose(store.capture(_sources(model, opt)), step=9)
    store.promote()
    assert store.committed_step == 9 and store.candidate_step is None
    _bit_equal(store.load(), second)


def test_captures_reuse_the_spare_snapshot_memory() -> None:
    model, opt = _trained()
    store = SnapshotStore("device")
    store.commit(store.capture(_sources(model, opt)), step=0)
    ptr = store._committed["model"]["0.weight"].data_ptr()  # type: ignore[index]
    store.commit(store.capture(_sources(model, opt)), step=1)  # a fresh one (no spare yet)
    store.commit(store.capture(_sources(model, opt)), step=2)  # written into the first one's tensors
    assert store._committed["model"]["0.weight"].data_ptr() == ptr  # type: ignore[index]


def test_bad_modes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="snapshot='fast'"):
        SnapshotStore("fast")
    with pytest.raises(ConfigError, match="snapshot_dir"):
        SnapshotStore("disk")
    with pytest.raises(ConfigError, match="snapshot_dir"):
        SnapshotStore("host", path=tmp_path / "x.pt")
    with pytest.raises(StateError, match="no snapshot"):
        SnapshotStore("device").load()
    model = nn.Linear(2, 1)
    with pytest.raises(ConfigError, match="snapshot"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), snapshot="disk")


def test_auto_mode_is_device_on_cpu_and_disk_with_a_directory(tmp_path: Path) -> None:
    model = nn.Linear(200, 200)
    assert choose_mode(model.parameters()) == "device"  # host memory is device memory here
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert gg.Guard(model, opt).snapshot_mode == "device"
    assert gg.Guard(model, opt, snapshot_dir=tmp_path).snapshot_mode == "disk"
    assert not SnapshotStore("host").pin or torch.cuda.is_available()


@pytest.mark.parametrize("mode", SNAPSHOT_MODES)
def test_guard_rollback_is_bit_exact_in_every_mode(mode: str, tmp_path: Path) -> None:
    model, opt = _trained()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    guard = gg.Guard(model, opt, scheduler=sched, snapshot=mode, snapshot_every=1000,
                     snapshot_dir=tmp_path if mode == "disk" else None)
    assert guard.snapshot_mode == mode
    g = torch.Generator().manual_seed(1)

    def step(poison: bool = False) -> bool:
        opt.zero_grad()
        x = torch.randn(16, 5, generator=g)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        loss.backward()
        applied = guard.step(loss * math.nan if poison else loss)
        sched.step()
        return applied

    for _ in range(4):
        assert step()
    guard.snapshot()
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    for _ in range(3):
        assert step()
    for _ in range(guard.rollback_after):
        assert not step(poison=True)
    assert guard.rollbacks == 1
    _bit_equal(model.state_dict(), saved["model"], "model")
    _bit_equal(opt.state_dict(), saved["opt"], "optimizer")


@pytest.mark.parametrize("mode", SNAPSHOT_MODES)
def test_periodic_snapshot_rollback_is_bit_exact_in_every_mode_and_survives_two_rollbacks(
    mode: str, tmp_path: Path
) -> None:
    """The automatic path: a candidate taken after ``snapshot_every`` good steps, committed by the next
    healthy step, restored bit for bit (model, Adam, the ZClip policy's running state), twice."""
    model, opt = _trained()
    guard = gg.Guard(model, opt, clip="zclip", snapshot=mode, snapshot_every=4, rollback_after=2,
                     snapshot_dir=tmp_path if mode == "disk" else None)
    g = torch.Generator().manual_seed(2)

    def step(poison: bool = False) -> bool:
        opt.zero_grad()
        x = torch.randn(16, 5, generator=g)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        loss.backward()
        return guard.step(loss * math.nan if poison else loss)

    for _ in range(4):
        assert step()
    assert guard.candidate_step == 4  # taken after the 4th good step, not yet the target
    zclip = guard.clip
    assert zclip is not None
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "clip": zclip.state_dict()})
    assert step() and guard.snapshot_step == 4 and guard.candidate_step is None  # validated: committed
    for attempt in (1, 2):  # the second rollback returns to the same snapshot: it survived the first
        for _ in range(2 if attempt == 1 else 0):
            assert step()
        assert not step(poison=True) and not step(poison=True)
        assert guard.rollbacks == attempt and guard.snapshot_step == 4
        _bit_equal(model.state_dict(), saved["model"], "model")
        _bit_equal(opt.state_dict(), saved["opt"], "optimizer")
        _bit_equal(zclip.state_dict(), saved["clip"], "clip")


def test_disk_mode_holds_no_copy_in_memory_once_written(tmp_path: Path) -> None:
    model, opt = _trained()
    store = SnapshotStore("disk", path=tmp_path / "snap.pt")
    store.propose(store.capture(_sources(model, opt)), step=1)
    store.promote()  # written to the file
    assert store._committed is None and store._spare == {} and store.candidate_step is None
    _bit_equal(store.load(), copy.deepcopy(_sources(model, opt)), "disk")
