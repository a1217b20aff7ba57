"""Overhead of ``gg.Guard`` on training steps with no intervention, interleaved against a bare step.

Variants (each on its own copy of the same model, batch and Adam optimizer; steps summed per period,
blocks interleaved by ``benchmarks/_timing.py``, ratio of medians):

* ``bare``: ``zero_grad``, forward, MSE, ``backward``, ``optimizer.step()``;
* ``Guard(clip=None)``: the same with ``guard.step(loss)``: non-finite and spike checks, snapshots, one
  host sync per step; target ≤ 1.05× ``bare``;
* ``bare + clip_grad_norm_``: torch's norm clipping before the step;
* ``Guard(clip="zclip")`` (ZClip clipping; the default Guard clips nothing routinely): target ≤ 1.05×
  ``bare + clip_grad_norm_`` (same clipping work).

    python benchmarks/guard.py [--quick] [--write]     # --write updates the "## Guard" section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing
from clip import write_section

import gradguard as gg

STEPS = 50  # = Guard's default snapshot_every, so each period pays for one snapshot
HEADING = "## Guard"


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
    if mode == "guard":
        guard = gg.Guard(model, opt, clip=None)
    elif mode == "guard_default":
        guard = gg.Guard(model, opt, clip="zclip")

    def block() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if guard is not None:
            guard.step(loss)
            return
        if mode == "bare_clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return block, guard


def interventions(guard: gg.Guard | None) -> str:
    """Skips and rollbacks the guard made (clips are counted apart: clipping is work the baseline does too)."""
    if guard is None:
        return "—"
    counts = {a: sum(e.action == a for e in guard.events) for a in ("skip", "rollback", "clip")}
    return f"{counts['skip']} / {counts['rollback']} / {counts['clip']}"


MODES = {
    "bare": "bare",
    "Guard(clip=None)": "guard",
    "bare + clip_grad_norm_(1.0)": "bare_clip",
    'Guard(clip="zclip")': "guard_default",
}
PAIRS = {"Guard(clip=None)": "bare", 'Guard(clip="zclip")': "bare + clip_grad_norm_(1.0)"}


def run_case(width: int, depth: int, batch: int, rounds: int) -> list[str]:
    """Table rows for one model size."""
    torch.manual_seed(0)
    base = mlp(width, depth)
    x, y = torch.randn(batch, width), torch.randn(batch, 1)
    made = {name: make_block(copy.deepcopy(base), x, y, mode) for name, mode in MODES.items()}
    blocks = {name: block for name, (block, _) in made.items()}
    # Steps alternate one by one and are summed per period of STEPS steps (a period holds one of the
    # guard's snapshots); the clock is the thread's CPU time, which other jobs on a shared machine do not
    # inflate.
    times = _timing.interleaved_periods(blocks, periods=rounds, period=STEPS, clock=time.thread_time)
    n_params = sum(p.numel() for p in base.parameters())
    case = f"MLP {depth}×{width} ({n_params / 1e6:.2f}M params), batch {batch}"
    rows = []
    for name in MODES:
        ms = 1e3 * _timing.median(times[name]) / STEPS
        ref = PAIRS.get(name)
        if ref is None:
            rows.append(f"| {case} | {name} | {ms:.2f} | — | — | — | — | — | |")
            continue
        r = _timing.paired_ratio(times, name, ref)
        r_min = min(times[name]) / min(times[ref])
        met = "yes" if r <= 1.05 else "**no**"
        acts = interventions(made[name][1])
        rows.append(f"| {case} | {name} | {ms:.2f} | {acts} | {ref} | {r:.3f} | {r_min:.3f} | ≤ 1.05× | {met} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model only, few rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 12)
    cases = [(64, 4, 32)] if args.quick else [(64, 4, 32), (256, 20, 128)]
    rows = [
        f"Machine: {_timing.machine()}.",
        f"Adam. Steps of the variants alternate one by one and are summed over periods of {STEPS} steps (one "
        f"guard snapshot each), {rounds} periods; times are the thread's CPU time, not wall time; ratio = "
        "median over periods of the paired ratio, with the ratio of the fastest periods beside it. The guard's "
        "skips / rollbacks / clips over the whole run (warm-up included) are counted from `guard.events`: the "
        "target is the overhead with no intervention, so skips and rollbacks there should read 0.",
        "",
        "| model | variant | ms per step | skips / rollbacks / clips | compared with | ratio | ratio of fastest "
        "periods | target | met |",
        "|---|---|---:|---:|---|---:|---:|---:|:---:|",
    ]
    for width, depth, batch in cases:
        rows += run_case(width, depth, batch, rounds)
    rows += [
        "",
        "The guard adds a fixed cost per step (about 60 small kernels: norms, two robust z-scores over the "
        "128-step windows, the decision vector, window updates; ~0.3 ms on this CPU), plus a device-side "
        "snapshot every 50 good steps. It is within 5% once a step takes several milliseconds; on a tiny "
        "model whose whole step is under a millisecond it is not.",
        "",
        "Where the host synchronises: once per `guard.step`, a single `.tolist()` of one small vector (loss, "
        "norm, threshold, clipped flag, z-scores, spike flags, the scaler's found-inf); the skip decision must "
        "be taken on the host because `optimizer.step()` is host code. `tests/test_guard.py::"
        "test_exactly_one_host_sync_per_step` checks that this is the only tensor read of a step.",
    ]
    table = "\n".join(rows)
    print(table)
    if args.write:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", HEADING, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
