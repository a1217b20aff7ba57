"""Zero code: an unmodified training program run plainly and under ``gradguard run``, wall time of each.

The program is ``benchmarks/programs/digits_cnn.py`` (a small CNN on sklearn's digits with Adam, an
evaluation every 200 steps; no gradguard in it). Each round runs ``python digits_cnn.py --steps N`` and
``python -m gradguard run --out DIR digits_cnn.py --steps N`` (and the hand-wired copy below) one after the
other in fresh processes, the order rotated every round, so a drift of a shared machine falls on all alike.
The program prints a timestamp after its imports and data loading and one after its last step, which
splits each process's wall time into start-up, training and *exit* (from the end of the last step to the
process's exit: the interpreter's shutdown, plus, under ``gradguard run``, writing the report). Target:
the run itself, from launch to the end of the last step (start-up included), ≤ 1.10× the plain program's,
as the median of the ratios paired within a round. The time to write the report at exit is shown
separately: the exit time under ``gradguard run`` minus the plain program's, and the wall time of
``gradguard report DIR`` rebuilding the report from the run's log in a fresh process.

Each round also runs the same program with ``gg.watch`` wired by hand (three lines added to a copy:
``mon = gg.watch(model, log_dir=DIR)`` once the optimizer is built, ``mon.step(loss)`` after
``loss.backward()``, ``mon.close()`` after the last step), so that what the monitor costs and what the
attached path adds to it are told apart; the three runs of a round go in a rotated order. The CPU time of
each whole process (user + system, from the kernel's accounting of the child) is shown beside the wall
times, since a loaded machine inflates wall time more than CPU time.

    python benchmarks/zero_code.py [--quick | --smoke] [--pairs N] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

HEADING = "## Zero code (`gradguard run`)"
LIMIT = 1.10
PROGRAM = harness.HERE / "programs" / "digits_cnn.py"
FULL = (3, 8000)  # rounds, steps (a run of about a minute on the 2-core reference machine)
QUICK = (1, 400)
SMOKE = (1, 20)
STAMP = re.compile(r"^(started|finished) (\d+\.\d+)$", re.MULTILINE)


def env(threads: int) -> dict[str, str]:
    """The children's environment: this checkout's sources, and the same thread count for both runs."""
    src = os.pathsep.join([str(harness.ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": str(threads)}


def launch(args: Sequence[str], threads: int) -> dict[str, object]:
    """Run ``python ARGS`` and split its wall time at the program's ``started``/``finished`` timestamps;
    ``cpu`` is the child's user + system CPU seconds (this process runs one child at a time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()  # the same clock as the program's timestamps
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=harness.ROOT,
                          env=env(threads), check=False)
    t_exit = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stamps = dict((k, float(v)) for k, v in STAMP.findall(proc.stdout))
    if proc.returncode != 0 or set(stamps) != {"started", "finished"}:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"python {' '.join(args)} exited {proc.returncode}: {tail[:200]}")
    return {
        "startup": stamps["started"] - t0,
        "train": stamps["finished"] - stamps["started"],
        "run": stamps["finished"] - t0,
        "exit": t_exit - stamps["finished"],
        "wall": t_exit - t0,
        "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "stdout": STAMP.sub("", proc.stdout),  # the program's own output, timestamps removed
    }


#: Where the hand-wired copy of the program gets its three lines: (anchor in the program, text added after it).
HAND_EDITS = (
    ("import torch\n", "import gradguard as gg\n"),
    ("    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)\n", "    mon = gg.watch(model, log_dir={out!r})\n"),
    ("        loss.backward()\n", "        mon.step(loss)\n"),
    ("    print(f\"final test accuracy {evaluate():.3f}\", flush=True)\n", "    mon.close()\n"),
)


def hand_wired(folder: Path, out: Path) -> Path:
    """A copy of the program in ``folder`` with ``gg.watch`` wired by hand (:data:`HAND_EDITS`), logging to ``out``."""
    text = PROGRAM.read_text(encoding="utf-8")
    for anchor, added in HAND_EDITS:
        if text.count(anchor) != 1:
            raise RuntimeError(f"{PROGRAM.name} changed: {anchor.strip()!r} is not one line of it; update HAND_EDITS")
        text = text.replace(anchor, anchor + added.format(out=str(out)))
    path = folder / "digits_cnn_watched.py"
    path.write_text(text, encoding="utf-8")
    return path


def rebuild(folder: Path) -> float:
    """Wall seconds of ``gradguard report FOLDER`` in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gradguard", "report", str(folder)], capture_output=True,
                          text=True, cwd=harness.ROOT, env=env(1), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"gradguard report {folder} exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
    return time.perf_counter() - t0


def run(opts: harness.Options, pairs: int | None = None, steps: int | None = None) -> harness.Section:
    """The zero-code section: ``pairs`` interleaved rounds of runs of ``steps`` steps (smoke: 1 round, 20 steps)."""
    default = SMOKE if opts.smoke else FULL
    pairs, steps = pairs or default[0], steps or default[1]
    prog = [str(PROGRAM), "--steps", str(steps)]
    load_start = os.getloadavg()
    arms = ("plain", "gg", "hand")
    runs: dict[str, list[dict[str, object]]] = {k: [] for k in arms}
    rebuilds: list[float] = []
    same_output = True
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(pairs):
            out = Path(tmp) / f"run{p}"
            hand = hand_wired(Path(tmp), Path(tmp) / f"hand{p}")
            cmds = {"plain": prog, "gg": ["-m", "gradguard", "run", "--out", str(out), *prog],
                    "hand": [str(hand), *prog[1:]]}
            for k in arms[p % 3:] + arms[:p % 3]:
                runs[k].append(launch(cmds[k], opts.threads))
            if not (out / "report.html").is_file():
                raise RuntimeError(f"gradguard run wrote no report.html in {out}")
            same_output &= runs["plain"][-1]["stdout"] == runs["gg"][-1]["stdout"]
            rebuilds.append(rebuild(out))
    load_end = os.getloadavg()

    def col(k: str, part: str) -> list[float]:
        return [float(r[part]) for r in runs[k]]  # type: ignore[arg-type]

    def paired(k: str, base: str, part: str) -> list[float]:
        return [a / b for a, b in zip(col(k, part), col(base, part), strict=True)]

    timed = ("startup", "train", "run", "wall", "cpu")
    ratios = {part: paired("gg", "plain", part) for part in timed}
    report_s = [a - b for a, b in zip(col("gg", "exit"), col("plain", "exit"), strict=True)]
    parts = [("startup", "start-up (launch → first step)"), ("train", "training (first → last step)"),
             ("run", "**the run** (launch → last step)"), ("exit", "exit (last step → process exit)"),
             ("wall", "whole process (launch → exit)"), ("cpu", "CPU time of the whole process (user + system)")]
    rows = []
    for part, label in parts:
        ratio = harness.ratio_text(ratios[part]) if part in ratios else "—"
        by_hand = harness.ratio_text(paired("hand", "plain", part)) if part in ratios else "—"
        added = harness.ratio_text(paired("gg", "hand", part)) if part in ratios else "—"
        rows.append([label, _secs(col("plain", part)), _secs(col("gg", part)), ratio, _secs(col("hand", part)),
                     by_hand, added])
    per_step = {k: [(a - b) / steps * 1e3 for a, b in zip(col(k, "train"), col("plain", "train"), strict=True)]
                for k in ("gg", "hand")}
    rows.append(["training time per step over plain, ms", "—", _secs(per_step["gg"]), "—", _secs(per_step["hand"]),
                 "—", "—"])
    rows.append(["report written at exit (exit under `gradguard run` − plain exit)", "—", _secs(report_s), "—", "—",
                 "—", "—"])
    rows.append(["`gradguard report DIR` in a fresh process (rebuild from the log)", "—", _secs(rebuilds), "—", "—",
                 "—", "—"])
    def median(values: Sequence[float]) -> float:
        return harness.quartiles(values)[1]

    ratio = median(ratios["run"])
    met = ratio <= LIMIT
    judged = "not judged in a smoke run" if opts.smoke else harness.mark(met)
    body = [
        str(__doc__).split("\n\n", 1)[1].split("\n\n    python", 1)[0].strip(),
        "",
        f"{pairs} round(s) of runs of `--steps {steps}`, `OMP_NUM_THREADS={opts.threads}` for all; load average "
        f"(1, 5, 15 min) at start {_load(load_start)}, at end {_load(load_end)}.",
        "",
        harness.table(["part", "plain s, median [IQR]", "`gradguard run` s, median [IQR]", "run / plain (paired)",
                       "`gg.watch` by hand s", "hand / plain", "run / hand"], rows, "lrrrrrr"),
        "",
        f"- The run under `gradguard run` / plain: **{ratio:.3f}×**; target ≤ {LIMIT:.2f}× {judged}.",
        f"- The same with `gg.watch` wired by hand / plain: {median(paired('hand', 'plain', 'run')):.3f}×; "
        f"training part {median(paired('hand', 'plain', 'train')):.3f}× by hand, "
        f"{median(ratios['train']):.3f}× under `gradguard run`.",
        f"- The program's own stdout (timestamps removed) is the same under `gradguard run`: "
        f"{'yes' if same_output else 'no'}.",
    ]
    targets = [] if opts.smoke else [
        harness.Target(f"`gradguard run` / plain on `digits_cnn.py --steps {steps}` (launch → last step)",
                       ratio, LIMIT, met)]
    return harness.Section(HEADING, "\n".join(body), targets)


def _secs(values: Sequence[float]) -> str:
    lo, mid, hi = harness.quartiles(values)
    return f"{mid:.2f} [{lo:.2f}–{hi:.2f}]"


def _load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=str(__doc__).splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=f"{QUICK[0]} round of {QUICK[1]} steps (about 10 s each)")
    mode.add_argument("--smoke", action="store_true", help=f"{SMOKE[0]} round of {SMOKE[1]} steps")
    parser.add_argument("--pairs", type=int, default=None,
                        help=f"rounds of runs (plain, `gradguard run`, by hand; default {FULL[0]})")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {FULL[1]})")
    args = parser.parse_args(argv)
    for name in ("pairs", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} {value}: must be ≥ 1")
    pairs, steps = QUICK if args.quick else (None, None)
    section = run(harness.Options(smoke=args.smoke, rss=False, profile=False), args.pairs or pairs,
                  args.steps or steps)
    print(section.body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
