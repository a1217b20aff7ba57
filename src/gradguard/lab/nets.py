"""Small models and a plain training loop shared by the lab's experiments.

Everything here is ordinary PyTorch; the experiments decide what to measure and claim.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.lab.data import Split
from gradguard.stats import tensor_norms, total_norm

#: Activations by the names experiments use.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu(0.01)": lambda: nn.LeakyReLU(0.01),
    "leaky_relu(0.2)": lambda: nn.LeakyReLU(0.2),
    "rrelu": nn.RReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
}


class DeepMLP(nn.Module):
    """Hidden layers of ``widths`` units, each Linear → [BatchNorm] → activation, then a Linear head.

    With ``residual=True`` each hidden layer after the first adds its input back: h ← h + f(h) (He et al.
    2016), so the backward pass has an identity path around every layer (the widths must then be equal).
    BatchNorm uses PyTorch momentum 0.1, i.e. Keras' 0.9 (Ioffe & Szegedy 2015). ``forward_all`` also returns each
    hidden layer's output, which the experiments summarise.
    """

    def __init__(
        self, n_in: int, n_out: int, widths: Sequence[int], activation: str,
        batchnorm: bool = False, residual: bool = False,
    ) -> None:
        super().__init__()
        sizes = [n_in, *widths]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.norms = nn.ModuleList(nn.BatchNorm1d(w, momentum=0.1) if batchnorm else nn.Identity() for w in widths)
        self.acts = nn.ModuleList(ACTIVATIONS[activation]() for _ in widths)
        self.head = nn.Linear(sizes[-1], n_out)
        self.residual = residual

    def forward_all(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits and the list of hidden-layer outputs (post-activation)."""
        outs = []
        for k, (lin, norm, act) in enumerate(zip(self.hidden, self.norms, self.acts, strict=True)):
            h = act(norm(lin(x)))
            x = x + h if self.residual and k > 0 else h
            outs.append(x)
        return self.head(x), outs

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_all(x)[0]


def grad_norm(model: nn.Module) -> float:
    """Global L2 norm of the model's gradients (one fused reduction, one host read)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(total_norm(tensor_norms(grads))) if grads else 0.0


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Share of ``x`` classified as ``y`` (eval mode for the call, previous mode restored)."""
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def batches(split: Split, batch: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled mini-batches of the training set (a new permutation each epoch)."""
    n = len(split.y)
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch + 1, batch):
            idx = order[i:i + batch]
            yield split.x[idx], split.y[idx]


@dataclass
class History:
    """Training record: loss and global gradient norm per step, test accuracy at each evaluation."""

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)

    def first_nonfinite(self) -> int | None:
        """Index of the first step whose loss was NaN/Inf, or None."""
        return next((i for i, v in enumerate(self.loss) if not math.isfinite(v)), None)


def train_classifier(
    model: nn.Module,
    data: Split,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    batch: int,
    generator: torch.Generator,
    eval_every: int,
    progress: Callable[[float], None] = lambda f: None,
    after_backward: Callable[[Tensor], None] = lambda loss: None,
) -> History:
    """Plain cross-entropy training for ``steps`` mini-batches, evaluating test accuracy every ``eval_every``.

    ``after_backward(loss)`` runs between ``backward()`` and ``optimizer.step()`` (where ``Monitor.step``
    belongs). The lab logs every step, so reading the loss and gradient norm each step is its logging
    schedule.
    """
    history = History()
    stream = batches(data, batch, generator)
    for step in range(1, steps + 1):
        x, y = next(stream)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        history.loss.append(float(loss.detach()))
        history.grad_norm.append(grad_norm(model))
        after_backward(loss)
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            history.eval_step.append(step)
            history.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
            progress(step / steps)
    return history


def train_regressor(
    model: nn.Module,
    data: Split,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    batch: int,
    generator: torch.Generator,
    clip: Callable[[Iterator[nn.Parameter]], object] | None = None,
    guard: Any = None,
    penalty: Callable[[], Tensor] | None = None,
    progress: Callable[[float], None] = lambda f: None,
) -> History:
    """Mean-squared-error training; ``loss`` records the MSE (without ``penalty``), ``grad_norm`` the global
    gradient norm before clipping.

    Exactly one of: plain ``optimizer.step()``, ``clip(model.parameters())`` then ``optimizer.step()``, or
    ``guard.step(loss)`` (a :class:`gradguard.Guard` that clips, skips and rolls back by itself). A run
    without a guard stops at the first non-finite loss: from there every weight is NaN.
    """
    history = History()
    stream = batches(data, batch, generator)
    for step in range(steps):
        x, y = next(stream)
        optimizer.zero_grad(set_to_none=True)
        mse = F.mse_loss(model(x), y)
        loss = mse + penalty() if penalty is not None else mse
        loss.backward()
        history.loss.append(float(mse.detach()))
        history.grad_norm.append(grad_norm(model))
        if guard is not None:
            guard.step(loss)
        else:
            if not math.isfinite(history.loss[-1]):
                break
            if clip is not None:
                clip(model.parameters())
            optimizer.step()
        if step % 10 == 0:
            progress(step / steps)
    progress(1.0)
    return history
