"""The run report: heatmap cells against the logged values recomputed by hand, row groups at 200 layers, step
bins and gaps, findings on the timeline linked to their rows, Guard events, partial-run banners, compare page."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from run_report_logs import param_names, some_findings, synthetic_log
from torch import nn

import gradguard as gg
from gradguard.cli import main
from gradguard.report.heatmaps import MAX_COLUMNS, MAX_ROWS, blocks, gradient_grid, inactive_grid, update_ratio_grid
from gradguard.report.runlog import WATCH_LOG, load_watch_log
from gradguard.report.watch import compare_path, render_watch_report, watch_figures


def _mlp(log_dir: Path, *, steps: int = 30, lr: float = 0.05,
         nan_at: int | None = None) -> tuple[gg.Monitor, list[float]]:
    """A 4-layer MLP trained under gg.watch(log_dir=...); returns the monitor and the losses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    with gg.watch(model, log_dir=log_dir, console=False) as mon:
        for step in range(steps):
            x = torch.randn(32, 8)
            if step == nan_at:
                x[0, 0] = float("nan")
            loss = nn.functional.mse_loss(model(x), x[:, :1])
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
            losses.append(float(loss.detach()))
    return mon, losses


def _append(folder: Path, *records: dict[str, object]) -> None:
    with (folder / WATCH_LOG).open("a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


def _naive_rows(folder: Path) -> dict[int, dict[str, object]]:
    """Step rows straight from the file, the last line of each step."""
    rows: dict[int, dict[str, object]] = {}
    for line in (folder / WATCH_LOG).read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        if obj.get("type") == "step":
            rows[int(obj["step"])] = obj
    return rows


def test_gradient_cells_are_log10_of_the_logged_norms_of_a_watched_mlp(tmp_path: Path) -> None:
    mon, _ = _mlp(tmp_path)
    log = load_watch_log(tmp_path)
    found = gradient_grid(log)
    assert found is not None
    grid, rms = found
    assert not rms  # gg.watch does not log element counts: the rows are tensor norms, and the page says so
    logged = [k[len("grad_norm/"):] for k in mon.history[0] if k.startswith("grad_norm/")]
    assert grid.row_labels == log.params == logged
    # The log has per-tensor norms on the sampled steps (every 10th at the start of a run): one column each,
    # spanning the whole run.
    columns = [row for row in mon.history if "weight_norm/0.weight" in row]
    assert [row["step"] for row in columns] == [0, 10, 20]
    assert len(grid.z[0]) == len(columns) and grid.edges[0] == 0 and grid.edges[-1] == 30
    for c, row in enumerate(columns):
        for r, p in enumerate(log.params):
            assert grid.z[r][c] == pytest.approx(math.log10(row[f"grad_norm/{p}"]), rel=1e-6, abs=1e-9)
    ratios = update_ratio_grid(log)
    assert ratios is not None
    sampled = [row for row in mon.history if "update_ratio/0.weight" in row]
    assert sampled  # the monitor's sampled steps carry the ratios; the grid has one column per such step
    assert len(ratios.z[0]) == len(sampled)
    for c, row in enumerate(sampled):
        assert ratios.z[0][c] == pytest.approx(math.log10(row["update_ratio/0.weight"]), rel=1e-6)
    units = inactive_grid(log)
    assert units is not None
    grid_u, omitted = units
    assert "1" in grid_u.row_labels and "3" in grid_u.row_labels  # the ReLUs output exact zeros
    assert omitted == len(log.modules) - len(grid_u.row_labels) >= 1  # Linear outputs are never exactly 0


def test_rows_are_grouped_by_whole_modules_at_200_layers_and_cells_are_the_block_rms(tmp_path: Path) -> None:
    names = synthetic_log(tmp_path, layers=200, steps=12, numel=True)
    log = load_watch_log(tmp_path)
    found = gradient_grid(log)
    assert found is not None
    grid, rms = found
    assert rms
    groups, row = blocks(names, by_module=True)
    assert len(grid.z) == len(groups) <= MAX_ROWS < len(names)
    assert row == "4 modules" and grid.row == row
    # Groups tile the tensors in order and never split a module (weight and bias of one layer stay together).
    assert groups[0][0] == 0 and groups[-1][1] == len(names)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))
    assert all(names[a].rsplit(".", 1)[0] != names[a - 1].rsplit(".", 1)[0] for a, _, _ in groups[1:])
    assert grid.row_labels[0] == "[0–7] blocks.0 … blocks.3"
    rows = _naive_rows(tmp_path)
    numel = {p: float(rows[0][f"numel/{p}"]) for p in names}  # type: ignore[arg-type]
    for g, (a, b, _) in enumerate(groups):
        for s in range(12):
            sq = sum(float(rows[s][f"grad_norm/{p}"]) ** 2 for p in names[a:b])  # type: ignore[arg-type]
            expect = math.log10(math.sqrt(sq / sum(numel[p] for p in names[a:b])))
            assert grid.z[g][s] == pytest.approx(expect, rel=1e-9, abs=1e-12)


def test_update_ratio_block_is_the_ratio_of_the_block(tmp_path: Path) -> None:
    names = synthetic_log(tmp_path, layers=100, steps=21, sample_every=10)
    log = load_watch_log(tmp_path)
    grid = update_ratio_grid(log)
    assert grid is not None
    groups, _ = blocks(names, by_module=True)
    rows = _naive_rows(tmp_path)
    sampled = [10, 20]
    assert len(grid.z[0]) == len(sampled)
    assert grid.edges == [0, 15, 21]  # a column per sampled step, reaching halfway to its neighbours
    for g, (a, b, _) in enumerate(groups):
        for c, s in enumerate(sampled):
            du = sum((float(rows[s][f"update_ratio/{p}"]) * float(rows[s][f"weight_norm/{p}"])) ** 2  # type: ignore[arg-type]
                     for p in names[a:b])
            w = sum(float(rows[s][f"weight_norm/{p}"]) ** 2 for p in names[a:b])  # type: ignore[arg-type]
            assert grid.z[g][c] == pytest.approx(math.log10(math.sqrt(du / w)), rel=1e-9)


def test_steps_are_binned_to_a_few_hundred_columns_and_a_nan_step_stays_visible(tmp_path: Path) -> None:
    names = synthetic_log(tmp_path, layers=2, steps=4000, nan_at=1234)
    log = load_watch_log(tmp_path)
    found = gradient_grid(log)
    assert found is not None
    grid, _ = found
    assert len(grid.z[0]) == MAX_COLUMNS and len(grid.edges) == MAX_COLUMNS + 1
    width = (grid.edges[-1] - grid.edges[0]) / MAX_COLUMNS
    assert grid.edges[0] == 0 and grid.edges[-1] == 4000 and width == pytest.approx(10.0)
    bad_col = int(1234 // width)
    last = len(names) - 1  # the NaN was logged for the last tensor only
    assert math.isnan(grid.z[last][bad_col]) and all(math.isfinite(v) for v in grid.z[0])  # type: ignore[arg-type]
    # Every other cell is the geometric mean of its 10 steps, recomputed from the file.
    rows = _naive_rows(tmp_path)
    col = 7
    expect = np.mean([math.log10(float(rows[s][f"grad_norm/{names[last]}"])) for s in range(70, 80)])  # type: ignore[arg-type]
    assert grid.z[last][col] == pytest.approx(expect, rel=1e-9)


def test_per_tensor_detail_logged_on_a_schedule_leaves_no_empty_columns(tmp_path: Path) -> None:
    names = synthetic_log(tmp_path, layers=3, steps=30, detail_every=3)
    log = load_watch_log(tmp_path)
    assert log.track("grad_norm").logged.all()  # the global norm is on every row
    assert log.track(f"grad_norm/{names[0]}").logged.tolist() == [s % 3 == 0 for s in range(30)]
    found = gradient_grid(log)
    assert found is not None
    grid, _ = found
    assert len(grid.z[0]) == 10  # one column per step that logged detail, none left "not logged"
    assert all(v is not None and math.isfinite(v) for row in grid.z for v in row)
    rows = _naive_rows(tmp_path)
    assert grid.z[2][4] == pytest.approx(math.log10(float(rows[12][f"grad_norm/{names[2]}"])), rel=1e-9)  # type: ignore[arg-type]


def test_time_step_profiles_appear_only_when_logged(tmp_path: Path) -> None:
    synthetic_log(tmp_path / "rnn", layers=2, steps=40, time_grad={"lstm": 25})
    synthetic_log(tmp_path / "mlp", layers=2, steps=40)
    with_rnn = {f.name: f for f, _ in watch_figures(load_watch_log(tmp_path / "rnn"))}
    without = {f.name for f, _ in watch_figures(load_watch_log(tmp_path / "mlp"))}
    assert "time_grad" in with_rnn and "time_grad" not in without
    panel = with_rnn["time_grad"].panels[0]
    assert panel.title.startswith("lstm") and all(len(s.y) == 25 for s in panel.series)
    rows = _naive_rows(tmp_path / "rnn")
    first = panel.series[0]
    assert first.label == "step 10" and first.y == pytest.approx(rows[10]["time_grad/lstm"])


def _anchors(html: str) -> tuple[dict[str, str], dict[str, str]]:
    """Rail marks (mark id → href) and findings-table rows (row id → the href of its back link)."""
    marks = dict(re.findall(r"<a id='([\w-]*mark-\d+)' class='\w+' href='#([\w-]+)'", html))
    rows = dict(re.findall(r"<tr id='([\w-]*finding-\d+)' class='\w+'><td><a href='#([\w-]+)'>", html))
    return marks, rows


def test_every_finding_is_on_the_timeline_and_linked_to_its_row(tmp_path: Path) -> None:
    mon, losses = _mlp(tmp_path, nan_at=20)
    assert not math.isfinite(losses[20]) and math.isfinite(losses[19])  # the fault did reach the loss
    assert mon.findings  # ... and the monitor reported it
    _append(tmp_path, {"type": "event", "step": 20, "action": "skip", "reason": "non-finite gradient"},
            *({"type": "event", "step": s, "action": "clip", "reason": "norm above 1", "norm": 2.0} for s in (5, 6)),
            {"type": "event", "step": 21, "action": "rollback", "reason": "spike"},
            {"type": "run", "status": "complete", "exit_code": 0, "reason": ""})
    html = render_watch_report(tmp_path).read_text(encoding="utf-8")
    marks, rows = _anchors(html)
    n = len(load_watch_log(tmp_path).findings)
    assert n == len({f.key for f in mon.findings})
    assert set(marks) == {f"mark-{i}" for i in range(1, n + 1)}
    assert all(marks[f"mark-{i}"] == f"finding-{i}" and rows[f"finding-{i}"] == f"mark-{i}" for i in range(1, n + 1))
    for f in mon.findings:  # each row says which finding it is, at its step
        assert re.search(rf"<td>{f.kind}</td><td><code>{re.escape(f.module or '(model)')}</code></td>"
                         rf"<td class='num'>{f.step}</td>", html)
    assert "Run complete, exit code 0." in html and "Partial run" not in html
    assert "<td>skip</td><td class='num'>1</td>" in html and "<td>clip</td><td class='num'>2</td>" in html
    assert "<td>rollback</td><td class='num'>1</td>" in html
    pngs = {p.stem for p in tmp_path.glob("*.png")}
    assert {"timeline", "grad_flow", "update_ratio", "units", "depth"} <= pngs
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "<script" not in html and not re.search(r"(src|href)=['\"]?(https?:)?//", html)


@pytest.mark.parametrize(("end", "expect"), [
    (None, "Partial run: no closing record."),
    ({"status": "interrupted", "exit_code": 130, "reason": "SIGINT"},
     "Partial run: the program was interrupted: SIGINT, exit code 130."),
    ({"status": "error", "exit_code": 1, "reason": "RuntimeError: CUDA out of memory"},
     "Partial run: the program ended with an error: RuntimeError: CUDA out of memory, exit code 1."),
    ({"status": "complete", "exit_code": 0, "reason": ""}, "Run complete, exit code 0."),
])
def test_the_page_says_how_the_run_ended(tmp_path: Path, end: dict[str, object] | None, expect: str) -> None:
    synthetic_log(tmp_path, layers=1, steps=6, end=end)
    html = render_watch_report(tmp_path).read_text(encoding="utf-8")
    assert expect in html
    partial = end is None or end["status"] != "complete"
    assert ("Partial run" in html) == partial
    assert ("What was logged up to step 5 is shown." in html) == partial
    assert html.index(expect) < html.index("<figure")  # at the top, before any figure


def test_a_killed_line_and_unknown_records_are_tolerated(tmp_path: Path) -> None:
    synthetic_log(tmp_path, layers=1, steps=5)
    _append(tmp_path, {"type": "future_kind", "x": 1})
    with (tmp_path / WATCH_LOG).open("a", encoding="utf-8") as fh:
        fh.write('{"type":"step","step":5,"loss":')  # SIGKILL in the middle of a write
    log = load_watch_log(tmp_path)
    assert log.skipped_lines == 1 and log.steps.tolist() == [0, 1, 2, 3, 4] and log.end is None


def test_a_log_with_only_a_closing_record_still_gets_a_page(tmp_path: Path) -> None:
    _append(tmp_path, {"type": "run", "status": "complete", "exit_code": 0, "reason": "nothing to monitor"})
    html = render_watch_report(tmp_path).read_text(encoding="utf-8")
    assert "Run complete, exit code 0." in html and "no logged step" in html and "No findings." in html


def test_compare_page_puts_two_runs_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "healthy", tmp_path / "sick run"
    synthetic_log(a, layers=3, steps=40, numel=True, end={"status": "complete", "exit_code": 0, "reason": ""})
    findings = some_findings(40, param_names(3), count=3)
    synthetic_log(b, layers=3, steps=25, findings=findings, nan_at=12, seed=1)
    assert main(["report", str(a), str(b)]) == 0
    path = compare_path(a, b)
    assert path == a / "compare-sick_run.html"
    assert f"report: {path}" in capsys.readouterr().out
    html = path.read_text(encoding="utf-8")
    assert "A: healthy" in html and "B: sick run" in html
    assert "complete (exit 0)" in html and "partial: no closing record" in html
    # B has no element counts: both panels show norms, so that one colour scale means one quantity.
    assert "log10 of the tensor norm ‖g‖ (element counts not logged)" in html
    marks, rows = _anchors(html)
    assert set(marks) == {f"b-mark-{i}" for i in range(1, 4)}  # run A has no finding
    assert all(marks[f"b-mark-{i}"] == f"b-finding-{i}" and rows[f"b-finding-{i}"] == f"b-mark-{i}"
               for i in range(1, 4))
    # One timeline for both, then each heatmap with a panel per run.
    assert {p.name for p in a.glob("compare-sick_run-*.png")} == {
        f"compare-sick_run-{n}.png" for n in ("timeline", "grad_flow", "update_ratio", "units")}
    assert html.count("data:image/png;base64,") == 4
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html)


def test_compare_needs_two_run_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic_log(tmp_path / "a", layers=1, steps=3)
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and "holds no run log" in err[0]


@pytest.mark.slow
def test_report_of_a_20000_step_200_tensor_log_is_written_in_bounded_time(tmp_path: Path) -> None:
    import time

    synthetic_log(tmp_path, layers=200, bias=False, steps=20_000, numel=True, sample_every=100,
                  findings=some_findings(20_000, param_names(200, bias=False)))
    start = time.perf_counter()
    html = render_watch_report(tmp_path).read_text(encoding="utf-8")
    elapsed = time.perf_counter() - start
    print(f"report of 20000 steps x 200 tensors: {elapsed:.1f} s")
    marks, _ = _anchors(html)
    assert len(marks) == 6
    grid = gradient_grid(load_watch_log(tmp_path))
    assert grid is not None and len(grid[0].z) == 50 and len(grid[0].z[0]) == MAX_COLUMNS
    assert elapsed < 180  # on two shared cores; parsing the 210 MB of JSON is most of it


def test_a_finding_after_the_last_logged_step_is_still_on_the_timeline(tmp_path: Path) -> None:
    late = gg.Finding("nonfinite", "", 50, "error", "NaN at step 50", "skip it", {})
    synthetic_log(tmp_path, layers=1, steps=10, findings=[late],
                  events=[{"step": 60, "action": "rollback", "reason": "spike"}])
    figures = {f.name: f for f, _ in watch_figures(load_watch_log(tmp_path))}
    for panel in figures["timeline"].panels + figures["grad_flow"].panels:
        assert panel.xlim == [0.0, 61.0]  # logged steps 0-9, the finding at 50, the event at 60
    marks = [s for s in figures["timeline"].panels[0].series if s.kind == "marks"]
    assert [(s.x, s.ticks) for s in marks] == [([50], ["1"])]


def test_without_a_logged_loss_the_findings_are_numbered_on_the_gradient_norm_panel(tmp_path: Path) -> None:
    finding = gg.Finding("exploding", "fc", 3, "warning", "norm grew", "clip it", {})
    _append(tmp_path, *({"type": "step", "step": s, "grad_norm": 10.0 ** s} for s in range(6)),
            {"type": "finding", **finding.to_dict()})
    figures = {f.name: f for f, _ in watch_figures(load_watch_log(tmp_path))}
    (panel,) = figures["timeline"].panels
    assert panel.title.startswith("global gradient")
    assert [(s.x, s.ticks) for s in panel.series if s.kind == "marks"] == [([3], ["1"])]


def test_image_cells_and_axes_frames_land_where_the_page_puts_its_links() -> None:
    import io

    from matplotlib import colormaps
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    from gradguard.report.figures import Figure, Panel, Series
    from gradguard.report.plots import EXACT_ZERO, NON_FINITE, NOT_LOGGED, render

    # Columns over steps 0-10, 10-30, 30-40: a not-logged, a non-finite and an exact-zero cell, and two values.
    z = [[None, math.nan, -math.inf], [0.0, 1.0, 0.5]]
    image = Series("", kind="image", z=z, x=[0, 10, 30, 40], row_ticks=["a", "b"], cmap="viridis", vmin=0.0, vmax=1.0)
    fig = Figure("f", "t", [Panel("", "step", "row", [image], legend=False, xlim=[0, 40])], ncols=1,
                 panel_size=[6.0, 3.0])
    out = render(fig)
    pixels = imread(io.BytesIO(out.png))[..., :3]
    height, width = pixels.shape[:2]
    (frame,) = out.frames
    assert (frame.x0, frame.x1) == (0.0, 40.0)

    def colour_at(step: float, row: int) -> np.ndarray:
        x = (frame.left + (step - frame.x0) / (frame.x1 - frame.x0) * (frame.right - frame.left)) * width
        y = (frame.top + (row + 0.5) / 2 * (frame.bottom - frame.top)) * height
        return pixels[int(y), int(x)]

    viridis = colormaps["viridis"]
    for step, row, expect in ((5, 0, to_rgb(NOT_LOGGED)), (20, 0, to_rgb(NON_FINITE)), (35, 0, to_rgb(EXACT_ZERO)),
                              (5, 1, viridis(0.0)[:3]), (20, 1, viridis(1.0)[:3]), (35, 1, viridis(0.5)[:3])):
        assert colour_at(step, row) == pytest.approx(np.array(expect), abs=0.02), (step, row)
