"""`gradguard probe`: a working run, and every bad input as a one-line error with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradguard.cli import main

FACTORIES = '''
import torch
from torch import nn


class Reg(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.rnn = nn.RNN(1, 16, batch_first=True)
        q = torch.empty(16, 16)
        nn.init.orthogonal_(q)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(scale * q)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def healthy():
    return Reg(1.0)


def forgetful():
    return Reg(0.5)


def classifier():
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))


def dropout_net():
    return nn.Sequential(nn.Linear(10, 32), nn.Dropout(0.5), nn.Linear(32, 4))


def broken():
    raise RuntimeError("cannot build\\nsecond line")


def not_a_model():
    return 42


NOT_CALLABLE = 3
'''


@pytest.fixture()
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(FACTORIES, encoding="utf-8")
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("gradguard: error: ")
    return err[0]


def test_probe_run_writes_report_and_fails_on_warning(factories: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["probe", f"{factories}:forgetful", "--input-shape", "8x40x1", "--time-dim", "1", "--out", str(out)]
    assert main(args) == 0  # the default --fail-on error: a vanishing warning alone passes
    printed = capsys.readouterr().out
    assert "| 0 | rnn | RNN |" in printed and "warning · vanishing" in printed
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 2
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert data["findings"][0]["kind"] == "vanishing" and data["options"]["time_dim"] == 1
    assert main([*args, "--fail-on", "warning"]) == 1


@pytest.mark.parametrize("loss", ["mse", "ce", "default"])
def test_probe_losses(factories: Path, tmp_path: Path, loss: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["probe", f"{factories}:classifier", "--input-shape", "16x10", "--loss", loss,
                 "--out", str(tmp_path)])
    assert code == 0
    kind = {"mse": "mse", "ce": "loss_fn", "default": "projection"}[loss]
    assert json.loads((tmp_path / "report.json").read_text())["loss_kind"] == kind
    capsys.readouterr()


def test_probe_eval_flag_probes_in_eval_mode(factories: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Dropout(0.5) zeroes about half its outputs in training mode and none in eval mode."""
    zeros = {}
    for flag in ([], ["--eval"]):
        out = tmp_path / ("eval" if flag else "train")
        assert main(["probe", f"{factories}:dropout_net", "--input-shape", "64x10", "--out", str(out), *flag]) == 0
        data = json.loads((out / "report.json").read_text(encoding="utf-8"))
        assert data["options"]["train"] is not bool(flag)
        zeros[bool(flag)] = next(row["frac_zero"] for row in data["layers"] if row["type"] == "Dropout")
    assert zeros[True] == 0.0
    assert zeros[False] == pytest.approx(0.5, abs=0.05)  # 2048 Bernoulli(0.5) draws: 5 % is > 4 standard errors
    capsys.readouterr()


def test_probe_by_package_module_reference(tmp_path: Path, factories: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # A package name no other test imports: a module cached in sys.modules under the same name would shadow it.
    package = tmp_path / "gg_probe_test_zoo"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "factories.py").write_text(factories.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("gg_probe_test_zoo", "gg_probe_test_zoo.factories"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    ref = "gg_probe_test_zoo.factories:healthy"
    assert main(["probe", ref, "--input-shape", "4x6x1", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "report.html").is_file()
    capsys.readouterr()


@pytest.mark.parametrize(
    ("ref", "shape", "extra", "message"),
    [
        ("no_colon_here", "4x6x1", [], "must look like"),
        ("{dir}/missing.py:healthy", "4x6x1", [], "does not exist"),
        ("{file}:nope", "4x6x1", [], "has no attribute 'nope'"),
        ("{file}:NOT_CALLABLE", "4x6x1", [], "is not callable"),
        ("no_such_pkg_xyz.models:healthy", "4x6x1", [], "cannot import module"),
        ("{file}:broken", "4x6x1", [], "raised RuntimeError: cannot build"),
        ("{file}:not_a_model", "4x6x1", [], "returned int"),
        ("{file}:healthy", "4x6x3", [], "rejected an input of shape 4x6x3"),
        ("{file}:healthy", "4xsixx1", [], "positive integers"),
        ("{file}:healthy", "4x0x1", [], "positive integers"),
        ("{file}:healthy", "4x6x1", ["--time-dim", "3"], "--time-dim 3 is out of range"),
        ("{file}:classifier", "4x10", ["--loss", "ce", "--seed", "-1"], "seed=-1"),
    ],
)
def test_probe_bad_input_is_one_line_exit_2(factories: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            ref: str, shape: str, extra: list[str], message: str) -> None:
    ref = ref.format(dir=tmp_path, file=factories)
    code = main(["probe", ref, "--input-shape", shape, "--out", str(tmp_path / "o"), *extra])
    assert code == 2
    assert message in _one_line_error(capsys)


def test_probe_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["probe", "x.py:f", "--input-shape", "2x2", "--loss", "hinge"])
    assert exc.value.code == 2
    assert "invalid choice: 'hinge'" in capsys.readouterr().err


def test_probe_subprocess_bad_factory(factories: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "gradguard", "probe", f"{factories}:broken", "--input-shape", "4x6x1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "raised RuntimeError: cannot build" in lines[0]
