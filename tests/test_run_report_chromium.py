"""The run report in headless Chromium at 4, 40 and 200 layers: every image loads, every finding's mark is
on the page, rows are grouped at 200 layers, and the page fetches nothing from the network (Chromium runs
behind a proxy on a dead port, so any fetch would fail and leave an image broken)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from run_report_logs import param_names, some_findings, synthetic_log
from torch import nn

import gradguard as gg
from gradguard.report.heatmaps import MAX_ROWS, gradient_grid
from gradguard.report.runlog import load_watch_log
from gradguard.report.watch import render_watch_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Appended to a copy of the page, for the test only: the report itself carries no script.
_PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-broken", String(imgs.filter((i) => !i.complete || i.naturalWidth === 0).length));
  document.body.setAttribute("data-marks", String(document.querySelectorAll(".rail a").length));
  const rows = [...document.querySelectorAll(".rail a")].filter((a) => document.querySelector(a.getAttribute("href")));
  document.body.setAttribute("data-linked", String(rows.length));
  document.body.setAttribute("data-resources", String(performance.getEntriesByType("resource").length));
});</script></body>"""


def _dead_port() -> int:
    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _render(browser: str, page: Path, tmp_path: Path, shot: Path) -> tuple[str, str]:
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE), encoding="utf-8")
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
              f"--proxy-server=127.0.0.1:{_dead_port()}", "--proxy-bypass-list=<-loopback>",
              "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()],
                   capture_output=True, text=True, timeout=120)
    probe.unlink()
    return dom.stdout, dom.stderr


def _watched_mlp(folder: Path) -> None:
    """A 4-layer MLP with a NaN batch, watched with gg.watch(log_dir=...)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gg.watch(model, log_dir=folder, console=False) as mon:
        for step in range(40):
            x = torch.randn(32, 8)
            if step == 25:
                x[0, 0] = float("nan")
            loss = nn.functional.mse_loss(model(x), x[:, :1])
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            if step != 25:
                opt.step()
    assert mon.findings


def _attr(dom: str, name: str) -> int:
    found = re.search(rf'data-{name}="(\d+)"', dom)
    assert found is not None, f"the probe did not run (no data-{name})"
    return int(found.group(1))


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
@pytest.mark.parametrize("layers", [4, 40, 200])
def test_run_report_renders_in_headless_chromium(tmp_path: Path, layers: int) -> None:
    browser = _chromium()
    assert browser is not None
    run = tmp_path / f"run{layers}"
    if layers == 4:
        _watched_mlp(run)
    else:
        synthetic_log(run, layers=layers, steps=300, numel=True, findings=some_findings(300, param_names(layers)),
                      events=[{"step": 40, "action": "skip", "reason": "non-finite gradient"}],
                      end={"status": "interrupted", "exit_code": 130, "reason": "SIGINT"}, nan_at=150)
    page = render_watch_report(run)
    log = load_watch_log(run)
    shot = tmp_path / f"report-{layers}.png"
    dom, stderr = _render(browser, page, tmp_path, shot)
    console = [line for line in stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], f"console messages while rendering {page}: {console}"
    assert _attr(dom, "images") == len(list(run.glob("*.png"))) >= 4
    assert _attr(dom, "broken") == 0
    assert _attr(dom, "resources") == 0  # data: images are not fetched; anything else would be
    assert _attr(dom, "marks") == _attr(dom, "linked") == len(log.findings) >= 1
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 20_000
    grid = gradient_grid(log)
    assert grid is not None
    # 8 tensors; 80 tensors grouped by layer (weight and bias); 400 tensors grouped 4 layers a row.
    assert len(grid[0].z) == {4: 8, 40: 40, 200: 50}[layers] <= MAX_ROWS
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html) and "@import" not in html and "url(" not in html
