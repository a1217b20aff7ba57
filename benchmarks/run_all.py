"""``make bench``: run every benchmark and rewrite BENCHMARKS.md whole (issue 7).

    python benchmarks/run_all.py                   # full run, CPU, rewrites BENCHMARKS.md
    python benchmarks/run_all.py --device cuda     # the same script on a GPU (reports syncs per step)
    python benchmarks/run_all.py --smoke           # a couple of steps of each benchmark; prints, writes nothing
    python benchmarks/run_all.py --only clipping guard --out /tmp/b.md

Sections, in order: monitor overhead against the peers (``peers.py``), the monitor on compiled models
(``compiled.py``), clipping against torch and the packages (``clip_peers.py``), NaN provenance
(``nan_provenance.py``), Guard (``guard.py``), probe (``probe.py``), lab wall time, an unmodified program
under ``gradguard run`` (``zero_code.py``), memory and log size of a 20,000-step watched run
(``long_run.py``), import time (``import_time.py``). The measurement method is described in ``harness.py``
and written into the file's "Method" paragraph.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

Runner = Callable[[harness.Options], harness.Section]


def monitor(opts: harness.Options) -> harness.Section:
    import peers

    return peers.run(opts)


def compiled_models(opts: harness.Options) -> harness.Section:
    import compiled

    return compiled.run(opts)


def clipping(opts: harness.Options) -> harness.Section:
    import clip_peers

    return clip_peers.run(opts)


def nan(opts: harness.Options) -> harness.Section:
    import nan_provenance

    return nan_provenance.run(opts)


def _script(module: str, heading: str, full: list[str], smoke: list[str], opts: harness.Options,
            label: tuple[str, ...], ratio: str, prefix: str = "") -> harness.Section:
    """Run another helper's script in process (its ``main(argv)``) and take what it prints as the section.

    Its targets are read back from its Markdown table: the rows whose ``target`` cell reads ``≤ X×``, with
    the value of the column ``ratio`` and a label made of the columns ``label``.
    """
    import importlib

    mod = importlib.import_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        mod.main(smoke if opts.smoke else full)
    body = "\n".join(ln for ln in out.getvalue().strip().splitlines() if ln.strip() != heading).strip()
    if opts.device != "cpu":
        body = f"(`benchmarks/{module}.py` has no device option: CPU figures.)\n\n" + body
    targets = [] if opts.smoke else _table_targets(body, label, ratio, prefix)
    return harness.Section(heading, body, targets)


def _table_targets(text: str, label: tuple[str, ...], ratio: str, prefix: str = "") -> list[harness.Target]:
    header: list[str] = []
    targets = []
    for line in text.splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = cells
            continue
        if set(cells[0]) <= set("-: ") or "target" not in header or ratio not in header:
            continue
        limit = re.search(r"≤\s*([\d.]+)×", cells[header.index("target")])
        value = re.search(r"[\d.]+", cells[header.index(ratio)])
        if limit is None or value is None:
            continue
        what = prefix + " on ".join(cells[header.index(c)] for c in label if c in header)
        v, lim = float(value.group()), float(limit.group(1))
        targets.append(harness.Target(what, v, lim, v <= lim))
    return targets


def guard(opts: harness.Options) -> harness.Section:
    section = _script("guard", "## Guard", [], ["--quick", "--rounds", "1"], opts, ("variant", "model"), "ratio")
    if opts.profile and any(not t.met for t in section.targets):
        top = harness.pyspy_top(["-c", GUARD_CHILD], "<locals>.block (guard.py")
        section.body += "\n\n" + harness.profile_text(
            top, "a training step with `Guard(clip=None)` on the MLP 20×256, batch 128 (300 steps)",
            "py-spy, inclusive share of the samples inside the step: its direct callees, then gradguard functions; "
            "`Guard._apply` includes `optimizer.step()`")
    return section


# Guard alone on the large MLP of benchmarks/guard.py, for py-spy (a child process).
GUARD_CHILD = """
import sys, torch
sys.path.insert(0, "benchmarks")
import guard, gradguard as gg
torch.set_num_threads(1)
torch.manual_seed(0)
model = guard.mlp(256, 20)
x, y = torch.randn(128, 256), torch.randn(128, 1)
step, _ = guard.make_block(model, x, y, "guard")
for _ in range(300):
    step()
"""


def probe(opts: harness.Options) -> harness.Section:
    return _script("probe", "## Probe", [], ["--quick"], opts, ("case",), "probe / step",
                   "`gg.probe` / training step on ")


def lab(opts: harness.Options) -> harness.Section:
    """Wall time of ``gradguard lab run --all --quick`` and, in a full run, of the whole suite."""
    runs = [("`gradguard lab run --all --quick`", ["--all", "--quick"])]
    if opts.smoke:
        runs = [("`gradguard lab run weighted-sum --quick` (smoke run: one experiment)", ["weighted-sum", "--quick"])]
    elif opts.lab_full:
        runs.append(("`gradguard lab run --all` (full suite)", ["--all"]))
    rows = []
    lab_targets: list[harness.Target] = []
    for label, args in runs:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "gradguard", "lab", "run", *args, "--out", tmp],
                capture_output=True, text=True, cwd=harness.ROOT, check=False,
                env={**os.environ, "PYTHONPATH": str(harness.ROOT / "src")},
            )
            wall = time.perf_counter() - t0
            claims = [(m.parent.name, c) for m in sorted(Path(tmp).glob("*/metrics.json"))
                      for c in json.loads(m.read_text(encoding="utf-8")).get("claims", [])]
            done = len(list(Path(tmp).glob("*/metrics.json")))
        held = sum(bool(c.get("holds")) for _, c in claims)
        failing = [f"`{exp}/{c.get('id')}` (measured {c.get('measured')}, expected {c.get('expected')})"
                   for exp, c in claims if not c.get("holds")]
        if proc.returncode == 0:
            status = "ok"
        elif failing:
            status = f"exit {proc.returncode}: claims not holding: " + "; ".join(failing)
        else:
            status = f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        rows.append([label, f"{wall:.1f}", str(done), f"{held}/{len(claims)}", status])
        lab_targets.append(harness.Target(f"{label}: every claim holds", float("nan"), float("nan"), not failing))
    if not opts.lab_full and not opts.smoke:
        rows.append(["`gradguard lab run --all` (full suite)", "—", "—", "—", "not run (`--lab-full` runs it)"])
    body = (
        "Each run in a fresh process (interpreter start and imports included), one at a time, output to a "
        "temporary folder; the exit status is non-zero when a claim does not hold.\n\n"
        + harness.table(["command", "wall s", "experiments finished", "claims holding", "status"], rows, "lrrrl")
    )
    return harness.Section("## Lab", body, [] if opts.smoke else lab_targets)


def zero_code(opts: harness.Options) -> harness.Section:
    import zero_code

    return zero_code.run(opts)


def long_run(opts: harness.Options) -> harness.Section:
    import long_run

    return long_run.run(opts)


def import_time(opts: harness.Options) -> harness.Section:
    import import_time

    return import_time.run(opts)


SECTIONS: dict[str, Runner] = {
    "monitor": monitor,
    "compiled": compiled_models,
    "clipping": clipping,
    "nan": nan,
    "guard": guard,
    "probe": probe,
    "lab": lab,
    "zero-code": zero_code,
    "long-run": long_run,
    "import": import_time,
}


def method(opts: harness.Options) -> str:
    return "\n".join([
        "- **Same process, interleaved.** The configurations of a table are built side by side in one process "
        "and take turns step by step (or block by block for sub-millisecond calls), the order reversed every "
        "round, so load from other processes on a shared machine falls on all of them alike.",
        "- **Clock.** " + ("The process's CPU time (`time.process_time`): a step preempted by another job on "
                           "the shared machine is not charged that job's time." if opts.device == "cpu" else
                           "Wall time (`time.perf_counter`) with `torch.cuda.synchronize()` after each timed "
                           "step (outside the code under test)."),
        "- **Warm-up** rounds run first and are not timed (allocator, lazy initialisation, first sampled step).",
        f"- **Periods.** Step times are summed over periods of {harness.PERIOD} steps (gradguard's default "
        "logging and sampling period, so its periodic work is inside every sample). The **ratio** is the "
        "median over periods of the paired ratio configuration / baseline (same rounds); the brackets give "
        "its interquartile range (the **spread**). Absolute times are medians per step; the ratios are the "
        "result.",
        "- **Peak RSS** per configuration: each configuration alone in a fresh child process for a few steps, "
        "its `VmHWM` from `/proc/self/status` (interleaving in one process cannot separate peaks; "
        "`getrusage(RUSAGE_SELF).ru_maxrss` is not used because on Linux it survives `execve`, so a child "
        "started by this large process would report the parent's peak). It includes the interpreter, torch and "
        "the model.",
        "- **Syncs** per step (CUDA runs only): synchronising calls warned about by "
        "`torch.cuda.set_sync_debug_mode(\"warn\")` over 3 steps.",
        "- **Profiles.** Where a gradguard target is missed, that configuration is run alone in a child process "
        "under `py-spy` and the functions with the largest inclusive share of the step are listed beside the "
        "table.",
        f"- Threads: `torch.set_num_threads({opts.threads})` for every benchmark.",
    ])


def render(sections: list[harness.Section], opts: harness.Options, seconds: float, started: str) -> str:
    targets = [t for s in sections for t in s.targets]
    summary_rows = []
    for t in targets:
        value = "see section" if t.value != t.value else f"{t.value:.3f}{t.unit}"
        limit = "see section" if t.limit != t.limit else f"≤ {t.limit:.3f}{t.unit}"
        summary_rows.append([t.what, value, limit, harness.mark(t.met)])
    head = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`python benchmarks/run_all.py{' --smoke' if opts.smoke else ''}"
        f"{' --device ' + opts.device if opts.device != 'cpu' else ''}`) on {started}, in {seconds / 60:.1f} "
        "minutes. Do not edit by hand: the whole file is rewritten on every run.",
        "",
        "## Machine",
        "",
        *harness.machine(opts),
        "",
        "## Method",
        "",
        method(opts),
        "",
        "## Targets",
        "",
        harness.table(["target", "measured", "limit", "met"], summary_rows, "lrrc") if summary_rows
        else "No targets judged (smoke run).",
        "",
    ]
    parts = ["\n".join(head)]
    for s in sections:
        parts.append(f"{s.heading}\n\n{s.body.strip()}\n")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=str(__doc__).splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--smoke", action="store_true", help="a couple of steps of every benchmark")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run these sections only")
    parser.add_argument("--lab-full", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the full lab suite (default: on in a full run, off with --smoke)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--no-profile", action="store_true", help="skip profiles of missed targets")
    parser.add_argument("--out", type=Path, default=None,
                        help="file to write (default BENCHMARKS.md; a smoke run writes only when given)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; allowed here: cpu")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device!r}: allowed: cpu, cuda, cuda:N")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be ≥ 1")
    torch.set_num_threads(args.threads)
    opts = harness.Options(
        device=args.device,
        smoke=args.smoke,
        threads=args.threads,
        lab_full=(not args.smoke) if args.lab_full is None else args.lab_full,
        rss=not args.no_rss,
        profile=not args.no_profile and not args.smoke,
    )
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    sections = []
    for name in args.only or list(SECTIONS):
        t = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        sections.append(SECTIONS[name](opts))
        print(f"[bench] {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    text = render(sections, opts, time.perf_counter() - t0, started)
    out = args.out if args.out is not None else (None if args.smoke else harness.ROOT / "BENCHMARKS.md")
    if out is None:
        print(text)
    else:
        out.write_text(text, encoding="utf-8")
        print(f"[bench] wrote {out}", file=sys.stderr)
    missed = [t.what for s in sections for t in s.targets if not t.met]
    if missed:
        print("[bench] targets missed: " + "; ".join(missed), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
