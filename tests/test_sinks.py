"""Sinks: the JSONL file survives a kill at any moment; the console prints each finding once."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from zoo import dead_layer, relu_rnn_orthogonal2

import gradguard as gg
from gradguard.sinks import ConsoleSink, JsonlSink, Sink


def _train(mon: gg.Monitor, model: nn.Module, steps: int) -> None:
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.step(loss)


def test_jsonl_lines_are_complete_json_with_history_and_findings(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    mon = gg.watch(model, log_dir=tmp_path, log_every=5, console=False)
    _train(mon, model, 27)
    path = tmp_path / "metrics.jsonl"
    lines_before_close = path.read_text().splitlines()
    # Rows reach the sink on fetches: each of the first 16 steps (early detection), then every 5 steps or
    # sooner when gradguard.detect.Sentinel trips; the last steps are still pending until close().
    written = len([ln for ln in lines_before_close if '"type":"step"' in ln])
    assert 16 + 5 <= written < 27
    mon.report(gg.Finding("loss_spike", "", 11, "warning", "jumped to 1e3", "gg.Guard(model, opt)"))
    mon.close()
    records = [json.loads(ln) for ln in path.read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(27))
    assert steps[3]["grad_norm"] == mon.history[3]["grad_norm"]
    # Per-tensor columns on the sampled steps (every 10th at the start of a run), global scalars on the others.
    sampled = [r["step"] for r in mon.history if "weight_norm/0.weight" in r]
    assert sampled == [0, 10, 20]
    assert [r["step"] for r in steps if "grad_norm/0.weight" in r] == sampled
    assert all(set(r) == {"type", "step", "loss", "grad_norm"} for r in steps if r["step"] not in sampled)
    assert steps[10]["grad_norm/0.weight"] == mon.history[10]["grad_norm/0.weight"]
    assert not any(k.startswith("nonfinite/") for r in steps for k in r)  # counts of 0 are not written
    (finding,) = [r for r in records if r["type"] == "finding"]
    assert gg.Finding.from_dict({k: v for k, v in finding.items() if k != "type"}).message == "jumped to 1e3"


def test_jsonl_writes_non_finite_numbers_as_strings(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    sink.on_step({"step": 0, "loss": float("nan"), "grad_norm": float("inf")})
    sink.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec == {"type": "step", "step": 0, "loss": "nan", "grad_norm": "inf"}


def test_jsonl_writes_non_finite_rows_whole_and_all_rows_on_request(tmp_path: Path) -> None:
    plain = {"step": 1, "loss": 0.5, "grad_norm": 1.0, "grad_norm/w": 1.0, "nonfinite/w": 0.0}
    bad = {"step": 2, "loss": 0.5, "grad_norm": float("nan"), "grad_norm/w": float("nan"), "nonfinite/w": 3.0}
    for tensors, expected in (("sampled", [{"step": 1, "loss": 0.5, "grad_norm": 1.0}, bad]), ("all", [plain, bad])):
        sink = JsonlSink(tmp_path / tensors, tensors=tensors)
        sink.on_step(plain)
        sink.on_step(bad)
        sink.close()
        lines = [json.loads(ln) for ln in (tmp_path / tensors / "metrics.jsonl").read_text().splitlines()]
        assert [{k: v for k, v in r.items() if k != "type"} for r in lines] == [
            {k: "nan" if v != v else v for k, v in e.items()} for e in expected]
    with pytest.raises(gg.ConfigError, match="tensors='some'"):
        JsonlSink(tmp_path, tensors="some")


def test_jsonl_survives_sigkill_at_any_moment(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import torch, gradguard as gg
        from torch import nn
        torch.set_num_threads(1)
        model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])
        mon = gg.watch(model, log_dir={str(tmp_path)!r}, log_every=1, console=False)
        while True:
            model.zero_grad()
            loss = model(torch.randn(4, 32)).pow(2).mean()
            loss.backward()
            mon.step(loss)
        """
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    path = tmp_path / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 200_000):
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    text = path.read_text()
    lines = text.split("\n")
    assert text.endswith("\n"), "a kill left half a line behind"
    records = [json.loads(ln) for ln in lines[:-1]]
    assert len(records) > 50
    assert [r["step"] for r in records] == list(range(len(records)))


def test_console_prints_each_finding_once() -> None:
    buf = io.StringIO()
    s = dead_layer()
    mon = gg.watch(s.model, console=False, sinks=[ConsoleSink(file=buf)])
    s.run(mon)
    out = buf.getvalue()
    assert out.count("dead_units at `act1`") == 1
    assert "never fired" in out and "→" in out
    mon.close()


def test_console_prints_again_when_severity_changes() -> None:
    buf = io.StringIO()
    sink = ConsoleSink(file=buf)
    f = gg.Finding("dead_units", "act1", 10, "info", "12% dead", "use LeakyReLU")
    sink.on_finding(f)
    sink.on_finding(gg.Finding("dead_units", "act1", 20, "info", "13% dead", "use LeakyReLU"))
    sink.on_finding(gg.Finding("dead_units", "act1", 30, "warning", "60% dead [sic]", "use LeakyReLU"))
    lines = [ln for ln in buf.getvalue().splitlines() if "dead_units" in ln]
    assert len(lines) == 2 and "60% dead [sic]" in lines[1]  # rich markup in messages is escaped


class Recorder(Sink):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.findings: list[gg.Finding] = []
        self.histograms: list[tuple[int, str, Tensor]] = []
        self.closed = False

    def on_step(self, record: dict[str, float]) -> None:
        self.rows.append(record)

    def on_finding(self, finding: gg.Finding) -> None:
        self.findings.append(finding)

    def on_histogram(self, step: int, tag: str, values: Tensor) -> None:
        self.histograms.append((step, tag, values))

    def close(self) -> None:
        self.closed = True


def test_custom_sink_receives_rows_findings_histograms_and_close() -> None:
    rec = Recorder()
    s = relu_rnn_orthogonal2()
    mon = gg.watch(s.model, console=False, sinks=[rec])
    s.run(mon)
    mon.close()
    assert [r["step"] for r in rec.rows] == list(range(s.steps))
    assert {"step", "loss", "grad_norm", "grad_norm/rnn.weight_hh_l0"} <= set(rec.rows[0])
    keys = [f.key for f in rec.findings]
    assert ("exploding", "rnn") in keys
    assert any(tag == "time_forward/rnn" and v.numel() == 20 for _, tag, v in rec.histograms)
    assert rec.closed
