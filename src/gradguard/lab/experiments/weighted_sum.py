"""The pre-activation of one neuron with 750 inputs, for three weight scales σ.

z = Σ_{i=1..750} x_i·w_i with inputs x_i ~ U(0, 1) drawn once and weights w_i ~ N(0, σ) drawn 10,000
times. Given x, z is exactly normal with mean 0 and variance σ²·Σx_i² (≈ 750·σ²/3 = 250·σ² since
E[x²] = 1/3): the weight scale sets the pre-activation scale, which decides whether sigmoid/tanh units
saturate and whether a ReLU recurrence blows up.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradguard.lab import claims as C
from gradguard.lab.experiment import ExperimentInfo, Result, RunContext
from gradguard.report.figures import Figure, Panel, Series

SIGMAS = (1.0, 0.1, 0.01)
INPUTS = 750
#: |z| beyond which sigmoid'(z) < 0.018 and tanh'(z) < 0.0014: the flat, saturated region.
SATURATED = 4.0


def run(ctx: RunContext) -> Result:
    draws = 10_000  # the seed's count; the simulation is cheap, so quick mode keeps it
    x = ctx.rng.uniform(0.0, 1.0, INPUTS)
    sum_sq = float(np.sum(x**2))
    claims, panels = [], []
    metrics: dict[str, Any] = {"sum_x_squared": sum_sq}
    for k, sigma in enumerate(SIGMAS):
        z = ctx.rng.normal(0.0, sigma, (draws, INPUTS)) @ x
        exact_var = sigma**2 * sum_sq
        mean, var = float(z.mean()), float(z.var(ddof=1))
        sem = math.sqrt(exact_var / draws)
        saturated = float(np.mean(np.abs(z) > SATURATED))
        metrics[f"sigma={sigma:g}"] = {"mean": mean, "variance": var, "exact_variance": exact_var,
                                       "frac_saturated": saturated}
        claims.append(C.close_to(f"variance σ={sigma:g}", f"sample variance of z equals σ²·Σx² for σ={sigma:g}",
                                 var, exact_var, 0.05))
        claims.append(C.at_most(f"mean σ={sigma:g}", f"|mean of z| in standard errors for σ={sigma:g}",
                                abs(mean) / sem, 3.0))
        grid = np.linspace(-4 * math.sqrt(exact_var), 4 * math.sqrt(exact_var), 200)
        pdf = np.exp(-(grid**2) / (2 * exact_var)) / math.sqrt(2 * math.pi * exact_var)
        panels.append(Panel(
            f"σ = {sigma:g}: sample var {var:.4g}, exact σ²Σx² = {exact_var:.4g}", "pre-activation z",
            "probability density",
            [Series("10,000 draws of z", [float(f"{v:.4g}") for v in z.tolist()], kind="hist", alpha=0.6),
             Series("N(0, σ²Σx²)", pdf.tolist(), x=grid.tolist(), color="black")],
        ))
        ctx.progress((k + 1) / len(SIGMAS))
    sat = metrics
    claims.append(C.at_least("saturates at σ=1", f"share of |z| > {SATURATED:g} (sigmoid/tanh flat) with σ = 1",
                             sat["sigma=1"]["frac_saturated"], 0.5))
    claims.append(C.at_most("small at σ=0.01", f"share of |z| > {SATURATED:g} with σ = 0.01",
                            sat["sigma=0.01"]["frac_saturated"], 0.0))
    figure = Figure("histograms", "One neuron's weighted sum of 750 inputs, three weight scales", panels,
                    caption="Histograms of z = Σ x_i·w_i over 10,000 weight draws (inputs fixed). The curve is the "
                            "exact distribution given the inputs. Note the x-axis ranges: each 10× smaller σ "
                            "makes z 10× smaller.", ncols=3)
    config = {"inputs": INPUTS, "draws": draws, "sigmas": list(SIGMAS), "input_distribution": "U(0, 1)"}
    return Result(config, metrics, claims, [figure])


INFO = ExperimentInfo(
    id="weighted-sum",
    references=("LeCun et al. 1998", "Glorot & Bengio 2010"),
    title="A neuron's weighted sum: weight scale sets the pre-activation scale",
    summary=(
        "A unit with 750 inputs in [0, 1] sums them with random weights. Its pre-activation has variance "
        "σ²·Σx² ≈ 250·σ², so with σ = 1 most values land far out where sigmoid and tanh are flat (their "
        "gradient nearly zero) and where a ReLU recurrence amplifies, while σ = 0.01 keeps them small. This is "
        "the case for small, fan-in-scaled initial weights (Xavier/He; see deep-init), the remedy the ReLU "
        "LSTM needed."
    ),
    run=run,
)
