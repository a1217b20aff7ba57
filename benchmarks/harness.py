"""The shared harness of ``make bench``: options, per-step interleaving, spreads, peak RSS, syncs, profiles.

Every benchmark of ``benchmarks/run_all.py`` returns a :class:`Section` (its Markdown and its targets);
this module holds what they share, so that all tables are measured the same way:

- **Interleaving.** Configurations take turns *step by step* in one process, the order reversed every
  round, so a drift of a shared machine (another process, frequency scaling) falls on all of them alike.
- **Clock.** On CPU the process's CPU time (``time.process_time``): on a shared machine a step preempted
  by another job would otherwise be charged the other job's time. On CUDA, wall time with a
  synchronisation after each step.
- **Periods.** Step times are summed over periods of 10 steps (gradguard's default logging and sampling
  period), so periodic work (one sampled step in ten, one fetch in ten) lies inside every sample; the
  ratio to the bare loop is the median over periods of the *paired* ratio (both sums taken over the same
  rounds), and the spread is its interquartile range.
- **Peak RSS** cannot be separated between configurations sharing a process, so each configuration's peak
  is taken in its own short child process (``VmHWM``, see :func:`peak_rss_mib`).
- **Syncs** (CUDA only) are counted with ``torch.cuda.set_sync_debug_mode("warn")``, which warns on every
  synchronising call (``.item()``, ``.tolist()``, device-to-host copies, ``nonzero``).
- **Profiles** of a configuration that misses its target come from ``py-spy`` sampling a child process
  (``torch.profiler`` operator totals when py-spy is not installed).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PERIOD = 10


@dataclass(frozen=True)
class Options:
    """What ``run_all.py`` was asked for; every benchmark reads the same options."""

    device: str = "cpu"
    smoke: bool = False
    threads: int = 1
    lab_full: bool = False
    rss: bool = True
    profile: bool = True


@dataclass(frozen=True)
class Target:
    """One target of the issue, with the measured value."""

    what: str
    value: float
    limit: float
    met: bool
    unit: str = "×"  # how value and limit read in the Targets table (a ratio unless said otherwise)


@dataclass
class Section:
    """One ``## heading`` of BENCHMARKS.md: its Markdown body and the targets it checked."""

    heading: str
    body: str
    targets: list[Target] = field(default_factory=list)


def sync(device: str) -> None:
    """Wait for queued device work (only the harness calls this, outside the code under test)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(device: str) -> Callable[[], float]:
    """CPU time of this process on CPU (time spent waiting for other jobs on a shared machine does not
    count, and torch's intra-op threads do); wall time on an accelerator, whose work runs off the CPU."""
    return time.process_time if device == "cpu" else time.perf_counter


def interleave_steps(
    steps: Mapping[str, Callable[[], None]],
    rounds: int,
    warmup: int,
    device: str = "cpu",
    limits: Mapping[str, int] | None = None,
    prepare: Mapping[str, Callable[[], None]] | None = None,
) -> dict[str, list[float]]:
    """Seconds (:func:`clock`) of each call of each ``steps[name]``, taking turns, order reversed every round.

    Args:
        steps: name → one training step.
        rounds: timed rounds; each configuration is called once per round.
        warmup: untimed rounds first (allocator, lazy initialisation, the first sampled step).
        device: ``"cuda..."`` adds a synchronisation after each timed call, so its time is the step's.
        limits: name → at most this many timed calls (a configuration hundreds of times slower than the
            bare loop takes part only in the first rounds; its times are paired with those rounds).
        prepare: name → work run before every call of ``steps[name]`` (warm-up included) and not timed,
            e.g. loading the next batch's gradients.
    """
    names = list(steps)
    limits = dict(limits or {})
    prep = dict(prepare or {})
    for _ in range(warmup):
        for n in names:
            if n not in limits:  # a limited (very slow) configuration is warmed by its caller's first step
                if n in prep:
                    prep[n]()
                steps[n]()
    sync(device)
    now = clock(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            if len(times[n]) >= limits.get(n, rounds):
                continue
            if n in prep:
                prep[n]()
                sync(device)
            t0 = now()
            steps[n]()
            sync(device)
            times[n].append(now() - t0)
    return times


def period_ratios(times: Mapping[str, list[float]], num: str, den: str, period: int = PERIOD) -> list[float]:
    """Paired ratios sum(num) / sum(den) over consecutive periods of the rounds both took part in."""
    a, b = times[num], times[den][: len(times[num])]
    period = max(1, min(period, len(a)))
    return [sum(a[i : i + period]) / sum(b[i : i + period]) for i in range(0, len(a) - period + 1, period)]


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); all equal for a single value."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def ratio_text(values: Sequence[float]) -> str:
    """``1.03× [1.01–1.05]``: median paired ratio and its interquartile range."""
    lo, mid, hi = quartiles(values)
    return f"{mid:.3f}× [{lo:.3f}–{hi:.3f}]"


def mark(met: bool) -> str:
    return "✓" if met else "✗"


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A Markdown table; ``align`` has one of ``l``/``r``/``c`` per column (default left)."""
    spec = {"l": "---", "r": "---:", "c": ":---:"}
    aligns = [spec[c] for c in (align or "l" * len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine(opts: Options) -> list[str]:
    """Lines describing where the numbers were taken."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        f"- CPU: {cpu}; {os.cpu_count()} logical cores, {usable} usable by this process",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s) "
        f"(`torch.set_num_threads({opts.threads})`), Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}",
        f"- device: `{opts.device}`"
        + (f" ({torch.cuda.get_device_name()})" if opts.device.startswith("cuda") else "")
        + f"; load average at start (1, 5, 15 min): {load}",
    ]
    return lines


def count_syncs(step: Callable[[], None], calls: int, device: str) -> float | None:
    """Synchronising calls per step seen by ``torch.cuda.set_sync_debug_mode``; ``None`` off CUDA."""
    if not device.startswith("cuda"):
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    n = sum("synchroniz" in str(w.message).lower() for w in caught)
    return n / calls


def child(args: Sequence[str], timeout: float = 300.0) -> dict[str, object]:
    """Run ``python benchmarks/<args>`` in a fresh process and parse its last stdout line as JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    result: dict[str, object] = json.loads(lines[-1])
    return result


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own address space.
    ``getrusage(RUSAGE_SELF).ru_maxrss`` is the fallback elsewhere; on Linux it is *not* used because it
    survives ``execve``: a child started by a large benchmark process would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def pyspy_top(args: Sequence[str], marker: str, n: int = 8, timeout: float = 300.0) -> list[tuple[str, float]] | str:
    """Where a training step spends its time, from py-spy sampling ``python <args>`` in a child process.

    Only samples below the first frame containing ``marker`` (the step function) count. Returned, as
    (function (file), share of those samples): first the step's direct callees (forward, backward, the
    tool's hook, the optimizer step), then the ``n`` gradguard functions with the largest inclusive share.
    A string says why no profile could be taken.
    """
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return "py-spy is not installed (pip install '.[bench]')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "raw.txt"
        proc = subprocess.run(
            [exe, "record", "-r", "250", "-f", "raw", "-o", str(out), "--", sys.executable, *args],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False,
        )
        if proc.returncode != 0 or not out.exists():
            return f"py-spy failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:200]}"
        stacks = out.read_text().splitlines()
    callees: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in stacks:
        frames_part, _, count_s = line.rpartition(" ")
        frames = frames_part.split(";")
        idx = next((i for i, f in enumerate(frames) if marker in f), None)
        if idx is None or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        callees[_frame_name(frames[idx + 1]) if idx + 1 < len(frames) else "(the step function itself)"] += count
        for name in {_frame_name(f) for f in frames[idx + 1 :] if "gradguard/" in f}:
            ours[name] += count
    if total == 0:
        return "py-spy recorded no samples inside the step"
    top = [(f"step → {name}", c / total) for name, c in callees.most_common(6)]
    return top + [(name, c / total) for name, c in ours.most_common(n)]


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` → ``func (file.py)`` with the package folder kept for gradguard/torch."""
    func, _, loc = frame.partition(" (")
    path = loc.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    for anchor in ("gradguard", "torch", "lightning", "cockpit", "backpack", "torch_surgeon"):
        if anchor in parts:
            return f"{func} ({'/'.join(parts[parts.index(anchor) :])})"
    return f"{func} ({Path(path).name})"


def torch_profile_top(step: Callable[[], None], calls: int, n: int = 8) -> list[tuple[str, float]]:
    """Fallback profile: operators by share of self CPU time over ``calls`` steps (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [(e.key, e.self_cpu_time_total / total) for e in top]


def profile_text(top: list[tuple[str, float]] | str, what: str, how: str = "py-spy, inclusive share of the samples "
                 "inside the training step") -> str:
    """Markdown lines for a profile beside a missed target."""
    if isinstance(top, str):
        return f"Profile of {what}: not taken — {top}."
    lines = [f"Profile of {what} ({how}):", ""]
    lines += [f"- {share:5.1%}  `{name}`" for name, share in top]
    return "\n".join(lines)
