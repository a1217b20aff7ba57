"""The monitor on a ``torch.compile``'d model: what ``gg.watch`` costs there, and what it does to the graphs.

Both orders the README documents are timed against the bare compiled loop: ``gg.watch(torch.compile(m))``
and ``m.compile()`` then ``gg.watch(m)``. The same model also runs eagerly, bare and watched, as the
reference. All configurations take turns step by step in one process (:func:`harness.interleave_steps`),
after warm-up rounds that hold the compilations.

Graphs are counted apart, one configuration at a time after ``torch._dynamo.reset()``: the frames the
backend compiled (``torch._dynamo.testing.CompileCounterWithBackend``) and dynamo's graph-break counter
(``torch._dynamo.utils.counters["graph_break"]``), each new one charged to the step that caused it, sampled
(activation statistics, every 10th step by default) or not.

Inductor (the default backend, C++ code generation) when a C++ compiler is found, else ``aot_eager``
(dynamo and AOTAutograd without code generation); a smoke run always uses ``aot_eager`` to stay quick.

    python benchmarks/compiled.py [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import models
from models import LR, Workload

import gradguard as gg

HEADING = "## Compiled models"
Step = Callable[[], None]
Backend = str | Callable[..., object]


# --------------------------------------------------------------------------- configurations (shown verbatim)
def bare_eager(w: Workload, backend: Backend) -> tuple[Step, gg.Monitor | None]:
    opt = torch.optim.Adam(w.model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(w.model(w.x), w.y)
        loss.backward()
        opt.step()

    return step, None


def watched_eager(w: Workload, backend: Backend) -> tuple[Step, gg.Monitor | None]:
    opt = torch.optim.Adam(w.model.parameters(), lr=LR)
    mon = gg.watch(w.model, console=False)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(w.model(w.x), w.y)
        loss.backward()
        mon.step(loss)
        opt.step()

    return step, mon


def bare_compiled(w: Workload, backend: Backend) -> tuple[Step, gg.Monitor | None]:
    compiled = torch.compile(w.model, backend=backend)
    opt = torch.optim.Adam(w.model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(compiled(w.x), w.y)
        loss.backward()
        opt.step()

    return step, None


def watch_of_compiled(w: Workload, backend: Backend) -> tuple[Step, gg.Monitor | None]:
    compiled = torch.compile(w.model, backend=backend)
    opt = torch.optim.Adam(w.model.parameters(), lr=LR)
    mon = gg.watch(compiled, console=False)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(compiled(w.x), w.y)
        loss.backward()
        mon.step(loss)
        opt.step()

    return step, mon


def compile_in_place_then_watch(w: Workload, backend: Backend) -> tuple[Step, gg.Monitor | None]:
    w.model.compile(backend=backend)
    opt = torch.optim.Adam(w.model.parameters(), lr=LR)
    mon = gg.watch(w.model, console=False)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(w.model(w.x), w.y)
        loss.backward()
        mon.step(loss)
        opt.step()

    return step, mon


@dataclass(frozen=True)
class Config:
    """One row: ``baseline`` is the key of the bare loop its ratio is taken against."""

    key: str
    label: str
    build: Callable[[Workload, Backend], tuple[Step, gg.Monitor | None]]
    baseline: str
    compiled: bool


CONFIGS: tuple[Config, ...] = (
    Config("eager", "bare loop, eager", bare_eager, "eager", False),
    Config("eager_gg", "gradguard default, eager `gg.watch(model)`", watched_eager, "eager", False),
    Config("compiled", "bare loop, compiled `torch.compile(model)`", bare_compiled, "compiled", True),
    Config("wrap", "gradguard, `gg.watch(torch.compile(model))`", watch_of_compiled, "compiled", True),
    Config("in_place", "gradguard, `model.compile()` then `gg.watch(model)`", compile_in_place_then_watch,
           "compiled", True),
)


CONFIGS_BY_KEY = {c.key: c for c in CONFIGS}


def record_sampled(mon: gg.Monitor) -> set[int]:
    """The steps ``mon`` samples, recorded as its schedule marks them taken (the adaptive schedule is
    stateful: asking it afterwards which steps were sampled would answer for the future, not the past)."""
    seen: set[int] = set()
    schedule = mon.sample_every
    taken = schedule.taken

    def record(step: int) -> None:
        seen.add(step)
        taken(step)

    schedule.taken = record  # type: ignore[method-assign]
    return seen


def by_kind_of_step(t: list[float], bare: list[float], sampled: set[int], warmup: int) -> tuple[float, float]:
    """(ratio on the monitor's other steps, ratio on its sampled steps): sums of the paired rounds of each
    kind; timed round r is the monitor's step ``warmup + r``."""
    kinds: tuple[list[int], list[int]] = ([], [])
    for r in range(len(t)):
        kinds[warmup + r in sampled].append(r)
    other, sampled_ratio = (sum(t[r] for r in k) / sum(bare[r] for r in k) if k else float("nan") for k in kinds)
    return other, sampled_ratio


def pick_backend(smoke: bool) -> tuple[str, str]:
    """(backend, why): Inductor where a C++ compiler is found, else ``aot_eager``."""
    if smoke:
        return "aot_eager", "a smoke run, to stay quick"
    cxx = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        return "aot_eager", "no C++ compiler found for Inductor"
    return "inductor", f"the default backend; C++ code generated with `{cxx}`"


# --------------------------------------------------------------------------- graphs
@dataclass(frozen=True)
class Graphs:
    """Frames compiled and graph breaks per kind of step (``first``, ``sampled``, ``other``)."""

    frames: dict[str, int]
    breaks: dict[str, int]
    reasons: list[str]


def count_graphs(cfg: Config, base: Workload, backend: str, steps: int) -> Graphs:
    """Frames compiled and graph breaks of ``cfg`` alone, fresh dynamo state, charged to the step that
    caused each: ``first`` (step 0, which compiles), ``sampled`` (the monitor's later sampled steps) or
    ``other`` (every other step, which must compile nothing)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend(backend)
    w = Workload(base.key, base.label, copy.deepcopy(base.model), base.x, base.y)
    step, mon = cfg.build(w, counter)
    frames = {"first": 0, "sampled": 0, "other": 0}
    breaks = {"first": 0, "sampled": 0, "other": 0}
    seen_frames = seen_breaks = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(steps):
            step()
            n_breaks = sum(counters["graph_break"].values())
            part = "first" if i == 0 else "sampled" if mon is not None and mon.sample_every(i) else "other"
            frames[part] += counter.frame_count - seen_frames
            breaks[part] += n_breaks - seen_breaks
            seen_frames, seen_breaks = counter.frame_count, n_breaks
    reasons = sorted(counters["graph_break"])
    if mon is not None:
        mon.close()
    torch._dynamo.reset()
    return Graphs(frames, breaks, reasons)


# --------------------------------------------------------------------------- the benchmark
def run(opts: harness.Options) -> harness.Section:
    """The ``## Compiled models`` section on workload (a)."""
    backend, why = pick_backend(opts.smoke)
    # 60 warm-up rounds hold the compilations and gradguard's dense start (a sampled step every 10 for 50
    # steps, docs/monitor.md); periods of 50 then hold one steady-state sampled step each.
    rounds, warmup, period = (3, 2, 1) if opts.smoke else (200, 60, 50)
    count_steps = 12 if opts.smoke else 2 * harness.PERIOD + 1  # sampled steps 0, 10 (and 20)
    base = models.build("mlp", smoke=opts.smoke, device=opts.device)
    graphs = {c.key: count_graphs(c, base, backend, count_steps) for c in CONFIGS if c.compiled}

    torch._dynamo.reset()
    steps: dict[str, Step] = {}
    monitors: dict[str, gg.Monitor] = {}
    sampled: dict[str, set[int]] = {}
    for cfg in CONFIGS:
        w = Workload(base.key, base.label, copy.deepcopy(base.model), base.x, base.y)
        steps[cfg.key], mon = cfg.build(w, backend)
        if mon is not None:
            monitors[cfg.key] = mon
            sampled[cfg.key] = record_sampled(mon)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = harness.interleave_steps(steps, rounds=rounds, warmup=warmup, device=opts.device)
    split = {k: by_kind_of_step(times[k], times[CONFIGS_BY_KEY[k].baseline], sampled[k], warmup)
             for k in monitors}
    for mon in monitors.values():
        mon.close()
    torch._dynamo.reset()

    rows = []
    ok = True
    bare = sum(graphs["compiled"].frames.values())
    for cfg in CONFIGS:
        ratios = harness.period_ratios(times, cfg.key, cfg.baseline, period)
        ms = 1e3 * harness.quartiles(times[cfg.key])[1]
        cells = ["—", "—", "—"]
        if cfg.compiled:
            g = graphs[cfg.key]
            total, breaks = sum(g.frames.values()), sum(g.breaks.values())
            quiet = f"{g.frames['other']} / {g.breaks['other']}"
            if cfg.key != "compiled":
                quiet += f" (sampled steps: {g.frames['sampled']} / {g.breaks['sampled']})"
                ok = ok and total == bare and g.frames["other"] == 0 and breaks == 0
            cells = [f"{total} ({total - bare:+d} vs bare)", str(breaks), quiet]
            if g.reasons:
                cells[1] += " (" + "; ".join(f"`{r}`" for r in g.reasons)[:300] + ")"
        baseline = CONFIGS_BY_KEY[cfg.baseline].label
        kinds = " / ".join("—" if v != v else f"{v:.3f}×" for v in split[cfg.key]) if cfg.key in split else "—"
        rows.append([cfg.label, f"{ms:.1f}", harness.ratio_text(ratios), kinds, baseline, *cells])
    targets = [] if opts.smoke else [harness.Target(
        f"`gg.watch` of a compiled {base.label}: no extra graph, graph break or recompilation", float("nan"),
        float("nan"), ok)]
    body = [
        f"Workload {base.label}, Adam (lr 1e-4), MSE; the model is compiled, the optimizer step is not. "
        f"Backend `{backend}` ({why}). Every configuration trains its own copy of the same model; they take "
        f"turns step by step in one process, the order reversed every round: {rounds} timed rounds after "
        f"{warmup} warm-up rounds (which hold the compilations and gradguard's dense start), in periods of "
        f"{period} steps. Ratio as in the monitor-overhead tables, to the bare loop of the same mode.",
        "",
        f"Graphs: each compiled configuration alone for {count_steps} steps after `torch._dynamo.reset()`; "
        "frames compiled by the backend and dynamo's graph breaks, in total and on the steps that are neither "
        "the first nor one of gradguard's sampled steps (every 10th), which must add none.",
        "",
        harness.table(["configuration", "ms / step", "ratio to bare", "other / sampled steps",
                       "bare loop it is paired with",
                       "graphs compiled", "graph breaks", "compiles / breaks on non-sampled steps"],
                      rows, "lrrrlrrr"),
        "",
        "The compiled bare loop against the eager one (same rounds): "
        f"{harness.ratio_text(harness.period_ratios(times, 'compiled', 'eager', period))}.",
        "",
        "gradguard's sampled steps on a compiled model take their activation statistics from one extra eager "
        "forward without autograd (`Monitor._eager_pass`), which is inside the ratio; the column \"other / "
        "sampled steps\" splits the paired rounds by kind of step (sums over the rounds of each kind).",
        "",
        "### Code of each configuration",
        "",
    ]
    for cfg in CONFIGS:
        body += [f"**{cfg.label}**", "", "```python", inspect.getsource(cfg.build).rstrip(), "```", ""]
    return harness.Section(HEADING, "\n".join(body), targets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    section = run(harness.Options(smoke=args.smoke, threads=args.threads, rss=False, profile=False))
    print(section.body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

