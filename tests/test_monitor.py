"""gg.watch(model): statistics against naive per-tensor references, hook hygiene, real-model cases."""

from __future__ import annotations

import copy
import inspect
import math
from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard.monitor.activations import SUMMARY_SAMPLE
from gradguard.sinks import Sink

RTOL = 1e-5


def small_mlp(inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            fc0=nn.Linear(6, 16),
            act0=nn.ReLU(inplace=inplace),
            fc1=nn.Linear(16, 8),
            act1=nn.Tanh(),
            fc2=nn.Linear(8, 3),
        )
    )


def data(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)


def test_param_stats_match_naive_reference() -> None:
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = gg.watch(model, log_every=4, sample_every=3, console=False)
    ref: list[dict[str, float]] = []
    prev: dict[str, Tensor] = {}
    for step in range(11):
        x, y = data(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.step(loss)
        total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters()))
        row = {"loss": float(loss.detach()), "grad_norm": total}
        for name, p in model.named_parameters():
            row[f"grad_norm/{name}"] = float(p.grad.norm())
            row[f"grad_max/{name}"] = float(p.grad.abs().max())
            row[f"weight_norm/{name}"] = float(p.detach().norm())
            if name in prev:
                row[f"update_ratio/{name}"] = float((p.detach() - prev[name]).norm() / p.detach().norm())
            prev[name] = p.detach().clone()
        ref.append(row)
        opt.step()
    hist = mon.history
    assert [r["step"] for r in hist] == list(range(11))
    for step, (got, want) in enumerate(zip(hist, ref, strict=True)):
        assert got["loss"] == pytest.approx(want["loss"], rel=RTOL)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)
        for name, _ in model.named_parameters():
            assert got[f"grad_norm/{name}"] == pytest.approx(want[f"grad_norm/{name}"], rel=RTOL)
            assert got[f"nonfinite/{name}"] == 0.0
            if step % 3 == 0:  # sampled (detail) steps
                assert got[f"grad_max/{name}"] == pytest.approx(want[f"grad_max/{name}"], rel=RTOL)
                assert got[f"weight_norm/{name}"] == pytest.approx(want[f"weight_norm/{name}"], rel=RTOL)
                if step > 0:
                    assert got[f"update_ratio/{name}"] == pytest.approx(want[f"update_ratio/{name}"], rel=1e-4)
            else:
                assert f"grad_max/{name}" not in got and f"update_ratio/{name}" not in got
    mon.close()


def test_activation_stats_match_naive_reference() -> None:
    model = small_mlp()
    outputs: dict[str, list[Tensor]] = {}
    for name, m in model.named_children():
        m.register_forward_hook(lambda mod, a, o, name=name: outputs.setdefault(name, []).append(o.detach().clone()))
    mon = gg.watch(model, sample_every=2, console=False)
    for step in range(5):
        x, y = data(step)
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        mon.step()
    hist = mon.history
    for step in (0, 2, 4):
        for name, outs in outputs.items():
            o = outs[step]
            assert o.numel() <= SUMMARY_SAMPLE  # small enough to be summarised exactly
            row = hist[step]
            assert row[f"act/{name}/mean"] == pytest.approx(float(o.mean()), rel=1e-4, abs=1e-6)
            assert row[f"act/{name}/std"] == pytest.approx(float(o.std(unbiased=False)), rel=1e-4)
            assert row[f"act/{name}/frac_zero"] == pytest.approx(float((o == 0).float().mean()), abs=1e-7)
            assert row[f"act/{name}/numel"] == o.numel()
        t = outputs["act1"][step]
        assert hist[step]["act/act1/frac_saturated"] == pytest.approx(float((t.abs() > 0.99).float().mean()), abs=1e-7)
    assert "act/fc0/mean" not in hist[1]  # not a sampled step
    mon.close()


def test_history_has_every_parameter_and_loss_none_without_loss() -> None:
    model = small_mlp()
    mon = gg.watch(model, console=False)
    x, y = data(0)
    nn.functional.mse_loss(model(x), y).backward()
    mon.step()
    (row,) = mon.history
    assert row["loss"] is None
    for name, _ in model.named_parameters():
        assert f"grad_norm/{name}" in row
    mon.close()


def _train_pair(inplace: bool, steps: int = 12) -> tuple[nn.Module, nn.Module, gg.Monitor]:
    torch.manual_seed(1)
    a = small_mlp(inplace)
    b = copy.deepcopy(a)
    mon = gg.watch(b, sample_every=2, console=False)
    oa = torch.optim.Adam(a.parameters(), 1e-2)
    ob = torch.optim.Adam(b.parameters(), 1e-2)
    for step in range(steps):
        x, y = data(step)
        for m, o, mo in ((a, oa, None), (b, ob, mon)):
            o.zero_grad()
            out = m(x)
            nn.functional.mse_loss(out, y).backward()
            if mo is not None:
                mo.step()
            o.step()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa.grad, pb.grad)
            assert torch.equal(pa, pb)
    return a, b, mon


@pytest.mark.parametrize("inplace", [False, True])
def test_watched_training_is_bit_identical_and_close_removes_every_hook(inplace: bool) -> None:
    a, b, mon = _train_pair(inplace)
    assert mon.history  # it recorded something
    mon.close()
    for m in b.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    x, y = data(99)
    outs = []
    for m in (a, b):
        m.zero_grad()
        out = m(x)
        nn.functional.mse_loss(out, y).backward()
        outs.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for ga, gb in zip(outs[0][1], outs[1][1], strict=True):
        assert torch.equal(ga, gb)


def test_inplace_relu_stats_see_the_pre_activation() -> None:
    """With ReLU(inplace=True) the Linear's summary must be taken before the ReLU overwrites it."""
    model = small_mlp(inplace=True)
    seen: list[Tensor] = []
    model.fc0.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    mon = gg.watch(model, console=False)
    x, y = data(0)
    nn.functional.mse_loss(model(x), y).backward()
    mon.step()
    row = mon.history[0]
    assert (seen[0] < 0).any()
    assert row["act/fc0/mean"] == pytest.approx(float(seen[0].mean()), rel=1e-4, abs=1e-6)
    assert row["act/fc0/frac_zero"] == 0.0
    assert row["act/act0/frac_zero"] == pytest.approx(float((seen[0] <= 0).float().mean()), abs=1e-7)
    mon.close()


class Shared(nn.Module):
    """One Linear applied twice per forward (shared weights), plus a frozen and an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6)
        self.unused = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(torch.relu(self.block(self.frozen(x)))))


def test_shared_module_frozen_and_unused_parameters() -> None:
    model = Shared()
    mon = gg.watch(model, console=False)
    x, y = data(0)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    mon.step(loss)
    (row,) = mon.history
    assert "grad_norm/frozen.weight" not in row and "grad_norm/unused.weight" not in row
    want = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.grad is not None))
    assert row["grad_norm"] == pytest.approx(want, rel=RTOL)
    assert row["grad_norm/block.weight"] == pytest.approx(float(model.block.weight.grad.norm()), rel=RTOL)
    assert row["act/block/numel"] == 2 * 12 * 6  # both calls pooled
    assert not [f for f in mon.findings if f.rank >= 1]
    mon.close()


def test_eval_passes_are_not_mixed_into_training_stats() -> None:
    model = small_mlp()
    mon = gg.watch(model, console=False)
    with torch.no_grad():
        model(torch.full((50, 6), 1e4))  # eval under no_grad on a sampled step, before the training forward
    model.eval()
    model(torch.full((40, 6), 1e4))  # eval() mode with grad enabled: not a training pass either
    model.train()
    x, y = data(0)
    nn.functional.mse_loss(model(x), y).backward()
    mon.step()
    row = mon.history[0]
    assert row["act/fc0/numel"] == 12 * 16
    assert abs(row["act/fc0/mean"]) < 10
    mon.close()


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru", "gg_lstm"])
def test_recurrent_time_profiles_match_reference(kind: str) -> None:
    torch.manual_seed(0)
    rnn: nn.Module = {
        "rnn": lambda: nn.RNN(3, 5, batch_first=True),
        "lstm": lambda: nn.LSTM(3, 5, num_layers=2, batch_first=True),
        "gru": lambda: nn.GRU(3, 5, batch_first=True),
        "gg_lstm": lambda: gg.nn.LSTM(3, 5, num_layers=2, activation="relu"),
    }[kind]()
    model = nn.ModuleDict({"rnn": rnn})
    mon = gg.watch(model, console=False)
    x = torch.randn(4, 7, 3)
    out, _ = model["rnn"](x)
    out.retain_grad()
    (out[:, ::2] ** 2).sum().backward()  # odd time steps get no direct gradient
    mon.step()
    prof = mon.time_profiles
    want_fwd = out.detach().pow(2).mean(dim=(0, 2)).sqrt()
    want_grad = out.grad.pow(2).sum(dim=(0, 2)).sqrt()
    torch.testing.assert_close(prof["forward"]["rnn"], want_fwd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(prof["grad"]["rnn"], want_grad, rtol=1e-5, atol=1e-7)
    names = {n for n, _ in rnn.named_parameters()}
    row = mon.history[0]
    for n in names:
        assert row[f"grad_norm/rnn.{n}"] == pytest.approx(float(dict(rnn.named_parameters())[n].grad.norm()), rel=RTOL)
    mon.close()


def test_reduce_fn_hook_receives_stacked_squared_norms_once_per_fetch() -> None:
    model = small_mlp()
    calls: list[tuple[int, ...]] = []

    def reduce_fn(block: Tensor) -> Tensor:
        calls.append(tuple(block.shape))
        return block * 4.0  # as if two identical shards were summed twice: norms double

    mon = gg.watch(model, log_every=5, reduce_fn=reduce_fn, console=False)
    norms = []
    for step in range(10):
        x, y = data(step)
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(float(model.fc0.weight.grad.norm()))
        mon.step()
    hist = mon.history
    n_params = len(list(model.parameters()))
    assert calls == [(5, 3 * n_params), (5, 3 * n_params)]
    for row, n in zip(hist, norms, strict=True):
        assert row["grad_norm/fc0.weight"] == pytest.approx(2 * n, rel=RTOL)
    mon.close()


def test_context_manager_and_report() -> None:
    model = small_mlp()
    with gg.watch(model, console=False) as mon:
        f = gg.Finding("loss_spike", "", 3, "warning", "m", "a")
        mon.report(f)
        mon.report(gg.Finding("loss_spike", "", 5, "error", "m2", "a"))
        assert mon.findings == [gg.Finding("loss_spike", "", 5, "error", "m2", "a")]
    assert mon.closed
    with pytest.raises(gg.InputError, match="Finding"):
        mon.report("not a finding")  # type: ignore[arg-type]


def test_summary_lists_layers_and_findings() -> None:
    model = small_mlp()
    mon = gg.watch(model, console=False)
    for step in range(3):
        x, y = data(step)
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.step(loss)
    mon.report(gg.Finding("exploding", "fc1", 2, "warning", "grew ×12", "gg.clip.ClipNorm(1.0)"))
    summary = mon.summary()
    text = str(summary)
    for name, _ in model.named_parameters():
        assert name in text
    assert "grew ×12" in text and "3 steps" in text
    # The same numbers as a dict: the latest gradient norm is the history's, the median over 3 steps.
    assert summary["steps"] == 3 and list(summary["parameters"]) == [n for n, _ in model.named_parameters()]
    norms = [r["grad_norm/fc0.weight"] for r in mon.history]
    assert summary["parameters"]["fc0.weight"]["grad_norm"] == pytest.approx(norms[-1], rel=1e-12)
    assert summary["parameters"]["fc0.weight"]["median_grad_norm"] == pytest.approx(sorted(norms)[1], rel=1e-12)
    assert [f.message for f in summary["findings"]] == ["grew ×12"]
    mon.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving a model between devices needs a GPU")
def test_model_moved_between_devices() -> None:
    model = small_mlp()
    mon = gg.watch(model, console=False)
    for step in range(4):
        dev = "cuda" if step >= 2 else "cpu"
        model.to(dev)
        x, y = data(step)
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x.to(dev)), y.to(dev))
        loss.backward()
        mon.step(loss)
    hist = mon.history
    assert [r["step"] for r in hist] == [0, 1, 2, 3]
    assert hist[3]["grad_norm/fc0.weight"] == pytest.approx(float(model.fc0.weight.grad.norm()), rel=1e-4)
    mon.close()


# ----------------------------------------------------------------------------- bad input
def test_watch_rejects_non_module_and_parameterless_model() -> None:
    with pytest.raises(gg.InputError, match=r"nn\.Module.*list"):
        gg.watch([nn.Linear(2, 2)])  # type: ignore[arg-type]
    with pytest.raises(gg.ConfigError, match="no parameters"):
        gg.watch(nn.ReLU())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"log_every": 0}, r"log_every=0 is out of range; allowed: \[1, inf\)"),
        ({"sample_every": 2.5}, "sample_every=2.5 must be an integer"),
        ({"window": 3}, "window=3 is out of range"),
        ({"console": "yes"}, "console='yes' must be True, False or None"),
        ({"sinks": [object()]}, "Sink"),
    ],
)
def test_invalid_options_name_value_and_allowed(options: dict, match: str) -> None:
    with pytest.raises(gg.GradGuardError, match=match):
        gg.watch(small_mlp(), **options)


def test_unknown_option_is_a_type_error_of_the_explicit_signature() -> None:
    with pytest.raises(TypeError, match="colour"):
        gg.watch(small_mlp(), colour=True)  # type: ignore[call-arg]
    params = inspect.signature(gg.watch).parameters
    assert all(p.kind is p.KEYWORD_ONLY for n, p in params.items() if n != "model")
    assert list(params)[1:] == [n for n in inspect.signature(gg.Monitor).parameters if n != "model"]


def test_bad_loss_values() -> None:
    model = small_mlp()
    mon = gg.watch(model, console=False)
    x, y = data(0)
    loss = nn.functional.mse_loss(model(x), y, reduction="none")
    loss.mean().backward()
    with pytest.raises(gg.InputError, match=r"scalar.*shape \(12, 3\)"):
        mon.step(loss)
    with pytest.raises(gg.InputError, match="float"):
        mon.step(1.5)  # type: ignore[arg-type]
    mon.close()


def test_step_without_gradients_warns_and_is_no_finding() -> None:
    # A usage mistake, not a pathology: never a `vanishing` finding (or any other kind).
    model = small_mlp()
    mon = gg.watch(model, console=False)
    with pytest.warns(RuntimeWarning, match=r"no gradient.*loss\.backward\(\)"):
        mon.step()
    assert mon.findings == [] and mon.steps == 1
    mon.close()


def test_step_count_is_a_deprecated_alias_of_steps() -> None:
    model = small_mlp()
    mon = gg.watch(model, console=False)
    for step in range(2):
        x, y = data(step)
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        mon.step()
    with pytest.warns(DeprecationWarning, match="Monitor.steps"):
        assert mon.step_count == mon.steps == 2
    mon.close()


def test_step_after_close_raises_state_error() -> None:
    model = small_mlp()
    mon = gg.watch(model, console=False)
    mon.close()
    mon.close()  # idempotent
    with pytest.raises(gg.StateError, match="after close"):
        mon.step()


def test_regression_exit_without_close_does_not_abort(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A monitor left armed at interpreter exit once ran torch ops in __del__, and torch aborted."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import torch, gradguard as gg\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))\n"
        "mon = gg.watch(m, console=False)\n"
        "m(torch.randn(3, 4)).sum().backward()\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_nonfinite_counts_are_exact_on_a_flagged_step() -> None:
    model = small_mlp()
    mon = gg.watch(model, console=False, replay=False)
    x, y = data(0)
    nn.functional.mse_loss(model(x), y).backward()
    with torch.no_grad():
        model.fc1.weight.grad[0, :5] = math.nan
        model.fc1.weight.grad[3, 2] = math.inf
    want = int((~torch.isfinite(model.fc1.weight.grad)).sum())
    mon.step()
    row = mon.history[0]
    assert want == 6
    assert row["nonfinite/fc1.weight"] == want
    assert row["nonfinite/fc0.weight"] == 0.0
    assert not math.isfinite(row["grad_norm/fc1.weight"])
    mon.close()


def test_large_outputs_are_summarised_on_a_sample_within_its_standard_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(64, 256), relu=nn.ReLU(), head=nn.Linear(256, 1)))
    outs: list[Tensor] = []
    model.relu.register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    mon = gg.watch(model, console=False)
    model(torch.randn(128, 64)).sum().backward()
    mon.step()
    row = mon.history[0]
    o = outs[0]
    assert o.numel() == 32 * SUMMARY_SAMPLE
    frac = float((o == 0).float().mean())
    se = math.sqrt(frac * (1 - frac) / SUMMARY_SAMPLE)
    assert abs(row["act/relu/frac_zero"] - frac) < 4 * se
    assert abs(row["act/relu/mean"] - float(o.mean())) < 4 * float(o.std()) / math.sqrt(SUMMARY_SAMPLE)
    assert row["act/relu/numel"] == SUMMARY_SAMPLE
    mon.close()


def test_norms_see_gradients_changed_after_backward_and_accumulated_ones() -> None:
    """A gradient edited after backward (clipping, unscaling) or accumulated over several backward passes
    must be measured as it is at ``mon.step``. (Regression guard for an experiment that took the norms in
    post-accumulate-grad hooks: no faster end to end, and wrong without version checks.)"""
    model = small_mlp()
    mon = gg.watch(model, console=False)
    x, y = data(0)
    nn.functional.mse_loss(model(x), y).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    mon.step()
    nn.functional.mse_loss(model(x), y).backward()  # accumulates onto the clipped gradients
    nn.functional.mse_loss(model(2 * x), y).backward()
    want = float(model.fc0.weight.grad.norm())
    mon.step()
    hist = mon.history
    assert hist[0]["grad_norm"] == pytest.approx(0.1, rel=1e-5)
    assert hist[1]["grad_norm/fc0.weight"] == pytest.approx(want, rel=RTOL)
    mon.close()
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


def _cnn() -> tuple[nn.Module, Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    return model, torch.randn(6, 3, 8, 8)


def _transformer() -> tuple[nn.Module, Tensor]:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, num_layers=2), nn.Linear(16, 4)), torch.randn(5, 7, 16)


@pytest.mark.parametrize("build", [_cnn, _transformer], ids=["cnn_bn_inplace", "transformer"])
def test_real_architectures_train_watched_without_errors_or_warnings(build) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model, x = build()
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    mon = gg.watch(model, console=False, sample_every=2)
    for _ in range(6):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        mon.step(loss)
        opt.step()
    hist = mon.history
    assert len(hist) == 6 and all(math.isfinite(r["grad_norm"]) for r in hist)
    assert not [f for f in mon.findings if f.rank >= 1]
    mon.close()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    model.eval()
    twin.load_state_dict(model.state_dict())
    twin.eval()
    assert torch.equal(model(x), twin(x))


def test_detail_every_step_matches_reference() -> None:
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gg.watch(model, detail_every=1, console=False)
    prev = None
    ratios = []
    for step in range(5):
        x, y = data(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        mon.step()
        w = model.fc1.weight.detach()
        ratios.append(None if prev is None else float((w - prev).norm() / w.norm()))
        prev = w.clone()
        opt.step()
    hist = mon.history
    assert "update_ratio/fc1.weight" not in hist[0]
    for row, want in zip(hist[1:], ratios[1:], strict=True):
        assert row["update_ratio/fc1.weight"] == pytest.approx(want, rel=1e-4)
        assert row["grad_max/fc1.weight"] > 0
    assert "act/fc1/mean" not in hist[1]  # activations still follow sample_every
    mon.close()


def test_a_second_report_of_the_same_event_does_not_replace_a_more_severe_one() -> None:
    mon = gg.watch(small_mlp(), console=False)
    diagnosis = gg.Finding("nonfinite", "", 4, "error", "NaN born in the input batch", "clean the data", {})
    mon.report(diagnosis)
    mon.report(gg.Finding("nonfinite", "", 4, "warning", "Guard skipped step 4", "nothing", {}))
    assert mon.findings == [diagnosis]
    later = gg.Finding("nonfinite", "", 9, "warning", "Guard skipped step 9", "nothing", {})
    mon.report(later)  # a new event: the newest state wins
    assert mon.findings == [later]
    mon.close()


def test_history_is_bounded_recent_in_full_older_evenly_downsampled_nan_steps_kept() -> None:
    limit, steps, bad = 20, 300, 57
    model = small_mlp()
    mon = gg.watch(model, console=False, history_limit=limit)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sizes = []
    for step in range(steps):
        x, y = data(step % 7)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == bad:
            model.fc0.weight.grad[0, 0] = math.nan  # one non-finite step, not applied
        mon.step(loss)
        if step != bad:
            opt.step()
        if step % 50 == 49:
            sizes.append(len(mon.history))
    hist = mon.history
    assert max(sizes) <= 2 * limit  # flat: never more than the bound, however long the run
    got = [r["step"] for r in hist]
    assert got == sorted(got) and got[-limit:] == list(range(steps - limit, steps))  # the newest in full
    old = [s for s in got[:-limit] if s != bad]
    stride = old[1] - old[0]
    assert stride > 1 and all(s % stride == 0 for s in old) and old[0] == 0  # evenly spread from the start
    assert len(old) >= limit // 2
    assert bad in got  # the non-finite step survives downsampling
    row = hist[1]
    # Older rows keep the global scalars only; the non-finite step and the recent ones keep every column.
    assert row["step"] == stride and row["grad_norm"] > 0 and set(row) == {"step", "loss", "grad_norm"}
    assert "grad_norm/fc0.weight" in hist[got.index(bad)] and "grad_norm/fc0.weight" in hist[-limit]
    with pytest.raises(gg.ConfigError, match="history_limit"):
        gg.watch(model, console=False, history_limit=0)
    mon.close()


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_dead_units_after_a_convolution_are_its_channels(conv: type[nn.Module]) -> None:
    # One of 4 output channels can never fire (weights 0, bias -1): the ReLU after the convolution has 4
    # units (channels), whatever the spatial size, so the dead share is 1 of 4 (a 1-d conv's output
    # (N, C, L) has its units in dim 1 too, not in its last dim).
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(1))
    shape = (8, 2, 12) if conv is nn.Conv1d else (8, 2, 12, 12)
    model(torch.randn(shape))
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[0].bias[1] = -1.0
    mon = gg.watch(model, console=False, sample_every=1)
    for step in range(6):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        model.zero_grad()
        model(x).pow(2).mean().backward()
        mon.step()
    dead = [f for f in mon.findings if f.kind == "dead_units"]
    assert [f.module for f in dead] == ["1"] and "1 of 4 units" in dead[0].message
    mon.close()


def test_sampling_schedule_dense_start_sparse_steady_state_and_alerts() -> None:
    from gradguard.monitor import Sampling

    def fired(s: Sampling, steps: int, alert_at: tuple[int, ...] = ()) -> list[int]:
        out = []
        for step in range(steps):
            if s(step):
                out.append(step)
                s.taken(step)
            if step in alert_at:
                s.alert(step + 1, "test")
        return out

    assert fired(Sampling(7), 30) == [0, 7, 14, 21, 28]  # a fixed period: as every(7)
    assert fired(Sampling(7), 30, alert_at=(3,)) == [0, 7, 14, 21, 28]  # alerts do not move a fixed period
    assert fired(Sampling(10, 50, start=30, hold=20), 200) == [0, 10, 20, 30, 80, 130, 180]
    # An alert raised after step 100 for the step to come (101, whose sampling was decided already): the next
    # sampled step is max(101 + 1, 80 + 10) = 102, then every 10 steps until 101 + 20, then sparse again.
    assert fired(Sampling(10, 50, start=30, hold=20), 200, alert_at=(100,)) == [0, 10, 20, 30, 80, 102, 112, 122,
                                                                                  172]
    s = Sampling(10, 50, start=30, hold=20)
    fired(s, 105, alert_at=(100,))
    t = Sampling(10, 50, start=30, hold=20)
    t.load_state_dict(s.state_dict())
    assert [x for x in range(105, 200) if t(x) and (t.taken(x) or True)] == [112, 122, 172]
    with pytest.raises(gg.ConfigError, match="sparse=5"):
        Sampling(10, 5)


def test_default_schedule_goes_sparse_and_a_layer_that_dies_later_is_found_within_the_documented_delay() -> None:
    # docs/monitor.md: sampled-step evidence needing k = 5 samples (dead units) is visible at most
    # 49 + 10 (k - 1) steps after it starts, plus up to log_every - 1 = 9 steps until the fetch.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    gg.init.apply(model, "he_normal")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen: list[gg.Finding] = []

    class Record(Sink):
        def on_finding(self, finding: gg.Finding) -> None:
            seen.append(finding)  # the step each finding was first reported (or changed)

    mon = gg.watch(model, console=False, sinks=[Record()])
    die, steps = 300, 420
    sampled = []
    for step in range(steps):
        if step == die:
            with torch.no_grad():
                model[2].bias.fill_(-100.0)  # every unit of the second ReLU is off from now on
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), x[:, :1])
        loss.backward()
        if mon._tap.armed:
            sampled.append(step)
        mon.step(loss)
        opt.step()
        if step < die:
            assert not [f for f in mon.findings if f.kind == "dead_units" and f.rank >= 1]
    assert len([s for s in sampled if s < die]) < die // 10  # sparser than every 10th step before the fault
    dead = [f for f in seen if (f.kind, f.module) == ("dead_units", "3") and f.rank >= 1]
    assert dead and dead[0].step <= die + 49 + 10 * 4 + 9, (dead, sampled)
    mon.close()
