"""GradGuardCallback with a real lightning.pytorch.Trainer on CPU, compared with plain training loops."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")

import gradguard as gg  # noqa: E402
from gradguard.errors import ConfigError, InputError  # noqa: E402
from gradguard.integrations.lightning import GradGuardCallback  # noqa: E402
from gradguard.stats import tensor_norms  # noqa: E402

EPOCHS = 3
BATCH = 8
# Lightning 2.6 on torch 2.13 warns about its own use of a deprecated torch pytree API.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")


class Regressor(pl.LightningModule):
    """``net`` trained with SGD on MSE; ``nan_at`` poisons the inputs of that global step."""

    def __init__(self, net: nn.Module, lr: float = 0.1, nan_at: int | None = None, optimizer: Any = None) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.nan_at = nan_at
        self._optimizer = optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.nan_at is not None and self.global_step == self.nan_at:
            x = x * float("nan")
        return self.loss_fn(self.net(x), y)

    def loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.dtype == torch.long:
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._optimizer or torch.optim.SGD(self.parameters(), lr=self.lr)


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def data() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(32, 6, generator=gen), torch.randn(32, 3, generator=gen))


def loader() -> DataLoader:
    return DataLoader(data(), batch_size=BATCH, shuffle=False)


def trainer(tmp_path: Path, callback: GradGuardCallback, logger: Any = False, epochs: int = EPOCHS, **kw: Any) -> Any:
    kw.setdefault("devices", 1)
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        log_every_n_steps=1,
        **kw,
    )


def plain_loop(nan_at: int | None = None, guarded: bool = False) -> tuple[list[list[float]], list[float], nn.Module]:
    """Reference: the same training as a hand-written loop; per-step gradient norms, losses, final model."""
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = gg.Guard(net, opt) if guarded else None
    norms, losses = [], []
    step = 0
    for _ in range(EPOCHS):
        for x, y in loader():
            if step == nan_at:
                x = x * float("nan")
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            norms.append(tensor_norms([p.grad for p in net.parameters()]).tolist())
            losses.append(float(loss.detach()))
            if guard is not None:
                guard.step(loss.detach())
            else:
                opt.step()
            step += 1
    return norms, losses, net


def test_fit_monitors_every_step_like_a_plain_loop_and_logs(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    cb = GradGuardCallback(watch_options={"log_every": 4, "sample_every": 4})
    logger = CSVLogger(str(tmp_path), name="run")
    trainer(tmp_path, cb, logger=logger).fit(Regressor(make_net()), loader())
    ref_norms, ref_losses, _ = plain_loop()
    history = cb.monitor.history
    assert cb.monitor.closed and cb.guard is None
    assert [r["step"] for r in history] == list(range(EPOCHS * 4))
    names = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    for row, norms, loss in zip(history, ref_norms, ref_losses, strict=True):
        assert row["loss"] == pytest.approx(loss, rel=1e-6)
        assert [row[f"grad_norm/{n}"] for n in names] == pytest.approx(norms, rel=1e-5)
        assert row["grad_norm"] == pytest.approx(math.sqrt(sum(v * v for v in norms)), rel=1e-5)
    # The trainer's logger received the same numbers under gradguard/..., at the same steps.
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("gradguard/grad_norm")]
    assert [int(r["step"]) for r in rows] == list(range(EPOCHS * 4))
    assert [float(r["gradguard/grad_norm"]) for r in rows] == pytest.approx([r["grad_norm"] for r in history], rel=1e-6)
    assert any(r.get("gradguard/update_ratio/net.0.weight") for r in rows)


def test_sick_model_produces_the_expected_finding_in_tensorboard(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from zoo import SICK

    setup = SICK["dead_layer"]()
    batches = [setup.batch(i) for i in range(12)]
    module = Regressor(setup.model, optimizer=setup.optimizer)
    cb = GradGuardCallback(watch_options={"log_every": 4, "sample_every": 2, "console": False})
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer(tmp_path, cb, logger=logger, epochs=2).fit(module, DataLoader(batches, batch_size=None))
    assert setup.sick(setup)  # really sick: every unit of act1 outputs exactly 0
    findings = {(f.kind, f.module) for f in cb.monitor.findings}
    assert ("dead_units", "net.act1") in findings, findings
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert "gradguard/grad_norm" in acc.Tags()["scalars"]
    assert len(acc.Scalars("gradguard/grad_norm")) == 24
    assert "findings/dead_units/net.act1/text_summary" in acc.Tags()["tensors"]


def test_guarded_run_survives_injected_nan_like_a_plain_guarded_loop(tmp_path: Path) -> None:
    nan_at = 5
    # Control: without the Guard the NaN step destroys the weights.
    _, _, broken = plain_loop(nan_at=nan_at)
    assert not all(torch.isfinite(p).all() for p in broken.parameters())

    cb = GradGuardCallback(guard={}, watch_options={"log_every": 4, "console": False})
    module = Regressor(make_net(), nan_at=nan_at)
    run = trainer(tmp_path, cb)
    run.fit(module, loader())
    assert run.global_step == EPOCHS * 4
    assert all(torch.isfinite(p).all() for p in module.parameters())
    skips = [e for e in cb.guard.events if e.action == "skip"]
    assert [(e.step, e.reason) for e in skips] == [(nan_at, "nonfinite_loss")]
    assert "nonfinite" in {f.kind for f in cb.monitor.findings}
    # Exactly the weights of the same Guard driving a hand-written loop: one update per applied step,
    # Lightning's own update after the Guard's was a no-op.
    _, _, ref = plain_loop(nan_at=nan_at, guarded=True)
    for p, q in zip(module.net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_option_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="monitor"):
        GradGuardCallback(monitor="yes")
    with pytest.raises(InputError, match="guard"):
        GradGuardCallback(guard=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="optimizer"):
        GradGuardCallback(guard={"optimizer": None})
    cb = GradGuardCallback(guard={}, watch_options={"console": False})
    with pytest.raises(ConfigError, match="gradient_clip_val"):
        trainer(tmp_path, cb, gradient_clip_val=1.0).fit(Regressor(make_net()), loader())


# ------------------------------------------------------------------------- DDP: 2 CPU processes (gloo)


class HalfPoisoned(Regressor):
    """Only rank 1 sees NaN inputs at ``nan_at``: the ranks hold different local data."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.nan_at is not None and self.global_step == self.nan_at and self.global_rank == 1:
            x = x * float("nan")
        return self.loss_fn(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        # Lightning's own sampler always shuffles training data; this one gives rank r the rows r::2 in
        # order, so step k covers rows 8k..8k+7 over both ranks — the single-process batch of 8.
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(data(), shuffle=False)
        return DataLoader(data(), batch_size=BATCH // 2, sampler=sampler)


class DumpingCallback(GradGuardCallback):
    """Writes what each rank's monitor and Guard saw to ``<out>/rank<r>.json`` (spawned ranks cannot return)."""

    def __init__(self, out: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.out = out

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_end(trainer, pl_module)
        import json

        keep = ("step", "loss", "grad_norm")
        result = {
            "history": [{k: v for k, v in r.items() if k.startswith(keep)} for r in self.monitor.history],
            "findings": [f.to_dict() for f in self.monitor.findings],
            "events": [(e.step, e.action, e.reason) for e in self.guard.events],
            "params": [p.detach().reshape(-1).tolist() for p in pl_module.net.parameters()],
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def test_ddp_ranks_agree_with_each_other_and_with_one_process(tmp_path: Path) -> None:
    import json

    nan_at = 5
    cb = DumpingCallback(str(tmp_path), guard={}, watch_options={"log_every": 4})
    run = trainer(tmp_path, cb, strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
    run.fit(HalfPoisoned(make_net(), nan_at=nan_at))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # history, findings, Guard events and weights: identical on both ranks
    ref_norms, ref_losses, ref_net = plain_loop(nan_at=nan_at, guarded=True)
    got = ranks[0]
    assert [(s, a, r) for s, a, r in got["events"] if a == "skip"] == [(nan_at, "skip", "nonfinite_loss")]
    for row, norms, loss in zip(got["history"], ref_norms, ref_losses, strict=True):
        if row["step"] == nan_at:
            assert math.isnan(row["loss"]) and math.isnan(row["grad_norm"])
            continue
        assert row["loss"] == pytest.approx(loss, rel=1e-5)
        assert row["grad_norm"] == pytest.approx(math.sqrt(sum(v * v for v in norms)), rel=1e-5)
    for p_got, p_ref in zip(got["params"], ref_net.parameters(), strict=True):
        torch.testing.assert_close(torch.tensor(p_got), p_ref.detach().reshape(-1), rtol=1e-4, atol=1e-6)


def test_amp_grad_scaler_monitor_sees_unscaled_loss_and_gradients(tmp_path: Path) -> None:
    """Lightning's MixedPrecision with a GradScaler (a CPU one here; CUDA takes the same code path)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scale = 2.0**10
    nan_at = 5
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    cb = GradGuardCallback(guard={"clip": None}, watch_options={"log_every": 4, "console": False})
    module = Regressor(make_net(), nan_at=nan_at)
    trainer(tmp_path, cb, plugins=[plugin]).fit(module, loader())
    ref_norms, ref_losses, _ = plain_loop()
    first = cb.monitor.history[0]
    # Loss divided back by the scale Lightning multiplied it with; gradients already unscaled by Lightning.
    assert first["loss"] == pytest.approx(ref_losses[0], rel=1e-3)
    assert first["grad_norm"] == pytest.approx(math.sqrt(sum(v * v for v in ref_norms[0])), rel=1e-2)
    assert [(e.step, e.reason) for e in cb.guard.events if e.action == "skip"] == [(nan_at, "nonfinite_loss")]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert plugin.scaler.get_scale() == scale / 2  # the scaler saw the overflow once and backed off once


def test_gradient_accumulation_one_monitor_step_per_optimizer_step(tmp_path: Path) -> None:
    cb = GradGuardCallback(watch_options={"log_every": 2, "console": False})
    trainer(tmp_path, cb, accumulate_grad_batches=2).fit(Regressor(make_net()), loader())
    # Reference: two micro-batches of 8, each loss divided by 2 before backward, then one step.
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ref = []
    for _ in range(EPOCHS):
        batches = list(loader())
        for a, b in zip(batches[0::2], batches[1::2], strict=True):
            opt.zero_grad()
            total = 0.0
            for x, y in (a, b):
                loss = nn.functional.mse_loss(net(x), y) / 2
                loss.backward()
                total += float(loss.detach())
            ref.append((total, float(tensor_norms([p.grad for p in net.parameters()]).norm())))
            opt.step()
    history = cb.monitor.history
    assert len(history) == len(ref) == EPOCHS * 2
    for row, (loss, norm) in zip(history, ref, strict=True):
        assert row["loss"] == pytest.approx(loss, rel=1e-6)
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)


def test_guard_without_monitor(tmp_path: Path) -> None:
    cb = GradGuardCallback(monitor=False, guard={"clip": gg.clip.ClipNorm(1.0)})
    module = Regressor(make_net(), nan_at=2)
    trainer(tmp_path, cb, epochs=1).fit(module, loader())
    assert cb.monitor is None and cb.guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_guard_refuses_fused_optimizer_under_amp(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    assert opt._step_supports_amp_scaling  # the optimizer really unscales inside step()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    cb = GradGuardCallback(guard={}, watch_options={"console": False})
    with pytest.raises(ConfigError, match="fused"):
        trainer(tmp_path, cb, plugins=[plugin]).fit(Regressor(net, optimizer=opt), loader())
