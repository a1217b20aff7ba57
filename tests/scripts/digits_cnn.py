"""A small CNN on scikit-learn's 8×8 handwritten digits, trained with SGD and momentum from a DataLoader.

In the manner of the classic MNIST example (two convolutions, max-pooling, dropout, a linear head,
``F.nll_loss`` on ``log_softmax``), shrunk to the digits set that ships with scikit-learn.

Faults (``--fault``): ``lr100`` multiplies the learning rate by 100; ``nan`` puts a NaN pixel in one
training batch (step 25), as a corrupted record in the data would.
``--watch DIR`` is the same program instrumented by hand with ``gg.watch`` (the reference for the tests).
``--pause-after N`` prints ``paused after step N`` once step ``N`` (counted from 0) has made its update, then
sleeps: a test kills the process there, at a known step.
"""

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--workers", type=int, default=0)
parser.add_argument("--fault", choices=["none", "lr100", "nan"], default="none")
parser.add_argument("--watch", default=None, help="instrument by hand with gg.watch, logging to this folder")
parser.add_argument("--exit-code", type=int, default=0, help="exit with this code at the end")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--pause-after", type=int, default=None, metavar="N", help="sleep after step N's update")
args = parser.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(1)
NAN_STEP = 25


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.log_softmax(self.fc(torch.flatten(self.dropout(x), 1)), dim=1)


def main() -> int:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(args.seed))
    model = Net()
    lr = args.lr * (100 if args.fault == "lr100" else 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    mon = None
    if args.watch:
        import gradguard as gg

        mon = gg.watch(model, log_dir=args.watch, console=False)
    model.train()
    step = 0
    while step < args.steps:
        for data, target in loader:
            if step >= args.steps:
                break
            if args.fault == "nan" and step == NAN_STEP:
                data[0, 0, 3, 3] = float("nan")
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            if mon is not None:
                mon.step(loss)
            optimizer.step()
            if step % 10 == 0:
                print(f"step {step}: loss {loss.item():.4f}")
            if step == args.pause_after:
                print(f"paused after step {step}", flush=True)
                time.sleep(3600)
            step += 1
    if mon is not None:
        mon.close()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"final loss {loss.item():.6f} | accuracy {acc:.3f} | weights finite {finite}")
    return args.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
