"""A zoo of deliberately sick (and two healthy) training setups, shared by monitor, probe and guard tests.

Each entry is a function ``build(seed=0) -> Setup``. A :class:`Setup` owns a model, an optimizer, a loss
function and a deterministic batch function ``batch(step) -> (x, y)``; ``setup.step(i, monitor)`` runs
one training step and ``setup.run(monitor)`` the whole schedule. ``Setup.expect`` is the
``(kind, module)`` of the finding the monitor must produce (``None`` for healthy controls), and
``Setup.sick`` is a measurement that says whether the pathology really happened, so a test can check the
setup is sick before it checks the diagnosis.

    from zoo import SICK, HEALTHY
    s = SICK["deep_sigmoid_tiny_init"]()
    s.run(monitor)

Data: ``sklearn`` digits and the ``statsmodels`` sunspots series, both shipped offline with the packages.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gradguard as gg

Batch = tuple[Tensor, Tensor]


@dataclass
class Setup:
    """One training setup: everything needed to run it, and what the monitor must say about it."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Any, Tensor], Tensor]
    batch: Callable[[int], Batch]
    steps: int
    expect: tuple[str, str] | None
    sick: Callable[[Setup], bool] = field(default=lambda s: False)
    losses: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def step(self, i: int, monitor: gg.Monitor | None = None) -> Tensor:
        """One step: zero_grad, forward, loss, backward, ``monitor.step(loss)``, optimizer step."""
        x, y = self.batch(i)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if monitor is not None:
            monitor.step(loss)
        self.optimizer.step()
        self.losses.append(float(loss.detach()))
        return loss.detach()

    def run(self, monitor: gg.Monitor | None = None, steps: int | None = None) -> list[float]:
        """Run ``steps`` (default :attr:`steps`) steps; returns the losses."""
        for i in range(self.steps if steps is None else steps):
            self.step(i, monitor)
        return self.losses


# ----------------------------------------------------------------------------- data (offline)
@functools.lru_cache(maxsize=1)
def digits() -> Batch:
    """sklearn digits: 1797 images 8×8 → 64 features scaled to [0, 1], 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def sunspots() -> Tensor:
    """Yearly sunspot activity 1700–2008 (statsmodels), min-max normalised to [0, 1] (SEEDS S0.1)."""
    import statsmodels.api as sm

    s = torch.tensor(sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(), dtype=torch.float32)
    return (s - s.min()) / (s.max() - s.min())


def sunspot_windows(length: int) -> Batch:
    """All (window of ``length`` values → next value) pairs: x (N, length, 1), y (N, 1)."""
    s = sunspots()
    x = s.unfold(0, length + 1, 1)
    return x[:, :length, None].contiguous(), x[:, length:].contiguous()


def minibatches(data: Batch, size: int, seed: int) -> Callable[[int], Batch]:
    """Deterministic mini-batch function: step i → the i-th batch of a seeded permutation (cycled)."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(8)])
    per_epoch = len(order) // size

    def batch(i: int) -> Batch:
        idx = order[(i % per_epoch) * size : (i % per_epoch + 1) * size]
        return x[idx], y[idx]

    return batch


def mlp(sizes: list[int], act: Callable[[], nn.Module]) -> nn.Sequential:
    """Linear layers of ``sizes`` with ``act()`` between them; names ``fc0, act0, fc1, ...``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for k in range(len(sizes) - 1):
        layers[f"fc{k}"] = nn.Linear(sizes[k], sizes[k + 1])
        if k < len(sizes) - 2:
            layers[f"act{k}"] = act()
    return nn.Sequential(layers)


class SeqRegressor(nn.Module):
    """A recurrent layer ``rnn`` and a linear ``head`` on the last time step's output."""

    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(out, y)


def _nonfinite_loss(s: Setup) -> bool:
    return any(not math.isfinite(v) for v in s.losses)


# ----------------------------------------------------------------------------- sick setups
def relu_lstm_normal(seed: int = 0) -> Setup:
    """SEEDS S0.2: 2-layer ReLU LSTM, weights N(0, 1), biases 0.1, Adam on MSE, sunspots → blows up."""
    torch.manual_seed(seed)
    lstm = gg.nn.LSTM(1, 8, num_layers=2, activation="relu")
    model = SeqRegressor(lstm, 8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weight" in name:
                p.normal_(0.0, 1.0)
            else:
                p.fill_(0.1)
    return Setup(
        name="relu_lstm_normal",
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=0.1),
        loss_fn=_mse,
        batch=minibatches(sunspot_windows(20), 32, seed),
        steps=40,
        expect=("exploding", "rnn"),
        sick=lambda s: max(s.losses) > 1e3 * min(s.losses) or _nonfinite_loss(s),
    )


def deep_sigmoid_tiny_init(seed: int = 0) -> Setup:
    """SEEDS S1.1/S2.1: 10 sigmoid layers at N(0, 0.01) init: the gradient dies on its way to the input."""
    torch.manual_seed(seed)
    model = mlp([64] + [64] * 9 + [10], nn.Sigmoid)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.01) if name.endswith("weight") else p.zero_()
    return Setup(
        name="deep_sigmoid_tiny_init",
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=_ce,
        batch=minibatches(digits(), 64, seed),
        steps=30,
        expect=("vanishing", "fc0"),
        sick=lambda s: _grad_ratio(s.model, "fc0", "fc9") < 1e-3,
    )


def tanh_mlp_normal(seed: int = 0) -> Setup:
    """SEEDS S2.1: tanh MLP with N(0, 1) weights: pre-activations of std ≈ √fan_in saturate every unit."""
    torch.manual_seed(seed)
    model = mlp([64, 256, 256, 10], nn.Tanh)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0) if name.endswith("weight") else p.zero_()
    return Setup(
        name="tanh_mlp_normal",
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss_fn=_ce,
        batch=minibatches(digits(), 64, seed),
        steps=30,
        expect=("saturation", "act1"),
        sick=lambda s: _saturated_fraction(s, "act1") > 0.5,
    )


def dead_layer(seed: int = 0) -> Setup:
    """A ReLU layer whose pre-activations are all negative (bias −50): every unit is dead from the start."""
    torch.manual_seed(seed)
    model = mlp([64, 128, 64, 10], nn.ReLU)
    nn.init.constant_(model.fc1.bias, -50.0)
    return Setup(
        name="dead_layer",
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_fn=_ce,
        batch=minibatches(digits(), 64, seed),
        steps=50,
        expect=("dead_units", "act1"),
        sick=lambda s: _frac_zero(s, "act1") == 1.0,
    )


class LogLayer(nn.Module):
    """A custom module that takes the log of its input: NaN for every negative entry (forward)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x)


def nan_in_custom_forward(seed: int = 0) -> Setup:
    """NaN born in a custom module's forward: ``log`` of a ReLU-free linear output (negatives → NaN)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(fc0=nn.Linear(64, 32), act0=nn.ReLU(), fc1=nn.Linear(32, 16), log=LogLayer(), fc2=nn.Linear(16, 10))
    )
    return Setup(
        name="nan_in_custom_forward",
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss_fn=_ce,
        batch=minibatches(digits(), 32, seed),
        steps=3,
        expect=("nonfinite", "log"),
        sick=_nonfinite_loss,
    )


class L2Norm(nn.Module):
    """‖x‖₂ over the last dim: finite forward (√0 = 0) but an infinite derivative 1/(2√u) at u = 0."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sqrt((x * x).sum(dim=-1, keepdim=True))


def inf_in_backward(seed: int = 0) -> Setup:
    """Inf born only in the backward pass: √ at 0 in ``norm`` on a batch holding an all-zero sample."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(8, 16, bias=False), norm=L2Norm(), head=nn.Linear(1, 1)))
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(10, 16, 8, generator=g)
    xs[5, 3] = 0.0  # step 5: one sample of zeros → fc output exactly 0 → √0 in the forward is fine
    ys = torch.randn(10, 16, 1, generator=g)
    return Setup(
        name="inf_in_backward",
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss_fn=_mse,
        batch=lambda i: (xs[i % 10], ys[i % 10]),
        steps=8,
        expect=("nonfinite", "norm"),
        # Step 5's loss is finite (the forward is fine) yet step 6's is NaN: the update of step 5 came
        # from a non-finite gradient, i.e. from the backward pass.
        sick=lambda s: math.isfinite(s.losses[5]) and not math.isfinite(s.losses[6]),
    )


def outlier_batch(seed: int = 0) -> Setup:
    """A corrupted batch (inputs ×1000, as from a unit bug) at step 80 of a healthy run: a loss spike."""
    torch.manual_seed(seed)
    model = mlp([64, 64, 10], nn.ReLU)
    base = minibatches(digits(), 64, seed)

    def batch(i: int) -> Batch:
        x, y = base(i)
        return (x * 1000.0, y) if i == 80 else (x, y)

    return Setup(
        name="outlier_batch",
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
        loss_fn=_ce,
        batch=batch,
        steps=90,
        expect=("loss_spike", ""),
        sick=lambda s: s.losses[80] > 10 * sorted(s.losses[60:80])[10],
    )


def relu_rnn_orthogonal2(seed: int = 0) -> Setup:
    """SEEDS S0.8/S3.1: ReLU RNN with W_hh = 2 × orthogonal: the recurrence multiplies the state by ≈ 2."""
    torch.manual_seed(seed)
    rnn = nn.RNN(1, 32, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        nn.init.orthogonal_(rnn.weight_hh_l0)
        rnn.weight_hh_l0.mul_(2.0)
    model = SeqRegressor(rnn, 32)
    return Setup(
        name="relu_rnn_orthogonal2",
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-4),
        loss_fn=_mse,
        batch=minibatches(sunspot_windows(20), 32, seed),
        steps=12,
        expect=("exploding", "rnn"),
        sick=lambda s: _time_growth(s) > 1e3,
    )


# ----------------------------------------------------------------------------- healthy controls
def digits_mlp_he_adam(seed: int = 0) -> Setup:
    """Healthy: ReLU MLP 64-128-128-10 on digits, He init, Adam lr 1e-3."""
    torch.manual_seed(seed)
    model = mlp([64, 128, 128, 10], nn.ReLU)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return Setup(
        name="digits_mlp_he_adam",
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_fn=_ce,
        batch=minibatches(digits(), 64, seed),
        steps=200,
        expect=None,
        sick=lambda s: not s.losses[-1] < 0.5 * s.losses[0],
    )


def sunspots_tanh_lstm(seed: int = 0) -> Setup:
    """Healthy: 2-layer tanh LSTM (torch.nn.LSTM) on normalised sunspots windows, Adam lr 1e-2."""
    torch.manual_seed(seed)
    model = SeqRegressor(nn.LSTM(1, 32, num_layers=2, batch_first=True), 32)
    return Setup(
        name="sunspots_tanh_lstm",
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        loss_fn=_mse,
        batch=minibatches(sunspot_windows(20), 32, seed),
        steps=150,
        expect=None,
        sick=lambda s: not s.losses[-1] < 0.5 * s.losses[0],
    )


# ----------------------------------------------------------------------------- measurements
def _grad_ratio(model: nn.Module, first: str, last: str) -> float:
    """‖∇W_first‖/√n ÷ ‖∇W_last‖/√n from the gradients currently held by the model."""
    g1 = getattr(model, first).weight.grad
    g2 = getattr(model, last).weight.grad
    return float((g1.norm() / g1.numel() ** 0.5) / (g2.norm() / g2.numel() ** 0.5))


def _forward_output(s: Setup, module: str) -> Tensor:
    out: list[Tensor] = []
    h = dict(s.model.named_modules())[module].register_forward_hook(lambda m, a, o: out.append(o.detach()))
    with torch.no_grad():
        s.model(s.batch(0)[0])
    h.remove()
    return out[0]


def _saturated_fraction(s: Setup, module: str) -> float:
    return float((_forward_output(s, module).abs() > 0.99).float().mean())


def _frac_zero(s: Setup, module: str) -> float:
    return float((_forward_output(s, module) == 0).float().mean())


def _time_growth(s: Setup) -> float:
    with torch.no_grad():
        out, _ = s.model.rnn(s.batch(0)[0])
    rms = out.pow(2).mean(dim=(0, 2)).sqrt()
    return float(rms[-1] / rms[0])


#: Sick setups: name → builder. A read-only mapping built once; tests parametrise over it.
SICK: dict[str, Callable[..., Setup]] = {
    f.__name__: f
    for f in (
        relu_lstm_normal,
        deep_sigmoid_tiny_init,
        tanh_mlp_normal,
        dead_layer,
        nan_in_custom_forward,
        inf_in_backward,
        outlier_batch,
        relu_rnn_orthogonal2,
    )
}

#: Healthy controls: the monitor must stay silent (no finding of severity warning or worse).
HEALTHY: dict[str, Callable[..., Setup]] = {f.__name__: f for f in (digits_mlp_he_adam, sunspots_tanh_lstm)}
