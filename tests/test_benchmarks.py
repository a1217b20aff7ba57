"""The benchmarks of ``make bench`` in smoke mode (a couple of steps each), so that they do not rot.

Benchmarks are scripts, not timed tests: nothing here judges a time. What is checked is that every
benchmark runs end to end, writes every section and one row per configuration, that each peer that could
not run says why (the peers of the ``bench`` extra need not be installed for ``make test``), and the
facts the tables rest on: the harness pairs the right rounds, and the NaN-provenance benchmark's tools
name what the text says they name.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import compiled  # noqa: E402
import harness  # noqa: E402
import import_time  # noqa: E402
import nan_provenance  # noqa: E402
import peers  # noqa: E402
import run_all  # noqa: E402
import zero_code  # noqa: E402

pytestmark = pytest.mark.xdist_group("benchmarks")


def test_interleave_reverses_order_and_limits_slow_configurations() -> None:
    calls: list[str] = []
    steps = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    times = harness.interleave_steps(steps, rounds=4, warmup=1, limits={"c": 2})
    assert calls[:2] == ["a", "b"]  # warm-up (a limited configuration is warmed by its caller)
    assert calls[2:] == ["a", "b", "c", "c", "b", "a", "a", "b", "b", "a"]  # reversed every round; c stops after 2
    assert [len(times[k]) for k in "abc"] == [4, 4, 2]


def test_period_ratios_pair_the_same_rounds() -> None:
    times = {"base": [1.0, 1.0, 2.0, 2.0, 4.0, 4.0], "x": [2.0, 2.0, 2.0, 2.0], "y": [3.0]}
    assert harness.period_ratios(times, "x", "base", period=2) == [2.0, 1.0]
    assert harness.period_ratios(times, "y", "base", period=10) == [3.0]  # one period of the rounds it ran
    assert harness.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)


def test_table_escapes_cells() -> None:
    text = harness.table(["a", "b"], [["x|y", "1"]], "lr")
    assert text.splitlines() == ["| a | b |", "| --- | ---: |", "| x\\|y | 1 |"]


def test_nan_provenance_names_the_producer_and_detect_anomaly_names_the_loss_backward() -> None:
    ours = nan_provenance.time_to_name("gradguard", smoke=True, device="cpu", healthy=2)
    theirs = nan_provenance.time_to_name("detect_anomaly", smoke=True, device="cpu", healthy=2)
    assert ours["named"] == "module `fault`" and ours["steps"] == 1
    assert theirs["named"] == "autograd function `MseLossBackward0`" and theirs["steps"] == 1


def test_unavailable_peer_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = peers.Config("ghost", "ghost peer", peers.bare, packages=("no_such_package_for_gradguard",))
    step, why = peers.prepare(cfg, peers.models.build("mlp", smoke=True))
    assert step is None and why is not None and "not installed: no_such_package_for_gradguard" in why


def test_run_all_smoke_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    assert run_all.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    for heading in ("## Machine", "## Method", "## Targets", "## Monitor overhead", compiled.HEADING, "## Clipping",
                    "## NaN provenance", "## Guard", "## Probe", "## Lab", zero_code.HEADING,
                    import_time.HEADING):
        assert f"\n{heading}\n" in text, heading
    assert "model name" not in text and "torch " in text
    # One row per configuration and workload: timed (a ratio) or a stated reason.
    overhead = text.split("## Monitor overhead", 1)[1].split("\n## ", 1)[0]
    for cfg in peers.CONFIGS:
        rows = [ln for ln in overhead.splitlines() if ln.startswith(f"| {cfg.label} |")][:3]
        assert len(rows) == 3, cfg.label
        for row in rows:
            assert re.search(r"\d\.\d{3}× \[", row) or "could not run: " in row, row
    assert overhead.count("```python") == len(peers.CONFIGS)  # the code of every configuration is shown
    assert overhead.count("| Monitor.step total |") == 1  # overhead.py's per-part breakdown
    rss = r"\| gradguard default `gg.watch\(model\)` \| [\d.]+ \| [\d.]+× \[[^|]*\| (\d+) \(\+(\d+)\) \|"
    found = re.search(rss, text)
    assert found, "the smoke run measures gradguard's peak RSS in a child process"
    assert 50 < int(found.group(1)) < 4000, "a child's own peak (torch alone is ~200 MiB), not this process's"
    comp = text.split(compiled.HEADING, 1)[1].split("\n## ", 1)[0]
    for cfg in compiled.CONFIGS:
        (row,) = [ln for ln in comp.splitlines() if ln.startswith(f"| {cfg.label} |")]
        assert re.search(r"\d\.\d{3}× \[", row), row
        if cfg.compiled:  # gradguard adds no graph and no break, on any step of the smoke run
            assert "| 1 (+0 vs bare) | 0 | 0 / 0" in row, row
    lab = text.split("## Lab", 1)[1].split("\n## ", 1)[0]
    assert "| ok |" in lab
    # Zero code: every part of the run timed for both, the ratio of the run, the report time apart.
    zc = text.split(zero_code.HEADING, 1)[1].split("\n## ", 1)[0]
    assert re.search(r"\| \*\*the run\*\* \(launch → last step\) \| [\d.]+ \[[^|]*\| [\d.]+ \[[^|]*\| [\d.]+× \[", zc)
    assert re.search(r"\| report written at exit [^|]*\| — \| -?[\d.]+ \[", zc)
    assert "stdout (timestamps removed) is the same under `gradguard run`: yes" in zc
    # Import time: one row per command, and the --help check states a count of torch modules.
    it = text.split(import_time.HEADING, 1)[1].split("\n## ", 1)[0]
    for label in import_time.LABELS.values():
        assert sum(ln.startswith(f"| {label} | ") for ln in it.splitlines()) == 1, label
    assert re.search(r"`gradguard --help` imports \d+ torch module\(s\) \(\d+ modules in all", it)


def test_pkg_resources_stand_in_lives_only_for_cockpits_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in for setuptools' removed ``pkg_resources`` must not outlive the import that needs it."""
    monkeypatch.delitem(sys.modules, "pkg_resources", raising=False)
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name, *a: None)
    with peers._pkg_resources_shim():
        from pkg_resources import get_distribution  # type: ignore[import-not-found]

        assert get_distribution("torch").version == peers.importlib.metadata.version("torch")
    assert "pkg_resources" not in sys.modules


def test_zero_code_splits_wall_time_at_the_programs_timestamps() -> None:
    """A program that sleeps 0.3 s between its timestamps and 0.4 s after the last one (at exit)."""
    program = (
        "import atexit, time\n"
        "atexit.register(time.sleep, 0.4)\n"
        "print(f'started {time.time():.6f}', flush=True)\n"
        "print('own output')\n"
        "time.sleep(0.3)\n"
        "print(f'finished {time.time():.6f}', flush=True)\n"
    )
    parts = zero_code.launch(["-c", program], threads=1)
    assert str(parts["stdout"]).split() == ["own", "output"]
    secs = {k: v for k, v in parts.items() if isinstance(v, float)}
    assert 0.3 <= secs["train"] < 0.3 + 0.5
    assert 0.4 <= secs["exit"] < 0.4 + 0.5
    assert abs(secs["startup"] + secs["train"] + secs["exit"] - secs["wall"]) < 1e-6
    assert abs(secs["run"] - (secs["startup"] + secs["train"])) < 1e-6


def test_importtime_lists_the_modules_the_child_really_imported() -> None:
    """The parsed ``-X importtime`` list against the child's own ``sys.modules`` (the reference)."""
    mods = import_time.imported(["-c", "import json, sys; print(' '.join(sys.modules))"])
    names = [m for m, _, _ in mods]
    assert "json" in names and "json.decoder" in names
    assert all(cum >= own >= 0 for _, own, cum in mods)
    proc = import_time.subprocess.run([sys.executable, "-c", "import json, sys; print(' '.join(sys.modules))"],
                                      capture_output=True, text=True, check=True)
    reference = set(proc.stdout.split())
    assert {"json", "json.decoder", "json.scanner", "json.encoder"} <= set(names) & reference
    # `site` tries these at start-up; absent here, their failed import is timed but never enters sys.modules.
    assert set(names) - reference <= {"sitecustomize", "usercustomize"}
    assert not any(import_time.is_torch(m) for m in names)
    assert import_time.is_torch("torch.nn") and not import_time.is_torch("torchvision")


def test_amortized_ratio_equals_the_mean_cost_of_a_simulated_schedule() -> None:
    """Cheap steps at 1.1 (bare = 1), expensive ones at 5.0: the mean over a whole period, computed naively."""
    cheap, costly = 1.1, 5.0

    def mean_ratio(period: int) -> float:  # one expensive step in every `period`
        return sum(costly if i % period == 0 else cheap for i in range(period)) / period

    for every, period in ((1, 256), (10, 1000)):
        am = peers.Amortized("like", every, period)
        assert am.ratio(cheap, mean_ratio(every)) == pytest.approx(mean_ratio(period), rel=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb (bench extra) not installed")
def test_wandb_peer_runs_offline_and_its_hooks_log_every_parameter() -> None:
    """The wandb rows must time real hooks: the 10th backward at log_freq=10 logs a gradient histogram of every
    parameter, which the loss logged on the 11th step commits to the offline run file; nothing is left behind."""
    w = peers.models.build("mlp", smoke=True)
    step = peers.wandb_watch_every_10(w)
    try:
        run = peers._wandb_run()
        assert run.offline
        assert peers._wandb_logged() == set()
        for _ in range(11):
            step()
        folder = Path(peers._WANDB["folder"].name)
        # wandb names a later watched model's histograms with a prefix (`gradients/graph_<k><parameter>`).
        hooked = {n.encode() for n in w.model._wandb_hook_names}
        assert len(hooked) == len(list(w.model.parameters()))
        run.finish()  # its service writes the run file asynchronously, even after finish() returns
        deadline = time.monotonic() + 60
        while not hooked <= (peers._wandb_logged() or set()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert hooked <= (peers._wandb_logged() or set())
    finally:
        peers.close_peers()
    assert not folder.exists() and not peers._WANDB


def test_graph_count_charges_a_recompile_and_a_break_to_the_step_that_caused_them() -> None:
    """A step that flips a Python flag read by the compiled forward on step 3: a guard fails, dynamo
    recompiles, and the new code has a graph break; both must be charged to an ordinary step."""

    class Flagged(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.broken = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.fc(x)
            if self.broken:
                torch._dynamo.graph_break()
            return x.relu()

    def build(w: peers.Workload, backend: compiled.Backend) -> tuple[compiled.Step, None]:
        call = torch.compile(w.model, backend=backend)
        count = [0]

        def step() -> None:
            w.model.broken = count[0] == 3
            call(w.x).sum().backward()
            count[0] += 1

        return step, None

    torch.manual_seed(0)
    base = peers.Workload("flag", "flag", Flagged(), torch.randn(2, 4), torch.randn(2, 4))
    cfg = compiled.Config("flag", "flag", build, "flag", True)
    g = compiled.count_graphs(cfg, base, "aot_eager", steps=5)
    assert g.frames["first"] == 1 and g.breaks["first"] == 0
    assert g.frames["other"] >= 1 and g.breaks["other"] >= 1 and g.frames["sampled"] == 0
    assert g.reasons


def test_code_shown_for_a_configuration_includes_the_helpers_it_calls() -> None:
    """Two schedules of one peer share a helper: the code printed for each must contain the whole loop."""
    text = peers.source(peers.BY_KEY["cockpit_256"])
    assert text.startswith("def cockpit_economy_every_256(") and "\ndef _cockpit(" in text
    assert "loss.backward(create_graph=" in text and "def _pkg_resources_shim" not in text
    wandb = peers.source(peers.BY_KEY["wandb_10"])
    assert "run.watch(w.model" in wandb and "\ndef _wandb_run(" in wandb and wandb.count("\ndef _wandb(") == 1


def test_compiled_split_by_kind_of_step_pairs_the_monitors_own_schedule() -> None:
    """Timed round r is the monitor's step warmup + r: with warm-up 2 and steps 10 and 20 sampled, rounds 8
    and 18 are the sampled ones; sampled rounds cost 3.0, the others 1.2, the bare loop 1.0 (and 2.0)."""
    rounds = {8, 18}
    bare = [2.0 if r % 2 else 1.0 for r in range(20)]
    t = [(3.0 if r in rounds else 1.2) * b for r, b in enumerate(bare)]
    other, on_sampled = compiled.by_kind_of_step(t, bare, {10, 20}, warmup=2)
    assert other == pytest.approx(1.2, rel=1e-12) and on_sampled == pytest.approx(3.0, rel=1e-12)


def test_compiled_records_the_steps_the_monitor_sampled() -> None:
    """The adaptive schedule is asked while the run goes: the default samples steps 0, 10, 20 of a fresh run."""
    from torch import nn

    import gradguard as gg

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    mon = gg.watch(model, console=False)
    seen = compiled.record_sampled(mon)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(30):
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.step(loss)
    mon.close()
    assert {0, 10, 20} <= seen <= set(range(30)), sorted(seen)
