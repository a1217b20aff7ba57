"""gradguard under torch.distributed: 2 ranks on CPU with gloo, compared with a single-process reference.

Each test spawns two processes (``torch.multiprocessing``) that join a gloo process group through a file
store in ``tmp_path``; each rank trains on its half of a global batch and writes what it measured to a
file; the parent compares the ranks with each other and with the reference computed on the concatenated
batch. Spawning costs a few seconds, so one spawn checks every scenario at once.

FSDP is tested with FSDP2 (``torch.distributed.fsdp.fully_shard``), which runs on CPU with gloo in torch
2.13: parameters and gradients become DTensors sharded on dim 0 (uneven shards included), so the wrapper
API (FSDP1) is not needed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradguard.stats import tensor_norms
from gradguard.stats.distributed import (
    allreduce_mean,
    allreduce_norms,
    global_norms,
    local_tensors,
    make_reduce_fn,
    shard_group,
    sharded_mask,
)

WORLD = 2
RTOL = 1e-5
#: Seconds before a spawned run counts as deadlocked (a healthy one takes a few seconds).
DEADLINE_S = 90.0


# ----------------------------------------------------------------------------------------------- harness


def _entry(rank: int, fn: Callable[[int], dict[str, Any]], store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        result = fn(rank)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(fn: Callable[[int], dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    """Run ``fn(rank)`` on :data:`WORLD` gloo ranks; fail (instead of hanging) if they do not finish."""
    ctx = mp.start_processes(
        _entry,
        args=(fn, str(tmp_path / "store"), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"ranks did not finish within {DEADLINE_S} s: deadlock")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def make_mlp() -> nn.Sequential:
    """Tiny MLP whose layer widths (16 and 3 rows) split unevenly over two ranks under FSDP (8/8, 2/1)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def global_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch on every rank; rank r trains on rows ``r::WORLD``."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)


def reference_grad_norms() -> tuple[dict[str, float], float]:
    """Per-parameter gradient norms and the loss of one backward on the concatenated batch, one process."""
    model = make_mlp()
    x, y = global_batch()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    norms = tensor_norms([p.grad for _, p in model.named_parameters()]).tolist()
    return dict(zip(names, norms, strict=True)), float(loss.detach())


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ------------------------------------------------------------------------------------- stats: DDP, FSDP2


#: Policies checked on sharded gradients, with thresholds that make each of them clip this model.
CLIP_POLICIES = ("value", "norm", "agc", "zclip", "autoclip")


def _clip_record(name: str, model: nn.Module) -> list[Any]:
    """Apply a fresh policy ``name`` to ``model``'s gradients; its ClipResult and the clipped gradient norms."""
    from gradguard import clip

    policy = {
        "value": lambda: clip.ClipValue(0.01),
        "norm": lambda: clip.ClipNorm(0.1),
        "agc": lambda: clip.AGC(0.01),
        "zclip": lambda: clip.ZClip(),
        "autoclip": lambda: clip.AutoClip(),
    }[name]()
    result = policy(model.parameters())
    # the one limit the policy imposed (the other three fields are inf)
    limit = min(float(t) for t in (result.norm_limit, result.tensor_norm_limit, result.value_limit, result.ratio_limit))
    fields = [float(result.norm_before), float(result.norm_after), limit, bool(result.clipped)]
    kinds = sorted({type(t).__name__ for t in result})
    return [fields, tensor_norms([p.grad for p in model.parameters()]).tolist(), kinds]


def reference_clips() -> dict[str, list[Any]]:
    out = {}
    for name in CLIP_POLICIES:
        model = make_mlp()
        x, y = global_batch()
        nn.functional.mse_loss(model(x), y).backward()
        out[name] = _clip_record(name, model)
    return out


def _stats_worker(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    x, y = global_batch()
    xs, ys = x[rank::WORLD], y[rank::WORLD]
    out: dict[str, Any] = {}

    # DDP: gradients are averaged in backward, so local norms are already global; no collective needed.
    ddp = DistributedDataParallel(make_mlp())
    loss = nn.functional.mse_loss(ddp(xs), ys)
    loss.backward()
    params = list(ddp.module.named_parameters())
    out["ddp_mask"] = sharded_mask([p.grad for _, p in params])
    out["ddp"] = dict(zip([n for n, _ in params], global_norms([p.grad for _, p in params]).tolist(), strict=True))
    out["ddp_loss"] = float(allreduce_mean(loss.detach()))

    # FSDP2: gradients are DTensor shards; one all-reduce of stacked squared local norms.
    model = make_mlp()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss = nn.functional.mse_loss(model(xs), ys)
    loss.backward()
    params = list(model.named_parameters())
    grads = [p.grad for _, p in params]
    out["fsdp_mask"] = sharded_mask(grads)
    out["fsdp_local_numel"] = [t.numel() for t in local_tensors(grads)]
    out["fsdp_group_is_mesh"] = shard_group(grads) is mesh.get_group()
    out["fsdp"] = dict(zip([n for n, _ in params], global_norms(grads).tolist(), strict=True))
    local = tensor_norms(local_tensors(grads), math.inf)
    out["fsdp_inf"] = allreduce_norms(local, math.inf, sharded=out["fsdp_mask"]).tolist()
    out["fsdp_inf_ref"] = [float(p.grad.full_tensor().abs().max()) for _, p in params]
    out["fsdp_l1"] = allreduce_norms(tensor_norms(local_tensors(grads), 1.0), 1.0).tolist()
    out["fsdp_l1_ref"] = [float(p.grad.full_tensor().abs().sum()) for _, p in params]

    # Every clipping policy on FSDP2 shards: same measurement and same clipped gradient as one process.
    out["clip"] = {}
    for name in CLIP_POLICIES:
        model.zero_grad()
        nn.functional.mse_loss(model(xs), ys).backward()
        out["clip"][name] = _clip_record(name, model)

    # HSDP: a 2-D (replicate, shard) mesh; norms reduce over the shard dimension's group only.
    hsdp = make_mlp()
    mesh2 = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    for layer in (hsdp[0], hsdp[2], hsdp[4]):
        fully_shard(layer, mesh=mesh2)
    fully_shard(hsdp, mesh=mesh2)
    nn.functional.mse_loss(hsdp(xs), ys).backward()
    hgrads = [p.grad for p in hsdp.parameters()]
    out["hsdp_group_is_shard_dim"] = shard_group(hgrads) is mesh2.get_group("shard")
    out["hsdp"] = dict(zip([n for n, _ in hsdp.named_parameters()], global_norms(hgrads).tolist(), strict=True))

    # The monitor's reduction hook: a (rows, k·n) block of squared local norms, one all-reduce.
    sq = tensor_norms(local_tensors(grads)).pow(2)
    reduce = make_reduce_fn([p for _, p in params])
    assert reduce is not None and make_reduce_fn(list(ddp.module.parameters())) is None
    block = reduce(torch.stack([torch.cat([sq, 4 * sq]), torch.cat([sq, sq])]))
    out["fsdp_block"] = block.sqrt().tolist()

    # Replicated entries are counted once, not world_size times.
    out["replicated"] = allreduce_norms(torch.tensor([3.0, 4.0]), 2.0, sharded=[False, True]).tolist()
    # A NaN on one rank reaches every rank.
    out["nan"] = allreduce_norms(torch.tensor([float("nan") if rank == 1 else 1.0, 2.0]), 2.0).tolist()
    return out


def _all_worker(rank: int) -> dict[str, Any]:
    """Every scenario in one spawn: starting two processes costs more than the scenarios themselves."""
    return {"stats": _stats_worker(rank), "monitor": _monitor_worker(rank), "guard": _guard_worker(rank)}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What both ranks measured in all scenarios (run once per module; fails instead of hanging)."""
    return run_ranks(_all_worker, tmp_path_factory.mktemp("ranks"))


@pytest.mark.xdist_group("distributed")
def test_norms_under_ddp_and_fsdp_equal_single_process_reference(spawned: list[dict[str, Any]]) -> None:
    ranks = [r["stats"] for r in spawned]
    ref, ref_loss = reference_grad_norms()
    for r in ranks:
        assert r["ddp_mask"] == [False] * len(ref)
        for name, value in ref.items():
            assert rel_err(r["ddp"][name], value) < RTOL, (name, r["ddp"][name], value)
            assert rel_err(r["fsdp"][name], value) < RTOL, (name, r["fsdp"][name], value)
        assert rel_err(r["ddp_loss"], ref_loss) < RTOL
        assert r["fsdp_mask"] == [True] * len(ref)
        n = len(ref)
        for row, scale in zip(r["fsdp_block"], ([1.0, 2.0], [1.0, 1.0]), strict=True):
            for k in range(2):
                for got, want in zip(row[k * n : (k + 1) * n], ref.values(), strict=True):
                    assert rel_err(got, scale[k] * want) < RTOL
        assert r["fsdp_group_is_mesh"] and r["hsdp_group_is_shard_dim"]
        for name, value in ref.items():
            assert rel_err(r["hsdp"][name], value) < RTOL, (name, r["hsdp"][name], value)
        for got, want in zip(r["fsdp_inf"], r["fsdp_inf_ref"], strict=True):
            assert rel_err(got, want) < RTOL
        for got, want in zip(r["fsdp_l1"], r["fsdp_l1_ref"], strict=True):
            assert rel_err(got, want) < RTOL
        assert r["replicated"] == pytest.approx([3.0, math.sqrt(4.0**2 * WORLD)], rel=RTOL)
        assert math.isnan(r["nan"][0]) and r["nan"][1] == pytest.approx(math.sqrt(8.0), rel=RTOL)
    ref_clips = reference_clips()
    for name, (fields, norms, _) in ref_clips.items():
        # ZClip and AutoClip only start clipping once they have a history; the others clip at once.
        assert fields[3] == (name in ("value", "norm", "agc")), name
        for r in ranks:
            got_fields, got_norms, kinds = r["clip"][name]
            assert kinds == ["Tensor"], (name, kinds)  # plain tensors: usable in Guard's host decision
            assert got_fields[3] == fields[3], name
            for got, want in zip(got_fields[:3] + got_norms, fields[:3] + norms, strict=True):
                assert rel_err(got, want) < 1e-4, (name, got, want)
    # Shards really are local: 16x6 weight in 8+8 rows, 3-row output layer in 2+1 rows.
    assert [r["fsdp_local_numel"][0] for r in ranks] == [48, 48]
    assert [r["fsdp_local_numel"][4] for r in ranks] == [32, 16]
    # Every rank holds exactly the same numbers.
    assert ranks[0]["ddp"] == ranks[1]["ddp"] and ranks[0]["fsdp"] == ranks[1]["fsdp"]


def test_allreduce_norms_is_identity_without_process_group() -> None:
    norms = torch.tensor([1.0, 2.0])
    assert allreduce_norms(norms, 2.0) is norms
    assert allreduce_mean(norms) is norms


def test_allreduce_norms_rejects_bad_input() -> None:
    from gradguard.errors import ConfigError, InputError

    with pytest.raises(InputError, match="list"):
        allreduce_norms([1.0], 2.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="-1"):
        allreduce_norms(torch.ones(2), -1.0)
    with pytest.raises(ConfigError, match="1-D"):
        allreduce_norms(torch.ones(2, 2), 2.0)




# ---------------------------------------------------------------------------- the monitor: DDP and FSDP2

STEPS = 4
MONITOR_OPTIONS = {"log_every": 2, "sample_every": 2, "console": False, "replay": False}
#: History entries that must equal the single-process reference (activation summaries are per-rank).
COMPARED = ("loss", "grad_norm", "grad_norm/", "weight_norm/", "update_ratio/")


def step_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(STEPS)]


def _compared(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [
        {k: v for k, v in row.items() if k == "step" or any(k.startswith(c) for c in COMPARED)} for row in history
    ]


def reference_history() -> list[dict[str, float]]:
    """The monitor on one process, training on the concatenated batches."""
    import gradguard as gg

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gg.watch(model, **MONITOR_OPTIONS)
    for x, y in step_batches():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.step(loss.detach())
        opt.step()
    history = _compared(mon.history)
    mon.close()
    return history


def _monitor_worker(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import gradguard as gg

    out: dict[str, Any] = {}
    for mode in ("ddp", "fsdp"):
        model = make_mlp()
        if mode == "ddp":
            wrapped: nn.Module = DistributedDataParallel(model)
        else:
            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in (model[0], model[2], model[4]):
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        # gg.watch's own defaults under torch.distributed: console on rank 0 only, no replay.
        mon = gg.watch(model, log_every=2, sample_every=2)
        out[f"{mode}_defaults"] = (mon.replay_enabled, any(type(s).__name__ == "ConsoleSink" for s in mon.sinks))
        for x, y in step_batches():
            opt.zero_grad()
            loss = nn.functional.mse_loss(wrapped(x[rank::WORLD]), y[rank::WORLD])
            loss.backward()
            mon.step(allreduce_mean(loss.detach()))  # the global-batch loss, equal on every rank
            opt.step()
        out[mode] = _compared(mon.history)
        out[f"{mode}_findings"] = [f.to_dict() for f in mon.findings]
        mon.close()
    return out


@pytest.mark.xdist_group("distributed")
def test_monitor_under_ddp_and_fsdp_equals_single_process_reference(spawned: list[dict[str, Any]]) -> None:
    ranks = [r["monitor"] for r in spawned]
    ref = reference_history()
    assert len(ref) == STEPS and any("update_ratio/0.weight" in row for row in ref)
    for mode in ("ddp", "fsdp"):
        for r in ranks:
            got = r[mode]
            assert [row.keys() for row in got] == [row.keys() for row in ref], mode
            for row_got, row_ref in zip(got, ref, strict=True):
                for key, want in row_ref.items():
                    assert rel_err(row_got[key], want) < RTOL, (mode, row_ref["step"], key, row_got[key], want)
        assert [r[f"{mode}_defaults"] for r in ranks] == [[False, True], [False, False]]
        # Identical numbers and findings on every rank.
        assert ranks[0][mode] == ranks[1][mode]
        assert ranks[0][f"{mode}_findings"] == ranks[1][f"{mode}_findings"]


# --------------------------------------------------------------- Guard: identical decisions on every rank

#: Short windows for a 12-step run; spikes must be far out (z > 50, twice the median) so that ordinary
#: batch-to-batch noise of this tiny model is never a spike and only the injected fault is.
GUARD_OPTIONS = {
    "window": 8,
    "min_history": 4,
    "rollback_after": 2,
    "snapshot_every": 3,
    "spike_z": 6.0,  # a Gaussian rarity: Guard corrects it for the few values a window of 8 holds
    "spike_min_excess": 1.0,
}
GUARD_STEPS = 12
SPIKE_STEP = 6  # rank 0's targets ×1000 (half of the global batch): the global loss spikes
NAN_STEPS = (9, 10)  # rank 1's inputs are NaN: two non-finite steps in a row trigger a rollback


def guard_batch(step: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch of ``step`` (rows 0::2 belong to rank 0, 1::2 to rank 1), with the injected faults."""
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
    if step == SPIKE_STEP:
        y[0::2] *= 1000.0
    if step in NAN_STEPS:
        x[1::2] = float("nan")
    return x[rows], y[rows]


def _decisions(guard: Any, applied: list[bool]) -> dict[str, Any]:
    return {
        "applied": applied,
        "events": [(e.step, e.action, e.reason) for e in guard.events],
        "rollbacks": guard.rollbacks,
        "lr_factor": guard.lr_factor,
    }


def reference_guard() -> tuple[dict[str, Any], list[list[float]]]:
    import gradguard as gg

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, **GUARD_OPTIONS)
    applied = []
    for step in range(GUARD_STEPS):
        x, y = guard_batch(step, slice(None))
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        applied.append(guard.step(loss.detach()))
    return _decisions(guard, applied), [p.detach().reshape(-1).tolist() for p in model.parameters()]


def _guard_worker(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import gradguard as gg

    out: dict[str, Any] = {}
    for mode in ("ddp", "fsdp"):
        model = make_mlp()
        if mode == "ddp":
            wrapped: nn.Module = DistributedDataParallel(model)
        else:
            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in (model[0], model[2], model[4]):
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = gg.Guard(model, opt, **GUARD_OPTIONS)
        applied = []
        for step in range(GUARD_STEPS):
            x, y = guard_batch(step, slice(rank, None, WORLD))
            opt.zero_grad()
            loss = nn.functional.mse_loss(wrapped(x), y)
            loss.backward()
            # The decision may depend only on quantities equal on every rank: the all-reduced loss, and
            # gradients that DDP averaged / whose norms tensor_norms all-reduces over FSDP shards.
            applied.append(guard.step(allreduce_mean(loss.detach())))
        out[mode] = _decisions(guard, applied)
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        out[f"{mode}_params"] = [p.detach().reshape(-1).tolist() for p in params]
    return out


@pytest.mark.xdist_group("distributed")
def test_guard_decides_identically_on_every_rank_and_like_the_reference(spawned: list[dict[str, Any]]) -> None:
    ranks = [r["guard"] for r in spawned]  # the spawn fails instead of hanging if the ranks ever diverge
    ref, ref_params = reference_guard()
    # The reference itself sees the injected faults: a spike skip, two non-finite skips, one rollback.
    assert ref["applied"][SPIKE_STEP] is False and [ref["applied"][s] for s in NAN_STEPS] == [False, False]
    assert ref["rollbacks"] == 1 and ref["applied"][-1] is True
    assert sum(ref["applied"]) == GUARD_STEPS - 3, ref["events"]
    for mode in ("ddp", "fsdp"):
        assert ranks[0][mode] == ranks[1][mode], mode
        got = ranks[0][mode]
        assert got["applied"] == ref["applied"] and got["rollbacks"] == ref["rollbacks"], mode
        assert [tuple(e) for e in got["events"]] == [tuple(e) for e in ref["events"]], mode
        assert got["lr_factor"] == pytest.approx(ref["lr_factor"])
        # Same weights on both ranks and (to float rounding of the averaged gradients) as the reference.
        assert ranks[0][f"{mode}_params"] == ranks[1][f"{mode}_params"], mode
        for p_got, p_ref in zip(ranks[0][f"{mode}_params"], ref_params, strict=True):
            torch.testing.assert_close(torch.tensor(p_got), torch.tensor(p_ref), rtol=1e-4, atol=1e-6)
