"""The three training workloads of the side-by-side benchmarks (issue 7), each a model and one fixed batch.

(a) ``mlp``: 20 × (Linear(256, 256) + ReLU), batch 128, regression onto a random target.
(b) ``lstm``: 2-layer ``nn.LSTM`` (input 16, hidden 128), 200 time steps, batch 32, a linear head on the
    last step.
(c) ``transformer``: ``nn.TransformerEncoder`` of 4 post-norm layers, d_model 256, 8 heads, feed-forward
    1024 (the usual 4·d), dropout 0.1, sequence 128, batch 16, regression of every position.

Every workload trains with MSE and Adam (lr 1e-4); ``smoke=True`` shrinks the sizes so that a test can run
each benchmark in a second or two without changing any code path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LR = 1e-4


@dataclass(frozen=True)
class Workload:
    """One benchmark case: a freshly seeded model and its batch, on ``device``."""

    key: str
    label: str
    model: nn.Module
    x: Tensor
    y: Tensor


class LastStep(nn.Module):
    """Many-to-one LSTM regressor: the head reads the last time step."""

    def __init__(self, hidden: int, layers: int = 2) -> None:
        super().__init__()
        self.rnn = nn.LSTM(16, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Encoder(nn.Module):
    """Transformer encoder regressor (every position predicts a d-vector)."""

    def __init__(self, d: int, layers: int, heads: int = 8) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def mlp(smoke: bool = False, device: str = "cpu") -> Workload:
    width, depth, batch = (32, 4, 8) if smoke else (256, 20, 128)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers)
    return Workload(
        "mlp",
        f"(a) MLP {depth}×Linear({width})+ReLU, batch {batch}",
        model.to(device),
        torch.randn(batch, width, device=device),
        torch.randn(batch, width, device=device),
    )


def lstm(smoke: bool = False, device: str = "cpu") -> Workload:
    hidden, steps, batch = (16, 5, 4) if smoke else (128, 200, 32)
    return Workload(
        "lstm",
        f"(b) LSTM 2×{hidden}, {steps} steps, batch {batch}",
        LastStep(hidden).to(device),
        torch.randn(batch, steps, 16, device=device),
        torch.randn(batch, 1, device=device),
    )


def transformer(smoke: bool = False, device: str = "cpu") -> Workload:
    d, layers, seq, batch = (32, 2, 8, 2) if smoke else (256, 4, 128, 16)
    return Workload(
        "transformer",
        f"(c) Transformer encoder {layers}×d{d}, seq {seq}, batch {batch}",
        Encoder(d, layers).to(device),
        torch.randn(batch, seq, d, device=device),
        torch.randn(batch, seq, d, device=device),
    )


#: Workload builders by key, in table order.
WORKLOADS: dict[str, Callable[..., Workload]] = {"mlp": mlp, "lstm": lstm, "transformer": transformer}


def build(key: str, smoke: bool = False, device: str = "cpu", seed: int = 0) -> Workload:
    """The workload ``key`` with weights and batch drawn from ``seed`` (same numbers for every configuration)."""
    if key not in WORKLOADS:
        raise ValueError(f"unknown workload {key!r}; allowed: {', '.join(WORKLOADS)}")
    torch.manual_seed(seed)
    return WORKLOADS[key](smoke=smoke, device=device)
