"""The probe's measurements: forward hooks on one pass, one ``torch.autograd.grad``, then per-call rows.

:class:`Recorder` hooks every probed module and keeps its output's summary; :func:`measure` takes the
gradient of the loss with respect to every recorded output, the profiled input and the parameters in one
call, and turns them into :class:`~gradguard.preflight.rows.LayerRow`,
:class:`~gradguard.preflight.rows.TimeProfile` and :class:`~gradguard.preflight.rows.RecurrentProfile`
records. The quantities are defined in ``docs/probe.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.detect.forward import is_norm
from gradguard.errors import StateError
from gradguard.preflight.loss import float_tensors
from gradguard.preflight.recurrent import (
    CellSpec,
    Unrolled,
    cell_spec,
    has_active_dropout,
    unroll_profile,
    unsupported_reason,
)
from gradguard.preflight.rows import LayerRow, RecurrentProfile, TimeProfile
from gradguard.stats import (
    activation_summary,
    gradient_horizon,
    growth_factor,
    is_recurrent,
    nonfinite_counts,
    saturation_kind,
    tensor_norms,
    time_step_norms,
    unit_activity,
    unit_dim,
)

#: Modules whose zero outputs mean a unit that did not fire (a "dead" unit when it never fires).
_RELU_LIKE = (nn.ReLU, nn.ReLU6)
_NAN = float("nan")


@dataclass
class Call:
    """One module call seen by the forward hook: its output and, for an unrollable recurrence, its inputs."""

    name: str
    module: nn.Module
    call: int
    out: Tensor | None
    summary: Tensor
    dead: Tensor
    outputs: list[Tensor] = field(default_factory=list)
    inputs: Any = None
    hx: Any = None


@dataclass
class Measurement:
    """Everything :func:`measure` returns, ready for the verdict."""

    rows: list[LayerRow]
    recurrent: list[RecurrentProfile]
    time: TimeProfile | None
    loss: float
    norm_layers: frozenset[str]


def probed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaves, recurrent modules and modules owning parameters directly; never inside a recurrent one."""
    chosen: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        leaf = next(m.children(), None) is None
        own = next(m.parameters(recurse=False), None) is not None
        if is_recurrent(m):
            inside.append(name)
        if leaf or own or is_recurrent(m):
            chosen.append((name, m))
    return chosen


class Recorder:
    """Forward hooks on :func:`probed_modules`, recording one :class:`Call` per module call.

    ``embedding`` is ``(name, output)`` of the first ``nn.Embedding`` call when ``track_embedding`` is set
    (a model fed token ids: the signal through time starts at the embedding's output).
    """

    def __init__(self, model: nn.Module, *, track_embedding: bool = False) -> None:
        self.calls: list[Call] = []
        self.embedding: tuple[str, Tensor] | None = None
        self._track_embedding = track_embedding
        self._counts: dict[str, int] = {}
        # Whether the last weighted layer was a convolution, so that an activation applied to its
        # (N, C, L) output counts channels (normalisation layers keep the layout and do not reset it).
        self._after_conv = False
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in probed_modules(model)]

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._record(name, module, args, output)

        return hook

    def _record(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        tensors = float_tensors(output)
        y = tensors[0] if tensors else None
        self._counts[name] = self._counts.get(name, 0) + 1
        summary = activation_summary(y, saturation_kind(module)) if y is not None else torch.full((6,), _NAN)
        dead = summary.new_full((), _NAN)
        if y is not None and isinstance(module, _RELU_LIKE) and y.dim() >= 1 and y.numel() > 0:
            dims = unit_dim(y, module, after_conv=self._after_conv)
            dead = (unit_activity(y, dims) == 0).float().mean()
        if next(module.parameters(recurse=False), None) is not None and not is_norm(module):
            self._after_conv = isinstance(module, nn.modules.conv._ConvNd)
        if self._track_embedding and self.embedding is None and isinstance(module, nn.Embedding) and y is not None:
            self.embedding = (name, y)
        call = Call(name, module, self._counts[name], y, summary, dead)
        if cell_spec(module) is not None:
            call.outputs = tensors
            call.inputs = args[0] if args else None
            call.hx = args[1] if len(args) > 1 else None
        self.calls.append(call)


class _Targets:
    """The tensors to differentiate, deduplicated by identity (an ``nn.Identity`` returns its input)."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self._slot: dict[int, int] = {}

    def add(self, t: Tensor | None) -> int | None:
        if t is None or not t.requires_grad:
            return None
        if id(t) not in self._slot:
            self._slot[id(t)] = len(self.tensors)
            self.tensors.append(t)
        return self._slot[id(t)]


def _own_parameters(calls: Sequence[Call]) -> dict[int, list[Tensor]]:
    """Trainable parameters per module, keyed by the index of the module's first call."""
    owned: dict[int, list[Tensor]] = {}
    seen: set[int] = set()
    for i, c in enumerate(calls):
        if id(c.module) in seen:
            continue
        seen.add(id(c.module))
        recurse = next(c.module.children(), None) is None or is_recurrent(c.module)
        owned[i] = [p for p in c.module.parameters(recurse=recurse) if p.requires_grad]
    return owned


def norms_and_counts(tensors: Sequence[Tensor]) -> tuple[list[float], list[float]]:
    """L2 norms and non-finite counts of ``tensors``, as host floats.

    The fused float32 norm overflows once Σx² passes 3.4e38, i.e. for finite gradients of size ~1e19 that an
    exploding network reaches easily; those entries are recomputed from a float64 copy, so an infinite norm
    means a non-finite entry (or a norm beyond 1.8e308).
    """
    if not tensors:
        return [], []
    norms = tensor_norms(list(tensors)).double().cpu().tolist()
    counts = nonfinite_counts(list(tensors)).double().cpu().tolist()
    for i, (n, bad) in enumerate(zip(norms, counts, strict=True)):
        if not math.isfinite(n) and bad == 0:
            norms[i] = float(torch.linalg.vector_norm(tensors[i].detach().double().reshape(-1)))
    return norms, counts


def _peak(norms: Sequence[float]) -> int:
    # First index of the largest finite value, as torch.argmax picks it in gradient_horizon.
    finite = [i for i, v in enumerate(norms) if math.isfinite(v)]
    return max(finite, key=lambda i: (norms[i], -i)) if finite else 0


def _grouped_norms(groups: dict[int, list[Tensor]]) -> dict[int, tuple[float, float]]:
    """``(√Σ‖t‖², Σ non-finite)`` over each group's tensors, from one fused pass over all of them."""
    flat = [t for ts in groups.values() for t in ts]
    norms, counts = norms_and_counts(flat)
    out, k = {}, 0
    for i, ts in groups.items():
        n = len(ts)
        out[i] = (math.sqrt(sum(v * v for v in norms[k:k + n])), sum(counts[k:k + n]))
        k += n
    return out


def _layer_rows(calls: Sequence[Call], out_grads: Sequence[Tensor | None],
                owned: dict[int, list[Tensor]], param_grads: dict[int, list[Tensor | None]]) -> list[LayerRow]:
    norms, bad = norms_and_counts([g for g in out_grads if g is not None])
    flowing = iter(zip(norms, bad, strict=True))
    owned = {i: ps for i, ps in owned.items() if ps}
    weights = _grouped_norms({i: [p.detach() for p in ps] for i, ps in owned.items()})
    # An unused parameter (no gradient) counts as a zero gradient.
    wgrads = _grouped_norms({i: [g if g is not None else p.new_zeros(0) for g, p in zip(param_grads[i], ps,
                                                                                        strict=True)]
                             for i, ps in owned.items()})
    rows = []
    for i, (c, g) in enumerate(zip(calls, out_grads, strict=True)):
        mean, std, frac_zero, frac_sat, nonfinite, numel = c.summary.tolist()
        grad_norm, grad_bad = next(flowing) if g is not None else (_NAN, 0.0)
        p_norm = weights[i][0] if i in owned else _NAN
        pg_norm, pg_bad = wgrads[i] if i in owned else (_NAN, 0.0)
        rows.append(LayerRow(
            index=i, name=c.name, type=type(c.module).__name__, call=c.call, mean=mean, std=std,
            frac_zero=frac_zero, frac_saturated=frac_sat, nonfinite=nonfinite, numel=numel,
            dead_frac=float(c.dead), grad_norm=grad_norm, grad_rms=grad_norm / math.sqrt(max(numel, 1.0)),
            param_norm=p_norm, param_grad_norm=pg_norm, std_gain=_NAN, grad_gain=_NAN,
            saturation=saturation_kind(c.module), has_params=i in owned, grad_flows=g is not None,
            grad_nonfinite=grad_bad, param_grad_nonfinite=pg_bad,
        ))
    return _with_gains(rows)


def _with_gains(rows: list[LayerRow]) -> list[LayerRow]:
    """Fill ``std_gain`` (vs the previous row) and ``grad_gain`` (vs the next row)."""
    out = []
    for i, r in enumerate(rows):
        std_gain = r.std / rows[i - 1].std if i > 0 and rows[i - 1].std > 0 else _NAN
        nxt = rows[i + 1].grad_rms if i + 1 < len(rows) else _NAN
        grad_gain = r.grad_rms / nxt if nxt > 0 else _NAN
        out.append(replace(r, std_gain=std_gain, grad_gain=grad_gain))
    return out


def _time_profile(grad: Tensor, time_dim: int) -> TimeProfile:
    norms = time_step_norms(grad, time_dim)
    values = norms.cpu().tolist()
    horizon = float(gradient_horizon(norms))
    peak = _peak(values)
    return TimeProfile(time_dim=time_dim, norms=values, growth=float(growth_factor(norms)), horizon=horizon,
                       reaches_start=horizon == peak, peak_step=peak)


def _not_unrolled(c: Call, spec: CellSpec, note: str) -> RecurrentProfile:
    return RecurrentProfile(
        module=c.name, call=c.call, cell=spec.cell, nonlinearity=spec.nonlinearity, layers=spec.layers,
        steps=0, hidden_norms=[], input_norms=[], last_norms=[], growth=_NAN, horizon=_NAN, reaches_start=False,
        mean_derivative=[], gate_mean=[], gate_name=_gate_name(spec), spectral_radius=[], scaled_radius=[],
        unroll_error=_NAN, note=note,
    )


def _gate_name(spec: CellSpec) -> str | None:
    return {"lstm": "forget", "gru": "update"}.get(spec.cell)


def _reference_outputs(c: Call) -> tuple[list[Tensor], str]:
    """The module's outputs the unroll must reproduce, and a note when they had to be recomputed.

    The unroll has no dropout: a stacked recurrence with active inter-layer dropout is measured with it
    off, as evaluation runs it, against the module's own dropout-free output (the upstream gradient stays
    the training pass's).
    """
    if not has_active_dropout(c.module):
        return c.outputs, ""
    c.module.train(False)
    try:
        with torch.no_grad():
            again = c.module(c.inputs) if c.hx is None else c.module(c.inputs, c.hx)
    finally:
        c.module.train(True)
    return float_tensors(again), f"measured with its inter-layer dropout (p={c.module.dropout:g}) off"


def _unrolled_profile(c: Call, spec: CellSpec, u: Unrolled, note: str) -> RecurrentProfile:
    last = u.last_norms.cpu().tolist()
    horizon = float(gradient_horizon(u.last_norms))
    err = float(u.unroll_error)
    if err > 1e-3:
        note = "; ".join(filter(None, [note, f"unrolled output differs from the module's by {err:.1e} (relative)"]))
    return RecurrentProfile(
        module=c.name, call=c.call, cell=spec.cell, nonlinearity=spec.nonlinearity, layers=spec.layers,
        steps=u.steps, hidden_norms=u.hidden_norms.cpu().tolist(), input_norms=u.input_norms.cpu().tolist(),
        last_norms=last, growth=float(growth_factor(u.last_norms)), horizon=horizon,
        reaches_start=horizon == _peak(last), mean_derivative=u.mean_derivative.cpu().tolist(),
        gate_mean=u.gate_mean.cpu().tolist(), gate_name=_gate_name(spec), spectral_radius=u.radius.cpu().tolist(),
        scaled_radius=u.scaled_radius.cpu().tolist(), unroll_error=err, note=note,
    )


def _recurrent_profile(c: Call, upstream: list[Tensor | None], unroll: bool) -> RecurrentProfile:
    spec = cell_spec(c.module)
    assert spec is not None
    reason = "unrolling disabled (unroll=False)" if not unroll else unsupported_reason(c.module, c.inputs)
    if reason is not None:
        return _not_unrolled(c, spec, reason)
    reference, note = _reference_outputs(c)
    try:
        u = unroll_profile(c.module, spec, c.inputs, c.hx, reference, upstream)
    except (RuntimeError, ValueError, IndexError) as exc:
        # An initial state or layout the unroller does not know must not cost the whole probe: the
        # per-layer rows stay valid, and the note says why this module has no time profile.
        line = (str(exc).strip().splitlines() or [""])[0]
        return _not_unrolled(c, spec, f"not unrolled: {type(exc).__name__}: {line}")
    return _unrolled_profile(c, spec, u, note)


def measure(calls: Sequence[Call], loss: Tensor, profiled: Tensor | None, *, time_dim: int | None,
            unroll: bool) -> Measurement:
    """Differentiate ``loss`` once and measure every recorded call, the profiled input and each recurrence.

    Gradients are taken with ``torch.autograd.grad`` (``.grad`` is not written). ``profiled`` is the tensor
    whose gradient is profiled through ``time_dim`` (the model input, or the embedding's output).
    """
    if not loss.requires_grad:
        raise StateError("the loss does not depend on any trainable parameter or input; nothing to probe")
    targets = _Targets()
    out_slots = [targets.add(c.out) for c in calls]
    rec_slots = [[targets.add(t) for t in c.outputs] for c in calls]
    x_slot = targets.add(profiled)
    owned = _own_parameters(calls)
    param_slots = {i: [targets.add(p) for p in ps] for i, ps in owned.items()}
    grads = torch.autograd.grad(loss, targets.tensors, allow_unused=True) if targets.tensors else ()

    def grad_of(slot: int | None) -> Tensor | None:
        return None if slot is None else grads[slot]

    out_grads = [grad_of(s) for s in out_slots]
    param_grads = {i: [grad_of(s) for s in slots] for i, slots in param_slots.items()}
    rows = _layer_rows(calls, out_grads, owned, param_grads)
    gx = grad_of(x_slot)
    time = _time_profile(gx, time_dim) if time_dim is not None and gx is not None else None
    recurrent = [_recurrent_profile(c, [grad_of(s) for s in slots], unroll)
                 for c, slots in zip(calls, rec_slots, strict=True) if cell_spec(c.module) is not None]
    norm_layers = frozenset(c.name for c in calls if is_norm(c.module))
    return Measurement(rows, recurrent, time, float(loss.detach()), norm_layers)
