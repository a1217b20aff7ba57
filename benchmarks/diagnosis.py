"""``make diagnosis``: gradguard and its peers on the realistic zoo of ``tests/programs``; writes DIAGNOSIS.md.

    python benchmarks/diagnosis.py            # full-length runs, rewrites DIAGNOSIS.md
    python benchmarks/diagnosis.py --quick    # the test suite's short runs
    python benchmarks/diagnosis.py --quick --out /tmp/d.md

Per program and fault (the cases of ``tests/programs/registry.py`` and the faults that do not degrade
their program), each tool watches its own run of the same seed:

* **gradguard**: ``gg.watch`` with its defaults; an alarm is a finding of severity ≥ warning, at the step
  it was printed;
* **torch.autograd.detect_anomaly**: the whole run inside it; an alarm is the error it raises when a
  backward function returns NaN (the run stops there); it names an autograd function, not a module;
* **Lightning grad_norm** (``lightning.pytorch.utilities.grad_norm``) after every backward, with the
  threshold :data:`GRAD_NORM_ALARM` fixed before any run: an alarm is a total 2-norm above it or
  non-finite, naming the module of the parameter with the largest norm (it shares the gradguard run:
  measuring changes nothing);
* **HF DebugUnderflowOverflow** (``transformers.debug_utils``) on the model: an alarm is the error it
  raises when a module's inputs, weights or outputs hold inf/NaN, naming that module; it looks for
  inf/NaN only, so it applies to the non-finite faults;
* **torch-surgeon** (when importable, otherwise reported as not installed): ``Surgeon(model)`` with its
  default rules (an alert when a leaf module's output-gradient norm leaves its moving average by ×100 or
  ×0.01, or stays below 1e-7 for 50 steps), console off; an alarm is each run of consecutive alerts of one
  layer and status, stamped with the training step of the backward that raised it;

Delays count, as in the tests, from the first degraded step (step 0 for faults present from the start),
judged by ``tests/programs/judge.py``. False alarms: alarms per 1000 steps of the healthy programs.
A Guard table runs every program under the default ``gg.Guard`` against the unguarded seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from programs.common import RunResult, default_guard, module_of, quiet_watch  # noqa: E402
from programs.judge import culprits, degradation_start, names  # noqa: E402
from programs.registry import CASES, HEALTHY, PROGRAMS, Case  # noqa: E402

#: Lightning grad_norm alarm: a total gradient 2-norm above this (or non-finite). Fixed before the runs:
#: ten times the clipping threshold 1.0 that GPT-style training scripts use, a common "exploding" rule of thumb.
GRAD_NORM_ALARM = 10.0
SEEDS = (0, 1, 2)
#: Tool keys in table order, with their column labels.
TOOLS = {"gradguard": "gradguard", "anomaly": "detect_anomaly", "grad_norm": "Lightning grad_norm",
         "duo": "HF DebugUnderflowOverflow"}
#: Faults run for the table that do not degrade their program (measured, see the "degraded" column).
EXTRA = (Case("word_lm", "init_x10", ("exploding", "loss_spike"), ""),
         Case("seq_classifier", "unnormalised_batch", ("exploding", "loss_spike"), ""))


@dataclass
class Alarm:
    """The first alarm of a tool in one run at or after ``since``: visible step, kind and module (or op)."""

    step: int
    what: str
    module: str


@dataclass
class Outcome:
    """What one tool did in one run: its alarms (step, what, module) and whether it could run at all."""

    alarms: list[Alarm]
    note: str = ""
    episodes: int | None = None  # alarms as a user counts them, when that differs from len(alarms)

    @property
    def count(self) -> int:
        return len(self.alarms) if self.episodes is None else self.episodes

    def first(self, since: int) -> Alarm | None:
        return next((a for a in self.alarms if a.step >= since), None)


# ------------------------------------------------------------------------------------------ the tools
class GradNormWatch:
    """Lightning's grad_norm after every backward; alarms above :data:`GRAD_NORM_ALARM`."""

    def __init__(self) -> None:
        from lightning.pytorch.utilities import grad_norm

        self.grad_norm = grad_norm
        self.alarms: list[Alarm] = []
        self.episodes = 0
        self.above = False

    def __call__(self, step: int, model: nn.Module) -> None:
        norms = self.grad_norm(model, norm_type=2)
        total = float(norms.get("grad_2.0_norm_total", math.nan)) if norms else 0.0
        alarm = not (total <= GRAD_NORM_ALARM)
        self.episodes += int(alarm and not self.above)  # consecutive steps above the threshold are one alarm
        self.above = alarm
        if alarm:
            per = {k: float(v) for k, v in norms.items() if k != "grad_2.0_norm_total"}
            worst = max(per, key=lambda k: per[k] if math.isfinite(per[k]) else math.inf)
            self.alarms.append(Alarm(step, f"norm {total:.3g}", module_of(worst.split("/", 1)[1])))


def gradguard_and_grad_norm(name: str, fault: str | None, quick: bool) -> tuple[RunResult, Outcome, Outcome]:
    watch = GradNormWatch()
    r = PROGRAMS[name](fault, seed=0, quick=quick, monitor_factory=quiet_watch, after_backward=watch)
    seen: set[tuple[str, str, str]] = set()
    alarms = []
    for s in r.visible():
        key = (s.finding.kind, s.finding.module, s.finding.severity)
        if key not in seen:  # the console prints a finding again only when its severity changes
            seen.add(key)
            alarms.append(Alarm(s.visible, f"{s.finding.kind} ({s.finding.severity})", s.finding.module))
    return r, Outcome(alarms), Outcome(watch.alarms, episodes=watch.episodes)


def anomaly(name: str, fault: str | None, quick: bool) -> Outcome:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its "enabled, slower" notice and the forward traceback of each NaN
        with torch.autograd.detect_anomaly(check_nan=True):
            r = PROGRAMS[name](fault, seed=0, quick=quick, stop_on_error=True)
    if r.stopped is None:
        return Outcome([])
    step, message = r.stopped
    op = message.split("'")[1] if message.count("'") >= 2 else message[:40]
    return Outcome([Alarm(step, "NaN in backward", f"op {op}")])


def underflow_overflow(name: str, fault: str | None, quick: bool) -> Outcome:
    from transformers.debug_utils import DebugUnderflowOverflow

    class OneShot(DebugUnderflowOverflow):  # type: ignore[misc]
        """Raises once, as the tool does, then stays out of the way of the program's own evaluation."""

        active = True

        def forward_hook(self, module: nn.Module, input: Any, output: Any) -> None:
            if self.active:
                try:
                    super().forward_hook(module, input, output)
                except ValueError:
                    self.active = False
                    raise

    def attach(model: nn.Module, sink: Any) -> None:
        OneShot(model)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        r = PROGRAMS[name](fault, seed=0, quick=quick, monitor_factory=attach, stop_on_error=True)
    if r.stopped is None or "DebugUnderflowOverflow" not in r.stopped[1]:
        return Outcome([], "" if r.stopped is None else f"stopped: {r.stopped[1][:60]}")
    # Frame headers are the tool's 17-space prefix, a space, the module's qualified name and its class.
    headers = [ln[18:].rsplit(" ", 1)[0] for ln in out.getvalue().splitlines()
               if ln.startswith(" " * 18) and not ln.startswith(" " * 19)]
    return Outcome([Alarm(r.stopped[0], "inf/NaN", headers[-1] if headers else "?")])


def surgeon_available() -> str:
    try:
        import torch_surgeon  # noqa: F401
    except ImportError:
        return "not installed (the `bench` extra's torch-surgeon; not run)"
    return ""


def surgeon(name: str, fault: str | None, quick: bool) -> Outcome:
    from torch_surgeon import Surgeon

    alarms: list[Alarm] = []
    last: dict[tuple[str, str], int] = {}

    def attach(model: nn.Module, sink: Any) -> None:
        tool = Surgeon(model, rules={"verbose": False})

        def alert(layer: str, status: str, norm: float, step: int) -> None:
            # Its own counter counts forwards; the recorder's clock is the training step of this backward.
            now, key = sink.clock(), (layer, status)
            if last.get(key) != now - 1 and last.get(key) != now:
                module = f"{sink.prefix}.{layer}" if sink.prefix else layer
                alarms.append(Alarm(now, f"{status} (norm {norm:.3g})", module))
            last[key] = now

        tool.reporter.alert = alert
        with contextlib.redirect_stdout(io.StringIO()):
            tool.attach()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its full backward hooks warn where no input requires a gradient
        r = PROGRAMS[name](fault, seed=0, quick=quick, monitor_factory=attach, stop_on_error=True)
    alarms.sort(key=lambda a: a.step)
    return Outcome(alarms, "" if r.stopped is None else f"stopped: {r.stopped[1][:60]}")


# ------------------------------------------------------------------------------------------ tables
def _cell(a: Alarm | None, start: int | None, wanted: list[str], note: str = "") -> str:
    if start is None:
        return "— (not degraded)" if a is None else f"alarm at {a.step}: {a.what} `{a.module}`"
    if a is None:
        return "✗ missed" + (f" ({note})" if note else "")
    right = "✓" if names(a.module, wanted) else "✗"
    delay = f"+{a.step - start}" if a.step >= start else f"+0 ({start - a.step} before the loss criterion)"
    return f"✓ {delay} · {a.what} · {right} `{a.module or '(model)'}`"


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def build(quick: bool, log: Callable[[str], None]) -> str:
    t0 = time.perf_counter()
    # The code measured is the code imported now: name the commit before the runs, not after them.
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                           text=True, check=False).stdout.strip()
    surgeon_note = surgeon_available()
    tools = dict(TOOLS) if surgeon_note else {**TOOLS, "surgeon": "torch-surgeon"}
    metrics: dict[str, list[float]] = {}
    healthy_runs: dict[str, RunResult] = {}
    healthy_out: dict[str, dict[str, Outcome]] = {}
    for name in HEALTHY:
        r, gg_out, gn_out = gradguard_and_grad_norm(name, None, quick)
        healthy_runs[name] = r
        metrics[name] = [r.metric] + [PROGRAMS[name](None, seed=s, quick=quick).metric for s in SEEDS[1:]]
        healthy_out[name] = {"gradguard": gg_out, "anomaly": anomaly(name, None, quick), "grad_norm": gn_out,
                             "duo": underflow_overflow(name, None, quick)}
        if "surgeon" in tools:
            healthy_out[name]["surgeon"] = surgeon(name, None, quick)
        log(f"healthy {name}: {r.describe()}")

    fault_rows = []
    delays: dict[str, list[int]] = {k: [] for k in tools}
    detected = dict.fromkeys(tools, 0)
    placed = dict.fromkeys(tools, 0)
    degraded_cases = 0
    for case in (*CASES, *EXTRA):
        r, gg_out, gn_out = gradguard_and_grad_norm(case.program, case.fault, quick)
        start = degradation_start(r, metrics[case.program], healthy_runs[case.program])
        wanted, _ = culprits(case, r, healthy_runs[case.program])
        outs = {"gradguard": gg_out, "anomaly": anomaly(case.program, case.fault, quick), "grad_norm": gn_out,
                "duo": underflow_overflow(case.program, case.fault, quick)}
        if "surgeon" in tools:
            outs["surgeon"] = surgeon(case.program, case.fault, quick)
        since = r.fault_step or 0
        cells = []
        degraded_cases += start is not None
        for tool, out in outs.items():
            a = out.first(since)
            cells.append(_cell(a, start, wanted, out.note))
            if start is not None and a is not None:
                detected[tool] += 1
                placed[tool] += names(a.module, wanted)
                # An alarm between the fault and the loss criterion's onset (a slow climb) counts as no delay.
                delays[tool].append(max(0, a.step - start))
        deg = "no" if start is None else f"from {start}"
        fault_rows.append(f"| {case.program} | {case.fault} | {r.fault_step} | {deg} | " + " | ".join(cells)
                          + (f" | {surgeon_note} |" if surgeon_note else " |"))
        log(f"{case.id}: {r.describe()}")

    alarm_rows = []
    totals = dict.fromkeys(tools, 0)
    steps_total = 0
    for name in HEALTHY:
        n_steps = len(healthy_runs[name].losses)
        steps_total += n_steps
        cells = []
        for tool, out in healthy_out[name].items():
            totals[tool] += out.count
            shown = "; ".join(f"{a.step}: {a.what} `{a.module}`" for a in out.alarms[:3])
            cells.append(f"{out.count}" + (f" ({shown}{' …' if len(out.alarms) > 3 else ''})" if shown else ""))
        alarm_rows.append(f"| {name} | {n_steps} | " + " | ".join(cells) + " |")

    guard_rows = []
    for name in HEALTHY:
        g = PROGRAMS[name](None, seed=0, quick=quick, guard_factory=default_guard)
        assert g.guard is not None
        n = g.guard["skips"] + g.guard["clips"] + g.guard["rollbacks"]
        m = metrics[name]
        spread = max(m) - min(m)
        inside = min(m) - spread <= g.metric <= max(m) + spread
        guard_rows.append(f"| {name} (healthy) | {g.metric_name} {_fmt(g.metric)} | {', '.join(map(_fmt, m))} | "
                          f"{'✓' if inside else '✗'} | {g.guard['skips']} / {g.guard['clips']} / "
                          f"{g.guard['rollbacks']} of {g.guard['steps']} ({100 * n / g.guard['steps']:.1f} %) |")
    for case in (*CASES, *EXTRA):
        plain = PROGRAMS[case.program](case.fault, seed=0, quick=quick)
        g = PROGRAMS[case.program](case.fault, seed=0, quick=quick, guard_factory=default_guard)
        assert g.guard is not None
        better = (g.metric >= plain.metric) if g.higher_is_better else (g.metric <= plain.metric)
        guard_rows.append(f"| {case.id} | {g.metric_name} {_fmt(g.metric)} | unguarded {_fmt(plain.metric)} | "
                          f"{'✓' if better else '✗'} | {g.guard['skips']} / {g.guard['clips']} / "
                          f"{g.guard['rollbacks']} of {g.guard['steps']} |")
        log(f"guard {case.id}")

    def median(v: list[int]) -> str:
        return "—" if not v else _fmt(sorted(v)[len(v) // 2])

    def per_k(n: int) -> str:
        return _fmt(1000 * n / steps_total)

    import lightning
    import transformers

    lines = [
        "# Diagnosis on realistic training programs",
        "",
        f"Generated by `python benchmarks/diagnosis.py{' --quick' if quick else ''}` "
        f"(`make diagnosis` runs it full-length) at commit "
        f"`{commit}`{' with uncommitted changes under src/' if dirty else ''}, in "
        f"{time.perf_counter() - t0:.0f} s on {platform.machine()} ({torch.get_num_threads()} torch threads); "
        f"torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}; "
        f"{'quick' if quick else 'full-length'} runs, seed 0 (healthy noise over seeds {', '.join(map(str, SEEDS))}).",
        "",
        "Programs, faults and the measurement of degradation: `tests/programs/` (see `tests/test_realistic_zoo.py`).",
        "Each tool runs with its documented defaults; Lightning's `grad_norm` alarm threshold was fixed before the "
        f"runs at a total 2-norm of {GRAD_NORM_ALARM:g} (or non-finite)"
        + (f"; torch-surgeon: {surgeon_note}." if surgeon_note else "."),
        "",
        "## Summary",
        "",
        "| tool | faults detected (of degraded) | ... naming the right module | median delay (steps) | "
        "false alarms / 1000 healthy steps |",
        "|---|---|---|---|---|",
    ]
    for key, label in tools.items():
        lines.append(f"| {label} | {detected[key]} / {degraded_cases} | {placed[key]} | {median(delays[key])} | "
                     f"{per_k(totals[key])} |")
    lines += [
        "",
        "Goal for gradguard: every fault detected, median delay ≤ 3 steps, zero false alarms.",
        "",
        "## Faults",
        "",
        "A cell: ✓ +delay (steps after the degradation began) · what · whether the module named is the right one "
        "(the faulty layer; for learning-rate faults one of the layers whose updates grew most; for data and "
        "init faults any) · the module (detect_anomaly names an autograd op). \"from s\": the first degraded "
        "step (the loss stays above twice its best for 3 steps where the healthy run of the same seed has not "
        "by then, or turns non-finite; or the held-out metric is worse than the healthy seeds by more than "
        "their spread); a fault that did not degrade its program is reported, and an alarm on it is not "
        "counted.",
        "",
        "| program | fault | injected at | degraded | gradguard | detect_anomaly | Lightning grad_norm | "
        "DebugUnderflowOverflow | torch-surgeon |",
        "|---|---|---|---|---|---|---|---|---|",
        *fault_rows,
        "",
        "## False alarms on healthy programs",
        "",
        "Alarms on runs that train normally (the first three shown as step: what `module`). gradguard: each "
        "finding of severity ≥ warning once per kind, module and severity (as its console prints them); "
        "grad_norm: each run of consecutive steps above the threshold once"
        + ("; torch-surgeon: each run of consecutive alerts of one layer and status once." if "surgeon" in tools
           else "."),
        "",
        "| program | steps | " + " | ".join(t if t != "HF DebugUnderflowOverflow" else "DebugUnderflowOverflow"
                                          for t in tools.values()) + " |",
        "|---|---|" + "---|" * len(tools),
        *alarm_rows,
        f"| **total** | {steps_total} | " + " | ".join(str(totals[k]) for k in tools) + " |",
        "",
        "## Default Guard",
        "",
        "Healthy: the guarded metric against the unguarded seeds (✓ within their range ± spread). Faults: the "
        "guarded metric against the same unguarded run (✓ no worse). The tests ask the healthy runs to stay within "
        "noise on both sides. Interventions as measured: skips / clips "
        "(a step that lowered the gradient norm) / rollbacks.",
        "",
        "| run | guarded | unguarded | ok | skips / clips / rollbacks |",
        "|---|---|---|---|---|",
        *guard_rows,
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the test suite's short runs")
    ap.add_argument("--out", type=Path, default=ROOT / "DIAGNOSIS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    text = build(args.quick, lambda s: print(s, file=sys.stderr, flush=True))
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
