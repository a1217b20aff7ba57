"""Bad input across the CLI and the public API: every case gives one line naming the problem.

CLI cases run ``gradguard.cli.main(argv)`` in this process (the same code path as the console script;
one case is repeated in a real subprocess): exit code 2, one ``gradguard: error:`` line that names the
bad value, and no traceback. API cases must raise a specific gradguard exception (a subclass of
:class:`gradguard.GradGuardError`, hence also of ``ValueError``/``TypeError``/``RuntimeError``) whose
one-line message names the bad value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.cli import main
from gradguard.errors import ConfigError, GradGuardError, InputError, StateError

FACTORIES = """
import torch
from torch import nn


def make():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def other():
    return nn.Sequential(nn.Linear(5, 2))


def empty():
    return nn.Sequential()


def number():
    return 42


def boom():
    raise ValueError("kaboom in the factory")
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of bad things: model files, a plain file, foreign run folders."""
    d = tmp_path_factory.mktemp("bad")
    (d / "models.py").write_text(FACTORIES)
    (d / "broken.py").write_text("def make(:\n    pass\n")
    (d / "afile.txt").write_text("not a folder\n")
    (d / "empty").mkdir()

    def run_folder(name: str, metrics: Any, figures: Any = None, raw: bytes | None = None) -> None:
        f = d / name
        f.mkdir()
        if raw is not None:
            (f / "metrics.json").write_bytes(raw)
        else:
            (f / "metrics.json").write_text(json.dumps(metrics))
        if figures is not None:
            (f / "figures.json").write_text(json.dumps(figures))

    claim = {"id": "c", "statement": "s", "measured": 1.0, "expected": "≥ 0", "holds": True}
    run_folder("binary", None, raw=bytes(range(256)) * 4)
    run_folder("foreign", {"name": "some other tool", "version": 3})
    run_folder("array", [1, 2, 3])
    run_folder("badclaims", {"id": "x", "claims": [{"foo": 1}]})
    run_folder("claimstext", {"id": "x", "claims": "all good"})
    run_folder("badfigures", {"id": "x", "claims": [claim]}, figures=[{"name": "a"}])
    run_folder("figuresdict", {"id": "x", "claims": [claim]}, figures={"name": "a"})
    (d / "dirmetrics").mkdir()
    (d / "dirmetrics" / "metrics.json").mkdir()
    return d


# (case id, argv with {d} for the world folder, text the error line must contain)
CLI_CASES: list[tuple[str, list[str], str]] = [
    ("unknown-command", ["frobnicate"], "frobnicate"),
    ("lab-unknown-subcommand", ["lab", "frobnicate"], "frobnicate"),
    ("lab-unknown-experiment", ["lab", "run", "no-such-experiment", "--out", "{d}/o"], "no-such-experiment"),
    ("lab-seed-negative", ["lab", "run", "weighted-sum", "--seed", "-1", "--out", "{d}/o"], "-1"),
    ("lab-seed-too-large", ["lab", "run", "weighted-sum", "--seed", str(2**32), "--out", "{d}/o"], str(2**32)),
    ("lab-seed-not-integer", ["lab", "run", "weighted-sum", "--seed", "1.5e3", "--out", "{d}/o"], "1.5e3"),
    ("lab-no-experiment", ["lab", "run", "--out", "{d}/o"], "experiment"),
    ("lab-ids-and-all", ["lab", "run", "--all", "weighted-sum", "--out", "{d}/o"], "--all"),
    ("lab-out-is-a-file", ["lab", "run", "weighted-sum", "--out", "{d}/afile.txt/sub"], "afile.txt"),
    ("report-missing-folder", ["report", "{d}/nowhere"], "nowhere"),
    ("report-empty-folder", ["report", "{d}/empty"], "empty"),
    ("report-plain-file", ["report", "{d}/afile.txt"], "afile.txt"),
    ("report-binary-metrics", ["report", "{d}/binary"], "metrics.json"),
    ("report-foreign-json", ["report", "{d}/foreign"], "metrics.json"),
    ("report-json-array", ["report", "{d}/array"], "metrics.json"),
    ("report-claims-wrong-keys", ["report", "{d}/badclaims"], "claims"),
    ("report-claims-not-a-list", ["report", "{d}/claimstext"], "claims"),
    ("report-foreign-figures", ["report", "{d}/badfigures"], "figures.json"),
    ("report-figures-not-a-list", ["report", "{d}/figuresdict"], "figures.json"),
    ("report-metrics-is-a-folder", ["report", "{d}/dirmetrics"], "dirmetrics"),
    ("probe-file-missing", ["probe", "{d}/nowhere.py:make", "--input-shape", "4x3"], "nowhere.py"),
    ("probe-factory-missing", ["probe", "{d}/models.py:nothing", "--input-shape", "4x3"], "nothing"),
    ("probe-package-missing", ["probe", "no_such_pkg_xyz.mod:make", "--input-shape", "4x3"], "no_such_pkg_xyz"),
    ("probe-reference-malformed", ["probe", "just_a_name", "--input-shape", "4x3"], "just_a_name"),
    ("probe-factory-not-a-module", ["probe", "{d}/models.py:number", "--input-shape", "4x3"], "int"),
    ("probe-factory-raises", ["probe", "{d}/models.py:boom", "--input-shape", "4x3"], "kaboom"),
    ("probe-file-syntax-error", ["probe", "{d}/broken.py:make", "--input-shape", "4x3"], "broken.py"),
    ("probe-shape-not-numbers", ["probe", "{d}/models.py:make", "--input-shape", "4xq"], "4xq"),
    ("probe-shape-zero", ["probe", "{d}/models.py:make", "--input-shape", "0x3"], "0x3"),
    ("probe-shape-rejected", ["probe", "{d}/models.py:make", "--input-shape", "4x5"], "4x5"),
    ("probe-shape-too-large", ["probe", "{d}/models.py:make", "--input-shape", "99999999x99999999"],
     "99999999x99999999"),
    ("probe-time-dim-out-of-range", ["probe", "{d}/models.py:make", "--input-shape", "4x3", "--time-dim", "5"],
     "--time-dim 5"),
    ("probe-loss-unknown", ["probe", "{d}/models.py:make", "--input-shape", "4x3", "--loss", "hinge"], "hinge"),
    ("probe-seed-not-integer", ["probe", "{d}/models.py:make", "--input-shape", "4x3", "--seed", "abc"], "abc"),
    ("probe-empty-model", ["probe", "{d}/models.py:empty", "--input-shape", "4x3", "--out", "{d}/p1"], "parameters"),
    ("probe-out-unwritable", ["probe", "{d}/models.py:make", "--input-shape", "4x3", "--out", "{d}/afile.txt/sub"],
     "afile.txt"),
]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.mark.parametrize(("argv", "needle"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(world: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    args = [a.replace("{d}", str(world)) for a in argv]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("gradguard") and needle in lines[0], lines[0]


def test_cli_bad_input_in_a_real_process(world: Path) -> None:
    """The same contract through the console entry point: exit 2, one line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(gg.__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "gradguard", "report", str(world / "badclaims")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "claims" in proc.stderr


# ----------------------------------------------------------------------------- public API
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def _closed_monitor() -> Any:
    mon = gg.watch(_mlp(), console=False)
    mon.close()
    return mon


def _monitor_step_vector_loss() -> None:
    model = _mlp()
    mon = gg.watch(model, console=False)
    loss = model(torch.randn(4, 3)).pow(2)
    loss.sum().backward()
    mon.step(loss)


def _guard(**kw: Any) -> gg.Guard:
    model = _mlp()
    return gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def _guard_restore_foreign_snapshot(tmp: Path) -> None:
    a, b = _mlp(), nn.Sequential(nn.Linear(5, 2))
    ga = gg.Guard(a, torch.optim.Adam(a.parameters()), snapshot_dir=tmp / "a")
    gg.Guard(b, torch.optim.Adam(b.parameters()), snapshot_dir=tmp / "b")
    # Someone points the first run at the second one's snapshot (e.g. a shared snapshot_dir).
    os.replace(tmp / "b" / "gradguard_guard_snapshot.pt", tmp / "a" / "gradguard_guard_snapshot.pt")
    ga.restore()


def _guard_restore_garbage_snapshot(tmp: Path) -> None:
    model = _mlp()
    guard = gg.Guard(model, torch.optim.Adam(model.parameters()), snapshot_dir=tmp / "g")
    (tmp / "g" / "gradguard_guard_snapshot.pt").write_bytes(b"this is not a checkpoint")
    guard.restore()


def _lab_get_unknown() -> None:
    from gradguard.lab import registry

    registry.get("no-such-experiment")


# (case id, call taking the tmp folder, exception type, text the message must contain)
API_CASES: list[tuple[str, Callable[[Path], Any], type[GradGuardError], str]] = [
    ("watch-not-a-module", lambda t: gg.watch("my model"), InputError, "str"),
    ("watch-empty-model", lambda t: gg.watch(nn.Sequential()), ConfigError, "no parameters"),
    ("watch-log-every-zero", lambda t: gg.watch(_mlp(), log_every=0), ConfigError, "log_every=0"),
    ("watch-log-every-float", lambda t: gg.watch(_mlp(), log_every=1.5), InputError, "log_every=1.5"),
    ("watch-sink-wrong-type", lambda t: gg.watch(_mlp(), sinks=[print]), InputError, "sinks"),
    ("monitor-step-vector-loss", lambda t: _monitor_step_vector_loss(), InputError, "(4, 1)"),
    ("monitor-step-after-close", lambda t: _closed_monitor().step(), StateError, "close"),
    ("monitor-report-not-a-finding", lambda t: _closed_monitor().report("oops"), InputError, "str"),
    ("finding-unknown-kind", lambda t: gg.Finding("melting", "", 0, "error", "m", "a"), ConfigError, "melting"),
    ("probe-not-a-module", lambda t: gg.probe("net", torch.randn(2, 3)), InputError, "str"),
    ("probe-inputs-wrong-type", lambda t: gg.probe(_mlp(), "x"), InputError, "str"),
    ("probe-empty-model", lambda t: gg.probe(nn.Sequential(), torch.randn(4, 3)), ConfigError, "parameters"),
    ("probe-batch-with-nan", lambda t: gg.probe(_mlp(), torch.tensor([[0.0, float("nan"), 1.0]] * 4)),
     ConfigError, "NaN"),
    ("probe-shape-rejected", lambda t: gg.probe(_mlp(), torch.randn(4, 5)), ConfigError, "(4, 5)"),
    ("probe-time-dim-out-of-range", lambda t: gg.probe(_mlp(), torch.randn(4, 3), time_dim=3), ConfigError,
     "time_dim=3"),
    ("probe-seed-negative", lambda t: gg.probe(_mlp(), torch.randn(4, 3), seed=-2), ConfigError, "seed=-2"),
    ("clip-norm-negative", lambda t: gg.clip.ClipNorm(-1.0), ConfigError, "-1.0"),
    ("clip-value-text", lambda t: gg.clip.ClipValue("big"), InputError, "big"),
    ("clip-zclip-alpha-out-of-range", lambda t: gg.clip.ZClip(alpha=2.0), ConfigError, "alpha=2.0"),
    ("clip-autoclip-quantile", lambda t: gg.clip.AutoClip(quantile=1.5), ConfigError, "1.5"),
    ("init-unknown-scheme", lambda t: gg.init.apply(_mlp(), "glorious"), ConfigError, "glorious"),
    ("init-not-a-module", lambda t: gg.init.apply([1, 2], "he_normal"), InputError, "list"),
    ("init-lsuv-batch-not-a-tensor", lambda t: gg.init.lsuv(_mlp(), "x"), InputError, "str 'x'"),
    ("init-lsuv-batch-list-without-tensor", lambda t: gg.init.lsuv(_mlp(), [1.0, 2.0]), InputError, "[1.0, 2.0]"),
    ("l2-penalty-negative", lambda t: gg.l2_penalty(_mlp(), -0.1), ConfigError, "-0.1"),
    ("lstm-unknown-activation", lambda t: gg.nn.LSTM(1, 4, 1, activation="sigmoid"), ConfigError, "sigmoid"),
    ("lstm-zero-hidden", lambda t: gg.nn.LSTM(1, 0, 1), ConfigError, "hidden_size=0"),
    ("guard-optimizer-wrong-type", lambda t: gg.Guard(_mlp(), "adam"), InputError, "str"),
    ("guard-unknown-clip", lambda t: _guard(clip="gentle"), ConfigError, "gentle"),
    ("guard-spike-z-negative", lambda t: _guard(spike_z=-1.0), ConfigError, "spike_z=-1.0"),
    ("guard-spike-jump-below-one", lambda t: _guard(spike_jump=0.5), ConfigError, "spike_jump=0.5"),
    ("guard-step-not-a-tensor", lambda t: _guard().step(0.5), InputError, "float"),
    ("guard-snapshot-from-another-model", _guard_restore_foreign_snapshot, StateError, "snapshot"),
    ("guard-snapshot-not-a-checkpoint", _guard_restore_garbage_snapshot, StateError, "snapshot"),
    ("lab-unknown-experiment", lambda t: _lab_get_unknown(), ConfigError, "no-such-experiment"),
]


@pytest.mark.parametrize(("call", "exc_type", "needle"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(
    tmp_path: Path, call: Callable[[Path], Any], exc_type: type[GradGuardError], needle: str
) -> None:
    with pytest.raises(GradGuardError) as info:
        call(tmp_path)
    assert isinstance(info.value, exc_type), f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert needle in message, message


def test_case_count() -> None:
    """The issue asks for at least 25 bad-input cases across the CLI and the API."""
    assert len(CLI_CASES) >= 25 and len(API_CASES) >= 25
