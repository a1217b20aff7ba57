"""The stacked-LSTM recipe (2 × 100 units, SGD lr 0.01, element-wise clipping at 1.0).

Two stacked 100-unit LSTM layers and a linear head forecast the scaled sunspot series, with plain SGD at
lr 0.01, with and without :class:`gradguard.clip.ClipValue` (1.0). With PyTorch's default initialisation
the gradients stay small and clipping never acts; with weights ~ N(0, 1) (too large) single
gradient elements reach the hundreds or more despite the LSTM's gates, and clipping bounds every
applied element to [−1, 1].
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard.lab import claims as C
from gradguard.lab.data import sunspots_windows
from gradguard.lab.experiment import ExperimentInfo, Result, RunContext
from gradguard.lab.nets import train_regressor
from gradguard.report.figures import Figure, Panel, Series

WINDOW, BATCH, LR, CLIP, TAIL = 20, 32, 0.01, 1.0, 20


class Stacked(nn.Module):
    """``nn.LSTM`` with two layers of ``hidden`` units, then a linear head on the last hidden state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class MaxTracker:
    """A clip step that also records the largest |gradient element| before and after clipping."""

    def __init__(self, policy: gg.clip.ClipPolicy | None) -> None:
        self.policy = policy
        self.before: list[float] = []
        self.after: list[float] = []

    def _max(self, params: list[nn.Parameter]) -> float:
        return max(float(p.grad.abs().max()) for p in params if p.grad is not None)

    def __call__(self, parameters: Iterator[nn.Parameter]) -> None:
        params = list(parameters)
        self.before.append(self._max(params))
        if self.policy is not None:
            self.policy(params)
        self.after.append(self._max(params))


def run(ctx: RunContext) -> Result:
    hidden, steps = 100, (30 if ctx.quick else 600)
    data = sunspots_windows(WINDOW)
    runs: dict[str, dict[str, Any]] = {}
    variants = [(init, clip) for init in ("default", "N(0,1)") for clip in (False, True)]
    for k, (init, clip) in enumerate(variants):
        name = f"{init} init, {'clip value 1' if clip else 'no clipping'}"
        torch.manual_seed(ctx.seed)
        model = Stacked(hidden)
        if init == "N(0,1)":
            gg.init.apply(model, "normal", std=1.0, bias=0.0, generator=torch.Generator().manual_seed(ctx.seed))
        tracker = MaxTracker(gg.clip.ClipValue(CLIP) if clip else None)
        history = train_regressor(model, data, torch.optim.SGD(model.parameters(), lr=LR), steps=steps, batch=BATCH,
                                  generator=torch.Generator().manual_seed(ctx.seed), clip=tracker)
        with torch.no_grad():
            test = float(nn.functional.mse_loss(model(data.x_test), data.y_test))
        runs[name] = {"loss": history.loss, "max_grad": tracker.before, "final_train_mse": float(
            np.mean(history.loss[-TAIL:])), "final_test_mse": test, "largest_gradient_element": max(tracker.before),
            "largest_applied_element": max(tracker.after),
            "share_of_steps_clipped": float(np.mean(np.array(tracker.before) > CLIP)) if clip else 0.0}
        ctx.progress((k + 1) / len(variants))
    d_plain, d_clip = runs["default init, no clipping"], runs["default init, clip value 1"]
    big_clip = runs["N(0,1) init, clip value 1"]
    claims = [
        C.at_least("LSTM gradients explode", "N(0,1)-initialised stacked LSTM: largest gradient element seen",
                   runs["N(0,1) init, no clipping"]["largest_gradient_element"], 100.0),
        C.at_most("clip bounds elements", "with clipping: largest gradient element actually applied",
                  big_clip["largest_applied_element"], CLIP),
        C.at_most("harmless when calm", "default init: |final train MSE with clipping − without| / without",
                  abs(d_clip["final_train_mse"] - d_plain["final_train_mse"]) / d_plain["final_train_mse"], 0.05),
    ]
    grads = Panel("largest |gradient element| per step, before clipping", "SGD step",
                  "max |∂L/∂w| (log scale)", [Series(n, r["max_grad"], alpha=0.8) for n, r in runs.items()] +
                  [Series("clip value 1", [CLIP], kind="hline", linestyle=":")], yscale="log")
    loss = Panel("training loss", "SGD step", "MSE (log scale)",
                 [Series(n, r["loss"], alpha=0.8) for n, r in runs.items()], yscale="log")
    title = f"Two stacked {hidden}-unit LSTMs, SGD lr {LR:g}, with and without clipping"
    figure = Figure("stacked", title, [grads, loss],
                    caption="With the default initialisation no gradient element comes near 1, so clipping changes "
                            "nothing. With N(0,1) weights, gradient elements reach hundreds or more and clipping "
                            "bounds every step; at lr 0.01 it also slows the escape from such a bad start, so "
                            "clipping is a guard rail, not a substitute for a sensible initialisation.")
    metrics = {n: {k: v for k, v in r.items() if k not in ("loss", "max_grad")} for n, r in runs.items()}
    config = {"data": "statsmodels sunspots, scaled to [0, 1]", "window": WINDOW, "hidden": hidden, "layers": 2,
              "batch": BATCH, "optimizer": "SGD", "lr": LR, "clip_value": CLIP, "steps": steps}
    return Result(config, metrics, claims, [figure])


INFO = ExperimentInfo(
    id="stacked-lstm-clip",
    references=("Hochreiter & Schmidhuber 1997", "Pascanu et al. 2013"),
    title="Stacked LSTM with SGD and element-wise clipping at 1.0",
    summary=(
        "The classic recipe for a stacked LSTM is plain SGD with every gradient element clipped to [−1, 1]. With a "
        "sensible initialisation the gradients stay small and clipping costs nothing. With weights that are too "
        "large, single gradient elements reach the hundreds even though the LSTM's gates are bounded: gating does "
        "not prevent explosion, and clipping bounds every update. Remedy supported: clip by value (gradguard.clip."
        "ClipValue) as a cheap, always-on guard rail, together with a proper initialisation."
    ),
    run=run,
)
