"""A small CNN on sklearn's ``load_digits``, written as an ordinary training script (no gradguard in it).

The program ``benchmarks/zero_code.py`` times plainly and under ``gradguard run``: two 3×3 convolutions
with ReLU and max-pooling, dropout, two linear layers, Adam at lr 1e-3 over reshuffled mini-batches of 32
(8×8 images, 10 classes), cross-entropy, a test-accuracy evaluation every 200 steps and at the end.

It prints ``started <unix time>`` after its imports and data loading and ``finished <unix time>`` after
its last step and evaluation, so that the caller can separate start-up, training and the time from the
end of training to process exit (where ``gradguard run`` writes its report).

    python benchmarks/programs/digits_cnn.py --steps 3000
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout(torch.flatten(x, 1))
        return self.fc2(F.relu(self.fc1(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    x_train, y_train = images[order[:1400]], labels[order[:1400]]
    x_test, y_test = images[order[1400:]], labels[order[1400:]]
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    print(f"started {time.time():.6f}", flush=True)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            acc = float((model(x_test).argmax(1) == y_test).float().mean())
        model.train()
        return acc

    perm, pos = torch.randperm(len(y_train)), 0
    model.train()
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(perm):
            perm, pos = torch.randperm(len(y_train)), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.4f} test accuracy {evaluate():.3f}", flush=True)
    print(f"final test accuracy {evaluate():.3f}", flush=True)
    print(f"finished {time.time():.6f}", flush=True)


if __name__ == "__main__":
    main()
