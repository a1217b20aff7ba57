"""``gradguard report DIR`` on a monitor's log_dir: the watched run drawn as a self-contained page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.cli import main
from gradguard.report.watch import PROFILE_STEPS, WATCH_LOG, load_watch_log, profile_picks


def _train(log_dir: Path, steps: int = 40, nan_at: int | None = 30) -> gg.Monitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gg.watch(model, log_dir=log_dir, console=False) as mon:
        for step in range(steps):
            x = torch.randn(32, 8)
            if step == nan_at:
                x[0, 0] = float("nan")
            loss = nn.functional.mse_loss(model(x), x[:, :1])
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            if step != nan_at:
                opt.step()
    return mon


def test_report_of_a_killed_watched_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mon = _train(tmp_path)
    with (tmp_path / WATCH_LOG).open("a", encoding="utf-8") as f:
        f.write('{"type":"step","step":40,"lo')  # what a SIGKILL in the middle of a write would leave
    log = load_watch_log(tmp_path)
    assert log.skipped_lines == 1
    assert log.steps.tolist() == list(range(40))
    assert log.params == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert {f.key for f in log.findings} == {f.key for f in mon.findings} != set()
    assert log.last("grad_norm") == pytest.approx(mon.history[-1]["grad_norm"], rel=1e-6)
    assert main(["report", str(tmp_path)]) == 0
    assert f"report: {tmp_path / 'report.html'}" in capsys.readouterr().out
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    pngs = {p.stem for p in tmp_path.glob("*.png")}  # every figure embedded is also written beside the page
    assert {"timeline", "grad_flow", "update_ratio", "depth"} <= pngs
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "1 incomplete line(s) skipped" in html
    assert "nonfinite" in html and "<script" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)


def test_user_strings_are_escaped(tmp_path: Path) -> None:
    finding = gg.Finding("exploding", "<script>alert(1)</script>", 3, "error", "<b>x</b>", "<i>y</i>", {})
    step = {"type": "step", "step": 3, "loss": 1.0, "grad_norm": "nan", "grad_norm/<script>alert(1)</script>": 2.0}
    lines = [json.dumps(step), json.dumps({"type": "finding", **finding.to_dict()})]
    (tmp_path / WATCH_LOG).write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["report", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>x</b>" not in html and "<i>y</i>" not in html


def test_a_log_with_no_monitor_record_is_a_one_line_error(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / WATCH_LOG).write_text('{"hello": 1}\n[1, 2]\nnot json\n', encoding="utf-8")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no gradguard monitor record" in err[0]


def test_profiles_take_first_last_and_evenly_spread_steps() -> None:
    logged = np.arange(41) % 2 == 0
    picked = profile_picks(logged)
    assert len(picked) == PROFILE_STEPS
    assert picked == [0, 10, 20, 30, 40]
    assert profile_picks(logged[:5]) == [0, 2, 4]
