"""GradGuardCallback in a real ``transformers.Trainer`` on CPU: tiny random GPT-2 and BERT, nothing downloaded.

The reference for every gradient norm is the Trainer itself: ``clip_grad_norm_`` returns the norm *before*
clipping, which the Trainer logs as ``grad_norm``; a run with ``max_grad_norm=0`` (no clipping) measured by
a plain callback gives the unclipped norm of the first step independently of gradguard's hooks.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")

import gradguard as gg  # noqa: E402
from gradguard.errors import ConfigError, StateError  # noqa: E402
from gradguard.findings import Finding  # noqa: E402
from gradguard.integrations.transformers import (  # noqa: E402
    STATE_FILE,
    GradGuardCallback,
    load_monitor_state,
    monitor_state,
)
from gradguard.sinks.base import Sink  # noqa: E402

pytestmark = pytest.mark.xdist_group("transformers")

VOCAB, SEQ, BATCH = 64, 8, 4
#: The sick runs' fault: from this optimizer step on, the learning rate is multiplied by 1000 (SGD 0.1 → 100).
JUMP = 10
SICK_STEPS = JUMP + 4  # >= 10 healthy rows, then 3 degraded steps: the delay the rules are held to


def gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return transformers.BertForSequenceClassification(cfg)


MODELS = {"gpt2": gpt2, "bert": bert}
#: Cross-entropy of the uniform prediction: next token among VOCAB, or one of 2 classes.
CHANCE = {"gpt2": math.log(VOCAB), "bert": math.log(2)}


def chance(kind: str, ga: int) -> float:
    """The step loss of a uniform predictor as Trainer optimizes it. GPT-2 normalises by the step's token count
    (``num_items_in_batch``); BERT accepts that argument but ignores it, so Trainer sums its micro-batch means."""
    return CHANCE[kind] * (ga if kind == "bert" else 1)

#: BERT at its initialisation: the attention query/key gradients are ~1e-5 of the classifier's (the attention
#: logits start near 0), and the depth rule of the vanishing detector reports that as vanishing.


class Tokens(Dataset):
    """Random token sequences; GPT-2 predicts the next token, BERT whether the first token is even."""

    def __init__(self, kind: str, n: int = 256) -> None:
        self.kind = kind
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
        if self.kind == "gpt2":
            return {"input_ids": ids, "labels": ids}
        return {"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids[0] % 2}


class Recorder(Sink):
    """Every finding as the monitor sends it (the callback's ``monitor.findings`` keeps only the newest)."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def on_finding(self, finding: Finding) -> None:
        self.findings.append(finding)


class NormAtPreOptimizerStep(transformers.TrainerCallback):
    """A plain user callback: the global gradient norm as ``on_pre_optimizer_step`` sees it (after the clip)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        sq = sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None)
        self.norms.append(math.sqrt(sq))


class PostClipMonitor(transformers.TrainerCallback):
    """What a user gets by stepping a monitor in ``on_pre_optimizer_step``: the gradients after the clip."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.monitor = gg.watch(model, console=False)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.monitor.step()


@dataclass
class Run:
    callback: GradGuardCallback
    trainer: Any
    recorder: Recorder
    post_clip: NormAtPreOptimizerStep
    logs: list[dict[str, Any]] = field(default_factory=list)  # the Trainer's per-step logs, in step order


def bf16_on_cpu() -> None:
    try:
        transformers.TrainingArguments(output_dir="unused", use_cpu=True, bf16=True, report_to=[])
    except (ValueError, ImportError) as exc:  # transformers refuses bf16 where torch has no CPU support
        pytest.skip(f"bf16 on CPU is not supported here: {exc}")


def train(
    kind: str, out: Path, *, steps: int, ga: int = 1, bf16: bool = False, jump: int | None = None,
    max_grad_norm: float = 1.0, save_steps: int | None = None, resume: str | None = None,
    extra: tuple[Any, ...] = (), args_extra: dict[str, Any] | None = None, evaluate_every: int | None = None,
    **watch_options: Any,
) -> Run:
    """Train ``kind`` with SGD(lr=0.1) on Trainer's defaults (clipping to 1.0); ``jump``: the LR × 1000 from there."""
    torch.manual_seed(0)
    model = MODELS[kind]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if jump is None or s < jump else 1000.0)
    recorder = Recorder()
    callback = GradGuardCallback(sinks=[recorder], **watch_options)
    post_clip = NormAtPreOptimizerStep()
    args = transformers.TrainingArguments(
        output_dir=str(out), report_to=[], use_cpu=True, max_steps=steps, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=ga, bf16=bf16,
        max_grad_norm=max_grad_norm, train_sampling_strategy="sequential", disable_tqdm=True,
        log_level="error", seed=0, eval_strategy="steps" if evaluate_every else "no", eval_steps=evaluate_every,
        **(args_extra or {}),
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(kind), callbacks=[callback, post_clip, *extra],
        optimizers=(opt, sched), eval_dataset=Tokens(kind, n=2 * BATCH) if evaluate_every else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    logs = [r for r in trainer.state.log_history if "grad_norm" in r]
    return Run(callback, trainer, recorder, post_clip, logs)


def history_by_step(run: Run) -> dict[int, dict[str, Any]]:
    assert run.callback.monitor is not None
    return {r["step"]: r for r in run.callback.monitor.history}


CASES = [
    pytest.param("gpt2", 1, False, id="gpt2-fp32"),
    pytest.param("gpt2", 2, False, id="gpt2-fp32-accumulate2"),
    pytest.param("gpt2", 1, True, id="gpt2-bf16"),
    pytest.param("gpt2", 2, True, id="gpt2-bf16-accumulate2"),
    pytest.param("bert", 2, False, id="bert-fp32-accumulate2"),
]


@pytest.mark.parametrize(("kind", "ga", "bf16"), CASES)
def test_sick_run_is_seen_before_trainer_clips(tmp_path: Path, kind: str, ga: int, bf16: bool) -> None:
    if bf16:
        bf16_on_cpu()
    extra = (PostClipMonitor(),) if (kind, ga, bf16) == ("gpt2", 1, False) else ()
    run = train(kind, tmp_path / "run", steps=SICK_STEPS, ga=ga, bf16=bf16, jump=JUMP, extra=extra)
    reference = train(kind, tmp_path / "ref", steps=1, ga=ga, bf16=bf16, max_grad_norm=0.0)
    rows = history_by_step(run)
    assert sorted(rows) == list(range(SICK_STEPS))

    # The fault really degraded training: after the jump the loss is over twice that of guessing uniformly,
    # and twice the worst loss before it.
    losses = [r["loss"] for r in run.logs]
    assert max(losses[JUMP:]) > 2 * max(chance(kind, ga), *losses[:JUMP]), losses
    # Trainer clipped: a callback at on_pre_optimizer_step sees norm 1 whenever the true norm exceeded 1.
    for log, seen in zip(run.logs, run.post_clip.norms, strict=True):
        if log["grad_norm"] > 1.0:
            assert seen == pytest.approx(1.0, rel=1e-4)
    assert max(r["grad_norm"] for r in run.logs) > 10.0

    # The main invariant: the monitor records the pre-clip norm and the step's loss, every step.
    for log in run.logs:
        row = rows[log["step"] - 1]  # Trainer logs after global_step += 1
        assert row["grad_norm"] == pytest.approx(log["grad_norm"], rel=1e-5)
        assert row["loss"] == pytest.approx(log["loss"], rel=1e-5)
        assert log["gradguard/grad_norm"] == pytest.approx(log["grad_norm"], rel=1e-5)
    # ... and agrees with an unclipped run, measured without gradguard's hooks.
    assert rows[0]["grad_norm"] == pytest.approx(reference.post_clip.norms[0], rel=1e-5)

    # The healthy phase was silent; the fault is a finding (which one is up to the current rules).
    bad = [f for f in run.recorder.findings if f.rank >= 1]
    early = [f for f in bad if f.step < JUMP]
    assert not early, early
    after = {f.kind for f in bad if f.step >= JUMP}
    assert after & {"exploding", "loss_spike", "nonfinite"}, run.recorder.findings
    final = run.logs[-1]
    assert any(k.startswith("gradguard/finding/") and v >= 1 for k, v in final.items()), final
    if extra:
        # The regression this guards against: stepped after the clip, a monitor sees norm ≤ 1 and finds nothing.
        naive = extra[0].monitor
        assert max(r["grad_norm"] for r in naive.history) == pytest.approx(1.0, rel=1e-4)
        assert not [f for f in naive.findings if f.rank >= 1], naive.findings


@pytest.mark.parametrize(
    ("kind", "ga", "bf16"),
    [pytest.param("bert", 2, False, id="bert"),
     pytest.param("gpt2", 1, True, id="gpt2-bf16")],
)
def test_healthy_run_is_silent(tmp_path: Path, kind: str, ga: int, bf16: bool) -> None:
    if bf16:
        bf16_on_cpu()
    # With evaluations in between: their forwards (no_grad, eval mode) are neither a step nor part of its loss.
    run = train(kind, tmp_path, steps=SICK_STEPS, ga=ga, bf16=bf16, evaluate_every=5)
    assert any("eval_loss" in r for r in run.trainer.state.log_history)
    rows = history_by_step(run)
    assert sorted(rows) == list(range(SICK_STEPS))
    for log in run.logs:
        assert rows[log["step"] - 1]["loss"] == pytest.approx(log["loss"], rel=1e-5)
        assert rows[log["step"] - 1]["grad_norm"] == pytest.approx(log["grad_norm"], rel=1e-5)
    losses = [log["loss"] for log in run.logs]
    assert max(losses) < 2 * chance(kind, ga), losses  # not degraded, by the sick test's measure
    bad = [f for f in run.recorder.findings if f.rank >= 1]
    assert not [f for f in bad if f.kind != "vanishing"], bad
    assert not bad, bad  # BERT's attention queries and keys learn slowly at init: not vanishing


class PoisonWeight(transformers.TrainerCallback):
    """Set one LayerNorm weight to NaN after optimizer step ``at`` (the next forward produces the NaN)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.global_step == self.at:
            with torch.no_grad():
                model.transformer.h[1].ln_2.weight[0] = float("nan")


@pytest.mark.parametrize("ga", [1, 2])
def test_nan_is_traced_to_its_module(tmp_path: Path, ga: int) -> None:
    # The replay that localises a NaN runs inside the end-of-backward callback, with Trainer's inputs.
    run = train("gpt2", tmp_path, steps=3, ga=ga, extra=(PoisonWeight(at=1),))
    nan = [f for f in run.callback.monitor.findings if f.kind == "nonfinite"]
    assert len(nan) == 1 and nan[0].step == 1 and nan[0].severity == "error", nan
    assert nan[0].module == "transformer.h.1.ln_2", nan[0]
    assert run.callback.monitor.history[0]["loss"] == pytest.approx(run.logs[0]["loss"], rel=1e-5)


@pytest.mark.parametrize("reentrant", [False, True], ids=["checkpoint", "checkpoint-reentrant"])
def test_gradient_checkpointing(tmp_path: Path, reentrant: bool) -> None:
    # Recomputed forwards run inside backward (in a nested backward when reentrant): the monitor still steps
    # once per optimizer step, after the complete backward, with the pre-clip norm.
    checkpointing = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": reentrant}}
    run = train("gpt2", tmp_path, steps=3, ga=2, jump=0, args_extra=checkpointing)
    assert run.trainer.model.is_activation_checkpointing
    rows = history_by_step(run)
    assert len(rows) == 3
    for log in run.logs:
        assert rows[log["step"] - 1]["grad_norm"] == pytest.approx(log["grad_norm"], rel=1e-5)
        assert rows[log["step"] - 1]["loss"] == pytest.approx(log["loss"], rel=1e-5)
    assert max(log["grad_norm"] for log in run.logs) > 1.0  # clipped by Trainer, seen unclipped


def _ddp_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    run = train("gpt2", Path(out, "run"), steps=3, ga=2, jump=0)
    rows = history_by_step(run)
    result = {
        "wrapped": type(run.trainer.model_wrapped).__name__,
        "trainer": [(log["grad_norm"], log["loss"]) for log in run.logs],
        "monitor": [(rows[log["step"] - 1]["grad_norm"], rows[log["step"] - 1]["loss"]) for log in run.logs],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_ddp_gradients_are_read_after_the_all_reduce(tmp_path: Path) -> None:
    # The end-of-backward callback re-queues itself behind DDP's reducer: read before it, each rank would
    # record its own local gradient (measured: 1.41 and 1.44 on the two ranks against the averaged 0.96).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_ddp_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["wrapped"] == "DistributedDataParallel"
        for (t_norm, t_loss), (m_norm, m_loss) in zip(r["trainer"], r["monitor"], strict=True):
            assert m_norm == pytest.approx(t_norm, rel=1e-5)
            assert m_loss == pytest.approx(t_loss, rel=1e-5)  # the global loss, the same on both ranks
    assert ranks[0]["monitor"] == ranks[1]["monitor"]


def printed_findings(err: str) -> list[str]:
    """The header of every finding the console sink printed: ``kind at `module` (step N)``."""
    return re.findall(r"^(?:INFO|WARNING|ERROR)\s+(.+? \(step \d+\))", err, flags=re.M)


def test_resume_continues_the_monitor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save = JUMP + 4  # after the finding (3 degraded steps)
    steps = save + 2
    capsys.readouterr()
    full = train("gpt2", tmp_path, steps=steps, jump=JUMP, save_steps=save)
    printed_full = printed_findings(capsys.readouterr().err)
    checkpoint = tmp_path / f"checkpoint-{save}"
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    assert saved["steps"] == save and saved["findings"], saved.keys()

    resumed = train("gpt2", tmp_path, steps=steps, jump=JUMP, save_steps=save, resume=str(checkpoint))
    printed = printed_findings(capsys.readouterr().err)
    mon, ref = resumed.callback.monitor, full.callback.monitor
    # Step numbers continue at global_step and the rows before the checkpoint are back.
    assert mon.steps == steps
    a, b = history_by_step(resumed), history_by_step(full)
    assert sorted(a) == list(range(steps))
    for s in range(steps):
        assert a[s]["grad_norm"] == pytest.approx(b[s]["grad_norm"], rel=1e-5)
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-5)
    # The same findings as the uninterrupted run; on stderr exactly what that run printed after the checkpoint.
    assert {(f.kind, f.module, f.severity) for f in mon.findings} == {
        (f.kind, f.module, f.severity) for f in ref.findings
    }
    assert any(int(h.rsplit(" ", 1)[1][:-1]) < save for h in printed_full), printed_full
    assert printed == [h for h in printed_full if int(h.rsplit(" ", 1)[1][:-1]) >= save], (printed, printed_full)
    assert all(f.step >= save for f in resumed.recorder.findings), resumed.recorder.findings


def test_monitor_state_round_trip() -> None:
    # The callback saves Monitor.state_dict() next to each checkpoint and loads it into the fresh monitor.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = gg.watch(net, console=False, log_every=4)

    def step(m: gg.Monitor, i: int) -> None:
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss = (net(x) ** 2).mean()
        loss.backward()
        m.step(loss)
        opt.step()

    for i in range(13):
        step(mon, i)
    mon.report(Finding("loss_spike", "", 12, "warning", "a test finding", "none", {"z": torch.tensor(7.0)}))
    state = json.loads(json.dumps(monitor_state(mon), default=lambda o: o.tolist()))
    fresh = gg.watch(net, console=False, log_every=4)
    load_monitor_state(fresh, state)
    assert fresh.steps == mon.steps == 13
    assert fresh.sample_every.state_dict() == mon.sample_every.state_dict()
    assert [r["step"] for r in fresh.history] == [r["step"] for r in mon.history]
    assert [f.to_dict()["message"] for f in fresh.findings] == [f.to_dict()["message"] for f in mon.findings]
    step(fresh, 13)
    assert fresh.history[-1]["step"] == 13
    with pytest.raises(StateError, match="fresh monitor"):
        load_monitor_state(fresh, state)
    with pytest.raises(ConfigError, match="version"):
        load_monitor_state(gg.watch(net, console=False), {**state, "version": 99})


def test_loss_scaler_is_announced(tmp_path: Path) -> None:
    # fp16 on CUDA: accelerate's optimizer wrapper carries a GradScaler, and the norms the monitor sees are scaled.
    net = torch.nn.Linear(2, 1)
    args = SimpleNamespace(deepspeed=None, output_dir=str(tmp_path))
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    optimizer = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    cb = GradGuardCallback()
    with pytest.warns(UserWarning, match="loss scale"):
        cb.on_train_begin(args, state, None, model=net, optimizer=optimizer)
    cb.on_train_end(args, state, None)
    assert cb.monitor is not None and cb.monitor.closed and not net._forward_hooks


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match=r"unknown gg.watch option.*'log_evry'"):
        GradGuardCallback(log_evry=5)
    with pytest.raises(ConfigError, match="console"):
        GradGuardCallback(console="yes")
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    with pytest.raises(ConfigError, match="DeepSpeed"):
        GradGuardCallback().on_train_begin(
            SimpleNamespace(deepspeed="ds.json"), state, None, model=torch.nn.Linear(2, 1)
        )


@pytest.mark.parametrize("ga", [1, 2])
def test_guard_option_rolls_the_sick_run_back_and_keeps_it_trainable(tmp_path: Path, ga: int) -> None:
    steps = JUMP + 10
    bare = train("gpt2", tmp_path / "bare", steps=steps, ga=ga, jump=JUMP, console=False)
    run = train("gpt2", tmp_path / "guard", steps=steps, ga=ga, jump=JUMP, guard=True, console=False)
    healthy = max(log["loss"] for log in bare.logs[:JUMP])
    # The fault really ruins the unguarded run: every loss after the jump is over twice the healthy level.
    assert min(log["loss"] for log in bare.logs[JUMP + 1 :]) > 2 * healthy
    guard = run.callback.guard
    assert guard is not None and guard.rollbacks >= 1, guard.summary()
    assert all(torch.isfinite(p).all() for p in run.trainer.model.parameters())
    # Guarded, the run is back at its healthy level by the end (the Trainer's own loss log).
    assert max(log["loss"] for log in run.logs[-3:]) < 1.1 * healthy, [log["loss"] for log in run.logs]
    assert type(run.trainer.optimizer.optimizer) is torch.optim.SGD  # the Trainer's own optimizer is back


def test_guard_option_leaves_a_healthy_run_bit_identical(tmp_path: Path) -> None:
    bare = train("gpt2", tmp_path / "bare", steps=12, console=False)
    run = train("gpt2", tmp_path / "guard", steps=12, guard=True, console=False)
    assert run.callback.guard is not None and run.callback.guard.summary()["intervened"] == 0
    assert [log["loss"] for log in run.logs] == [log["loss"] for log in bare.logs]
    for a, b in zip(bare.trainer.model.parameters(), run.trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_guard_option_is_checked() -> None:
    with pytest.raises(gg.ConfigError, match="guard="):
        GradGuardCallback(guard="yes")  # type: ignore[arg-type]
