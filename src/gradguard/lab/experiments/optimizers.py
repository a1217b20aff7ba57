"""Adaptive optimisers (Adagrad, RMSProp, Adam) against plain SGD on a net whose gradients vanish.

A 6-layer sigmoid MLP (PyTorch default init) has gradients that shrink by ≥ 4× per layer on the way
down, so SGD moves the lower layers' weights almost not at all (the "lower layers stop changing"
symptom). Adagrad (Duchi et al. 2011), RMSProp (Tieleman & Hinton 2012) and Adam (Kingma & Ba 2015) divide
each parameter's step by a running root-mean-square of its own gradients, so a uniformly small gradient
still gives a normal-sized step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from gradguard.lab import claims as C
from gradguard.lab.data import digits
from gradguard.lab.experiment import ExperimentInfo, Result, RunContext
from gradguard.lab.nets import DeepMLP, train_classifier
from gradguard.report.figures import Figure, Panel, Series

DEPTH, WIDTH, BATCH, TAIL = 6, 64, 64, 20

OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], float]] = {
    "SGD": (torch.optim.SGD, 0.1),
    "Adagrad": (torch.optim.Adagrad, 0.01),
    "RMSProp": (torch.optim.RMSprop, 1e-3),
    "Adam": (torch.optim.Adam, 1e-3),
}


def relative_change(before: Iterable[torch.Tensor], after: Iterable[torch.Tensor]) -> list[float]:
    """‖W_end − W_start‖ / ‖W_start‖ per layer."""
    return [float((a - b).norm() / b.norm()) for b, a in zip(before, after, strict=True)]


def run(ctx: RunContext) -> Result:
    steps = 300 if ctx.quick else 800
    data = digits(ctx.rng)
    runs: dict[str, dict[str, Any]] = {}
    for k, (name, (make, lr)) in enumerate(OPTIMIZERS.items()):
        torch.manual_seed(ctx.seed)
        model = DeepMLP(data.x.shape[1], 10, [WIDTH] * DEPTH, "sigmoid")
        start = [lin.weight.detach().clone() for lin in model.hidden if isinstance(lin, torch.nn.Linear)]
        history = train_classifier(model, data, make(model.parameters(), lr=lr), steps=steps, batch=BATCH,
                                   generator=torch.Generator().manual_seed(ctx.seed), eval_every=steps)
        end = [lin.weight.detach() for lin in model.hidden if isinstance(lin, torch.nn.Linear)]
        change = relative_change(start, end)
        runs[name] = {"lr": lr, "final_loss": float(np.mean(history.loss[-TAIL:])),
                      "test_accuracy": history.test_accuracy[-1], "relative_change": change,
                      "first_over_last_change": change[0] / change[-1], "loss": history.loss}
        ctx.progress((k + 1) / len(OPTIMIZERS))
    sgd = runs["SGD"]
    adaptive = [n for n in OPTIMIZERS if n != "SGD"]
    claims = [
        C.at_most("SGD starves low layers", "SGD: relative weight change of layer 1 / of the last hidden layer",
                  sgd["first_over_last_change"], 0.01),
        C.at_least("Adam moves them", "Adam's layer-1/last-layer change ratio over SGD's",
                   runs["Adam"]["first_over_last_change"] / sgd["first_over_last_change"], 10.0),
        C.at_most("adaptive train further", f"highest final training loss of {', '.join(adaptive)} / SGD's "
                  f"(mean of the last {TAIL} steps): below 1 means every one ended lower",
                  max(runs[n]["final_loss"] for n in adaptive) / sgd["final_loss"], 1.0),
    ]
    layers = list(range(1, DEPTH + 1))
    moved = Panel(f"how far each layer's weights moved in {steps} steps", "hidden layer (1 = next to the input)",
                   "‖W_end − W_start‖ / ‖W_start‖ (log scale)",
                   [Series(f"{n} (lr {r['lr']:g})", r["relative_change"], x=layers, marker="o")
                    for n, r in runs.items()], yscale="log")
    loss = Panel("training loss", "step", "cross-entropy (nats)",
                 [Series(n, r["loss"], alpha=0.8) for n, r in runs.items()])
    figure = Figure("optimizers", f"SGD vs adaptive optimisers on a {DEPTH}-layer sigmoid MLP", [moved, loss],
                    caption="Left: SGD changes the first layer hundreds of times less than the last one, because its "
                            "gradient is that much smaller; the adaptive optimisers normalise each parameter's step "
                            "and move every layer. Right: the loss they reach in the same number of steps.")
    metrics = {"runs": {n: {k: v for k, v in r.items() if k != "loss"} for n, r in runs.items()}}
    config = {"data": "sklearn digits", "depth": DEPTH, "width": WIDTH, "activation": "sigmoid",
              "init": "pytorch default", "batch": BATCH, "steps": steps,
              "optimizers": {n: {"lr": lr} for n, (_, lr) in OPTIMIZERS.items()}}
    return Result(config, metrics, claims, [figure])


INFO = ExperimentInfo(
    id="optimizers",
    references=("Duchi et al. 2011", "Tieleman & Hinton 2012", "Kingma & Ba 2015"),
    title="Adaptive optimisers keep the lower layers learning",
    summary=(
        "In a deep sigmoid network the gradient shrinks layer by layer, and plain SGD barely moves the lower "
        "layers: their weights 'stop changing', one of the symptoms to watch for. Adagrad, RMSProp and Adam scale "
        "each parameter's step by its own gradient history, so every layer moves and the loss falls further in "
        "the same budget. This supports adaptive optimisers as a partial remedy for vanishing gradients "
        "(initialisation, normalisation and architecture fix the cause)."
    ),
    run=run,
)
