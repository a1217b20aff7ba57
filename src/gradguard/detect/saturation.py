"""Saturation: sigmoid/tanh outputs stuck in their flat regions, where the derivative is ≈ 0.

``frac_saturated`` (see :data:`gradguard.stats.activations.SATURATION_MARGIN`) counts outputs whose
derivative is below ~4% of its peak. When at least :data:`WARN_FRACTION` of a layer's outputs are there,
most of its backward signal is multiplied by ≈ 0 (Glorot & Bengio 2010). ``info`` from
:data:`INFO_FRACTION`.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradguard.detect.base import Observation, finite, fmt
from gradguard.findings import Finding

INFO_FRACTION = 0.25
WARN_FRACTION = 0.5


def _output_module(depth: Sequence[str]) -> str | None:
    """The last leaf module to finish in the forward pass: the model's output layer.

    A sigmoid/tanh *output* that saturates means confident predictions (e.g. a sigmoid before BCELoss on a
    well-trained classifier), not a gradient pathology, so it is not reported.
    """
    # A name is a container when another name extends it by ".child": collect every proper prefix once
    # (linear in the number of names, where testing each pair is quadratic).
    parents = {o[:i] for o in depth for i, c in enumerate(o) if c == "."}
    leaves = [n for n in depth if n not in parents]
    return leaves[-1] if leaves else None


def detect(obs: Observation) -> list[Finding]:
    """One ``saturation`` finding per sigmoid/tanh-like module whose outputs are mostly saturated."""
    out = []
    output_module = _output_module(obs.depth)
    for name, kind in obs.saturation_kinds.items():
        summary = obs.activations.get(name)
        if summary is None or obs.new == 0 or name == output_module:
            continue
        frac = summary.get("frac_saturated")
        if not finite(frac) or frac < INFO_FRACTION:  # type: ignore[operator]
            continue
        assert frac is not None
        bound = "|y| > 0.99" if kind == "tanh" else "y < 0.01 or y > 0.99"
        out.append(
            Finding(
                kind="saturation",
                module=name,
                step=obs.step,
                severity="warning" if frac >= WARN_FRACTION else "info",
                message=(
                    f"{fmt(100 * frac)}% of the {kind} outputs of `{name}` are saturated ({bound}, derivative < 4% of "
                    f"its peak); output mean {fmt(summary['mean'])}, std {fmt(summary['std'])}."
                ),
                advice=(
                    "Scale the initial weights with gg.init.apply(model, 'xavier_uniform') (Var(W) = 2/(fan_in + "
                    "fan_out)), add BatchNorm (torch.nn.BatchNorm1d) before the activation, or switch to ReLU/ELU."
                ),
                evidence={"fraction": frac, "mean": summary["mean"], "std": summary["std"], "activation": kind},
            )
        )
    return out
