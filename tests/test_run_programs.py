"""``gradguard run`` on unmodified training programs (tests/scripts/), against the same programs run plainly
and instrumented by hand with ``gg.watch``.

The invariant: what ``gradguard run`` records for an unmodified program is what ``gg.watch`` wired by hand
right after ``loss.backward()`` records on the same run (the same per-step history and the same findings),
and the program's own output and exit code are unchanged. Every fault is first shown to degrade training.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
ENV.pop("RANK", None)
TIMEOUT = 300
#: word_lm.py's vocabulary: a model that predicts uniformly has cross-entropy ln(40).
WORD_LM_UNIFORM_LOSS = math.log(40)
#: digits_cnn.py has 10 balanced classes: chance accuracy is about 0.1.
DIGITS_CHANCE = 0.1


def _run(argv: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env or ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)


@functools.cache
def _case(script: str, fault: str, mode: str, out: str) -> subprocess.CompletedProcess[str]:
    """One run of a script: ``plain`` (python script.py), ``hand`` (--watch DIR), ``auto``, ``probe`` or ``guard``."""
    path = str(SCRIPTS / script)
    args = ["--fault", fault]
    if mode == "plain":
        return _run([path, *args])
    if mode == "hand":
        return _run([path, *args, "--watch", out])
    extra = {"guard": ["--guard"], "probe": ["--probe"]}.get(mode, [])
    return _run(["-m", "gradguard", "run", "--out", out, *extra, path, *args])


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("runs")

    def get(script: str, fault: str, mode: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        out = base / f"{Path(script).stem}-{fault}-{mode}"
        return _case(script, fault, mode, str(out)), out

    return get


def read_log(folder: Path) -> dict[str, Any]:
    """Steps, findings (newest state per kind and module), guard events and the run line of a metrics.jsonl."""
    log: dict[str, Any] = {"steps": {}, "findings": {}, "events": [], "run": None}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        obj = json.loads(line)
        if obj["type"] == "step":
            log["steps"][obj["step"]] = obj
        elif obj["type"] == "finding":
            log["findings"][(obj["kind"], obj["module"])] = obj
        elif obj["type"] == "event":
            log["events"].append(obj)
        elif obj["type"] == "run":
            log["run"] = obj
    return log


def final(stdout: str) -> dict[str, str]:
    """The fields of the script's last line: ``final loss X | accuracy Y | weights finite Z``."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("final loss"), stdout[-500:]
    return dict(re.match(r"(.+?) (\S+)$", part.strip()).groups() for part in last.split("|"))  # type: ignore[union-attr]


def same_as_hand(auto: Path, hand: Path) -> dict[str, Any]:
    """Assert that the attached monitor recorded what the hand-wired one did; returns the attached log."""
    a, h = read_log(auto), read_log(hand)
    assert sorted(a["steps"]) == sorted(h["steps"]) and a["steps"]
    for step, row in h["steps"].items():
        mine = a["steps"][step]
        for key in ("loss", "grad_norm"):
            x, y = mine[key], row[key]
            if isinstance(y, float):
                assert x == pytest.approx(y, rel=1e-6, abs=0.0), (step, key)
            else:  # "nan"/"inf" strings of non-finite values
                assert x == y, (step, key)
    strip = lambda fs: {k: (f["severity"], f["step"], f["message"]) for k, f in fs.items()}  # noqa: E731
    assert strip(a["findings"]) == strip(h["findings"])
    return a


def serious(log: dict[str, Any]) -> list[tuple[str, str]]:
    return [k for k, f in log["findings"].items() if f["severity"] in ("warning", "error")]


HEALTHY = ["word_lm.py", "char_gpt.py", "digits_cnn.py"]


@pytest.mark.parametrize("script", HEALTHY)
def test_healthy_run_is_silent_and_leaves_the_program_unchanged(case: Any, script: str) -> None:
    plain, _ = case(script, "none", "plain")
    # With --probe: the probe of the first batch must leave the model (and the RNG) exactly as it found them.
    auto, out = case(script, "none", "probe")
    assert plain.returncode == auto.returncode == 0, auto.stderr[-2000:]
    assert auto.stdout == plain.stdout  # the program's own output, byte for byte
    log = read_log(out)
    assert serious(log) == []
    assert log["run"]["status"] == "complete" and log["run"]["exit_code"] == 0
    assert len(log["steps"]) == 60 and (out / "report.html").is_file()
    assert "probe of the first batch" in auto.stderr and (out / "probe.html").is_file()
    assert "Traceback" not in auto.stderr


def test_word_lm_lr100_same_findings_as_hand(case: Any) -> None:
    healthy = float(final(case("word_lm.py", "none", "plain")[0].stdout)["final loss"])
    auto, out = case("word_lm.py", "lr100", "auto")
    hand, hand_out = case("word_lm.py", "lr100", "hand")
    sick = float(final(auto.stdout)["final loss"])
    assert "without a torch.optim optimizer: each backward pass is a step" in auto.stderr
    assert healthy < WORD_LM_UNIFORM_LOSS < sick / 10  # far worse than guessing: the fault bites
    assert auto.stdout == hand.stdout
    same_as_hand(out, hand_out)  # pre-clip norms: the hand-wired mon.step runs before clip_grad_norm_
    assert final(auto.stdout)["weights finite"] == "True"  # clipped to 0.25: finite, and ruined all the same
    # Bad from the first steps: the divergence is an `exploding` finding within three steps of the start.
    found = [f for f in read_log(out)["findings"].values() if f["severity"] != "info" and f["kind"] == "exploding"]
    assert found and min(f["step"] for f in found) <= 3, found


def test_gpt_nan_batch_same_nonfinite_finding_as_hand(case: Any) -> None:
    auto, out = case("char_gpt.py", "nan", "auto")
    hand, hand_out = case("char_gpt.py", "nan", "hand")
    assert final(auto.stdout)["weights finite"] == "False"  # unguarded, the NaN ruins the weights
    assert auto.stdout == hand.stdout and auto.returncode == 0
    log = same_as_hand(out, hand_out)
    f = log["findings"][("nonfinite", "blocks.0.attn")]
    assert f["severity"] == "error" and f["step"] == 30  # NAN_STEP of char_gpt.py, localised to the module


def test_digits_nan_batch_same_nonfinite_finding_as_hand(case: Any) -> None:
    auto, out = case("digits_cnn.py", "nan", "auto")
    hand, hand_out = case("digits_cnn.py", "nan", "hand")
    assert final(auto.stdout)["weights finite"] == "False"
    assert auto.stdout == hand.stdout
    log = same_as_hand(out, hand_out)
    f = log["findings"][("nonfinite", "")]
    assert f["severity"] == "error" and f["step"] == 25 and "data" in f["message"]


@pytest.mark.parametrize("script", ["char_gpt.py", "digits_cnn.py"])
def test_guard_keeps_a_nan_batch_run_finite(case: Any, script: str) -> None:
    guarded, out = case(script, "nan", "guard")
    assert guarded.returncode == 0, guarded.stderr[-2000:]
    result = final(guarded.stdout)
    assert result["weights finite"] == "True" and math.isfinite(float(result["final loss"]))
    log = read_log(out)
    skips = [e for e in log["events"] if e["action"] == "skip"]
    assert skips and skips[0]["reason"].startswith("nonfinite")
    assert log["run"]["guard"]["skipped"] == len(skips) >= 1
    assert "(guarded)" in guarded.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("script", "fault"), [("word_lm.py", "noclip"), ("char_gpt.py", "lr100"),
                                               ("char_gpt.py", "noclip"), ("digits_cnn.py", "lr100")])
def test_more_faults_same_findings_as_hand(case: Any, script: str, fault: str) -> None:
    auto, out = case(script, fault, "auto")
    hand, hand_out = case(script, fault, "hand")
    healthy = final(case(script, "none", "plain")[0].stdout)
    sick = final(auto.stdout)
    if "accuracy" in sick:
        assert float(sick["accuracy"]) < 2 * DIGITS_CHANCE < float(healthy["accuracy"])
    else:
        assert float(sick["final loss"]) > 1.05 * float(healthy["final loss"])
    assert auto.stdout == hand.stdout
    same_as_hand(out, hand_out)
    assert sick["weights finite"] == "True"  # these LR faults stay finite: the loss shows the damage


@pytest.mark.parametrize(("sig", "code", "shown"),
                         [(signal.SIGINT, 130, "KeyboardInterrupt"), (signal.SIGTERM, 143, "")])
def test_interrupted_run_leaves_a_readable_partial_report(tmp_path: Path, sig: int, code: int, shown: str) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradguard", "run", "--out", str(out), str(SCRIPTS / "digits_cnn.py"),
         "--steps", "100000"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    log = out / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and '"type":"step"' in log.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == code, stderr[-2000:]
    assert "final loss" not in stdout  # it was stopped mid-training
    run = read_log(out)["run"]
    assert run["status"] == "interrupted" and run["exit_code"] == code
    assert run["reason"] == signal.Signals(sig).name
    assert read_log(out)["steps"]
    html = (out / "report.html").read_text()
    assert html.rstrip().endswith("</html>")
    assert shown in stderr and "gradguard/attach" not in stderr  # the program's traceback only
    if sig != signal.SIGINT:
        return
    # The log alone rebuilds the report (as after SIGKILL): `gradguard report DIR`.
    (out / "report.html").unlink()
    rebuilt = _run(["-m", "gradguard", "report", str(out)])
    assert rebuilt.returncode == 0 and (out / "report.html").is_file()


def test_sigkill_loses_fewer_than_log_every_steps(tmp_path: Path) -> None:
    # The log is written as the run goes: each fetch of the statistics (every --log-every steps at the latest)
    # appends its rows at once, one unbuffered write per line. SIGKILL can lose only the steps recorded since
    # the last fetch, fewer than --log-every, and never leaves a partial line.
    log_every, paused = 25, 70
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradguard", "run", "--log-every", str(log_every), "--out", str(out),
         str(SCRIPTS / "digits_cnn.py"), "--steps", "100", "--pause-after", str(paused)],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("paused after step"):
                break
        else:
            raise AssertionError(f"the program exited {proc.wait()} before pausing")
        proc.kill()
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    objs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # whole lines only
    steps = [obj["step"] for obj in objs if obj["type"] == "step"]
    assert steps == list(range(len(steps)))
    assert 0 <= (paused + 1) - len(steps) < log_every  # steps 0..paused were recorded before the kill
    assert not any(obj["type"] == "run" for obj in objs)  # killed: no run line, `gradguard report` marks it partial


@pytest.mark.slow
def test_hf_trainer_same_as_hand(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    script = str(SCRIPTS / "hf_trainer.py")
    auto = _run(["-m", "gradguard", "run", "--out", str(tmp_path / "auto"), script, "--out", str(tmp_path / "t1")])
    hand = _run([script, "--out", str(tmp_path / "t2"), "--watch", str(tmp_path / "hand")])
    assert auto.returncode == hand.returncode == 0, auto.stderr[-2000:]
    assert auto.stdout.splitlines()[-1] == hand.stdout.splitlines()[-1]  # the Trainer's timings differ, not the loss
    log = same_as_hand(tmp_path / "auto", tmp_path / "hand")
    assert len(log["steps"]) == 20 and "AdamW.step() calls" in auto.stderr
