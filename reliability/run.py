"""Run the reliability campaigns and write RELIABILITY.md (``make reliability``).

    python reliability/run.py                 # full campaign: 4 models × 10 fault classes × 5 seeds = 200 faults
    python reliability/run.py --smoke         # 1 seed of the MLP and LSTM, 20 faults, seconds
    python reliability/run.py --workers 2     # processes (default 2)

Every fault is run twice, with ``gg.Guard`` + ``gg.watch`` on defaults and as an unguarded control, next
to the fault-free twin of both. The report is rebuilt whole from the results (written atomically), with
the raw per-run records in ``reliability/results.json``. The bad-input, interrupted-run, rollback and
safety test files are run too (``--no-tests`` skips them) and their per-case outcome is tabulated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from reliability.campaign import (  # noqa: E402
    LOSS_TOLERANCE,
    RunResult,
    RunSpec,
    detection,
    ideal_key,
    loss_delta,
    plan,
    run,
    twin_key,
)
from reliability.faults import FAULT_KINDS, LR_JUMP, LR_JUMP_STEPS, MODULE_FAULTS, OUTLIER_SCALE  # noqa: E402
from reliability.models import MODELS  # noqa: E402

TEST_FILES = ("tests/test_rollback.py", "tests/test_bad_input.py", "tests/test_interrupted.py", "tests/test_safety.py")


# ----------------------------------------------------------------------------- running
def _init_worker() -> None:
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")


def run_all(specs: list[RunSpec], workers: int, progress: bool = True) -> list[RunResult]:
    """Run every spec (in ``workers`` processes), results in the order of ``specs``."""
    if workers <= 1:
        _init_worker()
        return [run(s) for s in specs]
    ctx = get_context("spawn")  # a fresh interpreter per worker: no state inherited from this process
    results: list[RunResult | None] = [None] * len(specs)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
        futures = {pool.submit(run, s): i for i, s in enumerate(specs)}
        for done, fut in enumerate(as_completed(futures), start=1):
            results[futures[fut]] = fut.result()
            if progress and (done % 25 == 0 or done == len(specs)):
                print(f"  {done}/{len(specs)} runs", file=sys.stderr, flush=True)
    return [r for r in results if r is not None]


def run_tests(files: tuple[str, ...]) -> dict[str, Any]:
    """Run the given pytest files once and return per-file case outcomes from a JUnit XML report."""
    existing = [f for f in files if (ROOT / f).is_file()]
    out: dict[str, Any] = {"files": {}, "missing": [f for f in files if f not in existing]}
    if not existing:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *existing],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        )
        out["seconds"] = round(time.perf_counter() - start, 1)
        if not xml.is_file():
            return out
        for case in ET.parse(xml).getroot().iter("testcase"):
            file = case.get("classname", "").split(".")[-1] + ".py"
            status = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
            node = out["files"].setdefault(f"tests/{file}", {"passed": 0, "failed": 0, "error": 0, "skipped": 0,
                                                               "cases": []})
            node[status] += 1
            node["cases"].append((case.get("name", ""), status))
    return out


# ----------------------------------------------------------------------------- judging
def pct(n: int, d: int) -> str:
    return "–" if d == 0 else f"{n}/{d} ({100.0 * n / d:.1f} %)"


def fmt_delta(x: float) -> str:
    if x != x:
        return "n/a"
    if math.isinf(x):
        return "non-finite"
    return f"{100 * x:+.2f} %"


def judge(results: list[RunResult]) -> dict[str, Any]:
    """Per-run verdicts joined with their fault-free twins."""
    twins = {twin_key(r.spec): r for r in results if r.spec["fault"] is None and not r.spec.get("drop")}
    ideals = {ideal_key(r.spec): r for r in results if r.spec["fault"] is None and r.spec.get("drop")}
    rows = []
    for r in results:
        f = r.spec["fault"]
        if f is None:
            continue
        twin = twins[twin_key(r.spec)]
        delta = loss_delta(r, twin)
        ok_finite = r.completed and r.finite
        detected, blamed = detection(r) if r.spec["guarded"] else (False, "")
        ideal = ideals.get(ideal_key(r.spec)) if r.spec["guarded"] else None
        vs_ideal = loss_delta(r, ideal) if ideal is not None else math.nan
        rows.append({
            "model": r.spec["model"], "seed": r.spec["seed"], "guarded": r.spec["guarded"], "fault": f,
            "completed": r.completed, "finite": r.finite, "ok_finite": ok_finite, "delta": delta,
            "within": math.isfinite(delta) and abs(delta) <= LOSS_TOLERANCE, "detected": detected,
            "blamed": blamed, "skipped": r.skipped, "rollbacks": r.rollbacks, "fired": r.fired,
            "error": r.error, "findings": r.findings, "seconds": r.seconds,
            "ideal_delta": loss_delta(ideal, twin) if ideal is not None else math.nan,
            "vs_ideal": vs_ideal,
            "within_ideal": math.isfinite(vs_ideal) and abs(vs_ideal) <= LOSS_TOLERANCE,
            "equals_ideal": ideal is not None and r.eval_loss == ideal.eval_loss,
            "rollback_to": list(r.rollback_to),
        })
    return {"rows": rows, "twins": twins, "ideals": ideals}


# ----------------------------------------------------------------------------- report
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _quantiles(xs: list[float]) -> list[str]:
    fin = sorted(x for x in xs if math.isfinite(x))
    if not fin:
        return ["–"] * 5
    def q(p: float) -> float:
        return fin[min(len(fin) - 1, round(p * (len(fin) - 1)))]
    return [fmt_delta(q(p)) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]


BUCKETS = ((-math.inf, -0.05), (-0.05, -0.01), (-0.01, 0.01), (0.01, 0.05), (0.05, 0.2), (0.2, 1.0), (1.0, math.inf))


def _bucket_row(xs: list[float]) -> list[str]:
    counts = [sum(1 for x in xs if math.isfinite(x) and lo < x <= hi) for lo, hi in BUCKETS]
    nonfinite = sum(1 for x in xs if not math.isfinite(x))
    return [str(c) for c in counts] + [str(nonfinite)]


def _bucket_header() -> list[str]:
    def b(x: float) -> str:
        return "−∞" if x == -math.inf else ("+∞" if x == math.inf else f"{100 * x:+g} %")
    return [f"({b(lo)}, {b(hi)}]" for lo, hi in BUCKETS] + ["non-finite"]


def _describe_findings(findings: list[Any]) -> str:
    if not findings:
        return "none"
    return "; ".join(f"{k}@{m or '(model)'} step {s}" for k, m, s, _ in findings[:4]) + (
        " …" if len(findings) > 4 else "")


def render(judged: dict[str, Any], meta: dict[str, Any], tests: dict[str, Any] | None) -> str:
    rows = judged["rows"]
    twins = judged["twins"]
    g = [r for r in rows if r["guarded"]]
    c = [r for r in rows if not r["guarded"]]
    modf = [r for r in g if r["fault"]["kind"] in MODULE_FAULTS]
    out: list[str] = []
    w = out.append
    w("# RELIABILITY — gradguard under injected faults, bad input and interrupted runs")
    w("")
    w(f"Generated by `make reliability` (`{meta['command']}`) on {meta['date']} in {meta['seconds']:.0f} s "
      f"with {meta['workers']} worker process(es); torch {meta['torch']}, Python {meta['python']}, "
      f"{meta['platform']}. Campaign seed {meta['seed']}. Raw per-run records: `reliability/results.json`. "
      "This file is rewritten whole by every run; do not edit it by hand.")
    w("")
    w("## Headline")
    w("")
    n = len(g)
    fin = sum(r["ok_finite"] for r in g)
    det = sum(r["detected"] for r in g)
    within = sum(r["within"] for r in g)
    mod_ok = sum(r["detected"] for r in modf)
    w(_table(
        ["property (guarded runs: `gg.Guard` + `gg.watch` on defaults)", "target", "measured", "met"],
        [
            ["run completes and every weight and buffer is finite", "100 %", pct(fin, n),
             "yes" if fin == n else "**no**"],
            ["a finding of the right kind is raised (at/after the fault's step)", "100 %", pct(det, n),
             "yes" if det == n else "**no**"],
            ["… naming the faulted module, for faults placed in a module", "100 %", pct(mod_ok, len(modf)),
             "yes" if mod_ok == len(modf) else "**no**"],
            [f"final held-out loss within {100 * LOSS_TOLERANCE:g} % of the fault-free twin", "100 %",
             pct(within, n), "yes" if within == n else "**no**"],
        ],
    ))
    w("")
    with_ideal = [r for r in g if math.isfinite(r["vs_ideal"])]
    if with_ideal:
        wi = sum(r["within_ideal"] for r in with_ideal)
        eq = sum(r["equals_ideal"] for r in with_ideal)
        w(f"Reference for the last line, the *ideal skip*: the fault-free run with the faulted step's batch "
          f"(for `lr_jump` the {LR_JUMP_STEPS} jumped steps' batches) simply left out, the best any guard can "
          f"do. {pct(wi, len(with_ideal))} of the guarded runs end within {100 * LOSS_TOLERANCE:g} % of their "
          f"ideal skip, and {pct(eq, len(with_ideal))} end with exactly the same final loss (bit for bit): "
          "skipping the step left no other trace. Where the twin target is missed but the ideal-skip one is "
          "met, losing one batch of that run already moves its final loss by more than 5 % (see the misses "
          "table): the limit is the run's sensitivity, not the guard.")
        w("")
    cfin = sum(r["ok_finite"] for r in c)
    cwithin = sum(r["within"] for r in c)
    w(f"Control (the same {len(c)} faults, same seeds, plain `optimizer.step()`, no gradguard): "
      f"{pct(cfin, len(c))} end with finite weights, {pct(cwithin, len(c))} end within "
      f"{100 * LOSS_TOLERANCE:g} % of their fault-free twin.")
    w("")
    w("## Method")
    w("")
    w("Models (each with a deterministic task; initial weights, data order and each step's batch depend only "
      "on the run seed, so a faulted run and its fault-free twin see the same batches):")
    w("")
    w(_table(["model", "architecture", "task", "params", "steps", "Adam lr", "fault sites (activations)"],
             [[m["name"], m["doc"], m["task"], str(m["params"]), str(m["steps"]), f"{m['lr']:g}",
               ", ".join(f"`{x}`" for x in m["act_modules"])] for m in meta["models"]]))
    w("")
    w("Every run uses Adam with a cosine learning-rate decay to 10 % (`LambdaLR`), so runs end on a plateau "
      "and the twin comparison measures damage rather than where along a steep descent a run stopped. "
      "The final loss is the loss of the final weights on a held-out set (eval mode).")
    w("")
    w("Fault classes (one fault per run, at a seeded random step in the middle 60 % of the run, so that "
      "the detectors have a history and the run has time to recover):")
    w("")
    w(_table(["class", "what is injected", "right finding kinds"], [
        ["`input_nan`, `input_inf`", "one element of the step's input batch × NaN / +Inf", "`nonfinite`"],
        ["`activation_nan`, `activation_inf`",
         "a forward hook on a seeded module multiplies one output element by NaN / +Inf (armed for the whole "
         "step, so the monitor's replay sees it, like a real numerical bug); the gradient through it is "
         "non-finite too", "`nonfinite` at that module"],
        ["`grad_nan`, `grad_inf`", "a tensor hook on one seeded parameter of a seeded module multiplies one "
         "gradient element by NaN / +Inf during backward", "`nonfinite` at that module"],
        ["`loss_nan`, `loss_inf`", "the loss × a NaN / +Inf scalar (loss and every gradient non-finite)",
         "`nonfinite`"],
        ["`outlier_batch`", f"the step's inputs (and float targets) × {OUTLIER_SCALE:g}",
         "`loss_spike` or `exploding`"],
        ["`lr_jump`", f"every group's LR × {LR_JUMP:g} for {LR_JUMP_STEPS} steps from the fault's step "
         "(a schedule bug), then back", "`loss_spike` or `exploding`"],
    ]))
    w("")
    w("Guarded loop, exactly as documented: `loss.backward(); mon.step(loss); guard.step(loss); "
      "scheduler.step()` with `mon = gg.watch(model, console=False)` and `guard = gg.Guard(model, opt, "
      "monitor=mon, scheduler=scheduler)` (defaults otherwise). A finding counts when its kind is right, "
      "its step is ≥ the fault's step and, for module faults, its module is the faulted one. Findings are "
      "read from `mon.findings` at the end (the Guard reports its own through the monitor).")
    w("")
    if meta.get("figure"):
        w(f"![Δloss per fault class]({meta['figure']})")
        w("")
    w("## Per fault class (guarded)")
    w("")
    body = []
    for kind in FAULT_KINDS:
        rs = [r for r in g if r["fault"]["kind"] == kind]
        cs = [r for r in c if r["fault"]["kind"] == kind]
        if not rs:
            continue
        deltas = [r["delta"] for r in rs]
        fin_d = [d for d in deltas if math.isfinite(d)]
        vi = [r for r in rs if math.isfinite(r["vs_ideal"])]
        body.append([f"`{kind}`", str(len(rs)), pct(sum(r["ok_finite"] for r in rs), len(rs)),
                     pct(sum(r["detected"] for r in rs), len(rs)), pct(sum(r["within"] for r in rs), len(rs)),
                     fmt_delta(statistics.median(fin_d)) if fin_d else "–",
                     fmt_delta(max(fin_d, key=abs)) if fin_d else "–",
                     pct(sum(r["within_ideal"] for r in vi), len(vi)),
                     pct(sum(r["equals_ideal"] for r in vi), len(vi)),
                     f"{statistics.mean(r['skipped'] for r in rs):.1f} / "
                     f"{statistics.mean(r['rollbacks'] for r in rs):.1f}",
                     pct(sum(r["ok_finite"] for r in cs), len(cs)), pct(sum(r["within"] for r in cs), len(cs))])
    w(_table(["fault", "runs", "completes, finite", "right finding", f"loss within {100 * LOSS_TOLERANCE:g} %",
              "median Δloss", "worst Δloss", "within 5 % of ideal skip", "= ideal skip (bit for bit)",
              "mean skips / rollbacks", "control: finite",
              f"control: within {100 * LOSS_TOLERANCE:g} %"], body))
    w("")
    w("## Per model (guarded)")
    w("")
    body = []
    for name in MODELS:
        rs = [r for r in g if r["model"] == name]
        if not rs:
            continue
        body.append([name, str(len(rs)), pct(sum(r["ok_finite"] for r in rs), len(rs)),
                     pct(sum(r["detected"] for r in rs), len(rs)), pct(sum(r["within"] for r in rs), len(rs)),
                     f"{statistics.mean(r['seconds'] for r in rs):.2f} s"])
    w(_table(["model", "faults", "completes, finite", "right finding", "loss within 5 %", "mean run time"], body))
    w("")
    w("## Final-loss distribution")
    w("")
    w("Δloss = (final held-out loss of the faulted run − that of its fault-free twin) / twin's. Quantiles "
      "(min, 25 %, median, 75 %, max) over finite values, and counts per bucket:")
    w("")
    qrows = [["guarded, all faults", *_quantiles([r["delta"] for r in g])],
             ["control, all faults", *_quantiles([r["delta"] for r in c])]]
    for kind in FAULT_KINDS:
        rs = [r["delta"] for r in g if r["fault"]["kind"] == kind]
        if rs:
            qrows.append([f"guarded, `{kind}`", *_quantiles(rs)])
    w(_table(["runs", "min", "25 %", "median", "75 %", "max"], qrows))
    w("")
    w(_table(["runs", *_bucket_header()], [["guarded", *_bucket_row([r["delta"] for r in g])],
                                          ["control", *_bucket_row([r["delta"] for r in c])]]))
    w("")
    w("## Where the monitor put the blame (non-finite faults)")
    w("")
    w("Rows: the faulted module (module faults) or the class (input/loss faults, whose right answer is no "
      "module: the input or the loss). Columns: the modules named by `nonfinite` findings at/after the "
      "fault (`(loss/input)`: only findings about the model as a whole; `(none)`: no `nonfinite` finding).")
    w("")
    conf: dict[str, Counter[str]] = defaultdict(Counter)
    for r in g:
        kind = r["fault"]["kind"]
        if kind in ("outlier_batch", "lr_jump"):
            continue
        key = f"{r['model']}.{r['fault']['module']}" if kind in MODULE_FAULTS else f"`{kind}`"
        conf[key][r["blamed"]] += 1
    crow = []
    for key in sorted(conf):
        total = sum(conf[key].values())
        target = key.split(".", 1)[1] if "." in key else "(loss/input)"
        right = conf[key].get(target, 0)
        other = ", ".join(f"{b}: {k}" for b, k in conf[key].most_common() if b != target) or "–"
        crow.append([key, str(total), str(right), other])
    w(_table(["fault placed in", "runs", "blamed correctly", "blamed instead (count)"], crow))
    w("")
    jumps = [r for r in g if r["fault"]["kind"] == "lr_jump"]
    if jumps:
        w("## Why `lr_jump` is the hard case")
        w("")
        first = sum(1 for r in jumps if r["rollbacks"] > 0)
        poisoned = [r for r in jumps if any(t > r["fault"]["step"] for t in r["rollback_to"])]
        to_start = sum(1 for r in jumps if 0 in r["rollback_to"])
        lost = [r["fault"]["step"] - min(r["rollback_to"]) for r in jumps if r["rollback_to"]]
        w(f"The first {LR_JUMP:g}× step is applied before any signal exists: its damage shows only in the next "
          f"step's loss, so the guard can only skip what follows and roll back. {pct(first, len(jumps))} of the "
          f"`lr_jump` runs rolled back; the rollback returned to a snapshot taken on average "
          f"{statistics.mean(lost) if lost else float('nan'):.0f} steps before the jump (to the construction-time "
          f"snapshot in {to_start} runs), so that progress is lost, and the LR factor is halved and regains 1 "
          f"only over the guard's `recover_steps`. In {len(poisoned)} run(s) the snapshot restored had been taken "
          "*after* the jumped step was applied. A periodic snapshot is committed as the rollback target only "
          "once the following step is applied too (the state after an update is first measured by the next "
          "step's loss), so a snapshot that falls on the jumped step is dropped when the next step spikes; "
          "a nonzero count here would mean that rule is broken.")
        w("")
        w("The loss left after the rollback is the progress since that snapshot plus the halved learning rate. "
          "Detecting the jump earlier would not remove it: the guard already names it on the step after "
          "the jump in every run, and undoing one update needs either a snapshot of the step before (a copy "
          "of the model and optimizer state every step, against the ≤ 1.05× step-time target) or measuring "
          "the update/weight ratio ‖Δw‖/‖w‖, which needs the pre-step weights just the same. The LR itself "
          "is visible to the guard for free, but a 100× rise is also what a warm restart or a manual change "
          "looks like, so skipping on it would be a policy, not a default.")
        w("")
    w("## Runs that missed a target")
    w("")
    missed = [r for r in g if not (r["ok_finite"] and r["detected"] and r["within"])]
    if not missed:
        w("None.")
    else:
        w("Δloss is against the fault-free twin; *ideal skip Δ* is what leaving out the faulted batches costs "
          "the same run; *vs ideal* compares the guarded run with that ideal skip.")
        w("")
        w(_table(["model", "seed", "fault", "step", "module", "finite", "right finding", "Δloss", "ideal skip Δ",
                  "vs ideal", "skips / rollbacks", "findings at the end", "error"],
                 [[r["model"], str(r["seed"]), r["fault"]["kind"], str(r["fault"]["step"]),
                   r["fault"]["module"] or "–", "yes" if r["ok_finite"] else "**no**",
                   "yes" if r["detected"] else "**no**", fmt_delta(r["delta"]), fmt_delta(r["ideal_delta"]),
                   fmt_delta(r["vs_ideal"]), f"{r['skipped']} / {r['rollbacks']}", _describe_findings(r["findings"]),
                   r["error"] or "–"]
                  for r in missed]))
    w("")
    w("## Fault-free twins (false alarms and the cost of guarding a healthy run)")
    w("")
    body = []
    for name in MODELS:
        gt = [t for k, t in twins.items() if k[0] == name and k[2]]
        ct = {k[1]: t for k, t in twins.items() if k[0] == name and not k[2]}
        if not gt:
            continue
        fa = [t for t in gt if t.findings]
        kinds = Counter(f"{k}@{m or '(model)'}" for t in gt for k, m, _, _ in t.findings)
        cost = [(t.eval_loss - ct[t.spec["seed"]].eval_loss) / ct[t.spec["seed"]].eval_loss for t in gt
                if t.spec["seed"] in ct]
        body.append([name, str(len(gt)), str(len(fa)), ", ".join(f"{k} ×{v}" for k, v in kinds.most_common()) or "–",
                     str(sum(t.skipped for t in gt)), fmt_delta(statistics.median(cost)) if cost else "–"])
    w(_table(["model", "twins", "twins with any finding", "findings (kind@module ×runs)", "guard skips",
              "median Δloss guarded vs unguarded"], body))
    w("")
    w("A finding on a fault-free run is a false alarm only if it is wrong about the run; the kinds above are "
      "listed so that they can be checked (a guarded clean run differs from the unguarded one because the "
      "default Guard clips with ZClip).")
    w("")
    w("## The other reliability checks (test files, run by this command and by `make test`)")
    w("")
    if tests is None:
        w("Not run (`--no-tests`).")
    else:
        body = []
        for f in TEST_FILES:
            node = tests["files"].get(f)
            if node is None:
                body.append([f"`{f}`", "missing" if f in tests.get("missing", []) else "no result", "", ""])
                continue
            bad = [name for name, st in node["cases"] if st in ("failed", "error")]
            body.append([f"`{f}`", str(len(node["cases"])), str(node["passed"]),
                         ", ".join(f"`{b}`" for b in bad) or "–"])
        w(_table(["file", "cases", "passed", "failed"], body))
        w("")
        w(f"(ran in {tests.get('seconds', 0):.0f} s)")
        w("")
        w(TEST_NOTES)
    w("")
    return "\n".join(out)


TEST_NOTES = """\
- **Rollback exactness** (`tests/test_rollback.py`): after a Guard rollback, parameters, buffers, optimizer
  state (step counts and moments), LR-scheduler and GradScaler state equal the snapshot bit for bit; a
  run that is rolled back and continues with the same batches follows, bit for bit on CPU, the trajectory
  of a run that never saw the fault from the snapshot on.
- **Bad input** (`tests/test_bad_input.py`): a table of bad inputs across the CLI and the public API; each
  CLI case exits 2 with one `gradguard: error:` line and no traceback, each API case raises a specific
  gradguard exception naming the problem.
- **Interrupted runs** (`tests/test_interrupted.py`): `gradguard lab run` and a watched training script
  (`gg.watch(model, log_dir=...)`) are SIGKILLed at random moments; every metrics file parses up to its
  last complete line, no report/metrics/config is left half-written under its final name, and re-running
  the same command succeeds.
- **Safety** (`tests/test_safety.py`): files read back from disk go through
  `torch.load(weights_only=True)` or JSON (a pickled object that runs code is refused), and HTML reports
  escape user-provided strings (a module named `<script>alert(1)</script>`)."""


# ----------------------------------------------------------------------------- figure
def plot(judged: dict[str, Any], path: Path) -> None:
    """Δloss per fault class: guarded runs, their ideal skips and the unguarded controls (symlog axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = judged["rows"]
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=110)
    cap = 1e3  # non-finite finals (weights lost) are drawn at the right edge
    for i, kind in enumerate(FAULT_KINDS):
        for off, (label, color, pick) in enumerate((
            ("guarded (Guard + monitor)", "tab:blue", lambda r: r["guarded"] and r["delta"]),
            ("ideal skip (batches left out)", "tab:green", lambda r: r["guarded"] and r["ideal_delta"]),
            ("control (no gradguard)", "tab:red", lambda r: (not r["guarded"]) and r["delta"]),
        )):
            xs = []
            for r in rows:
                if r["fault"]["kind"] != kind or not pick(r):
                    continue
                d = r["delta"] if label[0] != "i" else r["ideal_delta"]
                if d == d:
                    xs.append(100 * d if math.isfinite(d) else 100 * cap)
            ys = [i + (off - 1) * 0.25] * len(xs)
            ax.scatter(xs, ys, s=10, color=color, alpha=0.6, label=label if i == 0 else None)
    ax.axvspan(-100 * LOSS_TOLERANCE, 100 * LOSS_TOLERANCE, color="0.85", zorder=0, label="±5 % target")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_yticks(range(len(FAULT_KINDS)), FAULT_KINDS)
    ax.invert_yaxis()
    ax.set_xlabel(f"final held-out loss vs fault-free twin (%); right edge {100 * cap:g} % = weights non-finite")
    ax.set_title("Injected faults: what they cost with and without gradguard")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main
def _model_meta(steps: int | None) -> list[dict[str, Any]]:
    out = []
    for name, ms in MODELS.items():
        model, _ = ms.make(0)
        out.append({"name": name, "doc": (type(model).__doc__ or "").strip().split("\n")[0],
                    "task": ms.task.__name__.strip("_").replace("_", " "),
                    "params": sum(p.numel() for p in model.parameters()), "steps": steps or ms.steps,
                    "lr": ms.lr, "act_modules": ms.act_modules})
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small campaign (MLP and LSTM, 1 seed)")
    parser.add_argument("--seeds", type=int, default=5, help="run seeds per model (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--out", default=str(ROOT / "RELIABILITY.md"), help="report path")
    parser.add_argument("--json", default=str(ROOT / "reliability" / "results.json"), help="raw results path")
    parser.add_argument("--no-tests", action="store_true", help="do not run the reliability test files")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    seeds = args.seeds
    if args.smoke:
        models, seeds = ["mlp", "lstm"], 1
    torch.set_num_threads(1)
    start = time.perf_counter()
    specs = plan(args.seed, models, seeds)
    n_faults = sum(1 for s in specs if s.fault is not None and s.guarded)
    print(f"reliability: {n_faults} faults × (guarded, control, ideal skip) + {2 * len(models) * seeds} "
          f"fault-free twins = {len(specs)} runs on {args.workers} worker(s)", file=sys.stderr)
    results = run_all(specs, args.workers)
    tests = None if args.no_tests else run_tests(TEST_FILES)
    seconds = time.perf_counter() - start
    meta = {
        "command": "python reliability/run.py" + (" --smoke" if args.smoke else ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": seconds, "workers": args.workers, "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(terse=True), "seed": args.seed,
        "models": [m for m in _model_meta(None) if m["name"] in models],
    }
    judged = judge(results)
    out = Path(args.out)
    figure = out.parent / ("reliability/loss_delta.png" if out.parent == ROOT else "loss_delta.png")
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot(judged, figure)
    meta["figure"] = str(figure.relative_to(out.parent))
    text = render(judged, meta, tests)
    write_atomic(Path(args.out), text)
    raw = {"meta": meta, "runs": [r.to_dict() for r in results], "tests": tests}
    write_atomic(Path(args.json), json.dumps(raw, indent=1, default=str) + "\n")
    g = [r for r in judged["rows"] if r["guarded"]]
    print(f"reliability: {sum(r['ok_finite'] for r in g)}/{len(g)} finite, {sum(r['detected'] for r in g)}/{len(g)} "
          f"detected, {sum(r['within'] for r in g)}/{len(g)} within {100 * LOSS_TOLERANCE:g} %; "
          f"wrote {args.out} in {seconds:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
