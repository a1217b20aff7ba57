"""gradguard.lab: registry, claims, runner files, CLI behaviour and every experiment's quick-mode claims."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradguard.cli import main
from gradguard.errors import ConfigError
from gradguard.lab import claims as C
from gradguard.lab import registry
from gradguard.lab.experiments.rnn_through_time import INPUTS, lstm_cell_path
from gradguard.lab.runner import run_experiment, run_many
from gradguard.report.files import CONFIG, FIGURES, INDEX, METRICS, REPORT, find_experiments, load_experiment

#: Claims that measurement contradicts would be listed here and reported ✗, never loosened; none is known.
KNOWN_FALSE: set[tuple[str, str]] = set()


def test_every_experiment_cites_the_literature_and_ids_are_unique() -> None:
    ids = registry.ids()
    assert len(ids) == len(set(ids)) == 12
    assert all(e.summary and e.title and e.references for e in registry.EXPERIMENTS)
    cover = registry.coverage()
    assert list(cover) == sorted(cover)
    assert {i for refs in cover.values() for i in refs} == set(ids)


def test_premise_of_the_lstm_over_rnn_bound() -> None:
    # The "LSTM vs RNN" bound assumes an untrained tanh RNN loses at least ρ(W_hh) per step back in time:
    # measured on ‖∂L/∂x_t‖ over lags 5..30 (away from the output, above float64's floor), several inits.
    for seed in range(4):
        torch.manual_seed(seed)
        rnn = nn.RNN(8, 64, batch_first=True).double()
        x = torch.randn(16, 40, 8, dtype=torch.float64, requires_grad=True)
        out, _ = rnn(x)
        (g,) = torch.autograd.grad(out[:, -1].sum(), x)
        logs = g.norm(dim=2).log().mean(0)  # (T,), lag k at index T − 1 − k
        factor = math.exp(float(logs[40 - 1 - 30] - logs[40 - 1 - 5]) / 25)
        rho = float(torch.linalg.eigvals(rnn.weight_hh_l0.detach()).abs().max())
        assert factor < rho, (seed, factor, rho)


def test_unknown_id_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid ids: relu-lstm, weighted-sum"):
        registry.get("nope")
    assert [e.id for e in registry.select(["residual", "weighted-sum", "residual"])] == ["residual", "weighted-sum"]


def test_claim_verdicts_follow_the_measurement() -> None:
    assert C.at_least("a", "s", 2.0, 1.0).holds and not C.at_least("a", "s", 0.5, 1.0).holds
    assert C.at_most("a", "s", 1.0, 1.0).holds and not C.at_most("a", "s", 1.1, 1.0).holds
    assert C.between("a", "s", 0.5, 0.0, 1.0).holds and not C.between("a", "s", 2.0, 0.0, 1.0).holds
    assert C.close_to("a", "s", 1.04, 1.0, 0.05).holds and not C.close_to("a", "s", 1.06, 1.0, 0.05).holds
    assert not C.is_true("a", "s", False).holds
    nan = float("nan")
    for claim in (C.at_least("a", "s", nan, 0), C.at_most("a", "s", nan, 0), C.between("a", "s", nan, 0, 1),
                  C.close_to("a", "s", nan, 1.0, 0.5)):
        assert not claim.holds, claim  # a NaN never passes


def _numbers(folder: Path) -> dict:
    metrics = json.loads((folder / METRICS).read_text())
    metrics.pop("elapsed_s")
    return {"metrics": metrics, "figures": json.loads((folder / FIGURES).read_text())}


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    info = registry.get("weighted-sum")
    a, b, c = (run_experiment(info, tmp_path / name, seed=s, quick=True) for name, s in
               (("a", 7), ("b", 7), ("c", 8)))
    assert _numbers(a.folder) == _numbers(b.folder)
    assert _numbers(a.folder) != _numbers(c.folder)
    config = json.loads((a.folder / CONFIG).read_text())
    assert config["seed"] == 7 and set(config["versions"]) >= {"python", "torch", "gradguard"}


def test_interrupted_run_keeps_finished_experiments(tmp_path: Path) -> None:
    infos = registry.select(["weighted-sum", "sigmoid-gradient"])

    def progress(info):  # type: ignore[no-untyped-def]
        def tick(fraction: float) -> None:
            if info.id == "sigmoid-gradient":
                raise KeyboardInterrupt  # the user presses Ctrl-C during the second experiment

        return tick

    with pytest.raises(KeyboardInterrupt):
        run_many(infos, tmp_path, seed=0, quick=True, progress=progress, index=True)
    done = load_experiment(tmp_path / "weighted-sum")
    assert done.all_hold and (tmp_path / "weighted-sum" / REPORT).is_file()
    assert not (tmp_path / "sigmoid-gradient" / METRICS).exists()
    assert find_experiments(tmp_path) == [tmp_path / "weighted-sum"]
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lab", "run", "nope"], "unknown experiment 'nope'; valid ids:"),
        (["lab", "run", "weighted-sum", "--seed", "x"], "--seed 'x' is not an integer"),
        (["lab", "run", "weighted-sum", "--seed", "-3"], "--seed -3 is out of range"),
        (["lab", "run"], "name at least one experiment or use --all"),
        (["lab", "run", "--all", "residual"], "give experiment ids or --all, not both"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unwritable_out_and_non_run_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["lab", "run", "weighted-sum", "--out", str(blocker / "sub")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "is not writable" in lines[0] and "is not a gradguard run" in lines[1]
    assert "is not a folder" in lines[2]


def test_lab_list_shows_ids_and_coverage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in registry.ids()) and "He et al. 2016 → residual" in out


def test_all_quick_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every experiment in quick mode: files, claims (each checked by measurement), index and re-rendering."""
    out = tmp_path / "run"
    code = main(["lab", "run", "--all", "--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    results = [load_experiment(out / i) for i in registry.ids()]
    failing = {(r.id, c["id"]) for r in results for c in r.claims if not c["holds"]}
    assert failing == KNOWN_FALSE, f"claims that do not hold: {failing}"
    assert code == (1 if failing else 0)
    assert ("✗" in printed) == bool(failing) and "✓" in printed and str(out / INDEX) in printed
    for r in results:
        assert r.claims, r.id
        for c in r.claims:
            assert set(c) == {"id", "statement", "measured", "expected", "holds"} and isinstance(c["holds"], bool)
        assert r.config["quick"] is True and r.config["config"], r.id
        for fig in r.figures:
            assert (r.folder / f"{fig['name']}.png").stat().st_size > 5_000
        assert (r.folder / REPORT).stat().st_size > 10_000
    index = (out / INDEX).read_text(encoding="utf-8")
    assert all(f'href="{i}/{REPORT}"' in index for i in registry.ids())
    # `gradguard report DIR` redraws every figure and page from the saved results alone.
    (out / "residual" / REPORT).unlink()
    (out / "residual" / "layer-gradients.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "residual" / REPORT).is_file() and (out / "residual" / "layer-gradients.png").is_file()
    assert main(["report", str(out / "residual")]) == 0
    # A few headline measurements, beyond their claims: the seed's numbers come out.
    ws = load_experiment(out / "weighted-sum").metrics["metrics"]
    assert math.isclose(ws["sigma=1"]["exact_variance"], 250.0, rel_tol=0.1)  # σ²·Σx² ≈ 750/3
    mp = load_experiment(out / "matrix-product").metrics["metrics"]
    assert 20 <= mp["normal"]["final_log10_maxabs_median"] <= 30  # the seed's 1e23–1e27


@pytest.mark.slow
@pytest.mark.parametrize("experiment", registry.ids())
def test_full_mode_claims(experiment: str, tmp_path: Path) -> None:
    """Full-size run of one experiment (``pytest -m slow``); the same claims, at the seed's sizes."""
    result = run_experiment(registry.get(experiment), tmp_path, seed=0, quick=False)
    failing = {(result.id, c["id"]) for c in result.claims if not c["holds"]}
    assert failing == {k for k in KNOWN_FALSE if k[0] == experiment}, result.claims


def test_lstm_cell_path_against_a_gates_only_lstm() -> None:
    """With zero weights the gates are constants, so ∂c_t/∂c_(t−1) = σ(b_f) exactly: the hand unroll must see it."""
    lstm = nn.LSTM(INPUTS, 6, batch_first=True).double()
    with torch.no_grad():
        for p in lstm.parameters():
            p.zero_()
        lstm.bias_ih_l0[6:12] = 1.5  # forget gate (order i, f, g, o)
        lstm.bias_ih_l0[12:18] = 0.3  # g ≠ 0, so c and h are not zero
    x = torch.randn(3, 100, INPUTS, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = lstm_cell_path(lstm, x, torch.ones(6, dtype=torch.float64))
    sig = 1 / (1 + math.exp(-1.5))
    assert r["mean_forget"] == pytest.approx(sig, rel=1e-12)
    assert r["measured_factor"] == pytest.approx(sig, rel=1e-9)
