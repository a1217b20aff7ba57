"""Non-finite values: report the module that produced the first NaN/Inf and in which pass.

The provenance itself comes from the monitor's replay (a module whose inputs were finite and output not);
this rule only words it. Severity is always ``error``: one NaN in a gradient corrupts every parameter it
reaches at the next optimizer step.
"""

from __future__ import annotations

from gradguard.detect.base import Observation
from gradguard.findings import Finding

_GUARD = "wrap the optimizer in gg.Guard(model, opt) so a non-finite step is skipped instead of applied"


def _advice(phase: str, module: str, params_bad: bool, inputs_bad: bool = False) -> str:
    if params_bad:
        return (
            f"The parameters of `{module}` were already corrupted by an earlier update: {_GUARD}, and bound "
            "the updates with gg.clip.ClipNorm(1.0) and a lower learning rate."
        )
    if module == "" and phase == "forward" and inputs_bad:
        return (
            "Clean the data: drop or impute NaN/Inf in the inputs (torch.nan_to_num, or filter the batch with "
            f"torch.isfinite(x).all()); {_GUARD}."
        )
    if module == "" and phase == "forward":
        return (
            "The loss function produced it: clamp its input (e.g. torch.log(p.clamp_min(1e-12))) or use a "
            f"stable form (F.cross_entropy on logits, nn.BCEWithLogitsLoss); {_GUARD}."
        )
    if module == "":
        return f"The loss function's derivative is infinite at these outputs: add an eps inside it; {_GUARD}."
    if phase == "backward":
        return (
            f"`{module}` has an infinite derivative at its input (e.g. sqrt or log at 0, pow with exponent < 1): "
            f"add an eps inside (torch.sqrt(x + 1e-12)) or clamp the input; {_GUARD}."
        )
    return (
        f"Guard the operation in `{module}`.forward that overflows or divides by zero (clamp the input of "
        f"exp/log/div, add an eps); if it overflows because activations explode, use gg.clip.ClipNorm(1.0); "
        f"{_GUARD}."
    )


def detect(obs: Observation) -> list[Finding]:
    """One ``nonfinite`` finding at the producing module when a NaN/Inf was flagged in the new rows."""
    if obs.nonfinite_step is None:
        return []
    step = obs.nonfinite_step
    bad = {k: v for k, v in obs.nonfinite_counts.items() if v}
    evidence: dict[str, object] = {"step": step, "nonfinite_grads": bad}
    origin = obs.origin
    if origin is None or "replay_error" in origin.evidence:
        where = ", ".join(f"{k} ({v:g})" for k, v in list(bad.items())[:5]) or "the loss"
        why = "replaying the step did not reproduce it"
        if origin is not None:
            why = origin.what
            evidence["replay_error"] = origin.evidence["replay_error"]
        return [
            Finding(
                kind="nonfinite",
                module="",
                step=step,
                severity="error",
                message=f"NaN/Inf appeared at step {step} in {where}; {why}, so its producer is unknown.",
                advice=f"Call mon.step() right after backward (before optimizer.step()) and {_GUARD}.",
                evidence=evidence,
            )
        ]
    evidence.update({"phase": origin.phase, **dict(origin.evidence)})
    name = f"`{origin.module}`" if origin.module else "the loss"
    params_bad = bool(origin.evidence.get("nonfinite_params"))
    from_data = bool(origin.evidence.get("nonfinite_inputs"))
    # A NaN that came with the batch was born before the model: no pass of any module produced it; the
    # module that received it first (e.g. the RNN fed a carried hidden state) is the one to name.
    receiver = str(origin.evidence.get("received_by", "")) if from_data else ""
    where = "in the data" if from_data else f"in the {origin.phase} pass of {name}"
    if receiver:
        where += f", and `{receiver}` received it first"
    return [
        Finding(
            kind="nonfinite",
            module=receiver or origin.module,
            step=step,
            severity="error",
            message=f"NaN/Inf was born at step {step} {where}: {origin.what}.",
            advice=_advice(origin.phase, origin.module, params_bad, from_data),
            evidence=evidence,
        )
    ]
