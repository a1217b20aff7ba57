"""History rows: one dict per step, assembled on the host from what one fetch brought back.

Norms arrive squared (so that a distributed ``reduce_fn`` can sum them across shards, see
gradguard.monitor.params); here they become ‖g‖ = (Σ_i ‖g_i‖²)^½ per step and per parameter, and on detail
steps ‖w‖, max|g| and the update ratio ‖Δw‖/‖w‖.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradguard.monitor.params import RowMeta


def history_row(i: int, meta: RowMeta, host: Mapping[str, Any], keys: Mapping[str, Sequence[str]]
                ) -> dict[str, Any]:
    """The history row of the ``i``-th fetched step.

    ``meta``: its gradguard.monitor.params.RowMeta; ``host``: the fetched blocks as Python lists (``grad_sq``,
    ``loss``, ``scale`` and on detail steps ``weight_sq``, ``delta_sq``, ``grad_max``; per step one value per
    parameter, in named_parameters() order); ``keys``: per statistic, each parameter's column name
    (``grad_norm/<name>``, ...).
    """
    gsq = host["grad_sq"][i]
    present = meta.present
    row: dict[str, Any] = {
        "step": meta.step,
        "loss": host["loss"][i] if meta.has_loss else None,
        "grad_norm": math.sqrt(sum(gsq[j] for j in present)),
    }
    if meta.scaled:
        row["loss_scale"] = host["scale"][i]
    counts = meta.nonfinite_counts.tolist() if meta.nonfinite_counts is not None else None
    for k, j in enumerate(present):
        g = gsq[j]
        row[keys["grad_norm"][j]] = math.sqrt(g)
        if counts is not None:
            row[keys["nonfinite"][j]] = float(counts[k])
        else:
            # Exact counts cost two passes, so they are taken only on flagged steps; a finite norm
            # proves the count is 0, a non-finite one (seen only on accelerators) means "some".
            row[keys["nonfinite"][j]] = 0.0 if math.isfinite(g) else math.nan
    if meta.detail:
        wsq, dsq, gmax = host["weight_sq"][i], host["delta_sq"][i], host["grad_max"][i]
        for j in present:
            row[keys["grad_max"][j]] = gmax[j]
        for j in range(len(keys["weight_norm"])):
            w = math.sqrt(wsq[j])
            row[keys["weight_norm"][j]] = w
            if math.isfinite(dsq[j]):
                # ‖Δw‖/‖w‖ of the optimizer step just taken (Karpathy's ≈1e-3 rule of thumb).
                row[keys["update_ratio"][j]] = math.sqrt(dsq[j]) / w if w > 0 else math.inf
    return row
