"""Import time: ``import gradguard`` and ``gradguard --help`` against ``import torch``, each in a fresh process.

Every command runs in its own new interpreter (nothing cached in the process; the operating system's file
cache is warm after the first round), the commands take turns round by round with the order reversed
every round, so a drift of a shared machine falls on all of them alike, and the wall time of each process
(start to exit) is recorded. The difference to ``import torch`` is taken per round (paired) and its median
and interquartile range reported. Targets: ``import gradguard`` within 0.3 s of ``import torch``, and
``gradguard --help`` without importing torch at all, checked from the modules the process loaded
(``python -X importtime``).

    python benchmarks/import_time.py [--smoke] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

HEADING = "## Import time"
LIMIT_S = 0.3
# label → interpreter arguments; "torch" is the baseline every other command is compared with.
COMMANDS: dict[str, tuple[str, ...]] = {
    "python": ("-c", "pass"),
    "torch": ("-c", "import torch"),
    "gradguard": ("-c", "import gradguard"),
    "full API": ("-c", "import torch, gradguard; gradguard.watch"),
    "--help": ("-m", "gradguard", "--help"),
}
LABELS = {
    "python": "`python -c pass` (interpreter start)",
    "torch": "`python -c \"import torch\"`",
    "gradguard": "`python -c \"import gradguard\"`",
    "full API": "`python -c \"import torch, gradguard; gradguard.watch\"` (full API)",
    "--help": "`python -m gradguard --help`",
}


def env() -> dict[str, str]:
    """The environment of every child: this checkout's sources first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(harness.ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def wall(args: Sequence[str]) -> float:
    """Seconds from starting ``python ARGS`` to its exit; a failing command is an error, not a time."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=harness.ROOT, env=env(),
                          check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"python {' '.join(args)} exited {proc.returncode}: {tail[:200]}")
    return seconds


def interleaved(rounds: int) -> dict[str, list[float]]:
    """Wall seconds of each command per round, the order of the commands reversed every round."""
    names = list(COMMANDS)
    times: dict[str, list[float]] = {n: [] for n in names}
    wall(COMMANDS["full API"])  # untimed: byte-compiles the sources and warms the file cache for every command
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            times[n].append(wall(COMMANDS[n]))
    return times


def parse_importtime(stderr: str) -> list[tuple[str, int, int]]:
    """(module, self µs, cumulative µs) from the lines ``python -X importtime`` writes to stderr."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = [f.strip() for f in line.split(":", 1)[1].split("|")]
        if len(fields) != 3 or not fields[0].isdigit():
            continue  # the header line
        rows.append((fields[2].strip(), int(fields[0]), int(fields[1])))
    return rows


def imported(args: Sequence[str]) -> list[tuple[str, int, int]]:
    """The modules ``python -X importtime ARGS`` imported, in the order their imports finished."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                          cwd=harness.ROOT, env=env(), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"python -X importtime {' '.join(args)} exited {proc.returncode}")
    return parse_importtime(proc.stderr)


def is_torch(module: str) -> bool:
    return module == "torch" or module.startswith("torch.")


def seconds_text(values: Sequence[float]) -> str:
    lo, mid, hi = harness.quartiles(values)
    return f"{mid:.3f} [{lo:.3f}–{hi:.3f}]"


def run(opts: harness.Options, rounds: int = 9) -> harness.Section:
    """The ``## Import time`` section: ``rounds`` interleaved rounds (2 in a smoke run)."""
    rounds = 2 if opts.smoke else rounds
    load_start = os.getloadavg()
    times = interleaved(rounds)
    load_end = os.getloadavg()
    diffs = {n: [a - b for a, b in zip(times[n], times["torch"], strict=True)] for n in COMMANDS}
    rows = []
    for n in COMMANDS:
        rows.append([LABELS[n], seconds_text(times[n]), "—" if n == "torch" else seconds_text(diffs[n])])
    help_mods = imported(COMMANDS["--help"])
    help_torch = [m for m, _, _ in help_mods if is_torch(m)]
    gg_torch = any(is_torch(m) for m, _, _ in imported(COMMANDS["gradguard"]))
    full_mods = imported(COMMANDS["full API"])
    dtensor = any(m == "torch.distributed.tensor" for m, _, _ in full_mods)
    # What the full API adds on top of torch: gradguard's largest modules by cumulative import time.
    ours = sorted(((m, cum) for m, _, cum in full_mods if m.startswith("gradguard.") and m.count(".") <= 2),
                  key=lambda r: -r[1])[:6]
    gaps = {n: harness.quartiles(diffs[n])[1] for n in ("gradguard", "full API")}
    met = {n: gap <= LIMIT_S for n, gap in gaps.items()}
    help_met = not help_torch
    judged = "not judged in a smoke run" if opts.smoke else ""
    body = [
        str(__doc__).split("\n\n", 1)[1].split("\n\n    python", 1)[0].strip(),
        "",
        f"{rounds} rounds; load average (1, 5, 15 min) at start {_load(load_start)}, at end {_load(load_end)}.",
        "",
        harness.table(["command", "wall s, median [IQR]", "minus `import torch`, s (paired)"], rows, "lrr"),
        "",
        f"- `import gradguard` − `import torch`: **{gaps['gradguard']:.3f} s**; target ≤ {LIMIT_S} s "
        + (judged or harness.mark(met["gradguard"])) + f". `import gradguard` imports torch: "
        f"{'yes' if gg_torch else 'no (the API is loaded on first use)'}.",
        f"- Full API (`import torch, gradguard; gradguard.watch`) − `import torch`: **{gaps['full API']:.3f} s**; "
        f"held to the same ≤ {LIMIT_S} s " + (judged or harness.mark(met["full API"])) + ".",
        f"- `gradguard --help` imports {len(help_torch)} torch module(s) ({len(help_mods)} modules in all, "
        "from `-X importtime`); target: none " + (judged or harness.mark(help_met))
        + (f" (first: `{'`, `'.join(help_torch[:3])}`)" if help_torch else "") + ".",
        f"- The full API imports `torch.distributed.tensor`: {'yes' if dtensor else 'no'}.",
        "- gradguard's largest modules in the full-API load (`-X importtime`, one run, cumulative, "
        "including the torch modules they are first to import): "
        + ", ".join(f"`{m}` {cum / 1e6:.3f} s" for m, cum in ours) + ".",
    ]
    targets = [] if opts.smoke else [
        harness.Target(f"`import gradguard` within {LIMIT_S} s of `import torch` (measured {gaps['gradguard']:.3f} s)",
                       float("nan"), float("nan"), met["gradguard"]),
        harness.Target(f"full API load within {LIMIT_S} s of `import torch` (measured {gaps['full API']:.3f} s)",
                       float("nan"), float("nan"), met["full API"]),
        harness.Target(f"`gradguard --help` imports no torch module (measured {len(help_torch)})",
                       float("nan"), float("nan"), help_met),
    ]
    return harness.Section(HEADING, "\n".join(body), targets)


def _load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=str(__doc__).splitlines()[0])
    parser.add_argument("--smoke", "--quick", action="store_true", help="2 rounds")
    parser.add_argument("--rounds", type=int, default=9, help="rounds in a full run (≥ 7, default 9)")
    args = parser.parse_args(argv)
    if args.rounds < 7:
        parser.error(f"--rounds {args.rounds}: must be ≥ 7 (use --smoke for a quick look)")
    print(run(harness.Options(smoke=args.smoke, rss=False, profile=False), args.rounds).body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
