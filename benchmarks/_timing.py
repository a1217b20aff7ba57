"""Interleaved timing with medians, shared by the benchmark scripts.

Timing two variants one after the other lets a drift of the machine (another process, frequency scaling,
a warming cache) bias the ratio. Here the variants take turns, block by block, in an order that
alternates every round, and the ratio is a ratio of medians.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def interleaved(
    variants: Mapping[str, Callable[[], None]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Call each variant once per round, alternating the order every round; seconds per call.

    Args:
        variants: name → a callable that runs one block of work (e.g. ``k`` training steps).
        rounds: timed calls per variant.
        warmup: untimed calls per variant first (allocator, caches, lazy initialisation).
    """
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def interleaved_periods(
    variants: Mapping[str, Callable[[], None]],
    periods: int,
    period: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    prepare: Mapping[str, Callable[[], None]] | None = None,
) -> dict[str, list[float]]:
    """Alternate single calls of the variants (order flipped every call) and sum them per period.

    Finer-grained than :func:`interleaved`: the variants share every stretch of machine load, which
    matters on a busy machine. Summing over a whole ``period`` keeps periodic costs (e.g. a monitor's
    every-10th-step work) inside each sample.

    ``clock=time.thread_time`` measures the CPU time of the calling thread instead of wall time: on a
    machine shared with other jobs it excludes the time the thread waited for a core, and with
    ``torch.set_num_threads(1)`` all of torch's CPU work runs on that thread.

    ``prepare[name]`` (optional) runs before every call of ``variants[name]``, untimed.

    Returns:
        name → seconds per period (``periods`` values each).
    """
    names = list(variants)
    prep = dict(prepare or {})
    for _ in range(warmup * period):
        for n in names:
            if n in prep:
                prep[n]()
            variants[n]()
    sums: dict[str, list[float]] = {n: [] for n in names}
    k = 0
    for _ in range(periods):
        acc = dict.fromkeys(names, 0.0)
        for _ in range(period):
            order = names if k % 2 == 0 else names[::-1]
            k += 1
            for n in order:
                if n in prep:
                    prep[n]()
                t0 = clock()
                variants[n]()
                acc[n] += clock() - t0
        for n in names:
            sums[n].append(acc[n])
    return sums


def paired_ratio(times: Mapping[str, list[float]], num: str, den: str) -> float:
    """Median over periods of times[num][i] / times[den][i] (pairs share the machine's load)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def median(values: list[float]) -> float:
    """Median of ``values``."""
    return statistics.median(values)


def ratio(times: Mapping[str, list[float]], num: str, den: str) -> float:
    """median(times[num]) / median(times[den])."""
    return median(times[num]) / median(times[den])


def machine() -> str:
    """One line describing where the numbers were taken."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.system()}"
    )
