"""``make demo``: a ReLU LSTM that blows up (SEEDS S0.2), trained with ``gg.watch`` on.

A 2-layer LSTM (``gradguard.nn.LSTM`` with ReLU as its cell activation) regresses the next value of the
yearly sunspot series (``statsmodels``, min-max normalised to [0, 1]) from the 20 before it, with Adam on
mean-squared error. Weights are drawn from N(0, 1) and biases set to 0.1, as in the seed article. The
loss drops for a few steps, then jumps by orders of magnitude; the monitor says what is going wrong and
where, and prints its per-layer summary. Runs in a few seconds on one CPU core.

    python -m gradguard.demo [--steps 120] [--seed 0] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard.errors import check_number


class Regressor(nn.Module):
    """``rnn`` (the ReLU LSTM) and a linear ``head`` on its last output."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.rnn = gg.nn.LSTM(1, hidden, num_layers=2, activation="relu")
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def sunspot_windows(length: int) -> tuple[Tensor, Tensor]:
    """(window of ``length`` yearly values → next value) pairs of the normalised sunspot series."""
    import statsmodels.api as sm

    s = torch.tensor(sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(), dtype=torch.float32)
    s = (s - s.min()) / (s.max() - s.min())
    w = s.unfold(0, length + 1, 1)
    return w[:, :length, None].contiguous(), w[:, length:].contiguous()


def build(seed: int, hidden: int = 8) -> Regressor:
    """The S0.2 model: weights ~ N(0, 1), biases 0.1."""
    torch.manual_seed(seed)
    model = Regressor(hidden)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weight" in name:
                p.normal_(0.0, 1.0)
            else:
                p.fill_(0.1)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradguard.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--log-dir", default=None, help="also write metrics.jsonl there")
    args = parser.parse_args(argv)
    check_number("steps", args.steps, low=1, integer=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    x, y = sunspot_windows(20)
    model = build(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"ReLU LSTM (2 × 8 units, weights N(0, 1), biases 0.1) on {len(x)} sunspot windows, Adam lr {args.lr}")
    print("The monitor prints each finding as it appears:\n")
    losses: list[float] = []
    with gg.watch(model, log_dir=args.log_dir) as mon:
        for _ in range(args.steps):
            idx = torch.randint(len(x), (32,), generator=gen)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            mon.step(loss)
            opt.step()
            losses.append(float(loss.detach()))
        trace = "  ".join(f"{v:.3g}" for v in losses[:12])
        print(f"\nloss, first 12 steps: {trace}")
        finite = [v for v in losses if v == v]
        lo, hi = min(finite), max(finite)
        print(f"loss: min {lo:.3g}, max {hi:.3g} (×{hi / lo:.3g}) over {len(losses)} steps")
        print()
        print(mon.summary())
    print(f"\n(demo took {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
