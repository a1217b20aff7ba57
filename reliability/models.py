"""Small models with their data, trained by the fault campaigns: MLP, CNN, LSTM and a small transformer.

Every model names its sub-modules (``fc1``, ``conv2``, ``lstm``, ``attn`` ...) so that a fault can be
placed in one of them and the monitor's answer compared with that name. Every task is deterministic: the
data set, the initial weights and the batch of each step depend only on the seed, so a faulted run and
its fault-free twin see exactly the same batches (the twin is the reference of the "final loss within
5 %" figure).

Data ships offline: sklearn's digits (CNN) and statsmodels' sunspots (LSTM); the MLP and the transformer
learn from a fixed random teacher.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Task:
    """A fixed data set, its loss and a deterministic batch schedule.

    ``batch(step)`` returns fresh tensors each call (a fault may write into them without touching the
    data set), cycling through a seeded permutation of the training set.
    """

    x_train: Tensor
    y_train: Tensor
    x_eval: Tensor
    y_eval: Tensor
    loss_fn: LossFn
    batch_size: int
    order: Tensor

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The batch of training step ``step`` (copies)."""
        n = self.x_train.shape[0]
        per_epoch = n // self.batch_size
        k = step % per_epoch
        idx = self.order[(step // per_epoch) % self.order.shape[0], k * self.batch_size : (k + 1) * self.batch_size]
        return self.x_train[idx].clone(), self.y_train[idx].clone()

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        """Loss of ``model`` (in eval mode) on the held-out set; NaN if the model produces NaN."""
        was = model.training
        model.eval()
        try:
            return float(self.loss_fn(model(self.x_eval), self.y_eval))
        finally:
            model.train(was)


def _orders(n: int, epochs: int, gen: torch.Generator) -> Tensor:
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(epochs)])


# ----------------------------------------------------------------------------- models
class MLP(nn.Module):
    """16 → 64 → 64 → 1 with ReLU (regression)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(64, 64)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(64, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x))))).squeeze(-1)


class CNN(nn.Module):
    """Two 3×3 convolutions with ReLU, max-pool and a linear head on 1×8×8 digit images (10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.head(h.flatten(1))


class LSTMRegressor(nn.Module):
    """Two-layer ``nn.LSTM`` (hidden 24) and a linear head predicting the next value of a series."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1]).squeeze(-1)


class TinyTransformer(nn.Module):
    """One pre-norm transformer block (2 heads, width 32) over 12 steps of 8 features, mean-pooled, 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.norm1 = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(32)
        self.ff1 = nn.Linear(32, 64)
        self.act = nn.GELU()
        self.ff2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.ff2(self.act(self.ff1(self.norm2(h))))
        return self.head(h.mean(1))


# ----------------------------------------------------------------------------- data
def _teacher_regression(seed: int) -> Task:
    gen = torch.Generator().manual_seed(1000 + seed)
    w1, w2 = torch.randn(16, 32, generator=gen) / 4, torch.randn(32, generator=gen) / 32**0.5
    x = torch.randn(1536, 16, generator=gen)
    y = torch.tanh(x @ w1) @ w2
    return Task(x[:1024], y[:1024], x[1024:], y[1024:], F.mse_loss, 32, _orders(1024, 8, gen))


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(d.target, dtype=torch.long)


def _digits_task(seed: int) -> Task:
    x, y = _digits()
    gen = torch.Generator().manual_seed(2000 + seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    x, y = x[perm], y[perm]
    return Task(x[:1280], y[:1280], x[1280:], y[1280:], F.cross_entropy, 32, _orders(1280, 8, gen))


@functools.lru_cache(maxsize=1)
def _sunspots() -> Tensor:
    import statsmodels.api as sm

    s = torch.tensor(sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(), dtype=torch.float32)
    return (s - s.min()) / (s.max() - s.min())


def _sunspots_task(seed: int) -> Task:
    s = _sunspots()
    length = 16
    windows = s.unfold(0, length + 1, 1)  # (n, length + 1)
    x, y = windows[:, :length].unsqueeze(-1), windows[:, length]
    gen = torch.Generator().manual_seed(3000 + seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    x, y = x[perm], y[perm]
    return Task(x[:224], y[:224], x[224:], y[224:], F.mse_loss, 16, _orders(224, 16, gen))


def _sequence_task(seed: int) -> Task:
    gen = torch.Generator().manual_seed(4000 + seed)
    x = torch.randn(1536, 12, 8, generator=gen)
    y = x[:, :, :4].mean(1).argmax(-1)
    return Task(x[:1024], y[:1024], x[1024:], y[1024:], F.cross_entropy, 32, _orders(1024, 8, gen))


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ModelSpec:
    """A campaign model: how to build it and its task, its optimiser settings and where faults may go.

    ``act_modules``: modules whose output a fault may poison (the monitor must name that module);
    ``grad_modules``: modules owning parameters whose gradient a fault may poison.
    """

    name: str
    build: Callable[[], nn.Module]
    task: Callable[[int], Task]
    lr: float
    steps: int
    act_modules: tuple[str, ...]
    grad_modules: tuple[str, ...]

    def make(self, seed: int) -> tuple[nn.Module, Task]:
        """The model with seeded initial weights and the seeded task."""
        torch.manual_seed(seed)
        return self.build(), self.task(seed)


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("mlp", MLP, _teacher_regression, 3e-3, 120, ("fc1", "act1", "fc2", "act2", "head"),
                  ("fc1", "fc2", "head")),
        ModelSpec("cnn", CNN, _digits_task, 3e-3, 120, ("conv1", "act1", "conv2", "act2", "pool", "head"),
                  ("conv1", "conv2", "head")),
        ModelSpec("lstm", LSTMRegressor, _sunspots_task, 1e-2, 120, ("lstm", "head"), ("lstm", "head")),
        ModelSpec("transformer", TinyTransformer, _sequence_task, 3e-3, 120,
                  ("embed", "norm1", "attn", "norm2", "ff1", "act", "ff2", "head"),
                  ("embed", "attn", "ff1", "ff2", "head")),
    )
}
