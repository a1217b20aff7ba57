"""gg.probe on init-time pathologies: each sick setup is first measured to be sick with plain autograd,
then the probe must name the right kind and the right layer (or horizon); healthy controls stay quiet."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.preflight import ProbeReport, projection_loss


def _mlp(depth: int, width: int, act: type[nn.Module], std: float, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width, bias=bias)
        nn.init.normal_(lin.weight, 0.0, std)
        if bias:
            nn.init.zeros_(lin.bias)
        layers += [lin, act()]
    head = nn.Linear(width, 1)
    nn.init.normal_(head.weight, 0.0, 1.0 / math.sqrt(width))
    layers.append(head)
    return nn.Sequential(*layers)


def _weight_grad_norms(model: nn.Sequential, x: torch.Tensor) -> list[float]:
    """Plain autograd reference: ‖∂L/∂W‖ of every Linear, with L = Σ r·y as the probe's default loss."""
    model.zero_grad(set_to_none=True)
    y = model(x)
    projection_loss(y).backward()
    norms = [m.weight.grad.norm().item() for m in model if isinstance(m, nn.Linear)]
    model.zero_grad(set_to_none=True)
    return norms


def _kinds(report: ProbeReport, min_rank: int = 1) -> list[tuple[str, str]]:
    return [(f.kind, f.module) for f in report.findings if f.rank >= min_rank]


class Regressor(nn.Module):
    """Many-to-one sequence regressor: recurrent module, then a linear head on the last step."""

    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _input_grad_profile(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Plain autograd reference: ‖∂L/∂x_t‖ per step for batch-first x."""
    xl = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(projection_loss(model(xl)), xl)
    return g.norm(dim=(0, 2))


def _rnn(nonlinearity: str, scale: float, hidden: int = 32) -> Regressor:
    rnn = nn.RNN(1, hidden, nonlinearity=nonlinearity, batch_first=True)
    q = torch.empty(hidden, hidden)
    nn.init.orthogonal_(q)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(scale * q)
    return Regressor(rnn, hidden)


def test_deep_sigmoid_mlp_small_init_vanishes_from_first_layers() -> None:
    model = _mlp(depth=8, width=32, act=nn.Sigmoid, std=0.01)
    x = torch.randn(32, 32)
    w = _weight_grad_norms(model, x)
    assert w[0] / w[-1] < 1e-9  # measured: really sick
    report = gg.probe(model, x)
    vanishing = [f for f in report.findings if f.kind == "vanishing"]
    assert len(vanishing) == 1
    assert vanishing[0].module == "0" and vanishing[0].severity == "error"
    assert vanishing[0].evidence["layers"][:3] == ["0", "2", "4"]
    assert "xavier_normal" in vanishing[0].advice or "he_normal" in vanishing[0].advice


def test_tanh_mlp_unit_normal_init_saturates() -> None:
    model = _mlp(depth=4, width=64, act=nn.Tanh, std=1.0)
    x = torch.randn(32, 64)
    with torch.no_grad():
        h = model[1](model[0](x))
    assert (h.abs() > 0.99).float().mean().item() > 0.5  # measured: really saturated
    report = gg.probe(model, x)
    sat = [f for f in report.findings if f.kind == "saturation"]
    assert len(sat) == 1 and sat[0].module == "1" and sat[0].rank >= 1
    assert set(sat[0].evidence["layers"]) >= {"1", "3", "5", "7"}
    assert report.layer("1").frac_saturated == pytest.approx((h.abs() > 0.99).float().mean().item(), abs=1e-6)


def test_deep_linear_unit_normal_init_names_first_overflowing_layer() -> None:
    depth = 40
    model = nn.Sequential(*[nn.Linear(128, 128, bias=False) for _ in range(depth)])
    for m in model:
        nn.init.normal_(m.weight, 0.0, 1.0)
    x = torch.randn(16, 128)
    first_bad = None
    with torch.no_grad():
        h = x
        for i, m in enumerate(model):
            h = m(h)
            if not torch.isfinite(h).all():
                first_bad = i
                break
    assert first_bad is not None and 10 < first_bad < depth  # measured: overflows, and not at once
    report = gg.probe(model, x)
    assert report.findings[0].kind == "nonfinite" and report.findings[0].severity == "error"
    assert report.findings[0].module == str(first_bad)
    assert _kinds(report) == [("nonfinite", str(first_bad))]  # no bogus depth verdicts on NaN gradients


def test_tanh_rnn_half_orthogonal_vanishes_through_time_with_predicted_horizon() -> None:
    hidden, steps = 32, 40
    model = _rnn("tanh", 0.5, hidden)
    x = torch.randn(16, steps, 1)
    prof = _input_grad_profile(model, x)
    assert (prof[0] / prof[-1]).item() < 1e-9  # measured: the first steps get nothing
    with torch.no_grad():
        out, _ = model.rnn(x)
    mean_fprime = (1 - out**2).mean().item()
    predicted = math.log(1e-3) / math.log(0.5 * mean_fprime)  # ρ(0.5·Q) = 0.5 exactly
    report = gg.probe(model, x, time_dim=1)
    rec = report.recurrent[0]
    assert rec.horizon == pytest.approx(predicted, rel=0.2)
    assert rec.spectral_radius[0] == pytest.approx(0.5, rel=1e-5)
    assert rec.mean_derivative[0] == pytest.approx(mean_fprime, rel=1e-4)
    found = [f for f in report.findings if f.kind == "vanishing"]
    assert [(f.module, f.severity) for f in found] == [("rnn", "warning")]
    assert found[0].evidence["horizon"] == pytest.approx(rec.horizon)
    assert "LSTM" in found[0].advice and "orthogonal" in found[0].advice


def test_relu_rnn_double_orthogonal_explodes_through_time() -> None:
    model = _rnn("relu", 2.0)
    x = torch.randn(16, 30, 1)
    prof = _input_grad_profile(model, x)
    assert (prof[0] / prof[-1]).item() > 1e3  # measured: the first steps get far more than the last
    report = gg.probe(model, x, time_dim=1)
    found = [f for f in report.findings if f.kind == "exploding"]
    assert [f.module for f in found] == ["rnn"] and found[0].rank >= 1
    assert report.recurrent[0].growth > 1.2
    assert "ClipNorm" in found[0].advice and "identity" in found[0].advice


def _lstm_with_forget_bias(value: float, hidden: int = 32) -> Regressor:
    torch.manual_seed(1)
    lstm = nn.LSTM(1, hidden, batch_first=True)
    with torch.no_grad():
        lstm.bias_ih_l0.zero_()
        lstm.bias_hh_l0.zero_()
        lstm.bias_ih_l0[hidden : 2 * hidden] = value
    return Regressor(lstm, hidden)


def test_lstm_forget_bias_one_sees_further_back_than_zero() -> None:
    x = torch.randn(16, 60, 1)
    reports = {b: gg.probe(_lstm_with_forget_bias(b), x, time_dim=1) for b in (0.0, 1.0)}
    rec0, rec1 = reports[0.0].recurrent[0], reports[1.0].recurrent[0]
    # Measured: the gates really differ as σ(0) = 0.5 vs σ(1) ≈ 0.73 on average.
    assert rec0.gate_mean[0] == pytest.approx(0.5, abs=0.03)
    assert rec1.gate_mean[0] == pytest.approx(1 / (1 + math.exp(-1)), abs=0.03)
    assert not rec0.reaches_start and not rec1.reaches_start
    assert rec1.horizon > 1.5 * rec0.horizon
    assert "lstm_forget_bias" in next(f for f in reports[0.0].findings if f.kind == "vanishing").advice


def test_healthy_he_relu_mlp_has_no_warning() -> None:
    model = _mlp(depth=8, width=64, act=nn.ReLU, std=math.sqrt(2 / 64))
    x = torch.randn(64, 64)
    w = _weight_grad_norms(model, x)
    assert 1e-2 < w[0] / w[-2] < 1e2  # measured: healthy
    report = gg.probe(model, x)
    assert _kinds(report) == []


def test_healthy_default_lstm_short_sequences_has_no_warning() -> None:
    model = Regressor(nn.LSTM(1, 32, batch_first=True), 32)
    x = torch.randn(16, 8, 1)
    prof = _input_grad_profile(model, x)
    assert (prof[0] / prof.max()).item() > 1e-3  # measured: the first step still gets gradient
    report = gg.probe(model, x, time_dim=1)
    assert _kinds(report) == []
    assert report.recurrent[0].reaches_start


def test_relu_mlp_unit_normal_init_explodes_forward() -> None:
    model = _mlp(depth=6, width=64, act=nn.ReLU, std=1.0)
    x = torch.randn(32, 64)
    stds = []
    with torch.no_grad():
        h = x
        for m in model:
            h = m(h)
            if isinstance(m, nn.Linear):
                stds.append(h.std().item())
    assert stds[-2] / stds[0] > 1e3  # measured: the hidden activations blow up
    report = gg.probe(model, x)
    assert ("exploding", "0") in _kinds(report)


class CellLoop(nn.Module):
    """A hand-written recurrence over nn.RNNCell: not unrollable by the probe, seen through time_dim."""

    def __init__(self, hidden: int, scale: float) -> None:
        super().__init__()
        self.cell = nn.RNNCell(1, hidden)
        q = torch.empty(hidden, hidden)
        nn.init.orthogonal_(q)
        with torch.no_grad():
            self.cell.weight_hh.copy_(scale * q)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


def test_input_time_profile_flags_a_custom_recurrence() -> None:
    model = CellLoop(32, 0.5)
    x = torch.randn(16, 40, 1)
    prof = _input_grad_profile(model, x)
    assert (prof[0] / prof[-1]).item() < 1e-9  # measured: really vanishing
    report = gg.probe(model, x, time_dim=1)
    assert report.recurrent == [] and report.time is not None
    torch.testing.assert_close(torch.tensor(report.time.norms), prof, rtol=1e-5, atol=0)
    found = [f for f in report.findings if f.kind == "vanishing"]
    assert [(f.module, f.severity) for f in found] == [("", "warning")]
    assert 5 < found[0].evidence["horizon"] < 15
    healthy = gg.probe(CellLoop(32, 1.0), torch.randn(16, 8, 1), time_dim=1)
    assert _kinds(healthy) == []


def test_relu_lstm_unit_normal_explodes_with_finite_but_huge_gradients() -> None:
    """Seed S0.2 at init; regression: float32 norms overflowed and the probe called finite gradients NaN."""
    rnn = gg.nn.LSTM(1, 32, num_layers=2, activation="relu")
    for name, p in rnn.named_parameters():
        if "weight" in name:
            nn.init.normal_(p, 0.0, 1.0)
        else:
            nn.init.constant_(p, 0.1)
    model = Regressor(rnn, 32)
    x = torch.rand(16, 50, 1)
    model.zero_grad(set_to_none=True)
    projection_loss(model(x)).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(bool(torch.isfinite(g).all()) for g in grads)  # measured: finite ...
    assert max(g.abs().max().item() for g in grads) > 1e19  # ... but so large that Σg² overflows float32
    model.zero_grad(set_to_none=True)
    report = gg.probe(model, x, time_dim=1)
    assert [(f.kind, f.module, f.severity) for f in report.findings] == [("exploding", "rnn", "error")]
    assert math.isfinite(report.layer("rnn").param_grad_norm) and report.layer("rnn").param_grad_norm > 1e19
