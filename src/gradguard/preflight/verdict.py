"""The probe's verdict: measurements in, :class:`gradguard.Finding` list out, each with its remedy.

One rule per pathology, all on one batch at initialisation: non-finite outputs or gradients, vanishing or
exploding gradients through depth (RMS gradient relative to the layer nearest the loss outside
[1e-3, 1e3]; Glorot & Bengio 2010, He et al. 2015), forward explosion (the monitor's rule,
:mod:`gradguard.detect.forward`), saturation, dead ReLU units, and vanishing or exploding gradients through
time (Bengio et al. 1994). The rules and thresholds are tabulated in ``docs/probe.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradguard.detect.base import RuleOptions
from gradguard.detect.forward import forward_finding
from gradguard.findings import KINDS, Finding
from gradguard.preflight.rows import LayerRow, RecurrentProfile, TimeProfile
from gradguard.stats.temporal import HORIZON_THRESHOLD

VANISH_WARNING, VANISH_ERROR = 1e-3, 1e-6
EXPLODE_WARNING, EXPLODE_ERROR = 1e3, 1e6
SATURATION_WARNING, SATURATION_ERROR = 0.25, 0.6
DEAD_WARNING, DEAD_ERROR = 0.5, 0.9
TIME_EXPLODE_WARNING, TIME_EXPLODE_ERROR = 1e2, 1e6

_CLIP = "clip gradients: gg.Guard(model, optimizer, clip=gg.clip.ClipNorm(1.0))"
_NORM = "add normalisation before each activation (nn.BatchNorm1d or nn.LayerNorm)"


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def _names(rows: Sequence[LayerRow], limit: int = 6) -> str:
    labels = [f"`{r.label}`" for r in rows]
    return ", ".join(labels) if len(labels) <= limit else ", ".join(labels[:limit]) + f" (+{len(labels) - limit})"


def _activations(rows: Sequence[LayerRow]) -> tuple[bool, bool]:
    saturating = any(r.saturation is not None for r in rows)
    relu = any(r.type in ("ReLU", "ReLU6") for r in rows)
    return saturating, relu


def _init_advice(rows: Sequence[LayerRow]) -> str:
    saturating, relu = _activations(rows)
    if saturating and not relu:
        return ('use Glorot/Xavier initialisation for sigmoid/tanh layers: gg.init.apply(model, "xavier_normal"), '
                'or switch to a non-saturating activation (nn.ReLU, nn.ELU) with gg.init.apply(model, "he_normal")')
    return 'use He initialisation for ReLU-family layers: gg.init.apply(model, "he_normal") ' \
           '(Glorot/Xavier, gg.init.apply(model, "xavier_normal"), for sigmoid/tanh layers)'


def _nonfinite(rows: Sequence[LayerRow], loss: float) -> list[Finding]:
    for i, r in enumerate(rows):
        if r.nonfinite > 0:
            prev = rows[i - 1] if i > 0 else None
            scale = f" with std {_fmt(prev.std)}" if prev and math.isfinite(prev.std) else ""
            grew = f"; the previous output `{prev.label}` was finite{scale}" if prev else ""
            return [Finding(
                kind="nonfinite", module=r.name, step=0, severity="error",
                message=(f"The forward output of `{r.label}` holds {int(r.nonfinite)} non-finite values of "
                         f"{int(r.numel)}: the first module where NaN/Inf appears{grew}."),
                advice=(f"The activations overflow: {_init_advice(rows)}; {_NORM}. Check the input batch for "
                        "NaN/Inf and scale it (normalise features)."),
                evidence={"first_layer": r.label, "index": r.index, "nonfinite": r.nonfinite,
                          "previous_std": prev.std if prev else None},
            )]
    bad = [r for r in rows if r.grad_nonfinite > 0 or r.param_grad_nonfinite > 0]
    if bad or not math.isfinite(loss):
        last = max(bad, key=lambda r: r.index) if bad else None
        where = f"the gradient reaching `{last.label}`" if last else "the loss"
        return [Finding(
            kind="nonfinite", module=last.name if last else "", step=0, severity="error",
            message=f"The forward pass is finite but {where} is not (loss = {_fmt(loss)}).",
            advice=f"Check the loss for log(0) or division by zero; {_CLIP}.",
            evidence={"layer": last.label if last else None, "loss": loss},
        )]
    return []


def _depth(rows: Sequence[LayerRow]) -> list[Finding]:
    # A module called several times (a cell looped over time, a shared block) is a recurrence, not a depth:
    # its calls are judged through time (time_dim), not layer by layer.
    repeated = {r.name for r in rows if r.call > 1}
    weighted = [r for r in rows if r.has_params and math.isfinite(r.grad_rms) and r.name not in repeated]
    if len(weighted) < 2 or not weighted[-1].grad_rms > 0:
        return []
    ref = weighted[-1]
    atten = [(r, r.grad_rms / ref.grad_rms) for r in weighted[:-1]]
    evidence_all = {r.label: a for r, a in atten}
    out: list[Finding] = []
    low = [(r, a) for r, a in atten if a < VANISH_WARNING]
    if low:
        first, a_first = low[0]
        worst = min(a for _, a in low)
        severity = "error" if worst < VANISH_ERROR else "warning"
        out.append(Finding(
            kind="vanishing", module=first.name, step=0, severity=severity,
            message=(f"The gradient reaching `{first.label}` is {_fmt(a_first)} × that at `{ref.label}` (RMS per "
                     f"element); it is below {VANISH_WARNING:g} × in {len(low)} of {len(atten)} lower layers: "
                     f"{_names([r for r, _ in low])}."),
            advice=f"{_init_advice(rows)}; {_NORM}; or add residual connections.",
            evidence={"reference": ref.label, "layers": [r.label for r, _ in low], "attenuation": evidence_all},
        ))
    high = [(r, a) for r, a in atten if a > EXPLODE_WARNING]
    if high:
        first, a_first = high[0]
        worst = max(a for _, a in high)
        severity = "error" if worst > EXPLODE_ERROR else "warning"
        out.append(Finding(
            kind="exploding", module=first.name, step=0, severity=severity,
            message=(f"The gradient reaching `{first.label}` is {_fmt(a_first)} × that at `{ref.label}` (RMS per "
                     f"element); it grows above {EXPLODE_WARNING:g} × in {len(high)} lower layers: "
                     f"{_names([r for r, _ in high])}."),
            advice=f"{_init_advice(rows)}; {_NORM}; {_CLIP}.",
            evidence={"reference": ref.label, "layers": [r.label for r, _ in high], "attenuation": evidence_all},
        ))
    return out


def _forward(rows: Sequence[LayerRow], input_std: float | None, norms: frozenset[str]) -> list[Finding]:
    repeated = {r.name for r in rows if r.call > 1}
    stds = [(r.name, r.std) for r in rows
            if r.has_params and r.name not in repeated and math.isfinite(r.std) and r.std > 0]
    if len(stds) < 2:
        return []
    saturating, relu = _activations(rows)
    opts = RuleOptions()
    f = forward_finding(stds, input_std, opts.forward_gain, opts.forward_growth, 0, relu or not saturating, norms)
    if f is None:
        return []
    return [Finding(f.kind, f.module, f.step, f.severity, f.message,
                    f"{f.advice[:-1]}; {_CLIP}." if f.advice.endswith(".") else f.advice, dict(f.evidence))]


def _saturation(rows: Sequence[LayerRow]) -> list[Finding]:
    sat = [r for r in rows if r.saturation is not None and r.frac_saturated >= SATURATION_WARNING]
    if not sat:
        return []
    worst = max(r.frac_saturated for r in sat)
    first = sat[0]
    return [Finding(
        kind="saturation", module=first.name, step=0, severity="error" if worst >= SATURATION_ERROR else "warning",
        message=(f"{first.frac_saturated:.0%} of the outputs of `{first.label}` ({first.saturation}) sit in the flat "
                 f"region where the derivative is below 4% of its peak; saturated layers: {_names(sat)}."),
        advice=('the pre-activations are too large: gg.init.apply(model, "xavier_normal"); ' + _NORM +
                '; or switch to a non-saturating activation (nn.ELU, nn.LeakyReLU(0.2)) with '
                'gg.init.apply(model, "he_normal").'),
        evidence={"layers": {r.label: r.frac_saturated for r in sat}},
    )]


def _dead(rows: Sequence[LayerRow]) -> list[Finding]:
    dead = [r for r in rows if math.isfinite(r.dead_frac) and r.dead_frac >= DEAD_WARNING]
    if not dead:
        return []
    worst = max(r.dead_frac for r in dead)
    first = dead[0]
    return [Finding(
        kind="dead_units", module=first.name, step=0, severity="error" if worst >= DEAD_ERROR else "warning",
        message=(f"{first.dead_frac:.0%} of the units of `{first.label}` output 0 for every example of the batch; "
                 f"layers with dead units: {_names(dead)}."),
        advice=('switch to nn.LeakyReLU(0.2) or nn.ELU(), re-initialise with gg.init.apply(model, "he_normal") '
                'and zero biases, and use a smaller learning rate.'),
        evidence={"layers": {r.label: r.dead_frac for r in dead}},
    )]


def _time_advice(cell: str | None, nonlinearity: str, exploding: bool) -> str:
    if exploding:
        base = f'{_CLIP}; start W_hh with spectral radius ≤ 1: gg.init.apply(model, "orthogonal")'
        if nonlinearity == "relu":
            base += '; a ReLU recurrence needs W_hh ≈ identity (IRNN): gg.init.apply(model, "identity"), or use tanh'
        return base + "."
    if cell == "lstm":
        return ('set the forget-gate bias to 1 so the cell keeps its gradient longer: '
                'gg.init.apply(model, "lstm_forget_bias"); truncate sequences to the horizon if that is enough.')
    if cell == "rnn":
        return ('replace nn.RNN by nn.LSTM or nn.GRU (gated memory), or start W_hh at spectral radius 1: '
                'gg.init.apply(model, "orthogonal") (tanh) or gg.init.apply(model, "identity") (ReLU, IRNN).')
    return ('use a gated recurrence (nn.LSTM / nn.GRU) or gg.init.apply(model, "orthogonal"); '
            'for LSTMs gg.init.apply(model, "lstm_forget_bias").')


def _through_time(module: str, label: str, norms: Sequence[float], growth: float, horizon: float,
                  reaches_start: bool, cell: str | None, nonlinearity: str, extra: dict[str, object]) -> list[Finding]:
    steps = len(norms)
    if steps < 2:
        return []
    last = norms[-1]
    finite = [v for v in norms if math.isfinite(v)]
    if len(finite) < len(norms):
        return [Finding(
            kind="exploding", module=module, step=0, severity="error",
            message=(f"The gradient through time of {label} becomes non-finite (or its norm passes 3.4e38) "
                     f"within {steps} steps."),
            advice=_time_advice(cell, nonlinearity, exploding=True),
            evidence={"steps": steps, "growth": growth, **extra},
        )]
    evidence = {"steps": steps, "growth": growth, "horizon": horizon, "reaches_start": reaches_start,
                "threshold": HORIZON_THRESHOLD, **extra}
    amplification = max(finite) / last if last > 0 else math.inf
    if growth > 1 and amplification >= TIME_EXPLODE_WARNING:
        return [Finding(
            kind="exploding", module=module, step=0,
            severity="error" if amplification >= TIME_EXPLODE_ERROR else "warning",
            message=(f"The gradient through time of {label} grows by {_fmt(growth)} per step back: the earliest "
                     f"steps get {_fmt(amplification)} × the last step's gradient over {steps} steps."),
            advice=_time_advice(cell, nonlinearity, exploding=True),
            evidence={**evidence, "amplification": amplification},
        )]
    if not reaches_start and math.isfinite(horizon):
        return [Finding(
            kind="vanishing", module=module, step=0, severity="warning",
            message=(f"The gradient through time of {label} falls below {HORIZON_THRESHOLD:g} of its peak after "
                     f"{horizon:.1f} steps back (per-step factor {_fmt(growth)}), well inside the {steps}-step "
                     f"sequence: dependencies longer than the horizon cannot be learned."),
            advice=_time_advice(cell, nonlinearity, exploding=False),
            evidence=evidence,
        )]
    if growth < 1 and math.isfinite(growth) and growth > 0:
        projected = math.log(HORIZON_THRESHOLD) / math.log(growth)
        return [Finding(
            kind="vanishing", module=module, step=0, severity="info",
            message=(f"The gradient through time of {label} reaches all {steps} steps, shrinking by {_fmt(growth)} "
                     f"per step; longer sequences would see about {projected:.0f} steps back."),
            advice=_time_advice(cell, nonlinearity, exploding=False),
            evidence={**evidence, "projected_horizon": projected},
        )]
    return []


def _recurrent(profiles: Sequence[RecurrentProfile]) -> list[Finding]:
    out: list[Finding] = []
    for p in profiles:
        if not p.last_norms:
            continue
        extra: dict[str, object] = {"call": p.call}
        if p.spectral_radius and math.isfinite(p.spectral_radius[0]):
            extra["spectral_radius"] = p.spectral_radius
            extra["scaled_radius"] = p.scaled_radius
            extra["mean_derivative"] = p.mean_derivative
        if p.gate_name:
            extra[f"{p.gate_name}_gate_mean"] = p.gate_mean
        out += _through_time(p.module, f"`{p.module or '(model)'}` ({p.cell})", p.last_norms, p.growth, p.horizon,
                             p.reaches_start, p.cell, p.nonlinearity, extra)
    return out


def diagnose(
    rows: Sequence[LayerRow],
    recurrent: Sequence[RecurrentProfile] = (),
    time: TimeProfile | None = None,
    loss: float = 0.0,
    *,
    input_std: float | None = None,
    norm_layers: frozenset[str] = frozenset(),
) -> list[Finding]:
    """All findings for one probe, worst first (then in :data:`gradguard.KINDS` order).

    ``input_std`` is the std of the profiled input (the reference of the first layer's gain) and
    ``norm_layers`` the names of the normalisation modules (they reset the forward-growth reference).
    """
    findings = _nonfinite(rows, loss)
    forward_ok = not findings
    forward: list[Finding] = []
    if forward_ok:
        depth = _depth(rows)
        findings += depth
        if not any(f.kind == "exploding" for f in depth):  # a backward explosion is the usual consequence
            forward = _forward(rows, input_std, norm_layers)
    findings += _saturation(rows)
    findings += _dead(rows)
    findings += _recurrent(recurrent)
    unrolled = any(p.last_norms for p in recurrent)
    if time is not None and not unrolled and forward_ok:
        findings += _through_time("", "the input", time.norms, time.growth, time.horizon, time.reaches_start,
                                  None, "", {"time_dim": time.time_dim})
    # A recurrence that amplifies through time also grows its output: its through-time finding says more.
    findings += [f for f in forward if f.key not in {g.key for g in findings}]
    findings.sort(key=lambda f: (-f.rank, KINDS.index(f.kind)))
    return findings
