"""The probe's advice is actionable: applying the gradguard call it names clears (or shrinks) the finding."""

from __future__ import annotations

import math

import torch
from torch import nn

import gradguard as gg
from gradguard.init import apply


def _mlp(depth: int, width: int, act: type[nn.Module], std: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.normal_(lin.weight, 0.0, std)
        nn.init.zeros_(lin.bias)
        layers += [lin, act()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _serious(report: gg.ProbeReport) -> list[tuple[str, str]]:
    return [(f.kind, f.module) for f in report.findings if f.rank >= 1]


def test_saturated_tanh_mlp_cured_by_advised_xavier() -> None:
    model = _mlp(4, 64, nn.Tanh, 1.0)
    x = torch.randn(32, 64)
    before = gg.probe(model, x)
    sat = next(f for f in before.findings if f.kind == "saturation")
    assert 'gg.init.apply(model, "xavier_normal")' in sat.advice
    apply(model, "xavier_normal")
    after = gg.probe(model, x)
    assert _serious(after) == []
    assert after.layer("1").frac_saturated < 0.05 < before.layer("1").frac_saturated


def test_exploding_relu_mlp_cured_by_advised_he() -> None:
    model = _mlp(6, 64, nn.ReLU, 1.0)
    x = torch.randn(32, 64)
    before = gg.probe(model, x)
    found = next(f for f in before.findings if f.kind == "exploding")
    assert 'gg.init.apply(model, "he_normal")' in found.advice
    apply(model, "he_normal")
    assert _serious(gg.probe(model, x)) == []


class _Reg(nn.Module):
    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def test_lstm_horizon_lengthened_by_advised_forget_bias() -> None:
    lstm = nn.LSTM(1, 32, batch_first=True)
    with torch.no_grad():
        lstm.bias_ih_l0.zero_()
        lstm.bias_hh_l0.zero_()
    model = _Reg(lstm, 32)
    x = torch.randn(16, 60, 1)
    before = gg.probe(model, x, time_dim=1)
    found = next(f for f in before.findings if f.kind == "vanishing")
    assert 'gg.init.apply(model, "lstm_forget_bias")' in found.advice
    apply(model, "lstm_forget_bias")
    after = gg.probe(model, x, time_dim=1).recurrent[0]
    assert after.gate_mean[0] > before.recurrent[0].gate_mean[0] + 0.15
    assert after.reaches_start or after.horizon > 1.5 * before.recurrent[0].horizon


def test_tanh_rnn_horizon_lengthened_by_advised_orthogonal() -> None:
    rnn = nn.RNN(1, 32, batch_first=True)
    q = torch.empty(32, 32)
    nn.init.orthogonal_(q)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(0.5 * q)
    model = _Reg(rnn, 32)
    x = torch.randn(16, 40, 1)
    before = gg.probe(model, x, time_dim=1).recurrent[0]
    apply(model, "orthogonal")
    after = gg.probe(model, x, time_dim=1).recurrent[0]
    assert after.spectral_radius[0] > 0.9
    assert after.reaches_start or after.horizon > 2 * before.horizon
    assert math.isfinite(after.growth) and after.growth > before.growth
