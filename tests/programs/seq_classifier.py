"""A GRU sequence classifier on a synthetic task, in the style of the usual recurrent-classifier tutorials.

Each sequence has 24 steps of 6 standardised features; one of 4 classes decides which feature carries a
slow sine burst somewhere in the sequence, the others are noise. A one-layer GRU (hidden 32) reads the
sequence, a linear head classifies its last hidden state; Adam at lr 3e-3, ``clip_grad_norm_(1.0)`` as
recurrent-model tutorials advise. Held-out metric: accuracy on a fixed test set (chance 0.25).

Faults: ``init_x10`` (GRU and head weights × 10), ``lr_x100`` (× 100 at step ``steps // 3``),
``unnormalised_batch`` (one batch at step ``steps // 3`` × 1000, a batch that skipped standardisation).

    cd tests && python -m programs.seq_classifier --fault lr_x100
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .common import GuardFactory, MonitorFactory, Recorder, RunResult, main, scale_lr, scale_weights

FAULTS = ("init_x10", "lr_x100", "unnormalised_batch")


def make_data(n: int, seed: int, length: int = 24, features: int = 6, classes: int = 4) -> tuple[Tensor, Tensor]:
    """Noise sequences; class c puts a sine burst of 8 steps into feature c at a random place."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, features, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    start = torch.randint(length - 8, (n,), generator=g)
    burst = 2.0 * torch.sin(torch.arange(8) * math.pi / 7)
    for i in range(n):
        x[i, start[i] : start[i] + 8, y[i]] += burst
    return (x - x.mean((0, 1))) / x.std((0, 1)), y


class GRUClassifier(nn.Module):
    def __init__(self, features: int = 6, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x)
        return self.head(h[-1])


def run(fault: str | None = None, steps: int = 60, seed: int = 0, monitor_factory: MonitorFactory | None = None,
        guard_factory: GuardFactory | None = None, *, stop_on_error: bool = False, after_backward=None,
        batch_size: int = 32, lr: float = 3e-3) -> RunResult:
    """Train on mini-batches of a fixed training set; held-out metric: test accuracy."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault {fault!r} is not one of {FAULTS}")
    torch.manual_seed(seed)
    x_train, y_train = make_data(1024, seed=3000 + seed)
    x_test, y_test = make_data(512, seed=4242)
    model = GRUClassifier()
    if fault == "init_x10":
        scale_weights(model, 10.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rec = Recorder("seq_classifier", fault, seed, steps, monitor_factory=monitor_factory,
                   guard_factory=guard_factory, stop_on_error=stop_on_error, after_backward=after_backward)
    rec.attach(model, optimizer)
    if fault == "init_x10":
        rec.fault_step = 0
    g = torch.Generator().manual_seed(seed)
    mid = steps // 3
    model.train()
    with rec.loop():
        for step in range(steps):
            idx = torch.randint(len(y_train), (batch_size,), generator=g)
            xb, yb = x_train[idx], y_train[idx]
            if step == mid and fault == "unnormalised_batch":
                xb = xb * 1000.0
                rec.fault_step = step
            if step == mid and fault == "lr_x100":
                scale_lr(optimizer, 100.0)
                rec.fault_step = step
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            rec.backward(loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            rec.optimizer_step(loss)
            rec.next_step()
    model.eval()
    with torch.no_grad():
        out = model(x_test)
        acc = float((out.argmax(1) == y_test).float().mean()) if torch.isfinite(out).all() else 0.0
    return rec.result(acc, "test accuracy", True, chance_loss=math.log(4))


if __name__ == "__main__":
    main(run, FAULTS)
