"""``gradguard run``: the program runs as under ``python``; bad input; ``-m``; torchrun ranks; ``--probe``;
and ``gg.autowatch()`` in-process against ``gg.watch`` wired by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradguard as gg

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
ENV.pop("RANK", None)
TIMEOUT = 300


def python(*argv: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env or ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)


def gradguard_run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return python("-m", "gradguard", "run", *argv, **kw)  # type: ignore[arg-type]


def own_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("gradguard:")]


def test_program_without_a_model_keeps_its_output_exit_code_and_traceback(tmp_path: Path) -> None:
    script = str(SCRIPTS / "plain.py")
    plain = python(script, "--raise", "x")
    attached = gradguard_run("--out", str(tmp_path / "o"), script, "--raise", "x")
    assert plain.returncode == attached.returncode == 1
    assert attached.stdout == plain.stdout
    # The program's stderr (its print and its traceback) exactly as Python shows it, then gradguard's lines.
    others = [line for line in attached.stderr.splitlines() if not line.startswith("gradguard:")]
    assert others == plain.stderr.splitlines()
    assert own_lines(attached.stderr) == [
        "gradguard: nothing to monitor: the program stepped no optimizer and ran no backward pass through a "
        "torch.nn.Module"
    ]
    assert not (tmp_path / "o").exists()  # nothing was written, so no empty folder is left behind


def test_exit_code_and_argv_pass_through(tmp_path: Path) -> None:
    script = str(SCRIPTS / "plain.py")
    # Options after the script are the program's, even gradguard's own names.
    attached = gradguard_run("--out", str(tmp_path / "o"), script, "--exit", "7", "--out", "mine")
    assert attached.returncode == 7
    assert attached.stdout == python(script, "--exit", "7", "--out", "mine").stdout == (
        "plain program ['--out', 'mine'] main\npath0 is my folder: True | pickles: True\n")


def test_module_mode_runs_as_python_dash_m(tmp_path: Path) -> None:
    plain = python("-m", "plain", "--exit", "3", "a", cwd=SCRIPTS)
    attached = gradguard_run("--out", str(tmp_path / "o"), "-m", "plain", "--exit", "3", "a", cwd=SCRIPTS)
    assert plain.returncode == attached.returncode == 3
    assert attached.stdout == plain.stdout  # for -m, sys.path[0] is the current folder, the module's here
    assert attached.stdout == "plain program ['a'] main\npath0 is my folder: True | pickles: True\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-m", "no_such_module_anywhere"], "no module named 'no_such_module_anywhere'"),
        (["-m"], "-m needs a module name"),
        (["--out", "/proc/gradguard-not-writable", str(SCRIPTS / "plain.py")], "cannot be written"),
        (["--log-every", "0", str(SCRIPTS / "plain.py")], "--log-every 0 is out of range"),
        ([], "name the program to run"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from gradguard.cli import main

    monkeypatch.setattr(sys, "path", list(sys.path))  # -m puts the current folder first, as python -m does
    assert main(["run", *argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("gradguard: error: ") and message in lines[0], err


def test_missing_script_from_the_console_entry_point() -> None:
    result = gradguard_run("does_not_exist.py", "--flag")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "gradguard: error: script 'does_not_exist.py' does not exist or is not a file\n"


def test_rank_folder_under_torchrun(tmp_path: Path) -> None:
    # A torchrun worker is told its rank by RANK; each rank writes its own log and report to DIR/rank<k>.
    env = {**ENV, "RANK": "1", "WORLD_SIZE": "2"}
    # Two DataLoader worker processes: forked from the attached program, they load data as usual.
    result = gradguard_run("--out", str(tmp_path / "o"), str(SCRIPTS / "digits_cnn.py"), "--steps", "12",
                           "--workers", "2", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "o" / "rank1"
    assert (folder / "report.html").is_file()
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["type"] == "step"] == list(range(12))
    assert lines[-1]["type"] == "run" and lines[-1]["status"] == "complete"
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _train(model: nn.Module, steps: int, *, nan_at: int | None = None, mon: gg.Monitor | None = None) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(32, 6, generator=gen)
        if step == nan_at:
            x[3, 2] = float("nan")
        loss = (model(x) - x[:, :1].sin()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if mon is not None:
            mon.step(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()


def test_autowatch_records_what_a_hand_wired_monitor_records() -> None:
    torch.manual_seed(0)
    by_hand = _mlp()
    torch.manual_seed(0)
    attached = _mlp()
    mon = gg.watch(by_hand, console=False)
    _train(by_hand, 25, nan_at=17, mon=mon)
    session = gg.autowatch(console=False)
    try:
        _train(attached, 25, nan_at=17)
        (watched,) = session.monitors
        assert watched.model is attached
        auto, hand = watched.history, mon.history
        assert [r["step"] for r in auto] == [r["step"] for r in hand] == list(range(25))
        for a, h in zip(auto, hand, strict=True):
            # Recorded before the program's clip_grad_norm_: the norms are the unclipped ones.
            assert a["grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-6, nan_ok=True)
            assert a["loss"] == pytest.approx(h["loss"], rel=1e-6, nan_ok=True)
        key = lambda f: (f.kind, f.module, f.severity, f.step)  # noqa: E731
        assert sorted(map(key, session.findings)) == sorted(map(key, mon.findings))
        assert any(f.kind == "nonfinite" and f.step == 17 for f in session.findings)
    finally:
        session.close()
        mon.close()


def test_autowatch_infers_a_cross_entropys_chance_level_as_the_hand_wired_monitor_does() -> None:
    # Logits 30x too large: the loss starts far above chance (ln 10). Telling that needs the chance level,
    # which the monitor infers from the loss's graph (a cross-entropy) and the output width.
    def classifier() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Linear(8, 10)
        with torch.no_grad():
            net.weight.mul_(30.0)
        return net

    def train(model: nn.Module, mon: gg.Monitor | None = None) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(3)
        for _ in range(6):
            x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if mon is not None:
                mon.step(loss)
            opt.step()

    by_hand = classifier()
    mon = gg.watch(by_hand, console=False)
    train(by_hand, mon)
    session = gg.autowatch(console=False)
    try:
        train(classifier())
        hand = [(f.kind, f.step, f.message) for f in mon.findings]
        auto = [(f.kind, f.step, f.message) for f in session.findings]
        assert any("ln 10, inferred from the output width" in m for _, _, m in hand), hand
        assert sorted(auto) == sorted(hand)
    finally:
        session.close()
        mon.close()


def test_autowatch_close_undoes_every_hook_and_patch() -> None:
    from torch.nn.modules import module as module_mod
    from torch.optim import optimizer as optimizer_mod

    before = (torch.autograd.backward, torch.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grad_value_,
              len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks),
              len(optimizer_mod._global_optimizer_pre_hooks), len(optimizer_mod._global_optimizer_post_hooks))
    model = _mlp()
    session = gg.autowatch(console=False, guard=True)
    _train(model, 4)
    opt_steps = session.targets[0].optimizers[0]
    assert "step" in vars(opt_steps)  # --guard replaced the instance's step
    session.close()
    after = (torch.autograd.backward, torch.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grad_value_,
             len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks),
             len(optimizer_mod._global_optimizer_pre_hooks), len(optimizer_mod._global_optimizer_post_hooks))
    assert after == before
    assert "step" not in vars(opt_steps)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())  # type: ignore[attr-defined]
    assert session.targets[0].guard is not None and session.targets[0].guard.applied == 4


def test_autowatch_guard_skips_a_nan_step_from_the_first_step_on() -> None:
    model = _mlp()
    session = gg.autowatch(console=False, guard=True)
    try:
        _train(model, 6, nan_at=0)  # the very first step: guarded from inside the optimizer's pre-hook
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
        guard = session.targets[0].guard
        assert guard is not None and (guard.skipped, guard.applied) == (1, 5)
    finally:
        session.close()


def test_autowatch_rejects_bad_options() -> None:
    with pytest.raises(gg.InputError, match="guard='yes' must be True or False"):
        gg.autowatch(guard="yes")  # type: ignore[arg-type]
    with pytest.raises(gg.ConfigError, match="log_every"):
        gg.autowatch(log_every=0)


def test_an_internal_error_never_breaks_the_program(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def broken(self: gg.Monitor, loss: object = None) -> None:
        raise RuntimeError("simulated monitor bug")

    torch.manual_seed(0)
    reference = _mlp()
    _train(reference, 5)
    monkeypatch.setattr(gg.Monitor, "step", broken)
    torch.manual_seed(0)
    model = _mlp()
    session = gg.autowatch(console=True)
    try:
        _train(model, 5)  # trains to the end, with the same result as unwatched
    finally:
        session.close()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    err = capsys.readouterr().err
    assert err.count("stopped watching after an internal error (RuntimeError: simulated monitor bug)") == 1


def test_autowatch_finds_two_models_by_their_program_names() -> None:
    gen_net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    disc_net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt_g = torch.optim.Adam(gen_net.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc_net.parameters(), lr=1e-3)
    session = gg.autowatch(console=False)
    try:
        with torch.no_grad():
            disc_net(torch.randn(2, 4))  # a sanity-check forward before training: not yet a training call
        d_losses = []
        for _ in range(6):
            fake = gen_net(torch.randn(16, 4))
            d_loss = F.softplus(-disc_net(torch.randn(16, 4))).mean() + F.softplus(disc_net(fake.detach())).mean()
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            d_losses.append(d_loss.item())
            g_loss = F.softplus(-disc_net(fake)).mean()  # also reaches disc_net's parameters
            opt_g.zero_grad()
            g_loss.backward()
            opt_g.step()
        named = {t.name: t for t in session.targets}
        assert set(named) == {"gen_net", "disc_net"}
        assert named["disc_net"].model is disc_net and named["gen_net"].model is gen_net
        assert named["disc_net"].optimizers == [opt_d] and named["gen_net"].optimizers == [opt_g]
        # Each optimizer step is one step of its model, recorded with the loss of that model's backward.
        history = named["disc_net"].monitor.history
        assert [r["loss"] for r in history] == pytest.approx(d_losses, rel=1e-6)
        assert named["gen_net"].monitor.steps == 6
    finally:
        session.close()


def test_guard_keeps_an_lr_schedulers_own_schedule() -> None:
    import warnings

    def train(session: bool) -> tuple[list[float], nn.Module]:
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)  # wraps opt.step before the guard does
        watched = gg.autowatch(console=False, guard=True) if session else None
        lrs = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "optimizer.step() has been overridden" from the scheduler
            for _ in range(10):
                loss = model(torch.randn(8, 6)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                lrs.append(sched.get_last_lr()[0])
        if watched is not None:
            watched.close()
        return lrs, model

    (lrs_plain, plain), (lrs_guarded, guarded) = train(False), train(True)
    assert lrs_guarded == lrs_plain
    for a, b in zip(guarded.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)  # a healthy run's updates are its own, bit for bit


def test_guard_without_an_optimizer_says_so_and_only_monitors(capsys: pytest.CaptureFixture[str]) -> None:
    def train(model: nn.Module) -> None:  # hand-written SGD, as in the word-language-model example
        gen = torch.Generator().manual_seed(2)
        for _ in range(5):
            model.zero_grad()
            model(torch.randn(8, 6, generator=gen)).pow(2).mean().backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.1)

    torch.manual_seed(0)
    reference = _mlp()
    train(reference)
    torch.manual_seed(0)
    model = _mlp()
    session = gg.autowatch(guard=True)
    try:
        train(model)
        (target,) = session.targets
        assert target.guard is None and target.monitor.steps == 5  # each backward pass is a step
    finally:
        session.close()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    assert "--guard needs an optimizer step to guard, so this run is only monitored" in capsys.readouterr().err


def test_owner_is_the_smallest_called_module_owning_most_trained_parameters() -> None:
    from gradguard.attach.discover import owner

    gen_net, disc_net = _mlp(), _mlp()
    both = nn.ModuleDict({"g": gen_net, "d": disc_net})
    params_d = list(disc_net.parameters())
    # Reference: brute force over the candidates, by the rule written out.
    for candidates in ([both, gen_net, disc_net], [gen_net, both], [both]):
        overlap = {id(m): sum(id(p) in {id(q) for q in params_d} for p in m.parameters()) for m in candidates}
        best = max(candidates, key=lambda m: (overlap[id(m)], -len(list(m.parameters()))))
        assert owner(candidates, params_d) is best
    assert owner([gen_net], params_d) is None
    assert owner([both, disc_net], params_d[:2] + list(gen_net.parameters())) is both  # owns all of them
