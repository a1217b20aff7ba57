"""Initialisation schemes: variances against the formulas, layouts element by element, LSUV vs the lsuv package."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import init
from gradguard.errors import ConfigError

FAN_IN, FAN_OUT = 400, 300
N = FAN_IN * FAN_OUT


def _sample_var_tol(var: float, kurtosis: float) -> float:
    """Five standard errors of a sample variance of N draws: sd(s²) = σ²·√((κ − 1)/N)."""
    return 5.0 * var * math.sqrt((kurtosis - 1.0) / N)


# (scheme, options, expected variance, kurtosis of the distribution: 3 normal, 1.8 uniform)
CASES = [
    ("normal", {"std": 1.0}, 1.0, 3.0),
    ("normal", {"std": 0.1}, 0.01, 3.0),
    ("xavier_uniform", {}, 2.0 / (FAN_IN + FAN_OUT), 1.8),
    ("xavier_normal", {}, 2.0 / (FAN_IN + FAN_OUT), 3.0),
    ("xavier_normal", {"activation": "tanh"}, (5 / 3) ** 2 * 2.0 / (FAN_IN + FAN_OUT), 3.0),
    ("he_normal", {}, 2.0 / FAN_IN, 3.0),
    ("he_uniform", {}, 2.0 / FAN_IN, 1.8),
    ("he_normal", {"mode": "fan_out"}, 2.0 / FAN_OUT, 3.0),
    ("he_normal", {"mode": "fan_avg"}, 2.0 / ((FAN_IN + FAN_OUT) / 2), 3.0),
    ("he_uniform", {"activation": "leaky_relu", "param": 0.2}, 2.0 / (1 + 0.2**2) / FAN_IN, 1.8),
    ("lecun", {}, 1.0 / FAN_IN, 3.0),
    ("lecun", {"distribution": "uniform"}, 1.0 / FAN_IN, 1.8),
]


@pytest.mark.parametrize(("scheme", "options", "var", "kurt"), CASES)
def test_weight_variance_matches_formula(scheme: str, options: dict, var: float, kurt: float) -> None:
    layer = nn.Linear(FAN_IN, FAN_OUT)
    report = init.apply(layer, scheme, **options)
    assert report.changed == ("weight", "bias")
    w = layer.weight.detach().double()
    assert abs(float(w.mean())) < 5 * math.sqrt(var / N)
    assert abs(float(w.var()) - var) < _sample_var_tol(var, kurt), (float(w.var()), var)
    assert torch.all(layer.bias == 0)
    if kurt < 2:  # uniform: the bound is √(3·Var)
        assert float(w.abs().max()) <= math.sqrt(3 * var) * (1 + 1e-6)


@pytest.mark.parametrize(("std", "bias"), [(1.0, 0.1), (0.1, 0.01)])
def test_normal_with_constant_bias_on_a_relu_lstm(std: float, bias: float) -> None:
    lstm = gg.nn.LSTM(1, 64, num_layers=2, activation="relu")
    init.apply(lstm, "normal", std=std, bias=bias)
    for k in range(2):
        w = getattr(lstm, f"weight_hh_l{k}").detach()
        n = w.numel()
        assert abs(float(w.var()) - std**2) < 5 * std**2 * math.sqrt(2 / n)
        # the effective bias is bias_ih + bias_hh: all of it in bias_ih, none in bias_hh
        assert torch.all(getattr(lstm, f"bias_ih_l{k}") == bias) and torch.all(getattr(lstm, f"bias_hh_l{k}") == 0)


def test_conv_fans_and_recurrent_gate_blocks() -> None:
    conv = nn.Conv2d(16, 32, 5)
    init.apply(conv, "he_normal")
    fan_in = 16 * 25
    tol = _sample_var_tol(2.0 / fan_in, 3.0) * math.sqrt(N / conv.weight.numel())
    assert abs(float(conv.weight.detach().var()) - 2.0 / fan_in) < tol
    gru = nn.GRU(50, 200)
    init.apply(gru, "xavier_uniform")
    # each of the 3 gate blocks is 200 × 50 with its own fans: Var = 2/(50+200)
    for block in gru.weight_ih_l0.detach().chunk(3):
        assert abs(float(block.var()) - 2.0 / 250) < 0.08 * 2.0 / 250


@pytest.mark.parametrize("module", [nn.LSTM(6, 5, num_layers=2), gg.nn.LSTM(6, 5, num_layers=2), nn.GRU(6, 5)])
def test_orthogonal_blocks_are_orthogonal(module: nn.Module) -> None:
    init.apply(module, "orthogonal", gain=2.0)
    gates = 3 if isinstance(module, nn.GRU) else 4
    for block in module.weight_hh_l0.detach().chunk(gates):  # type: ignore[union-attr]
        torch.testing.assert_close(block @ block.T, 4.0 * torch.eye(5), atol=1e-5, rtol=0)


def test_orthogonal_takes_the_activation_gain() -> None:
    """gain = calculate_gain(activation): √2 for ReLU, so QᵀQ·gain² = 2·I; default stays gain 1."""
    lin = nn.Linear(8, 8)
    init.apply(lin, "orthogonal", activation="relu")
    torch.testing.assert_close(lin.weight.detach() @ lin.weight.detach().T, 2.0 * torch.eye(8), atol=1e-5, rtol=0)
    init.apply(lin, "orthogonal")
    torch.testing.assert_close(lin.weight.detach() @ lin.weight.detach().T, torch.eye(8), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="gain"):
        init.apply(lin, "orthogonal", gain=-1.0)


def test_identity_layout_element_by_element() -> None:
    rnn = nn.RNN(3, 4, num_layers=2, nonlinearity="relu")
    before_ih = rnn.weight_ih_l0.detach().clone()
    report = init.apply(rnn, "identity", scale=0.5)
    for k in range(2):
        w = getattr(rnn, f"weight_hh_l{k}").detach()
        for i in range(4):
            for j in range(4):
                assert float(w[i, j]) == (0.5 if i == j else 0.0)
        assert torch.all(getattr(rnn, f"bias_ih_l{k}") == 0) and torch.all(getattr(rnn, f"bias_hh_l{k}") == 0)
    assert torch.equal(rnn.weight_ih_l0.detach(), before_ih)
    assert ("weight_ih_l0", "identity sets hidden-to-hidden weights and biases only") in report.skipped
    lstm_report = init.apply(nn.LSTM(3, 4), "identity")
    assert lstm_report.changed == () and len(lstm_report.skipped) == 4


@pytest.mark.parametrize("module", [nn.LSTM(3, 4, num_layers=2), gg.nn.LSTM(3, 4, num_layers=2), nn.LSTMCell(3, 4)])
def test_forget_bias_layout_element_by_element(module: nn.Module) -> None:
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    init.apply(module, "lstm_forget_bias", value=1.5)
    hidden = 4
    for name, p in module.named_parameters():
        if not name.startswith("bias"):
            assert torch.equal(p.detach(), before[name])
            continue
        for r in range(4 * hidden):
            in_forget = hidden <= r < 2 * hidden
            expect = (1.5 if name.startswith("bias_ih") else 0.0) if in_forget else float(before[name][r])
            assert float(p.detach()[r]) == expect, (name, r)
    suffixes = [n[len("bias_ih") :] for n, _ in module.named_parameters() if n.startswith("bias_ih")]
    for s in suffixes:
        total = getattr(module, "bias_ih" + s) + getattr(module, "bias_hh" + s)
        assert torch.all(total[hidden : 2 * hidden] == 1.5)


def test_report_lists_skips_and_embedding_padding() -> None:
    model = nn.Sequential(nn.Embedding(10, 8, padding_idx=0), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.PReLU())
    report = init.apply(model, "he_normal", bias=None)
    assert "0.weight" in report.changed and "1.weight" in report.changed
    assert ("1.bias", "bias=None") in report.skipped
    assert ("2.weight", "normalisation layer (kept at γ=1, β=0)") in report.skipped
    assert any(name == "3.weight" and "PReLU" in why for name, why in report.skipped)
    assert torch.all(model[0].weight[0] == 0)
    assert "skipped" in str(report)


def test_registry_lists_every_scheme_and_each_runs() -> None:
    assert set(init.scheme_names()) == {
        "normal", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "lecun", "orthogonal",
        "identity", "lstm_forget_bias", "lsuv",
    }  # fmt: skip
    for name, info in init.SCHEMES.items():
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        extra = {"inputs": torch.randn(16, 4)} if info.needs_inputs else {}
        report = init.apply(model, name, **extra)
        assert report.scheme == name
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_generator_makes_draws_reproducible() -> None:
    a, b = nn.Linear(5, 5), nn.Linear(5, 5)
    init.apply(a, "xavier_normal", generator=torch.Generator().manual_seed(3))
    init.apply(b, "xavier_normal", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.weight, b.weight)


def _deep_net(depth: int = 8, width: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(20, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 5))
    return nn.Sequential(*layers)


def _layer_stds(model: nn.Sequential, x: torch.Tensor) -> list[float]:
    out = []
    with torch.no_grad():
        for m in model:
            x = m(x)
            if isinstance(m, nn.Linear):
                out.append(float(x.std()))
    return out


def test_lsuv_unit_std_on_deep_net_and_matches_package() -> None:
    lsuv_pkg = pytest.importorskip("lsuv")
    x = torch.randn(256, 20)
    model = _deep_net()
    init.apply(model, "normal", std=0.5, bias=0.05)  # badly scaled start: std explodes with depth
    sick = _layer_stds(model, x)
    assert sick[-1] > 100 * sick[0], "the start must really be badly scaled"
    ref = copy.deepcopy(model)
    report = init.lsuv(model, x, orthonormal=False)
    lsuv_pkg.lsuv_with_singlebatch(ref, x, verbose=False, do_orthonorm=False)
    stds = _layer_stds(model, x)
    assert all(abs(s - 1.0) <= 0.1 for s in stds), stds
    assert report.details["std"] == pytest.approx(dict(zip(report.details["std"], stds, strict=True)), rel=1e-5)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # with the orthonormal start (step 1 of the paper) every layer still ends within tolerance
    fresh = _deep_net()
    init.lsuv(fresh, x)
    assert all(abs(s - 1.0) <= 0.1 for s in _layer_stds(fresh, x))


def test_bad_input_is_refused_clearly() -> None:
    model = nn.Linear(3, 3)
    with pytest.raises(ConfigError, match="xavier_uniform"):
        init.apply(model, "glorot")
    with pytest.raises(TypeError, match="inputs"):
        init.lsuv(model)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="needs inputs"):
        init.apply(model, "lsuv")
    with pytest.raises(ConfigError, match="does not take"):
        init.apply(model, "xavier_uniform", std=1.0)
    with pytest.raises(ConfigError, match="mode"):
        init.apply(model, "he_normal", mode="fan_sum")
    with pytest.raises(ConfigError, match=r"std=-1.0 is out of range; allowed: \[0.0, inf\)"):
        init.apply(model, "normal", std=-1.0)
    with pytest.raises(ConfigError, match=r"tol=0.0 is out of range; allowed: \(0.0, inf\)"):
        init.lsuv(model, torch.randn(4, 3), tol=0.0)
    with pytest.raises(ConfigError, match="activation"):
        init.apply(model, "he_normal", activation="swish")


def test_keywords_are_explicit_and_keyword_only() -> None:
    model = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="stdd"):
        init.apply(model, "normal", stdd=1.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        init.apply(model, "normal", 1.0)  # type: ignore[misc]
    with pytest.raises(TypeError):
        init.lsuv(model, torch.randn(4, 3), 1.0)  # type: ignore[misc]
    # the registry's defaults are apply's signature, not a second table
    assert init.SCHEMES["he_normal"].defaults["mode"] == "fan_in"
    assert init.SCHEMES["lsuv"].defaults == {"inputs": None, "target_std": 1.0, "tol": 0.1, "max_iter": 10,
                                             "orthonormal": True}  # fmt: skip


def test_deprecated_batch_is_inputs() -> None:
    x = torch.randn(32, 20)
    a, b, c = _deep_net(4), _deep_net(4), _deep_net(4)
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    torch.manual_seed(0)
    want = init.lsuv(a, x)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="inputs="):
        got = init.lsuv(b, batch=x)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="inputs="):
        init.apply(c, "lsuv", batch=x)
    assert got.details == want.details
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)
    with pytest.warns(DeprecationWarning, match="needs_inputs"):
        assert init.SCHEMES["lsuv"].needs_batch


def test_lsuv_takes_keyword_and_tuple_inputs() -> None:
    class TwoArgs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x + shift)))

    x, shift = torch.randn(64, 4), torch.randn(1, 4)
    for inputs in ((x, shift), {"x": x, "shift": shift}):
        model = TwoArgs()
        report = init.lsuv(model, inputs)
        assert set(report.details["std"]) == {"a", "b"}
        assert all(abs(s - 1.0) <= 0.1 for s in report.details["std"].values())
