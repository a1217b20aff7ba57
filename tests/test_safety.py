"""Safety: what gradguard reads from disk cannot run code, and its HTML reports escape user strings.

- Snapshots are read with ``torch.load(weights_only=True)``: a snapshot file holding a pickled object
  whose unpickling would run code is refused (and the payload is shown to be live with a plain load).
- Run folders are read as JSON only: ``gradguard report`` on a folder that also holds pickles never
  unpickles them; a figure name cannot make the renderer write outside the run folder.
- A static scan of the source: every ``torch.load`` passes ``weights_only=True``; nothing imports
  ``pickle``/``marshal``/``shelve``/``dill`` or calls ``eval``/``exec``/``np.load(..., allow_pickle=True)``.
- HTML reports (probe report, lab experiment report, lab index) escape every user-provided string: a
  module, experiment, claim or metric named ``<script>alert(1)</script>`` appears escaped, never raw.
"""

from __future__ import annotations

import ast
import html
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.cli import main
from gradguard.errors import GradGuardError, StateError

PAYLOAD = "<script>alert(1)</script>"
SRC = Path(gg.__file__).parent


class _Evil:
    """Unpickling this calls ``os.mkdir(marker)``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.marker),))


def _write_evil(path: Path, marker: Path, wrap: bool = True) -> None:
    torch.save({"model": _Evil(marker)} if wrap else _Evil(marker), path)


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Check the test's weapon: a plain (unsafe) load of the file really runs the payload."""
    marker = tmp_path / "pwned"
    _write_evil(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.is_dir()


def test_guard_refuses_a_malicious_snapshot(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), snapshot_dir=tmp_path / "snap")
    snapshot = tmp_path / "snap" / "gradguard_guard_snapshot.pt"
    assert snapshot.is_file()
    marker = tmp_path / "pwned"
    _write_evil(snapshot, marker)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(StateError, match="snapshot"):
        guard.restore()
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_guard_disk_snapshot_round_trips_with_weights_only(tmp_path: Path) -> None:
    """The safe loader is not a broken loader: a real snapshot restores exactly."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, snapshot_dir=tmp_path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(8, 3)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, saved["0.weight"])
    guard.restore()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_report_never_unpickles_files_in_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run" / "exp"
    run.mkdir(parents=True)
    marker = tmp_path / "pwned"
    claim = {"id": "c", "statement": "s", "measured": 1.0, "expected": "≥ 0", "holds": True}
    (run / "metrics.json").write_text(json.dumps({"id": "exp", "claims": [claim]}))
    for name in ("results.pt", "state.pkl", "model.pth", "metrics.pt"):
        _write_evil(run / name, marker)
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (run / "report.html").is_file()
    assert not marker.exists()


def test_figure_name_cannot_escape_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "deep" / "run" / "exp"
    run.mkdir(parents=True)
    claim = {"id": "c", "statement": "s", "measured": 1.0, "expected": "≥ 0", "holds": True}
    (run / "metrics.json").write_text(json.dumps({"id": "exp", "claims": [claim]}))
    figure = {"name": "../../escaped", "title": "t", "panels": []}
    (run / "figures.json").write_text(json.dumps([figure]))
    code = main(["report", str(run)])
    assert not (tmp_path / "deep" / "escaped.png").exists()
    assert code == 2 and "figure" in capsys.readouterr().err


# ----------------------------------------------------------------------------- static scan of the source
def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_source_loads_only_with_weights_only_or_json() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    problems: list[str] = []
    loads = 0
    for f in files:
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                problems += [f"{f}: imports {m}" for m in mods if m.split(".")[0] in ("pickle", "marshal", "shelve",
                                                                                       "dill", "cloudpickle")]
        for call in _calls(tree):
            name = _name(call.func)
            kw = {k.arg: k.value for k in call.keywords}
            if name in ("eval", "exec"):
                problems.append(f"{f}:{call.lineno}: {name}()")
            if name.endswith("torch.load") or (name == "load" and "weights_only" in kw):
                loads += 1
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    problems.append(f"{f}:{call.lineno}: torch.load without weights_only=True")
            if name.endswith("np.load") or name.endswith("numpy.load"):
                a = kw.get("allow_pickle")
                if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
                    problems.append(f"{f}:{call.lineno}: np.load with allow_pickle")
    assert loads >= 1  # the Guard's disk snapshot is found by the scan
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- HTML escaping
def _assert_escaped(text: str, *, minimum: int = 1) -> None:
    assert PAYLOAD not in text
    assert "<script" not in text.lower()
    assert text.count(html.escape(PAYLOAD)) >= minimum


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module(PAYLOAD, nn.Linear(4, 4))
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(getattr(self, PAYLOAD)(x)))


def test_probe_html_escapes_module_names(tmp_path: Path) -> None:
    model = _Named()
    # Make that module the culprit of a finding too, so its name also appears inside a message.
    with torch.no_grad():
        getattr(model, PAYLOAD).weight.mul_(1e4)
    report = gg.probe(model, torch.randn(16, 4))
    assert any(r.name == PAYLOAD for r in report.layers)
    text = report.to_html(tmp_path / "probe.html").read_text(encoding="utf-8")
    _assert_escaped(text)


def test_probe_cli_html_escapes_module_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    m = nn.Sequential()\n"
        f"    m.add_module({PAYLOAD!r}, nn.Linear(3, 3))\n"
        "    m.add_module('out', nn.Linear(3, 1))\n"
        "    return m\n"
    )
    main(["probe", f"{tmp_path / 'm.py'}:make", "--input-shape", "8x3", "--out", str(tmp_path / "out")])
    _assert_escaped((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))


def test_lab_report_and_index_escape_every_user_string(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    for i in range(2):
        folder = run / f"exp{i}"
        folder.mkdir(parents=True)
        claim = {"id": PAYLOAD, "statement": PAYLOAD, "measured": PAYLOAD, "expected": PAYLOAD, "holds": False}
        metrics = {"id": PAYLOAD, "title": PAYLOAD, "summary": PAYLOAD, "seeds": [PAYLOAD], "claims": [claim],
                   "metrics": {PAYLOAD: PAYLOAD, "nested": {PAYLOAD: 1.0}}, "seed": 0, "quick": True}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "config.json").write_text(json.dumps({"experiment": PAYLOAD, "config": {PAYLOAD: PAYLOAD}}))
        series = {"label": PAYLOAD, "y": [1.0, 2.0, 3.0]}
        panel = {"title": PAYLOAD, "xlabel": PAYLOAD, "ylabel": PAYLOAD, "series": [series]}
        figure = {"name": "fig", "title": PAYLOAD, "caption": PAYLOAD, "panels": [panel]}
        (folder / "figures.json").write_text(json.dumps([figure]))
    assert main(["report", str(run)]) == 0
    for i in range(2):
        _assert_escaped((run / f"exp{i}" / "report.html").read_text(encoding="utf-8"), minimum=5)
    _assert_escaped((run / "index.html").read_text(encoding="utf-8"))


def test_gradguard_errors_are_the_only_refusals() -> None:
    """StateError (raised on a refused snapshot) is a GradGuardError, so the CLI prints it in one line."""
    assert issubclass(StateError, GradGuardError)
