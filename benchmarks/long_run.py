"""Long runs: memory and log size of the default ``gg.watch(model, log_dir=...)`` over 20,000 steps.

A 100-layer MLP (``Linear(32, 32)`` + ReLU, 200 parameter tensors, PyTorch's default init), batch 16 cycling
over 8 fixed batches, SGD, MSE, trained for 20,000 steps under ``gg.watch(model, log_dir=D)`` (console off).
Measured: the process's resident set size (``VmRSS`` of ``/proc/self/status``, after ``gc.collect()``) at
steps 5,000 and 20,000, and the size of ``D/metrics.jsonl`` per step. Targets: RSS growth from step 5,000 to
20,000 ≤ 10 MiB (memory flat after warm-up: bounded history, see docs/monitor.md) and ≤ 2 KB per step of log
on average (global scalars every step, per-tensor columns on the sampled steps).

Usage: ``python benchmarks/long_run.py [--quick]`` (``--quick``: 2,000 steps, RSS at 500 and 2,000, targets
not judged).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import gradguard as gg

LAYERS = 100
WIDTH = 32
BATCH = 16
FULL = (20_000, 5_000)  # steps, step of the first RSS reading
QUICK = (2_000, 500)
SMOKE = (200, 100)  # run_all.py --smoke: the code path only
RSS_GROWTH_MIB = 10.0
BYTES_PER_STEP = 2048.0


def rss_mib() -> float:
    """Resident set size of this process in MiB (``VmRSS``), NaN where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def measure(steps: int, first: int) -> dict[str, float]:
    """Train the long-run MLP for ``steps`` steps; RSS at ``first`` and at the end, log bytes, CPU time."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, WIDTH, generator=gen), torch.randn(BATCH, WIDTH, generator=gen)) for _ in range(8)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    rss: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        mon = gg.watch(model, log_dir=tmp, console=False)
        t0 = time.process_time()
        for step in range(steps):
            x, y = batches[step % len(batches)]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
            if step + 1 in (first, steps):
                gc.collect()
                rss[step + 1] = rss_mib()
        cpu = time.process_time() - t0
        history = len(mon.history)
        alerts = mon.sample_every.alerts
        findings = len(mon.findings)
        mon.close()
        size = (Path(tmp) / "metrics.jsonl").stat().st_size
    return {"steps": steps, "first": first, "rss_first": rss[first], "rss_last": rss[steps],
            "bytes_per_step": size / steps, "log_mib": size / 2**20, "ms_per_step": 1e3 * cpu / steps,
            "history_rows": history, "alerts": alerts, "findings": findings}


def section(r: dict[str, float], judged: bool) -> tuple[str, list[harness.Target]]:
    growth = r["rss_last"] - r["rss_first"]
    first, steps = int(r["first"]), int(r["steps"])
    checks = [
        (f"RSS growth from step {first:,} to {steps:,}", f"{growth:+.1f} MiB ({r['rss_first']:.0f} → "
         f"{r['rss_last']:.0f})", growth, RSS_GROWTH_MIB, f"≤ {RSS_GROWTH_MIB:g} MiB", " MiB"),
        ("metrics.jsonl per step (average)", f"{r['bytes_per_step']:.0f} B ({r['log_mib']:.1f} MiB in all)",
         r["bytes_per_step"], BYTES_PER_STEP, "≤ 2 KB (2048 B)", " B"),
    ]
    rows: list[list[object]] = []
    targets = []
    for what, shown, value, limit, target, unit in checks:
        met = value <= limit
        rows.append([what, shown, target, harness.mark(met) if judged else "not judged (short run)"])
        if judged:
            targets.append(harness.Target(f"long run (100-layer MLP, {steps:,} steps): {what}", value, limit, met,
                                          unit))
    rows += [
        ["`mon.history` rows at the end", str(int(r["history_rows"])), "—", "—"],
        ["alerts of the sampling schedule / findings", f"{int(r['alerts'])} / {int(r['findings'])}", "—", "—"],
        ["CPU time per step (watched)", f"{r['ms_per_step']:.2f} ms", "—", "—"],
    ]
    body = (
        f"`benchmarks/long_run.py`: a {LAYERS}-layer MLP (Linear({WIDTH}, {WIDTH}) + ReLU, {2 * LAYERS} parameter "
        f"tensors, default init), batch {BATCH} cycling over 8 fixed batches, SGD (lr 0.01), MSE, {steps:,} steps "
        "under the default `gg.watch(model, log_dir=D)` in one process. RSS is `VmRSS` after `gc.collect()`.\n\n"
        + harness.table(["quantity", "measured", "target", "met"], rows, "lrll")
    )
    return body, targets


def run(opts: harness.Options) -> harness.Section:
    """The ``## Long runs`` section of BENCHMARKS.md (a smoke run uses the quick mode, not judged)."""
    torch.set_num_threads(opts.threads)
    body, targets = section(measure(*(SMOKE if opts.smoke else FULL)), judged=not opts.smoke)
    return harness.Section("## Long runs", body, targets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 steps, targets not judged")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    body, _ = section(measure(*(QUICK if args.quick else FULL)), judged=not args.quick)
    print("## Long runs\n\n" + body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
