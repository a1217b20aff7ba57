"""A small CNN on ``sklearn.datasets.load_digits``, in the style of the classic MNIST convnet example.

Two 3×3 convolutions with ReLU and max-pooling, dropout, two linear layers, Adam at lr 3e-3 over shuffled
mini-batches, cross-entropy; held-out metric: test accuracy on a fixed split (8×8 images, 10
classes, so the chance level is 0.1 and the chance loss ln 10).

Faults: ``init_x10`` (conv and linear weights × 10), ``lr_x100`` (× 100 at step ``steps // 3``),
``fp16_overflow`` (``fc1`` runs under ``torch.autocast`` in float16 for the whole run, and at step
``steps // 3`` its weights are scaled so that the batch's largest fc1 output is twice float16's maximum
(standing for a layer whose weights grew), so that it overflows to ``inf``; the program records in
``extra["fp16_inf_steps"]`` the steps where fc1's output really held an inf),
``unnormalised_batch`` (one batch at step ``steps // 3`` fed as raw 0–16 pixel values × 1000 instead
of being scaled to [0, 1]).

Options for the healthy variants: ``batch_size`` (tiny batches, 2–8), ``schedule="onecycle"``.

    cd tests && python -m programs.digits_cnn --fault init_x10
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .common import GuardFactory, MonitorFactory, Recorder, RunResult, main, scale_lr, scale_weights

FAULTS = ("init_x10", "lr_x100", "fp16_overflow", "unnormalised_batch")


@functools.lru_cache(maxsize=1)
def digits() -> tuple[Tensor, Tensor]:
    """The 1797 sklearn digits as (N, 1, 8, 8) float images in [0, 16] and integer labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)
        self.fc1_half = False

    def features(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return torch.flatten(F.max_pool2d(F.relu(self.conv2(x)), 2), 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(self.features(x))
        if self.fc1_half:
            with torch.autocast(x.device.type, dtype=torch.float16):
                h = self.fc1(x)
            x = F.relu(h.float())
        else:
            x = F.relu(self.fc1(x))
        return self.fc2(x)


def run(fault: str | None = None, steps: int = 60, seed: int = 0, monitor_factory: MonitorFactory | None = None,
        guard_factory: GuardFactory | None = None, *, stop_on_error: bool = False, after_backward=None,
        batch_size: int = 32, lr: float = 3e-3, schedule: str = "constant") -> RunResult:
    """Train for ``steps`` mini-batches (reshuffled every epoch); held-out metric: test accuracy."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault {fault!r} is not one of {FAULTS}")
    if schedule not in ("constant", "onecycle"):
        raise ValueError(f"schedule {schedule!r} is not 'constant' or 'onecycle'")
    torch.manual_seed(seed)
    images, labels = digits()
    split = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=split)
    train_idx, test_idx = order[:1400], order[1400:]
    x_train, y_train = images[train_idx] / 16.0, labels[train_idx]
    raw_train = images[train_idx]
    x_test, y_test = images[test_idx] / 16.0, labels[test_idx]

    model = Net()
    if fault == "init_x10":
        scale_weights(model, 10.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = None
    if schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr * 4, total_steps=steps)
    rec = Recorder("digits_cnn", fault, seed, steps, monitor_factory=monitor_factory, guard_factory=guard_factory,
                   stop_on_error=stop_on_error, after_backward=after_backward)
    rec.attach(model, optimizer)
    if fault == "init_x10":
        rec.fault_step = 0
    model.fc1_half = fault == "fp16_overflow"
    inf_steps: list[int] = []
    if fault == "fp16_overflow":
        model.fc1.register_forward_hook(
            lambda m, i, out: inf_steps.append(rec.step) if model.training and bool(torch.isinf(out).any()) else None
        )
    mid = steps // 3
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y_train), generator=g)
    pos = 0
    model.train()
    with rec.loop():
        for step in range(steps):
            if pos + batch_size > len(perm):
                perm, pos = torch.randperm(len(y_train), generator=g), 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
            data, target = x_train[idx], y_train[idx]
            if step == mid and fault == "unnormalised_batch":
                data = raw_train[idx] * 1000.0
                rec.fault_step = step
            if step == mid and fault == "lr_x100":
                scale_lr(optimizer, 100.0, scheduler)
                rec.fault_step = step
            if step == mid and fault == "fp16_overflow":
                with torch.no_grad():
                    # Large enough that this batch's largest fc1 output is twice float16's maximum.
                    peak = float((model.features(data) @ model.fc1.weight.t()).abs().max())
                    model.fc1.weight.mul_(2 * torch.finfo(torch.float16).max / peak)
                rec.fault_step = step
            optimizer.zero_grad()
            output = model(data)
            loss = F.cross_entropy(output, target)
            loss.backward()
            rec.backward(loss)
            rec.optimizer_step(loss)
            if scheduler is not None:
                scheduler.step()
            rec.next_step()

    model.eval()
    with torch.no_grad():
        model.fc1_half = False
        pred = model(x_test).argmax(1)
        acc = float((pred == y_test).float().mean())
        if not torch.isfinite(model(x_test)).all():
            acc = 0.0
    rec.extra["fp16_inf_steps"] = inf_steps
    return rec.result(acc, "test accuracy", True, chance_loss=math.log(10))


if __name__ == "__main__":
    main(run, FAULTS)
