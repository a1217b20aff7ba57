"""Interrupted runs: SIGKILL ``gradguard lab run`` and a watched training script at random moments.

After every kill: every metrics file parses up to its last complete line; no report, metrics, config,
figure or snapshot is half-written under its final name (JSON parses, HTML is closed, PNG has its IEND
chunk, a snapshot loads with ``torch.load(weights_only=True)``); ``gradguard report`` on what was left
either renders it or refuses it in one line. At the end, re-running the same command into the same
folder succeeds and leaves complete files.

Processes come from a fork server (``reliability/forkserver.py``) that imported torch and gradguard once:
each child is a real process running ``gradguard.cli.main(argv)`` (what the console script runs) or the
training script, killed with SIGKILL like any other. One kill also hits a freshly started interpreter
(``python -m gradguard lab run``) to cover the console entry point itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import gradguard as gg

ROOT = Path(__file__).resolve().parents[1]
LAB_IDS = ["matrix-product", "sigmoid-gradient"]  # two cheap experiments, so that index.html is written too
LAB_KILLS = 9
TRAIN_KILLS = 11
TRAIN_STEPS = 200
MAX_ATTEMPTS = 3  # × the kills wanted: a run that finishes before its kill time is retried
PNG_END = b"IEND\xaeB`\x82"

pytestmark = pytest.mark.xdist_group("interrupted")


class ForkServer:
    """Client of ``reliability/forkserver.py``."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "reliability" / "forkserver.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        assert self._read() == {"ready": True}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "fork server died"
        return json.loads(line)

    def _send(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def start(self, **job: Any) -> int:
        return int(self._send({"op": "start", **job})["pid"])

    def wait(self, pid: int) -> dict[str, Any]:
        return self._send({"op": "wait", "pid": pid})

    def run(self, **job: Any) -> dict[str, Any]:
        return self.wait(self.start(**job))

    def kill_after(self, delay: float, **job: Any) -> dict[str, Any]:
        pid = self.start(**job)
        time.sleep(delay)
        # The child is not reaped until wait(), so the pid cannot have been reused: kill never misses.
        os.kill(pid, signal.SIGKILL)
        return self.wait(pid)

    def close(self) -> None:
        with contextlib.suppress(AssertionError, BrokenPipeError, ValueError):
            self._send({"op": "quit"})
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server() -> Any:
    s = ForkServer()
    yield s
    s.close()


# ----------------------------------------------------------------------------- what "complete" means
def complete_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a JSON Lines file, parsed (raises if one does not parse)."""
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]  # the part after the last newline is an incomplete line (or empty)
    return [json.loads(line) for line in lines]


def check_final_files(folder: Path) -> dict[str, int]:
    """Every file under its final (not hidden) name is complete; returns counts by suffix."""
    counts: dict[str, int] = {}
    for f in folder.rglob("*"):
        if not f.is_file() or f.name.startswith("."):
            continue
        data = f.read_bytes()
        suffix = f.suffix
        counts[suffix] = counts.get(suffix, 0) + 1
        if suffix == ".json":
            json.loads(data)
        elif suffix == ".html":
            assert data.rstrip().endswith(b"</html>"), f"{f} is cut short"
        elif suffix == ".png":
            assert data.endswith(PNG_END), f"{f} is cut short"
        elif suffix == ".jsonl":
            complete_lines(f)
        elif suffix == ".pt":
            state = torch.load(f, weights_only=True)
            assert "model" in state
    return counts


# ----------------------------------------------------------------------------- lab run
def test_sigkill_lab_run(server: ForkServer, tmp_path: Path) -> None:
    rng = random.Random(20261122)
    ref = tmp_path / "ref"
    start = time.perf_counter()
    first = server.run(job="cli", argv=["lab", "run", *LAB_IDS, "--quick", "--out", str(ref)])
    duration = time.perf_counter() - start
    assert first == {"exit": 0}
    ref_counts = check_final_files(ref)
    assert ref_counts.get(".html", 0) == len(LAB_IDS) + 1  # one report each and the index

    out = tmp_path / "killed"
    argv = ["lab", "run", *LAB_IDS, "--quick", "--out", str(out)]
    killed = attempts = 0
    while killed < LAB_KILLS and attempts < MAX_ATTEMPTS * LAB_KILLS:
        attempts += 1
        status = server.kill_after(rng.uniform(0.02, 0.9 * duration), job="cli", argv=argv)
        if status.get("signal") == signal.SIGKILL:
            killed += 1
        else:  # it finished first (the machine got faster): aim earlier
            assert status == {"exit": 0}
            duration *= 0.7
        if out.exists():
            check_final_files(out)
    assert killed == LAB_KILLS
    # What was left can be re-rendered, or is refused in one line as "not a finished run".
    status = server.run(job="cli", argv=["report", str(out)])
    assert status["exit"] in (0, 2)
    # Re-running the same command into the same folder succeeds and leaves everything complete.
    assert server.run(job="cli", argv=argv) == {"exit": 0}
    counts = check_final_files(out)
    assert counts.get(".html", 0) == len(LAB_IDS) + 1
    for name in LAB_IDS:
        assert (out / name / "report.html").is_file() and (out / name / "metrics.json").is_file()


def test_sigkill_console_script_lab_run(tmp_path: Path) -> None:
    """One kill of a freshly started ``python -m gradguard lab run`` (the console entry point itself)."""
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "gradguard", "lab", "run", LAB_IDS[0], "--quick", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Wait until the experiment folder appears or time passes, then kill mid-run.
    deadline = time.time() + 20
    while time.time() < deadline and proc.poll() is None and not out.exists():
        time.sleep(0.05)
    time.sleep(random.Random(7).uniform(0.0, 0.5))
    proc.kill()
    proc.wait(timeout=30)
    if out.exists():
        check_final_files(out)


# ----------------------------------------------------------------------------- watched training script
def test_sigkill_watched_training(server: ForkServer, tmp_path: Path) -> None:
    rng = random.Random(11)
    ref = tmp_path / "ref"
    start = time.perf_counter()
    assert server.run(job="train", dir=str(ref), steps=TRAIN_STEPS) == {"exit": 0}
    duration = time.perf_counter() - start
    ref_lines = complete_lines(ref / "metrics.jsonl")
    assert sum(r["type"] == "step" for r in ref_lines) == TRAIN_STEPS

    out = tmp_path / "killed"
    killed = attempts = seen_lines = 0
    while killed < TRAIN_KILLS and attempts < MAX_ATTEMPTS * TRAIN_KILLS:
        attempts += 1
        before = len(complete_lines(out / "metrics.jsonl")) if (out / "metrics.jsonl").exists() else 0
        status = server.kill_after(rng.uniform(0.02, 0.9 * duration), job="train", dir=str(out), steps=TRAIN_STEPS)
        if status.get("signal") == signal.SIGKILL:
            killed += 1
        else:
            assert status == {"exit": 0}
            duration *= 0.7
        check_final_files(out)
        lines = complete_lines(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        assert len(lines) >= before  # appending never destroys earlier runs' lines
        seen_lines = len(lines)
        assert all(r["type"] in ("step", "finding") for r in lines)
    assert killed == TRAIN_KILLS
    done_before = len(list(out.glob("done-*")))
    assert done_before == attempts - killed  # only the runs that finished say so
    # Re-running the same script on the same folder succeeds and its rows follow the killed runs' rows.
    status = server.run(job="train", dir=str(out), steps=TRAIN_STEPS)
    assert status == {"exit": 0}
    lines = complete_lines(out / "metrics.jsonl")
    assert len(lines) >= seen_lines + TRAIN_STEPS
    last_run = [r["step"] for r in lines[seen_lines:] if r["type"] == "step"]
    assert last_run[-TRAIN_STEPS:] == list(range(TRAIN_STEPS))
    check_final_files(out)
    assert len(list(out.glob("done-*"))) == done_before + 1


def test_kill_counts_reach_twenty() -> None:
    assert LAB_KILLS + TRAIN_KILLS + 1 >= 20


def test_complete_lines_reader_tolerates_only_a_cut_last_line(tmp_path: Path) -> None:
    """The checker itself: a cut last line is ignored, a broken complete line fails."""
    f = tmp_path / "m.jsonl"
    f.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert complete_lines(f) == [{"a": 1}, {"b": 2}]
    f.write_bytes(b'{"a": 1}\n{"b": \n')
    with pytest.raises(json.JSONDecodeError):
        complete_lines(f)
    assert gg.__version__
