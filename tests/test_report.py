"""gradguard.report: figure specs, PNG plots, escaped self-contained HTML, and a headless-Chromium render."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.lab import registry
from gradguard.lab.runner import run_many
from gradguard.report.figures import Figure, Panel, Series
from gradguard.report.files import (
    INDEX,
    REPORT,
    ExperimentResults,
    jsonable,
    load_experiment,
    write_bytes_atomic,
    write_json_atomic,
)
from gradguard.report.html import render_experiment, render_index
from gradguard.report.plots import render_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _every_kind() -> Figure:
    line = Series("loss", [1.0, float("nan"), 1e3, "inf", 5.0], x=[0, 1, 2, 3, 4])
    return Figure("all", "every kind", [
        Panel("lines", "step", "value (log scale)", [line, Series("", [1e2], kind="hline"),
                                                    Series("m", [1e4], x=[1], kind="scatter", marker="x")],
              yscale="log"),
        Panel("hist", "z", "density", [Series("h", list(np.linspace(-1, 1, 50)), kind="hist", bins=10)]),
        Panel("bars", "name", "share", [Series("a", [0.1, 0.2], kind="bar", ticks=["x", "y"]),
                                        Series("b", [0.3, "nan"], kind="bar", ticks=["x", "y"])]),
        Panel("heat", "col", "row", [Series("", kind="heatmap", z=[[0.1, 0.9], [0.5, "nan"]], ticks=["a", "b"],
                                            row_ticks=["r1", "r2"])], legend=False),
    ], caption="c")


def test_figure_round_trips_through_json() -> None:
    fig = _every_kind()
    again = Figure.from_dict(json.loads(json.dumps(jsonable(fig.to_dict()))))
    assert again.to_dict() == json.loads(json.dumps(jsonable(fig.to_dict())))
    assert again.panels[0].series[0].y[1] == "nan"  # non-finite values are spelled out for strict JSON


def test_every_series_kind_renders_a_png() -> None:
    png = render_png(_every_kind())
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 10_000


def test_jsonable_spells_non_finite_and_float_reads_it_back() -> None:
    out = jsonable({"a": [float("nan"), float("inf"), -float("inf"), 1.5], "b": {"c": (2, "x")}})
    assert out == {"a": ["nan", "inf", "-inf", 1.5], "b": {"c": [2, "x"]}}
    assert np.isnan(float(out["a"][0])) and float(out["a"][1]) == float("inf")
    json.dumps(out, allow_nan=False)


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"v": 1})

    def boom(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # a kill between writing the temporary file and renaming it

    monkeypatch.setattr("gradguard.report.files.os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(target, b'{"v": 2}')
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # the temporary file was removed


def _fake_results(tmp_path: Path, text: str) -> ExperimentResults:
    metrics = {"id": "x", "title": text, "summary": text, "seeds": [text], "seed": 0, "quick": True,
               "elapsed_s": 1.0, "metrics": {text: text},
               "claims": [{"id": text, "statement": text, "measured": text, "expected": text, "holds": False}]}
    fig = Figure("f", text, [Panel(text, text, text, [Series(text, [1.0, 2.0])])], caption=text).to_dict()
    return ExperimentResults(tmp_path, {"config": {text: text}}, metrics, [fig])


def test_html_escapes_every_user_string(tmp_path: Path) -> None:
    evil = '<script>alert("x")</script>&"'
    res = _fake_results(tmp_path, evil)
    for page in (render_experiment(res, {"f": b"png"}), render_index([res])):
        assert "<script>" not in page
        assert "&lt;script&gt;" in page
    page = render_experiment(res, {"f": b"png"})
    assert "✗ fails" in page
    assert "http://" not in page and "https://" not in page  # no network assets


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Appended to a copy of the page, for the test only: the report itself carries no script.
_PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter((i) => !i.complete || i.naturalWidth === 0).length;
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-broken", String(broken));
});</script></body>"""


def _render(browser: str, page: Path, tmp_path: Path, shot: Path) -> tuple[str, str]:
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE), encoding="utf-8")
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
              "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=90)
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                   capture_output=True, text=True, timeout=90)
    return dom.stdout, dom.stderr


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_index_and_report_render_in_headless_chromium(tmp_path: Path) -> None:
    browser = _chromium()
    assert browser is not None
    out = tmp_path / "run"
    run_many(registry.select(["weighted-sum", "matrix-product"]), out, seed=0, quick=True, index=True)
    # The probe's page too, with its per-layer and per-time-step figures.
    torch.manual_seed(0)
    rnn = torch.nn.RNN(1, 16, batch_first=True)
    probe_page = gg.probe(rnn, torch.randn(4, 30, 1), time_dim=1).to_html(tmp_path / "probe" / "report.html")
    for page in (out / INDEX, out / "matrix-product" / REPORT, probe_page):
        shot = tmp_path / f"{page.parent.name}-{page.stem}.png"
        dom, log = _render(browser, page, tmp_path, shot)
        console = [line for line in log.splitlines() if ":CONSOLE" in line]
        assert console == [], f"console messages while rendering {page}: {console}"
        images = int(re.search(r'data-images="(\d+)"', dom).group(1))  # type: ignore[union-attr]
        broken = int(re.search(r'data-broken="(\d+)"', dom).group(1))  # type: ignore[union-attr]
        assert broken == 0, f"{broken} of {images} images did not load in {page}"
        assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 5_000
    # The report embeds its figure, a real PNG, and links nothing external.
    html = (out / "matrix-product" / REPORT).read_text(encoding="utf-8")
    blobs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(blobs) == len(load_experiment(out / "matrix-product").figures) >= 1
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in blobs)
    assert not re.search(r'(src|href)="(https?:)?//', html)
