"""What gg.probe measures, against plain-autograd references; the model is left exactly as it was."""

from __future__ import annotations

import html
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg
from gradguard.errors import ConfigError, InputError, StateError
from gradguard.nn import LSTM as GGLSTM
from gradguard.preflight import projection_loss
from gradguard.stats import activation_summary


class Net(nn.Module):
    """Registration order differs from execution order; one layer is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(16, 3)
        self.act = nn.Tanh()
        self.inp = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x))
        h = self.act(self.mid(h))
        return self.out(h)


def test_rows_follow_execution_order_and_match_autograd() -> None:
    model = Net()
    x = torch.randn(10, 8)
    report = gg.probe(model, x)
    assert [r.label for r in report.layers] == ["inp", "act", "mid", "act#2", "out"]

    # Reference: the same loss with retain_grad on every intermediate output.
    outs: list[torch.Tensor] = []
    h = model.inp(x)
    outs.append(h)
    h = model.act(h)
    outs.append(h)
    h = model.mid(h)
    outs.append(h)
    h = model.act(h)
    outs.append(h)
    y = model.out(h)
    outs.append(y)
    for t in outs:
        t.retain_grad()
    loss = projection_loss(y)
    loss.backward()
    for row, t, module in zip(report.layers, outs, [model.inp, model.act, model.mid, model.act, model.out],
                              strict=True):
        summary = activation_summary(t, "tanh" if module is model.act else None).tolist()
        got = [row.mean, row.std, row.frac_zero, row.frac_saturated, row.nonfinite, row.numel]
        assert got == pytest.approx(summary, rel=1e-6, abs=1e-7)
        assert row.grad_norm == pytest.approx(t.grad.norm().item(), rel=1e-5)
        assert row.grad_rms == pytest.approx(t.grad.norm().item() / math.sqrt(t.numel()), rel=1e-5)
    for name in ("inp", "mid", "out"):
        m = getattr(model, name)
        row = report.layer(name)
        want = math.sqrt(sum(p.grad.norm().item() ** 2 for p in m.parameters()))
        assert row.param_grad_norm == pytest.approx(want, rel=1e-5)
        assert row.param_norm == pytest.approx(math.sqrt(sum(p.norm().item() ** 2 for p in m.parameters())), rel=1e-5)
    rows = report.layers
    assert rows[2].std_gain == pytest.approx(rows[2].std / rows[1].std)
    assert rows[1].grad_gain == pytest.approx(rows[1].grad_rms / rows[2].grad_rms)
    assert math.isnan(report.layer("act").param_grad_norm)
    assert report.loss == pytest.approx(loss.item(), rel=1e-5)


def test_projection_loss_gives_unit_variance_gradient_without_touching_the_rng() -> None:
    y = torch.zeros(200, 50, requires_grad=True)
    state = torch.get_rng_state()
    (g,) = torch.autograd.grad(projection_loss(y, seed=3), y)
    assert torch.equal(torch.get_rng_state(), state)
    assert g.mean().item() == pytest.approx(0.0, abs=0.02)
    assert g.std().item() == pytest.approx(1.0, abs=0.02)
    (g2,) = torch.autograd.grad(projection_loss(y, seed=3), y)
    assert torch.equal(g, g2)


def test_model_state_and_rng_are_exactly_as_before() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)
            self.drop = nn.Dropout(0.5)
            self.lstm = nn.LSTM(6, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            h = self.drop(self.bn(self.lin(x).reshape(b * t, -1))).reshape(b, t, -1)
            out, _ = self.lstm(h)
            return self.head(out[:, -1])

    model = Mixed()
    model.train()
    model.head.eval()  # a mixed mode must come back as it was
    x = torch.randn(7, 5, 4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.lin.bias.grad = None  # and a missing .grad stays missing
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()

    # The probe runs a training-mode forward, which would move the batch-norm statistics.
    report = gg.probe(model, x, time_dim=1, train=True)
    assert report.layers

    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)
    # Sanity: the same forward outside the probe really would have changed the buffers and the RNG.
    model(x)
    assert not torch.equal(model.bn.running_mean, before["bn.running_mean"])
    assert not torch.equal(torch.get_rng_state(), rng)


def test_time_profile_matches_autograd() -> None:
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 2, 3, padding=1))
    x = torch.randn(5, 3, 20)
    report = gg.probe(model, x, time_dim=-1)
    xl = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(projection_loss(model(xl)), xl)
    want = g.norm(dim=(0, 1))
    assert report.time is not None and report.time.time_dim == 2
    torch.testing.assert_close(torch.tensor(report.time.norms), want, rtol=1e-5, atol=0)
    assert report.layer("1").dead_frac == 0.0


def test_dead_channels_of_a_conv1d_counted_by_channel_through_batchnorm() -> None:
    # Conv1d -> BatchNorm1d -> ReLU: the ReLU sees (N, C, L); a unit is a channel (as in the monitor), not
    # a position. One of 4 channels gets a bias of -100 after normalisation: it never fires.
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU())
    with torch.no_grad():
        model[1].bias[0] = -100.0
    x = torch.randn(6, 3, 20)
    y = model(x)
    naive = sum(bool((y[:, c] == 0).all()) for c in range(4)) / 4  # channels that never fire
    assert naive == 0.25
    assert gg.probe(model, x).layer("2").dead_frac == naive


def test_dead_units_after_negative_bias() -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        model[0].bias[:24] = -100.0  # 24 of 32 units can never fire on N(0,1) inputs
    x = torch.randn(64, 8)
    assert ((model[1](model[0](x)) > 0).sum(0) == 0).float().mean().item() == pytest.approx(0.75, abs=0.04)
    report = gg.probe(model, x)
    dead = [f for f in report.findings if f.kind == "dead_units"]
    assert [f.module for f in dead] == ["1"]
    assert report.layer("1").dead_frac == pytest.approx(0.75, abs=0.04)


class _Seq(nn.Module):
    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.rnn.batch_first else out[-1])


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru", "gg_lstm_relu"])
def test_unrolled_hidden_gradients_match_segment_reference(cell: str) -> None:
    """‖∂L/∂h_t‖ from the unroll vs the fused module run in two segments with h_t as a leaf."""
    hidden, steps = 6, 9
    rnn: nn.Module
    if cell.startswith("rnn"):
        rnn = nn.RNN(3, hidden, nonlinearity=cell[4:], batch_first=True)
    elif cell == "lstm":
        rnn = nn.LSTM(3, hidden, batch_first=True)
    elif cell == "gru":
        rnn = nn.GRU(3, hidden, batch_first=True)
    else:
        rnn = GGLSTM(3, hidden, activation="relu")
    model = _Seq(rnn, hidden)
    x = torch.randn(4, steps, 3)
    report = gg.probe(model, x)
    rec = report.recurrent[0]
    assert rec.unroll_error < 1e-5 and rec.note == ""
    for t in (0, 3, steps - 2):
        with torch.no_grad():
            _, state = rnn(x[:, : t + 1])
        if isinstance(state, tuple):
            h0 = state[0].clone().requires_grad_(True)
            out, _ = rnn(x[:, t + 1 :], (h0, state[1]))
        else:
            h0 = state.clone().requires_grad_(True)
            out, _ = rnn(x[:, t + 1 :], h0)
        (g,) = torch.autograd.grad(projection_loss(model.head(out[:, -1])), h0)
        assert rec.hidden_norms[0][t] == pytest.approx(g.norm().item(), rel=1e-4)
        # A many-to-one model sends back only the last step's gradient: both profiles agree.
        assert rec.last_norms[t] == pytest.approx(g.norm().item(), rel=1e-4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.RNN(3, 5, num_layers=2),
        lambda: nn.LSTM(3, 5, num_layers=3, batch_first=True),
        lambda: nn.GRU(3, 5, num_layers=2, batch_first=True, bias=False),
        lambda: GGLSTM(3, 5, num_layers=2, activation="tanh"),
    ],
)
def test_unroll_reproduces_multilayer_and_layouts(make) -> None:  # type: ignore[no-untyped-def]
    rnn = make()
    x = torch.randn(6, 4, 3)
    report = gg.probe(rnn, x)
    rec = report.recurrent[0]
    assert rec.unroll_error < 1e-5
    steps = 4 if rnn.batch_first else 6
    assert rec.steps == steps and len(rec.hidden_norms) == rec.layers and len(rec.hidden_norms[0]) == steps


def test_unbatched_input_and_initial_state() -> None:
    rnn = nn.GRU(3, 5, num_layers=2)
    h0 = torch.randn(2, 5)
    report = gg.probe(rnn, (torch.randn(7, 3), h0))
    assert report.recurrent[0].unroll_error < 1e-5 and report.recurrent[0].steps == 7


def test_bidirectional_is_reported_not_unrolled() -> None:
    report = gg.probe(nn.LSTM(3, 4, bidirectional=True, batch_first=True), torch.randn(2, 5, 3))
    assert "bidirectional" in report.recurrent[0].note and report.recurrent[0].last_norms == []


def test_targets_without_loss_fn() -> None:
    model = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    y_cls = torch.randint(0, 3, (8,))
    report = gg.probe(model, x, targets=y_cls)
    assert report.loss_kind == "cross_entropy"
    assert report.loss == pytest.approx(F.cross_entropy(model(x), y_cls).item(), rel=1e-6)
    y_reg = torch.randn(8, 3)
    report = gg.probe(model, x, targets=y_reg)
    assert report.loss_kind == "mse" and report.loss == pytest.approx(F.mse_loss(model(x), y_reg).item(), rel=1e-6)
    report = gg.probe(model, x, targets=y_reg, loss_fn=lambda out, t: (out - t).abs().mean())
    assert report.loss_kind == "loss_fn"
    with pytest.raises(ConfigError, match="do not match"):
        gg.probe(model, x, targets=torch.randn(8, 5))


def test_public_probe_is_the_function_not_a_module() -> None:
    # The package is gradguard.preflight, so importing it never shadows gg.probe (docs/probe.md, Layout).
    import gradguard.preflight

    assert callable(gg.probe) and gg.probe is gradguard.preflight.probe
    from gradguard import probe

    assert probe is gg.probe


def test_positional_targets_and_loss_fn_are_deprecated_but_work() -> None:
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    l1 = lambda out, t: (out - t).abs().mean()  # noqa: E731
    with pytest.warns(DeprecationWarning, match="targets=...") as caught:
        old = gg.probe(model, x, y, l1)
    assert caught[0].filename == __file__  # the warning points at the caller
    new = gg.probe(model, x, targets=y, loss_fn=l1)
    assert old.loss_kind == new.loss_kind == "loss_fn"
    assert old.loss == new.loss == pytest.approx(float((model(x) - y).abs().mean().detach()), rel=1e-6)
    with pytest.raises(InputError, match="positional"):
        gg.probe(model, x, y, l1, 3)


def test_bad_arguments_raise_specific_errors() -> None:
    model = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with pytest.raises(InputError, match=r"nn\.Module"):
        gg.probe("model", x)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="inputs"):
        gg.probe(model, 3.0)
    with pytest.raises(ConfigError, match="time_dim=5"):
        gg.probe(model, x, time_dim=5)
    with pytest.raises(InputError, match="scalar"):
        gg.probe(model, x, loss_fn=lambda out: out)
    with pytest.raises(InputError, match="targets"):
        gg.probe(model, x, targets=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed"):
        gg.probe(model, x, seed=-1)
    frozen = nn.Embedding(5, 2).requires_grad_(False)  # integer input, no trainable parameter
    with pytest.raises(StateError, match="nothing to probe"):
        gg.probe(frozen, torch.randint(0, 5, (3, 4)))
    # A failed call must still restore the model.
    model.eval()
    with pytest.raises(InputError):
        gg.probe(model, x, loss_fn=lambda out: out)
    assert not model.training


def test_markdown_and_html_escape_user_strings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    evil = "<script>alert(1)</script>"
    model = nn.Sequential()
    model.add_module(evil, nn.Linear(4, 4))
    model.add_module("act", nn.Sigmoid())
    model.add_module("head", nn.Linear(4, 1))
    report = gg.probe(model, torch.randn(8, 4))
    path = report.to_html(tmp_path / "sub" / "report.html")
    text = path.read_text(encoding="utf-8")
    assert evil not in text and html.escape(evil) in text
    assert len(re.findall(r"data:image/png;base64,", text)) == 1  # per-layer plot; no time profile here
    assert "http://" not in text and "https://" not in text
    md = report.to_markdown()
    assert "| 0 | " + evil in md and "## Findings" in md
    report2 = gg.probe(nn.RNN(2, 3, batch_first=True), torch.randn(2, 6, 2), time_dim=1)
    text2 = report2.to_html(tmp_path / "rnn.html").read_text(encoding="utf-8")
    assert len(re.findall(r"data:image/png;base64,", text2)) == 2


def test_to_dict_roundtrip_of_findings() -> None:
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.Sigmoid())])
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
    d = gg.probe(model, torch.randn(8, 16)).to_dict()
    assert d["findings"] and gg.Finding.from_dict(d["findings"][0]).kind == "vanishing"
    assert [r["name"] for r in d["layers"]][:2] == ["0", "1"]


def test_sequence_output_profiles_true_loss_and_last_step_separately() -> None:
    """Seq-to-seq: ‖∂L/∂h_t‖ includes every later step's loss; the last-step profile only the last one."""
    rnn = nn.RNN(2, 5, batch_first=True)
    x = torch.randn(3, 8, 2)
    report = gg.probe(rnn, x)
    rec = report.recurrent[0]
    with torch.no_grad():
        out, h_n = rnn(x)
    gen = torch.Generator().manual_seed(0)  # the projection of probe(seed=0): output first, then h_n
    r_out = torch.randn(tuple(out.shape), generator=gen)
    r_hn = torch.randn(tuple(h_n.shape), generator=gen)
    for t in (0, 4):
        with torch.no_grad():
            _, state = rnn(x[:, : t + 1])
        h0 = state.clone().requires_grad_(True)
        seg, seg_hn = rnn(x[:, t + 1 :], h0)
        full = (r_out[:, t + 1 :] * seg).sum() + (r_hn * seg_hn).sum()
        last = (r_out[:, -1] * seg[:, -1]).sum() + (r_hn * seg_hn).sum()
        (g_full,) = torch.autograd.grad(full, h0, retain_graph=True)
        (g_last,) = torch.autograd.grad(last, h0)
        # The output at step t is h_t itself, so ∂L/∂h_t = r_t + (what flows back from the later steps).
        want_full = (g_full + r_out[:, t]).norm().item()
        assert rec.hidden_norms[0][t] == pytest.approx(want_full, rel=1e-4)
        assert rec.last_norms[t] == pytest.approx(g_last.norm().item(), rel=1e-4)


def test_eval_mode_probe_is_deterministic_and_train_mode_uses_dropout() -> None:
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 2))
    x = torch.randn(8, 6)
    model.eval()
    want = projection_loss(model(x)).item()
    model.train()
    a = gg.probe(model, x, train=False)
    b = gg.probe(model, x, train=False)
    assert a.loss == b.loss == pytest.approx(want, rel=1e-6)
    assert a.layer("1").frac_zero == 0.0
    t = gg.probe(model, x, train=True)
    assert t.layer("1").frac_zero == pytest.approx(0.5, abs=0.12)
    assert model.training


def test_unroll_failure_becomes_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradguard.preflight.measure as measure

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("odd layout\nmore")

    monkeypatch.setattr(measure, "unroll_profile", boom)
    report = gg.probe(nn.GRU(2, 3, batch_first=True), torch.randn(2, 5, 2))
    assert report.recurrent[0].note == "not unrolled: RuntimeError: odd layout"
    assert report.layers and report.recurrent[0].last_norms == []
