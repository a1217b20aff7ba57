"""Batch normalisation before each activation lets a network train in fewer epochs.

The worked example is an MLP 784-300-100-10 with He initialisation, batch normalisation and ELU,
trained with plain SGD (lr 0.01, batch 200, 20 epochs) on MNIST. Offline we use scikit-learn's 8×8
digits (64 inputs, so 64-300-100-10). BN normalises each unit over the batch and rescales with learned
γ, β; at inference it uses moving averages of μ and σ² (Ioffe & Szegedy 2015), which makes training far
less sensitive to the scale of the pre-activations: a sigmoid net at a high learning rate gets there in
fewer epochs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradguard.lab import claims as C
from gradguard.lab.data import digits
from gradguard.lab.experiment import ExperimentInfo, Result, RunContext
from gradguard.lab.nets import DeepMLP, History, train_classifier
from gradguard.report.figures import Figure, Panel, Series

WIDTHS = (300, 100)
BATCH = 200
TARGET = 0.90  # test accuracy whose epoch count is compared

#: name → (activation, batchnorm, SGD learning rate)
VARIANTS = {
    "He + BN + ELU, lr 0.01 (worked example)": ("elu", True, 0.01),
    "He + ELU, no BN, lr 0.01": ("elu", False, 0.01),
    "sigmoid + BN, lr 1.0": ("sigmoid", True, 1.0),
    "sigmoid, no BN, lr 1.0": ("sigmoid", False, 1.0),
}


def _he_init(model: nn.Module) -> None:
    # He et al. 2015: Var(W) = 2/fan_in, the ReLU-family gain, biases zero.
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


def _scaled(progress: Callable[[float], None], k: int, n: int, fraction: float) -> None:
    progress((k + fraction) / n)  # run k of n is ``fraction`` done


def epochs_to(history: History, steps_per_epoch: int, target: float) -> float:
    """First epoch (1-based) whose end-of-epoch test accuracy reaches ``target``; ``inf`` if none."""
    for step, acc in zip(history.eval_step, history.test_accuracy, strict=True):
        if acc >= target:
            return step / steps_per_epoch
    return math.inf


def run(ctx: RunContext) -> Result:
    epochs = 20  # the seed's budget; cheap on digits, so quick mode keeps it
    data = digits(ctx.rng)
    steps_per_epoch = len(data.y) // BATCH
    histories: dict[str, History] = {}
    for k, (name, (act, bn, lr)) in enumerate(VARIANTS.items()):
        torch.manual_seed(ctx.seed)
        model = DeepMLP(data.x.shape[1], 10, WIDTHS, act, batchnorm=bn)
        _he_init(model)
        histories[name] = train_classifier(
            model, data, torch.optim.SGD(model.parameters(), lr=lr), steps=epochs * steps_per_epoch, batch=BATCH,
            generator=torch.Generator().manual_seed(ctx.seed), eval_every=steps_per_epoch,
            progress=functools.partial(_scaled, ctx.progress, k, len(VARIANTS)),
        )
    bn_layer = nn.BatchNorm1d(4, momentum=0.1)
    n_params, n_buffers = len(list(bn_layer.parameters())), len([b for b in bn_layer.buffers() if b.dim() == 1])
    metrics: dict[str, Any] = {
        name: {"test_accuracy_per_epoch": h.test_accuracy, "final_test_accuracy": h.test_accuracy[-1],
               f"epochs_to_{TARGET:g}": epochs_to(h, steps_per_epoch, TARGET)}
        for name, h in histories.items()
    }
    sig_bn = metrics["sigmoid + BN, lr 1.0"][f"epochs_to_{TARGET:g}"]
    sig_plain = metrics["sigmoid, no BN, lr 1.0"][f"epochs_to_{TARGET:g}"]
    claims = [
        C.at_least("BN is faster", f"epochs to {TARGET:.0%} test accuracy, sigmoid net without BN minus with BN",
                   sig_plain - sig_bn, 1.0),
        C.at_least("worked example", "He + BN + ELU (SGD 0.01, batch 200): test accuracy after 20 epochs",
                   metrics["He + BN + ELU, lr 0.01 (worked example)"]["final_test_accuracy"], 0.85),
        C.is_true("four vectors", "a BN layer holds γ, β (trained) and moving μ, σ² (buffers)",
                  (n_params, n_buffers) == (2, 2), f"{n_params} parameters, {n_buffers} moving statistics"),
    ]
    panel = Panel("test accuracy per epoch", "epoch", "test accuracy (fraction)", [])
    styles = {True: "-", False: "--"}
    for name, h in histories.items():
        panel.series.append(Series(name, h.test_accuracy, x=[s / steps_per_epoch for s in h.eval_step],
                                   linestyle=styles[VARIANTS[name][1]], marker="o"))
    panel.series.append(Series(f"target {TARGET:.0%}", [TARGET], kind="hline", linestyle=":"))
    loss = Panel("training loss per step", "SGD step", "cross-entropy (log scale)", [
        Series(name, h.loss, linestyle=styles[VARIANTS[name][1]]) for name, h in histories.items()
    ], yscale="log")
    figure = Figure("accuracy", "Batch normalisation: fewer epochs to the same accuracy", [panel, loss],
                    caption="Solid lines use batch normalisation before each activation, dashed lines do not. "
                            "On this small, shallow problem the ELU net learns about as fast either way; the "
                            "sigmoid net at a high learning rate reaches the target epochs earlier with BN.")
    config = {"data": "sklearn digits (64 features)", "widths": list(WIDTHS), "batch": BATCH, "epochs": epochs,
              "optimizer": "SGD", "init": "He normal, zero bias", "bn_momentum_pytorch": 0.1, "target": TARGET,
              "variants": {k: {"activation": a, "batchnorm": b, "lr": lr} for k, (a, b, lr) in VARIANTS.items()}}
    return Result(config, metrics, claims, [figure])


INFO = ExperimentInfo(
    id="batchnorm",
    references=("Ioffe & Szegedy 2015", "He et al. 2015", "Clevert et al. 2016"),
    title="Batch normalisation: the He + BN + ELU example and fewer epochs to target",
    summary=(
        "Batch normalisation standardises each unit's pre-activation over the mini-batch, then rescales it with "
        "two learned vectors; inference uses moving averages instead. The seed's He + BN + ELU network trained "
        "with plain SGD reaches high test accuracy, and a sigmoid network at a high learning rate reaches 90% "
        "in fewer epochs with BN than without: BN keeps pre-activations out of the saturated range whatever the "
        "weights do. This supports batch normalisation as a remedy, especially with saturating activations."
    ),
    run=run,
)
