"""The README's tour is code a user will paste: every ``python`` block in it must run, in order, as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gradguard.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    tour = text.split("## A short tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", tour, flags=re.S | re.M)


def test_tour_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = tour_blocks()
    assert len(blocks) >= 4, "the tour lost its runnable examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme_tour"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md tour block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    # What the tour says happens does happen: the vanishing verdict before, the NaN's producer during training.
    assert "vanishing" in printed
    findings = namespace["mon"].findings  # type: ignore[attr-defined]
    nan = [f for f in findings if f.kind == "nonfinite"]
    assert len(nan) == 1 and nan[0].step == 40 and "input batch" in nan[0].message, findings
    assert any(e.step == 40 and e.action == "skip" for e in namespace["guard"].events)  # type: ignore[attr-defined]
    assert (tmp_path / "probe.html").is_file() and (tmp_path / "runs" / "tour" / "metrics.jsonl").is_file()
    assert main(["report", "runs/tour"]) == 0  # the tour's command-line step, on the log the tour wrote
    assert (tmp_path / "runs" / "tour" / "report.html").is_file()
