"""l2_penalty against the explicit formula λ/2·Σw²."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.errors import ConfigError, InputError
from gradguard.penalty import l2_penalty, penalised_parameters


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.LSTM(8, 3, batch_first=True))


def test_matches_explicit_formula_excluding_bias_and_norm() -> None:
    model = _model()
    lam = 0.3
    weights = [model[0].weight, model[3].weight_ih_l0, model[3].weight_hh_l0]
    expected = lam / 2 * sum(float((w.detach().double() ** 2).sum()) for w in weights)
    got = l2_penalty(model, lam)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-6)
    names = [n for n, _ in penalised_parameters(model)]
    assert names == ["0.weight", "3.weight_ih_l0", "3.weight_hh_l0"]


def test_including_everything_and_gradient_is_lambda_w() -> None:
    model = _model()
    lam = 0.05
    expected = lam / 2 * sum(float((p.detach().double() ** 2).sum()) for p in model.parameters())
    got = l2_penalty(model, lam, exclude_bias=False, exclude_norm=False)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-6)
    got.backward()
    for p in model.parameters():
        torch.testing.assert_close(p.grad, lam * p.detach(), rtol=1e-6, atol=1e-8)


def test_zero_weights_have_zero_gradient_and_shared_counted_once() -> None:
    lin = nn.Linear(3, 3, bias=False)
    nn.init.zeros_(lin.weight)
    tied = nn.Sequential(lin, lin)
    pen = gg.l2_penalty(tied, 1.0)
    pen.backward()
    assert torch.equal(lin.weight.grad, torch.zeros(3, 3))
    nn.init.constant_(lin.weight, 2.0)
    assert float(gg.l2_penalty(tied, 1.0).detach()) == pytest.approx(0.5 * 9 * 4.0)


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="lam"):
        l2_penalty(_model(), -0.1)
    with pytest.raises(InputError):
        l2_penalty([torch.zeros(2)], 0.1)  # type: ignore[arg-type]
