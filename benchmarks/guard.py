"""Overhead of ``gg.Guard`` on training steps with no intervention, interleaved against a bare step, and
the peak memory of each snapshot mode.

Variants (each on its own copy of the same model, batch and Adam optimizer; each Guard interleaved step by
step with its baseline alone by ``benchmarks/_timing.py``, steps summed per period, ratio of medians):

* ``bare``: ``zero_grad``, forward, MSE, ``backward``, ``optimizer.step()``;
* ``Guard(clip=None)`` (the default Guard): the same with ``guard.step(loss)``;
* ``bare + clip_grad_norm_(1.0)`` and ``Guard(clip=ClipNorm(1.0))``: the same clipping work, torch's and
  the Guard's;
* ``bare + ZClip()`` and ``Guard(clip="zclip")``: ZClip applied by hand before the step, and by the Guard.

Targets: each Guard within 5 % of its baseline on the MLP 20×256; within 15 % on the MLP 4×64, whose
whole step is under a millisecond, so the Guard's few fixed kernels weigh there.

    python benchmarks/guard.py [--quick] [--write]     # --write updates the "## Guard" section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing
import harness
from clip import write_section

import gradguard as gg

STEPS = 50  # = Guard's default snapshot_every, so each period pays for one snapshot
HEADING = "## Guard"
SNAPSHOT_MODES = ("device", "host", "disk")


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def make_block(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str
) -> tuple[Callable[[], None], gg.Guard | None]:
    """One training step of ``mode`` on its own optimizer, and the guard taking part (if any)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    guard = None
    by_hand: gg.clip.ClipPolicy | None = None
    if mode == "guard":
        guard = gg.Guard(model, opt, clip=None)
    elif mode == "guard_norm":
        guard = gg.Guard(model, opt, clip=gg.clip.ClipNorm(1.0))
    elif mode == "guard_zclip":
        guard = gg.Guard(model, opt, clip="zclip")
    elif mode == "bare_zclip":
        by_hand = gg.clip.ZClip()
    params = list(model.parameters())

    def block() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if guard is not None:
            guard.step(loss)
            return
        if mode == "bare_clip":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        elif by_hand is not None:
            by_hand(params)
        opt.step()

    return block, guard


def interventions(guard: gg.Guard | None) -> str:
    """Skips and rollbacks the guard made (clips are counted apart: clipping is work the baseline does too)."""
    if guard is None:
        return "—"
    counts = {a: sum(e.action == a for e in guard.events) for a in ("skip", "rollback")}
    return f"{counts['skip']} / {counts['rollback']} / {guard.clipped}"


def ops_per_step(block: Callable[[], None], steps: int = 5) -> float:
    """ATen operators the step calls at top level (each a kernel launch on an accelerator), per step.

    From ``torch.profiler`` on CPU: operators called by other operators (``linear`` → ``addmm``) are not
    counted again. The steps counted are ordinary ones (no snapshot falls in them: see ``STEPS``).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            block()
    top = [
        e for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ]
    return len(top) / steps


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def host_reads_per_step(block: Callable[[], None], steps: int = 5) -> float:
    """Tensor reads to the host (``.item()``, ``.tolist()``, ``bool(t)`` ...) per step: on an accelerator
    each is a blocking synchronisation. Counted by wrapping those ``Tensor`` methods."""
    calls = collections.Counter[str]()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name: str) -> Callable[..., Any]:
        def read(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            calls[name] += 1
            return originals[name](self, *a, **k)

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counting(name))
        for _ in range(steps):
            block()
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    return sum(calls.values()) / steps


MODES = {
    "bare": "bare",
    "Guard(clip=None)": "guard",
    "bare + clip_grad_norm_(1.0)": "bare_clip",
    "Guard(clip=ClipNorm(1.0))": "guard_norm",
    "bare + ZClip()": "bare_zclip",
    'Guard(clip="zclip")': "guard_zclip",
}
PAIRS = {
    "Guard(clip=None)": "bare",
    "Guard(clip=ClipNorm(1.0))": "bare + clip_grad_norm_(1.0)",
    'Guard(clip="zclip")': "bare + ZClip()",
}


def run_case(width: int, depth: int, batch: int, rounds: int, target: float) -> list[str]:
    """Table rows for one model size."""
    torch.manual_seed(0)
    base = mlp(width, depth)
    x, y = torch.randn(batch, width), torch.randn(batch, 1)
    made = {name: make_block(copy.deepcopy(base), x, y, mode) for name, mode in MODES.items()}
    blocks = {name: block for name, (block, _) in made.items()}
    # Each Guard is timed against its own baseline only: the two alternate step by step and are summed per
    # period of STEPS steps (a period holds one of the guard's snapshots); interleaving all six variants
    # would let the other models' memory traffic evict the pair's. The clock is the thread's CPU time,
    # which other jobs on a shared machine do not inflate.
    times: dict[str, list[float]] = {}
    for name, ref in PAIRS.items():
        pair = {ref: blocks[ref], name: blocks[name]}
        timed = _timing.interleaved_periods(pair, periods=rounds, period=STEPS, clock=time.thread_time)
        times[name], times[ref] = timed[name], timed[ref]
    # After the timed periods (a multiple of STEPS steps plus the warm-up): the counted steps take no snapshot.
    ops = {name: ops_per_step(block) for name, block in blocks.items()}
    reads = {name: host_reads_per_step(block) for name, block in blocks.items()}
    n_params = sum(p.numel() for p in base.parameters())
    case = f"MLP {depth}×{width} ({n_params / 1e6:.2f}M params), batch {batch}"
    rows = []
    for name in MODES:
        ms = 1e3 * _timing.median(times[name]) / STEPS
        ref = PAIRS.get(name)
        if ref is None:
            rows.append(f"| {case} | {name} | {ms:.2f} | {ops[name]:.0f} | — | — | — | — | — | — | |")
            continue
        r = _timing.paired_ratio(times, name, ref)
        r_min = min(times[name]) / min(times[ref])
        met = "yes" if r <= target else "**no**"
        acts = interventions(made[name][1])
        rows.append(
            f"| {case} | {name} | {ms:.2f} | {ops[name]:.0f} ({ops[name] - ops[ref]:+.0f}) | "
            f"{reads[name] - reads[ref]:+.0f} | {acts} | {ref} | {r:.3f} | {r_min:.3f} | ≤ {target:.2f}× | {met} |"
        )
    return rows


# ------------------------------------------------------------------------------------------ memory
def memory_child(mode: str, width: int, depth: int, device: str) -> dict[str, float]:
    """Peak memory of a few Adam steps on an MLP ``depth``×``width`` with a Guard in ``mode`` (``"none"``: no
    Guard), in this (fresh) process: ``VmHWM`` in MiB, and ``torch.cuda.max_memory_allocated`` on CUDA.

    ``snapshot_every=1``, so after the third step a committed snapshot and a candidate are both held, the
    most a Guard ever holds between rollbacks.
    """
    torch.manual_seed(0)
    model = mlp(width, depth).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    x, y = torch.randn(8, width, device=device), torch.randn(8, 1, device=device)

    def backward() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    backward()
    opt.step()  # the optimizer's state exists before the Guard's first snapshot
    with tempfile.TemporaryDirectory() as tmp:
        guard = None
        if mode != "none":
            guard = gg.Guard(model, opt, snapshot=mode, snapshot_every=1, snapshot_dir=tmp if mode == "disk" else None)
        for _ in range(3):
            loss = backward()
            if guard is None:
                opt.step()
            else:
                assert guard.step(loss)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out = {"peak_rss_mib": harness.peak_rss_mib()}
        if device.startswith("cuda"):
            out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def memory_rows(width: int, depth: int, device: str) -> list[str]:
    n_params = sum(p.numel() for p in mlp(width, depth).parameters())
    state_mib = 3 * n_params * 4 / 2**20  # parameters and Adam's two moments, float32
    peaks = {m: harness.child([__file__, "--memory-child", m, "--device", device], timeout=600.0)
             for m in ("none", *SNAPSHOT_MODES)}
    rows = [
        "",
        f"Peak memory of each snapshot mode: MLP {depth}×{width} ({n_params / 1e6:.1f}M params), Adam, batch 8, "
        f"on {device}; each mode alone in a fresh child process (`VmHWM`; "
        "`torch.cuda.max_memory_allocated` on CUDA), three guarded steps with `snapshot_every=1`, so a "
        "committed snapshot and a candidate are both held. One snapshot of the parameters and Adam's state "
        f"is {state_mib:.0f} MiB.",
        "",
        "| snapshot mode | peak RSS MiB | added over no Guard | peak accelerator MiB | added over no Guard |",
        "|---|---:|---:|---:|---:|",
    ]
    none = peaks["none"]
    for mode, res in peaks.items():
        if "error" in res:
            rows.append(f"| {mode} | {res['error']} | | | |")
            continue
        rss = float(res["peak_rss_mib"])  # type: ignore[arg-type]
        added = "—" if mode == "none" or "error" in none else f"{rss - float(none['peak_rss_mib']):+.0f}"  # type: ignore[arg-type]
        cuda = res.get("cuda_peak_mib")
        if cuda is None:
            rows.append(f"| {'no Guard' if mode == 'none' else mode} | {rss:.0f} | {added} | — (CPU) | — |")
        else:
            extra = "—" if mode == "none" else f"{float(cuda) - float(none['cuda_peak_mib']):+.0f}"  # type: ignore[arg-type]
            label = "no Guard" if mode == "none" else mode
            rows.append(f"| {label} | {rss:.0f} | {added} | {float(cuda):.0f} | {extra} |")  # type: ignore[arg-type]
    if not device.startswith("cuda"):
        rows += [
            "",
            "CPU only: host and device memory are the same here and pinning is unavailable, so `\"host\"` "
            "costs what `\"device\"` costs (two copies); `\"disk\"` holds only the candidate until it is "
            "written. That `\"host\"` keeps the copies off the accelerator, with pinned memory and an "
            "asynchronous copy, is a CUDA claim these figures do not measure; `snapshot=\"auto\"` picks "
            "`\"device\"` on CPU and `\"host\"` on CUDA once two snapshots would exceed 10 % of the GPU's memory.",
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model only, few rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="device of the memory measurement (timings are CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--memory-child", choices=("none", *SNAPSHOT_MODES), help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    big = (2048, 12)  # 50M parameters
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, *big, args.device)))
        return 0
    rounds = args.rounds or (3 if args.quick else 12)
    cases = [(64, 4, 32, 1.15)] if args.quick else [(64, 4, 32, 1.15), (256, 20, 128, 1.05)]
    rows = [
        f"Machine: {_timing.machine()}.",
        "Adam. Each Guard and its baseline alternate step by step (the pair alone) and are summed over "
        f"periods of {STEPS} steps (one guard snapshot each), {rounds} periods; times are the thread's CPU "
        "time, not wall time (the machine may be shared); ratio = median over periods of the paired ratio, "
        "with the ratio of the fastest periods beside it. ATen ops: operators called at top level per "
        "ordinary step (torch.profiler, CPU), each a kernel launch on an accelerator, with what the Guard "
        "adds to its baseline in brackets. Host reads: tensor reads to the host per step (`.item()`, "
        "`.tolist()`, `bool(t)` ...) added to the baseline's, each a blocking synchronisation on an "
        "accelerator. The guard's skips / rollbacks / clips over the whole run (warm-up included) are counted"
        " from `guard.events` and `guard.clipped`: the target is the overhead with no intervention, so skips "
        "and rollbacks should read 0.",
        "",
        "| model | variant | ms per step | ATen ops per step | host reads added | skips / rollbacks / clips | "
        "compared with | ratio | ratio of fastest periods | target | met |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|:---:|",
    ]
    for width, depth, batch, target in cases:
        rows += run_case(width, depth, batch, rounds, target)
    rows += [
        "",
        "What the Guard adds to an ordinary step: without clipping, one fused `_foreach_norm` over the gradients, "
        "one `stack` of the loss and the per-tensor norms, and their one `.tolist()` (two ATen ops: "
        "`resolve_conj`, `resolve_neg`), plus a `detach` of the loss; with a clipping policy, the policy's "
        "own kernels and the same `stack` and fetch. The global norm, the spike test (robust z over the "
        "last 128 applied steps) and the divergence test are host "
        "arithmetic on the fetched floats, and the windows of applied steps are host lists. A device-side "
        "snapshot every 50 good steps is the only other cost.",
        "",
        "Where the host synchronises: once per `guard.step`, the single `.tolist()` (the skip decision must be "
        "taken on the host because `optimizer.step()` is host code); `tests/test_guard.py::"
        "test_exactly_one_host_sync_per_step` checks that this is the only tensor read of a step.",
    ]
    if not args.no_memory and not args.quick:
        rows += memory_rows(big[0], big[1], args.device)
    table = "\n".join(rows)
    print(table)
    if args.write:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", HEADING, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
