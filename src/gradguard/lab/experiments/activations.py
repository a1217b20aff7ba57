"""Non-saturating activations, and ReLU units that die at a high learning rate.

The same 8-layer, 100-unit MLP (He init) is trained on digits with Adam at lr 0.01, ten times the usual
default, with nine activations. A unit is *dead* when its activation's derivative is exactly zero on every
training example: no gradient reaches its weights, so it never recovers. ReLU units die this way when a
large update pushes their pre-activation below zero for all inputs; leaky ReLU (α = 0.01, 0.2), RReLU,
PReLU, ELU and SELU keep a non-zero slope for negative inputs and cannot. The gradguard monitor
(:func:`gradguard.watch`) watches the ReLU net and should report the dead units by itself.
"""

from __future__ import annotations

from typing import Any

import torch

import gradguard as gg
from gradguard.lab import claims as C
from gradguard.lab.data import digits
from gradguard.lab.experiment import ExperimentInfo, Result, RunContext
from gradguard.lab.nets import ACTIVATIONS, DeepMLP, train_classifier
from gradguard.report.figures import Figure, Panel, Series

DEPTH, WIDTH, BATCH = 8, 100, 64
HIGH_LR, LOW_LR = 1e-2, 1e-3
NON_DYING = ("leaky_relu(0.01)", "leaky_relu(0.2)", "rrelu", "prelu", "elu", "selu")


def unit_shares(model: DeepMLP, x: torch.Tensor) -> tuple[float, float]:
    """(dead, never positive) shares of hidden units over the inputs ``x``, in eval mode.

    Dead: the activation's derivative is exactly 0 for every input (measured by autograd on the
    pre-activation, so it is right for any activation). Never positive: the output is ≤ 0 for every input.
    """
    was = model.training
    model.eval()
    dead, never = [], []
    h = x
    for lin, norm, act in zip(model.hidden, model.norms, model.acts, strict=True):
        pre = norm(lin(h)).detach().requires_grad_(True)
        out = act(pre)
        (slope,) = torch.autograd.grad(out.sum(), pre)  # element-wise derivative of the activation
        dead.append((slope == 0).all(0))
        never.append((out <= 0).all(0))
        h = out.detach()
    model.train(was)
    return float(torch.cat(dead).float().mean()), float(torch.cat(never).float().mean())


def _train(act: str, lr: float, steps: int, ctx: RunContext, data: Any, watch: bool = False) -> dict[str, Any]:
    torch.manual_seed(ctx.seed)
    model = DeepMLP(data.x.shape[1], 10, [WIDTH] * DEPTH, act)
    gg.init.apply(model, "he_normal", activation="relu", generator=torch.Generator().manual_seed(ctx.seed))
    monitor = gg.watch(model, console=False) if watch else None
    history = train_classifier(
        model, data, torch.optim.Adam(model.parameters(), lr=lr), steps=steps, batch=BATCH,
        generator=torch.Generator().manual_seed(ctx.seed), eval_every=steps,
        after_backward=monitor.step if monitor is not None else (lambda loss: None),
    )
    dead, never = unit_shares(model, data.x)
    out = {"dead_share": dead, "never_positive_share": never, "test_accuracy": history.test_accuracy[-1],
           "loss": history.loss}
    if monitor is not None:
        out["monitor_findings"] = [f.message for f in monitor.findings if f.kind == "dead_units"]
        monitor.close()
    return out


def run(ctx: RunContext) -> Result:
    steps = 100 if ctx.quick else 400
    data = digits(ctx.rng)
    runs: dict[str, dict[str, Any]] = {}
    names = list(ACTIVATIONS)
    for k, act in enumerate(names):
        runs[act] = _train(act, HIGH_LR, steps, ctx, data, watch=act == "relu")
        ctx.progress((k + 1) / (len(names) + 1))
    low = _train("relu", LOW_LR, steps, ctx, data)
    ctx.progress(1.0)
    accs = {a: r["test_accuracy"] for a, r in runs.items()}
    relu = runs["relu"]
    claims = [
        C.at_least("ReLUs die", f"share of dead ReLU units after Adam at lr {HIGH_LR:g}", relu["dead_share"], 0.05),
        C.at_most("leaky cannot die", "largest dead-unit share among leaky ReLU (0.01, 0.2), RReLU, PReLU, ELU, SELU",
                  max(runs[a]["dead_share"] for a in NON_DYING), 0.0),
        C.at_most("lower lr, fewer deaths", f"dead ReLU share at lr {LOW_LR:g} / at lr {HIGH_LR:g}",
                  low["dead_share"] / max(relu["dead_share"], 1e-12), 0.5),
        C.at_least("monitor sees it", "dead_units findings gg.watch raised on the ReLU net",
                   len(relu["monitor_findings"]), 1),
        C.is_true("logistic last", "the logistic (sigmoid) net has the lowest test accuracy",
                  min(accs, key=accs.__getitem__) == "sigmoid", f"sigmoid {accs['sigmoid']:.3f}, "
                  f"best {max(accs, key=accs.__getitem__)} {max(accs.values()):.3f}"),
    ]
    shares = Panel(f"hidden units after {steps} Adam steps at lr {HIGH_LR:g}", "activation",
                   "share of hidden units", [
                       Series("dead (zero derivative on every example)", [runs[a]["dead_share"] for a in names],
                              kind="bar", ticks=names, alpha=0.9),
                       Series("never positive (output ≤ 0 on every example)",
                              [runs[a]["never_positive_share"] for a in names], kind="bar", ticks=names, alpha=0.45),
                   ])
    acc = Panel("test accuracy", "activation", "test accuracy (fraction)",
                [Series("", [accs[a] for a in names], kind="bar", ticks=names)], legend=False)
    loss = Panel("training loss", "Adam step", "cross-entropy (log scale)",
                 [Series(a, runs[a]["loss"], alpha=0.8) for a in names], yscale="log")
    figures = [
        Figure("units", "Dead units and accuracy by activation", [shares, acc],
               caption="Dead units get no gradient at all. Leaky variants may also sit below zero for every input "
                       "(light bars), but their negative slope keeps a gradient flowing, so they can come back."),
        Figure("loss", "Training loss by activation", [loss], ncols=1,
               caption="The logistic net barely moves: its gradient shrinks by at least 4× per layer."),
    ]
    metrics = {"runs": {a: {k: v for k, v in r.items() if k != "loss"} for a, r in runs.items()},
               f"relu_lr_{LOW_LR:g}": {k: v for k, v in low.items() if k != "loss"}}
    config = {"data": "sklearn digits", "depth": DEPTH, "width": WIDTH, "batch": BATCH, "steps": steps,
              "optimizer": "Adam", "lr": HIGH_LR, "low_lr": LOW_LR, "init": "he_normal (ReLU gain)",
              "activations": names}
    return Result(config, metrics, claims, figures)


INFO = ExperimentInfo(
    id="activations",
    references=("Maas et al. 2013", "He et al. 2015", "Clevert et al. 2016", "Klambauer et al. 2017"),
    title="Activations: dead ReLUs at a high learning rate, leaky variants cannot die",
    summary=(
        "Trained at a high learning rate, a ReLU network ends with a sizeable share of units that output zero for "
        "every input: their gradient is zero, so they never learn again (a lower learning rate kills far fewer). "
        "Leaky ReLU, RReLU, PReLU, ELU and SELU keep a small slope below zero and lose no unit, and the deep "
        "logistic network hardly learns at all. gradguard's monitor flags the dead units on its own. This supports "
        "non-saturating, non-dying activations and a smaller learning rate with ReLU."
    ),
    run=run,
)
