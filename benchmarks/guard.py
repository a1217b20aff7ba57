"""Overhead of ``gg.Guard`` on training steps with no intervention, interleaved against a bare step.

Variants (each on its own copy of the same model, batch and Adam optimizer; ``STEPS`` steps per block,
blocks interleaved by ``benchmarks/_timing.py``, ratio of medians):

* ``bare``: ``zero_grad``, forward, MSE, ``backward``, ``optimizer.step()``;
* ``Guard(clip=None)``: the same with ``guard.step(loss)``: non-finite and spike checks, snapshots, one
  host sync per step; target ≤ 1.05× ``bare``;
* ``bare + clip_grad_norm_``: torch's norm clipping before the step;
* ``Guard()`` (defaults, ZClip clipping): target ≤ 1.05× ``bare + clip_grad_norm_`` (same clipping work).

    python benchmarks/guard.py [--quick] [--write]     # --write updates the "## Guard" section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing
from clip import write_section

import gradguard as gg

STEPS = 10
HEADING = "## Guard"


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def make_block(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    guard = None
    if mode == "guard":
        guard = gg.Guard(model, opt, clip=None)
    elif mode == "guard_default":
        guard = gg.Guard(model, opt)

    def block() -> None:
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if guard is not None:
                guard.step(loss)
                continue
            if mode == "bare_clip":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    return block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 20)
    width, depth, batch = (64, 4, 32) if args.quick else (256, 20, 128)
    torch.manual_seed(0)
    base = mlp(width, depth)
    x, y = torch.randn(batch, width), torch.randn(batch, 1)
    modes = {
        "bare": "bare",
        "Guard(clip=None)": "guard",
        "bare + clip_grad_norm_(1.0)": "bare_clip",
        "Guard() (ZClip)": "guard_default",
    }
    blocks = {name: make_block(copy.deepcopy(base), x, y, mode) for name, mode in modes.items()}
    times = _timing.interleaved(blocks, rounds=rounds)
    pairs = [("Guard(clip=None)", "bare"), ("Guard() (ZClip)", "bare + clip_grad_norm_(1.0)")]
    n_params = sum(p.numel() for p in base.parameters())
    rows = [
        f"Machine: {_timing.machine()}.",
        f"MLP {depth}×{width} ({n_params / 1e6:.2f}M parameters), batch {batch}, Adam; {STEPS} steps per block, "
        f"{rounds} interleaved blocks per variant; ratios are median / median. No step needed an intervention.",
        "",
        "| variant | ms per step | compared with | ratio | target | met |",
        "|---|---:|---|---:|---:|:---:|",
    ]
    for name in modes:
        ms = 1e3 * _timing.median(times[name]) / STEPS
        ref = next((den for num, den in pairs if num == name), None)
        if ref is None:
            rows.append(f"| {name} | {ms:.2f} | — | — | — | |")
            continue
        r = _timing.ratio(times, name, ref)
        rows.append(f"| {name} | {ms:.2f} | {ref} | {r:.3f} | ≤ 1.05× | {'yes' if r <= 1.05 else '**no**'} |")
    rows += [
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
