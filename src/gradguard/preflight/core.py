"""``probe()``: one forward and one backward pass on a batch, measured per module and per time step.

Most vanishing and exploding gradients are already decided at initialisation (SEEDS S1.1, S2.1, S3.1,
S4.2): the product of per-layer (or per-step) Jacobians either keeps its size, shrinks or grows. The
probe measures that product on one batch before any training, and leaves the model exactly as it found
it (parameters, buffers, ``.grad``, train/eval flags and the global random state).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.adapt import as_module, unwrap_compiled
from gradguard.detect.forward import is_norm
from gradguard.errors import ConfigError, GradGuardError, InputError, StateError, check_number
from gradguard.findings import Finding
from gradguard.preflight.recurrent import (
    cell_spec,
    has_active_dropout,
    is_recurrent,
    unroll_profile,
    unsupported_reason,
)
from gradguard.stats import (
    activation_summary,
    gradient_horizon,
    growth_factor,
    nonfinite_counts,
    saturation_kind,
    tensor_norms,
    time_step_norms,
    unit_activity,
)
from gradguard.stats.activations import SUMMARY_FIELDS

#: Modules whose zero outputs mean a unit that did not fire (a "dead" unit when it never fires).
_RELU_LIKE = (nn.ReLU, nn.ReLU6)

#: Names of the losses :func:`probe` can use, as recorded in :attr:`ProbeReport.loss_kind`.
LOSS_KINDS = ("projection", "loss_fn", "mse", "cross_entropy")


@dataclass(frozen=True)
class LayerRow:
    """What the probe measured at one module call, in execution order.

    Forward fields describe the module's output ``y`` (its first floating tensor): ``mean``, ``std``,
    ``frac_zero``, ``frac_saturated``, ``nonfinite``, ``numel`` as in
    :func:`gradguard.stats.activation_summary`; ``dead_frac`` is the share of units that output zero for
    every example (ReLU-like modules only, else NaN). Backward fields: ``grad_norm = ‖∂L/∂y‖₂``,
    ``grad_rms = grad_norm / √numel`` (comparable across widths; ``grad_flows`` is False and both are NaN
    when no gradient reaches the output), ``grad_nonfinite`` and ``param_grad_nonfinite`` the NaN/Inf counts
    of those gradients (norms are computed in float64, so an infinite norm of finite values cannot occur
    below 1.8e308), ``param_norm`` and ``param_grad_norm``
    over the module's own parameters (first call only; NaN for a module without parameters).
    Neighbour ratios: ``std_gain = std / std of the previous row`` (forward growth across this module) and
    ``grad_gain = grad_rms / grad_rms of the next row`` (how the backward signal changed on its way from
    the next module's output to this one's). A ratio far from 1 at one row shows the depth at which the
    signal collapses or blows up. The forward fields are taken when the module returns; the gradient is that
    of the returned tensor object, so when a later in-place op (``nn.ReLU(inplace=True)``) overwrites it,
    both rows show the gradient of the overwritten value.
    """

    index: int
    name: str
    type: str
    call: int
    mean: float
    std: float
    frac_zero: float
    frac_saturated: float
    nonfinite: float
    numel: float
    dead_frac: float
    grad_norm: float
    grad_rms: float
    param_norm: float
    param_grad_norm: float
    std_gain: float
    grad_gain: float
    saturation: str | None = None
    has_params: bool = False
    grad_flows: bool = False
    grad_nonfinite: float = 0.0
    param_grad_nonfinite: float = 0.0

    @property
    def label(self) -> str:
        """Display name: the qualified name, ``(model)`` for the root, ``#k`` for a repeated call."""
        base = self.name or "(model)"
        return base if self.call == 1 else f"{base}#{self.call}"


@dataclass(frozen=True)
class TimeProfile:
    """Gradient norm reaching each time step of the model's input, ``n_t = ‖∂L/∂x_t‖``.

    ``growth`` is the fitted per-step factor going back in time (:func:`gradguard.stats.growth_factor`),
    ``horizon`` the steps back from the peak before the gradient drops below 1e-3 of it
    (:func:`gradguard.stats.gradient_horizon`); ``reaches_start`` is True when it never does.
    """

    time_dim: int
    norms: list[float]
    growth: float
    horizon: float
    reaches_start: bool
    peak_step: int


@dataclass(frozen=True)
class RecurrentProfile:
    """Per-step gradients of one recurrent module call, from unrolling it with its own weights.

    ``hidden_norms[k][t] = ‖∂L/∂h^k_t‖`` for layer ``k`` under the real loss; ``input_norms[t] =
    ‖∂L/∂x_t‖`` at the module's input; ``last_norms[t]`` is the norm at ``h^0_t`` of the gradient sent
    back from the last step alone (output at ``T−1`` and final state), i.e. the Jacobian product of
    SEEDS S3.1. ``growth`` and ``horizon`` are measured on ``last_norms``. ``spectral_radius`` and
    ``scaled_radius = ρ(W_hh)·mean f'`` are per layer for ``nn.RNN`` (NaN otherwise); ``gate_mean`` is the
    mean forget gate (LSTM) or update gate ``z`` (GRU) per layer. ``unroll_error`` is the relative max
    deviation of the unrolled output from the module's own; ``note`` says why a call was not unrolled.
    """

    module: str
    call: int
    cell: str
    nonlinearity: str
    layers: int
    steps: int
    hidden_norms: list[list[float]]
    input_norms: list[float]
    last_norms: list[float]
    growth: float
    horizon: float
    reaches_start: bool
    mean_derivative: list[float]
    gate_mean: list[float]
    gate_name: str | None
    spectral_radius: list[float]
    scaled_radius: list[float]
    unroll_error: float
    note: str = ""


@dataclass
class ProbeReport:
    """Everything one :func:`probe` call measured, and the verdict.

    Attributes:
        layers: :class:`LayerRow` per module call, in execution order.
        findings: :class:`gradguard.Finding` list, worst first (``step`` is 0).
        recurrent: :class:`RecurrentProfile` per recurrent module call.
        time: :class:`TimeProfile` of the model input when ``time_dim`` was given, else None.
        loss: the probe loss value.
        loss_kind: one of :data:`LOSS_KINDS`.
        options: the resolved options of the call (seed, train, time_dim, ...).
    """

    layers: list[LayerRow]
    findings: list[Finding]
    recurrent: list[RecurrentProfile] = field(default_factory=list)
    time: TimeProfile | None = None
    loss: float = float("nan")
    loss_kind: str = "projection"
    options: dict[str, Any] = field(default_factory=dict)

    def layer(self, name: str, call: int = 1) -> LayerRow:
        """The row of module ``name`` (its ``call``-th call)."""
        for row in self.layers:
            if row.name == name and row.call == call:
                return row
        raise ConfigError(f"no probed module named {name!r} (call {call}); have {[r.label for r in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (NaN stays NaN; use ``json.dumps(..., allow_nan=True)``)."""
        return {
            "layers": [asdict(r) for r in self.layers],
            "findings": [f.to_dict() for f in self.findings],
            "recurrent": [asdict(r) for r in self.recurrent],
            "time": None if self.time is None else asdict(self.time),
            "loss": self.loss,
            "loss_kind": self.loss_kind,
            "options": dict(self.options),
        }

    def to_markdown(self) -> str:
        """Per-layer table, recurrent profiles and findings as GitHub-flavoured Markdown."""
        from gradguard.preflight.render import report_markdown

        return report_markdown(self)

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML report (plots embedded as PNG) to ``path``; returns the path."""
        from gradguard.preflight.render import write_html

        return write_html(self, Path(path))


@dataclass
class _Call:
    name: str
    module: nn.Module
    call: int
    out: Tensor | None
    summary: Tensor
    dead: Tensor
    rec_outputs: list[Tensor] = field(default_factory=list)
    rec_input: Any = None
    rec_hx: Any = None


def _float_tensors(obj: Any) -> list[Tensor]:
    """Floating-point tensors in a nested output (tuples, lists, dicts, PackedSequence), in order."""
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _float_tensors(v)]
    if isinstance(obj, tuple | list):
        return [t for v in obj for t in _float_tensors(v)]
    return []


def _probed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
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


def projection_loss(output: Any, seed: int = 0) -> Tensor:
    """The default probe loss ``L = Σ_i r_i · y_i`` with fixed ``r_i ~ N(0, 1)``.

    Every floating tensor ``y`` of the output gets ``∂L/∂y = r``: unit-variance gradient on every output
    element, independent of what the model computes, so that the probe measures how the network
    transports a gradient rather than a particular task. ``r`` comes from a private
    ``torch.Generator(seed)`` (on the CPU, then moved), so the global random state is not touched.
    """
    tensors = _float_tensors(output)
    if not tensors:
        raise InputError("the model output contains no floating-point tensor to differentiate")
    gen = torch.Generator().manual_seed(int(seed))
    total = tensors[0].new_zeros((), dtype=torch.float32)
    for y in tensors:
        r = torch.randn(tuple(y.shape), generator=gen).to(device=y.device)
        total = total + (r * y.float()).sum()
    return total


def _inferred_loss(output: Any, targets: Tensor) -> tuple[Callable[[Any, Any], Tensor], str]:
    """Loss used when ``targets`` is given without ``loss_fn``: cross-entropy for class indices, else MSE."""
    tensors = _float_tensors(output)
    if not tensors:
        raise InputError("the model output contains no floating-point tensor to compare with targets")
    y = tensors[0]
    if not targets.is_floating_point():
        return (lambda out, tgt: F.cross_entropy(_float_tensors(out)[0], tgt)), "cross_entropy"
    if tuple(targets.shape) != tuple(y.shape):
        raise ConfigError(
            f"targets of shape {tuple(targets.shape)} do not match the output shape {tuple(y.shape)}; "
            "pass loss_fn= to say how to compare them"
        )
    return (lambda out, tgt: F.mse_loss(_float_tensors(out)[0], tgt)), "mse"


def _split_inputs(inputs: Any) -> tuple[list[Any], dict[str, Any]]:
    if isinstance(inputs, Tensor):
        return [inputs], {}
    if isinstance(inputs, Mapping):
        return [], dict(inputs)
    if isinstance(inputs, tuple | list):
        return list(inputs), {}
    raise InputError(f"inputs must be a Tensor, a tuple/list of them or a dict of them, got {type(inputs).__name__}")


def _unit_dim(out: Tensor, after_conv: bool) -> int:
    # Convolution outputs are channels-first; everything else (Linear, sequences) keeps units last.
    return 1 if after_conv and out.dim() >= 3 else -1


def probe(
    model: nn.Module,
    inputs: Any,
    targets: Tensor | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
    *,
    time_dim: int | None = None,
    train: bool = True,
    seed: int = 0,
    unroll: bool = True,
) -> ProbeReport:
    """Diagnose a model on one batch, before training: one forward and one backward pass, measured.

    For every module call, in execution order, the probe records the output's scale, sparsity,
    saturation and non-finite count, the gradient norm reaching that output and the module's parameter
    gradient norm, and the ratio of each to its neighbours, so the depth at which a signal collapses or
    explodes is visible (SEEDS S1.1, S2.1). With ``time_dim`` it also records ``‖∂L/∂x_t‖`` for every step
    of the input; every ``nn.RNN``/``nn.LSTM``/``nn.GRU``/``gradguard.nn.LSTM`` call is unrolled step by step
    with its own weights to get ``‖∂L/∂h_t‖``, the per-step growth factor, the horizon (steps back until
    the gradient falls below 1e-3 of its peak), ``ρ(W_hh)`` raw and times the mean activation derivative,
    and the mean forget gate (SEEDS S3.1, S3.2). The verdict is a list of :class:`gradguard.Finding`
    with the remedy to apply (:mod:`gradguard.preflight.verdict`).

    Nothing about the model changes: gradients are taken with ``torch.autograd.grad`` (``.grad`` is not
    written), buffers that the forward pass updates (batch-norm statistics) are restored, every module's
    train/eval flag is restored, and the global CPU/CUDA random state is forked and restored.

    Args:
        model: any ``nn.Module``.
        inputs: a Tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or a dict
            (``model(**inputs)``). The first floating tensor is the one whose gradient is profiled.
        targets: optional targets for ``loss_fn``.
        loss_fn: ``loss_fn(output, targets)`` (or ``loss_fn(output)`` without targets) returning a scalar.
            Without it: cross-entropy for integer ``targets``, MSE for floating ``targets`` of the output's
            shape, and with no targets the fixed random projection :func:`projection_loss`.
        time_dim: dimension of the first floating input that indexes time (e.g. 1 for batch-first).
        train: run the pass in training mode (dropout active, batch statistics), as a training step
            would; False runs it in eval mode. The model's own flags are restored either way.
        seed: seed of the projection loss's private generator.
        unroll: unroll recurrent modules (costs more than the fused kernels; see ``BENCHMARKS.md``).

    Returns:
        :class:`ProbeReport`.

    Raises:
        InputError: a model that is not a module, inputs/targets of the wrong type, a non-scalar loss.
        ConfigError: a batch holding NaN/Inf, a model without parameters, a model that rejects the
            inputs (its exception is chained), a ``time_dim`` out of range, targets of the wrong shape.
        StateError: a loss that depends on nothing trainable.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
        >>> report = probe(net, torch.randn(16, 8))
        >>> [row.label for row in report.layers]
        ['0', '1', '2']
    """
    # integrations (issue 6): a Keras 3 model (PyTorch backend) is probed through its readable torch view.
    model = as_module(model)
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # A torch.compile wrapper is probed through the module it wraps, eagerly: hooks added to a compiled
    # graph never run (dynamo does not re-check module hooks), so every column would be empty.
    model, compiled = unwrap_compiled(model)
    if loss_fn is not None and not callable(loss_fn):
        raise InputError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if targets is not None and not isinstance(targets, Tensor):
        raise InputError(f"targets must be a Tensor, got {type(targets).__name__}")
    if not isinstance(train, bool):
        raise InputError(f"train must be True or False, got {train!r}")
    check_number("seed", seed, low=0, integer=True)
    if next(model.parameters(), None) is None:
        raise ConfigError(
            f"model {type(model).__name__} has no parameters; allowed: a module with at least one parameter "
            "(there is no gradient to probe)"
        )
    args, kwargs = _split_inputs(inputs)
    # A NaN in the batch would be reported as a NaN "born" in the first layer: refuse the batch instead.
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in [*enumerate(args), *kwargs.items()]
           if isinstance(v, Tensor) and v.is_floating_point()}
    if any(bad.values()):
        where = ", ".join(f"input {k!r}: {n}" for k, n in bad.items() if n)
        raise ConfigError(f"the probe batch holds NaN/Inf values ({where}); probe a finite batch")
    first_key: Any = None
    tensors = [(k, v) for k, v in [*enumerate(args), *kwargs.items()] if isinstance(v, Tensor)]
    for key, value in tensors:
        if value.is_floating_point():
            first_key = key
            break
    # Integer first input (token ids, as in model(tokens, hidden)): the signal starts at the embedding's
    # output, so that is the tensor profiled through time, not the first floating one (a zero hidden state).
    tokens_key = tensors[0][0] if tensors and not tensors[0][1].is_floating_point() else None
    tokens_first = tokens_key is not None and any(isinstance(m, nn.Embedding) for m in model.modules())
    if time_dim is not None:
        check_number("time_dim", time_dim, integer=True)
        if first_key is None and not tokens_first:
            raise ConfigError("time_dim was given but the inputs contain no floating-point tensor")
        x0 = tensors[0][1] if tokens_first else (args[first_key] if isinstance(first_key, int) else kwargs[first_key])
        if not -x0.dim() <= time_dim < x0.dim():
            raise ConfigError(f"time_dim={time_dim} is out of range for an input of shape {tuple(x0.shape)}")
        time_dim = time_dim % x0.dim()

    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})
    handles = []
    cudnn_was = torch.backends.cudnn.enabled
    try:
        with torch.random.fork_rng(devices=cuda):
            if cuda and not train:
                # cuDNN's fused RNN kernels cannot run backward in eval mode; the native ones can.
                torch.backends.cudnn.enabled = False
            model.train(train)
            calls: list[_Call] = []
            state: dict[str, Any] = {"after_conv": False, "embedding": None}
            counts: dict[str, int] = {}

            def make_hook(name: str) -> Callable[..., None]:
                def hook(module: nn.Module, hook_args: tuple[Any, ...], output: Any) -> None:
                    tensors = _float_tensors(output)
                    y = tensors[0] if tensors else None
                    counts[name] = counts.get(name, 0) + 1
                    if y is not None:
                        summary = activation_summary(y, saturation_kind(module))
                    else:
                        summary = torch.full((len(SUMMARY_FIELDS),), float("nan"))
                    if y is not None and isinstance(module, _RELU_LIKE) and y.dim() >= 1 and y.numel() > 0:
                        dead = (unit_activity(y, _unit_dim(y, state["after_conv"])) == 0).float().mean()
                    else:
                        dead = summary.new_full((), float("nan"))
                    if next(module.parameters(recurse=False), None) is not None:
                        state["after_conv"] = isinstance(module, nn.modules.conv._ConvNd)
                    first_embedding = state["embedding"] is None and isinstance(module, nn.Embedding)
                    if tokens_first and first_embedding and y is not None:
                        state["embedding"] = (name, y)
                    call = _Call(name, module, counts[name], y, summary, dead)
                    if is_recurrent(module):
                        call.rec_outputs = tensors
                        call.rec_input = hook_args[0] if hook_args else None
                        call.rec_hx = hook_args[1] if len(hook_args) > 1 else None
                    calls.append(call)

                return hook

            for name, m in _probed_modules(model):
                handles.append(m.register_forward_hook(make_hook(name)))

            x_leaf: Tensor | None = None
            if first_key is not None:
                src = args[first_key] if isinstance(first_key, int) else kwargs[first_key]
                x_leaf = src.detach().clone().requires_grad_(True)
                if isinstance(first_key, int):
                    args[first_key] = x_leaf
                else:
                    kwargs[first_key] = x_leaf
            try:
                output = model(*args, **kwargs)
            except GradGuardError:
                raise
            except Exception as exc:  # the user's model: a rejected input is a usage error, in one line
                shapes = ", ".join(str(tuple(t.shape)) for t in [*args, *kwargs.values()] if isinstance(t, Tensor))
                first = (str(exc).strip().splitlines() or [""])[0]
                raise ConfigError(
                    f"the model rejected inputs of shape {shapes}: {type(exc).__name__}: {first}"
                ) from exc
            for h in handles:
                h.remove()
            handles.clear()

            loss, loss_kind = _compute_loss(output, targets, loss_fn, seed)
            profiled = x_leaf
            what = "none (no floating input)" if x_leaf is None else f"input {first_key!r}"
            if state["embedding"] is not None:
                emb_name, profiled = state["embedding"]
                what = f"output of `{emb_name}` (nn.Embedding) for the integer input {tokens_key!r}"
            input_std = None
            if profiled is not None and profiled.numel() > 1:
                input_std = float(profiled.detach().double().std())
            report = _backward_and_measure(calls, loss, profiled, time_dim, unroll, input_std)
            report.loss_kind = loss_kind
            report.options = {"train": train, "seed": seed, "time_dim": time_dim, "unroll": unroll,
                              "loss": loss_kind, "profiled": what, "compiled": compiled}
            return report
    finally:
        torch.backends.cudnn.enabled = cudnn_was
        for h in handles:
            h.remove()
        for m, was_training in modes:
            m.training = was_training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _compute_loss(output: Any, targets: Tensor | None, loss_fn: Callable[..., Tensor] | None,
                  seed: int) -> tuple[Tensor, str]:
    if loss_fn is None and targets is None:
        return projection_loss(output, seed), "projection"
    if loss_fn is None:
        assert targets is not None
        fn, kind = _inferred_loss(output, targets)
        loss = fn(output, targets)
    else:
        kind = "loss_fn"
        loss = loss_fn(output) if targets is None else loss_fn(output, targets)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise InputError(f"the loss must be a scalar tensor, got {shape}")
    return loss.reshape(()), kind


def _backward_and_measure(calls: list[_Call], loss: Tensor, x_leaf: Tensor | None,
                          time_dim: int | None, unroll: bool, input_std: float | None = None) -> ProbeReport:
    if not loss.requires_grad:
        raise StateError("the loss does not depend on any trainable parameter or input; nothing to probe")
    # Every tensor we want ∂L/∂· of, deduplicated by identity (an nn.Identity returns its input).
    targets: list[Tensor] = []
    slot: dict[int, int] = {}

    def want(t: Tensor | None) -> int | None:
        if t is None or not t.requires_grad:
            return None
        if id(t) not in slot:
            slot[id(t)] = len(targets)
            targets.append(t)
        return slot[id(t)]

    out_slots = [want(c.out) for c in calls]
    rec_slots = [[want(t) for t in c.rec_outputs] for c in calls]
    x_slot = want(x_leaf)
    owners: list[int] = []
    params: list[Tensor] = []
    seen_modules: set[int] = set()
    first_call_of: dict[int, int] = {}
    for i, c in enumerate(calls):
        if id(c.module) in seen_modules:
            continue
        seen_modules.add(id(c.module))
        first_call_of[id(c.module)] = i
        recurse = next(c.module.children(), None) is None or is_recurrent(c.module)
        for p in c.module.parameters(recurse=recurse):
            if p.requires_grad:
                owners.append(i)
                params.append(p)
    param_slots = [want(p) for p in params]
    grads = torch.autograd.grad(loss, targets, allow_unused=True) if targets else ()

    def grad_of(s: int | None) -> Tensor | None:
        return None if s is None else grads[s]

    device = loss.device
    nan = float("nan")
    # Backward: ‖∂L/∂y‖ per call (NaN where no gradient flows) and parameter norms grouped per module, in
    # float64 so that a huge but finite gradient is not mistaken for a non-finite one.
    out_grads = [grad_of(s) for s in out_slots]
    present = [g for g in out_grads if g is not None]
    present_norms, present_bad = _norms_and_counts(present, device)
    grad_norm = torch.full((len(calls),), nan, device=device, dtype=torch.float64)
    grad_bad = torch.zeros(len(calls), device=device, dtype=torch.float64)
    idx = [i for i, g in enumerate(out_grads) if g is not None]
    if idx:
        grad_norm[torch.tensor(idx, device=device)] = present_norms
        grad_bad[torch.tensor(idx, device=device)] = present_bad
    p_norm = torch.full((len(calls),), nan, device=device, dtype=torch.float64)
    pg_norm = torch.full((len(calls),), nan, device=device, dtype=torch.float64)
    pg_bad = torch.zeros(len(calls), device=device, dtype=torch.float64)
    if params:
        own = torch.tensor(owners, device=device)
        pn, _ = _norms_and_counts([p.detach() for p in params], device)
        pg, pg_count = _norms_and_counts([g if (g := grad_of(s)) is not None else p.new_zeros(0)
                                          for s, p in zip(param_slots, params, strict=True)], device)
        zeros = torch.zeros(len(set(owners)), device=device, dtype=torch.float64)
        p_norm.index_copy_(0, own.unique(), zeros)
        pg_norm.index_copy_(0, own.unique(), zeros)
        p_norm = p_norm.index_add(0, own, pn**2).sqrt()
        pg_norm = pg_norm.index_add(0, own, pg**2).sqrt()
        pg_bad = pg_bad.index_add(0, own, pg_count)
    summaries = torch.stack([c.summary.to(device) for c in calls]) if calls else torch.zeros(0, 6, device=device)
    dead = torch.stack([c.dead.to(device) for c in calls]) if calls else torch.zeros(0, device=device)

    # Time profile of the model input.
    time_t: tuple[Tensor, Tensor, Tensor] | None = None
    gx = grad_of(x_slot)
    if time_dim is not None and gx is not None:
        tn = time_step_norms(gx, time_dim)
        time_t = (tn, growth_factor(tn), gradient_horizon(tn))

    # Recurrent unrolling, with the upstream gradient of each returned tensor.
    rec_raw: list[tuple[_Call, Any, str]] = []
    for c, slots in zip(calls, rec_slots, strict=True):
        spec = cell_spec(c.module)
        if spec is None:
            continue
        reason = "unrolling disabled (unroll=False)" if not unroll else unsupported_reason(c.module, c.rec_input)
        if reason is not None:
            rec_raw.append((c, None, reason))
            continue
        upstream = [grad_of(s) for s in slots]
        reference, note = c.rec_outputs, ""
        if has_active_dropout(c.module):
            # The unroll has no dropout: measure the recurrence with it off, as evaluation runs it, against
            # the module's own dropout-free output (the upstream gradient stays the training pass's).
            c.module.train(False)
            try:
                with torch.no_grad():
                    again = c.module(c.rec_input) if c.rec_hx is None else c.module(c.rec_input, c.rec_hx)
            finally:
                c.module.train(True)
            reference = _float_tensors(again)
            note = f"measured with its inter-layer dropout (p={c.module.dropout:g}) off"
        try:
            unrolled = unroll_profile(c.module, spec, c.rec_input, c.rec_hx, reference, upstream)
        except (RuntimeError, ValueError, IndexError) as exc:
            # An initial state or layout the unroller does not know must not cost the whole probe: the
            # per-layer rows stay valid, and the note says why this module has no time profile.
            line = (str(exc).strip().splitlines() or [""])[0]
            rec_raw.append((c, None, f"not unrolled: {type(exc).__name__}: {line}"))
            continue
        rec_raw.append((c, unrolled, note))

    # One transfer to the host for all per-layer numbers.
    host = torch.cat([summaries.reshape(-1).double(), dead.double(), grad_norm, p_norm, pg_norm, grad_bad, pg_bad,
                      loss.detach().double().reshape(1)]).cpu().tolist()
    n = len(calls)
    k = len(SUMMARY_FIELDS)
    summ = [host[i * k:(i + 1) * k] for i in range(n)]
    off = n * k
    dead_l, gn_l, pn_l, pgn_l, gbad_l, pgbad_l = (host[off + j * n: off + (j + 1) * n] for j in range(6))
    loss_value = host[-1]

    rows: list[LayerRow] = []
    for i, c in enumerate(calls):
        mean, std, fz, fs, nf, numel = summ[i]
        first = first_call_of.get(id(c.module)) == i
        has_p = bool(pn_l[i] == pn_l[i]) and first  # NaN != NaN: no own parameters
        rows.append(LayerRow(
            index=i, name=c.name, type=type(c.module).__name__, call=c.call, mean=mean, std=std,
            frac_zero=fz, frac_saturated=fs, nonfinite=nf, numel=numel, dead_frac=dead_l[i],
            grad_norm=gn_l[i], grad_rms=gn_l[i] / math.sqrt(max(numel, 1.0)),
            param_norm=pn_l[i] if first else nan, param_grad_norm=pgn_l[i] if first else nan,
            std_gain=nan, grad_gain=nan, saturation=saturation_kind(c.module), has_params=has_p,
            grad_flows=out_grads[i] is not None, grad_nonfinite=gbad_l[i],
            param_grad_nonfinite=pgbad_l[i] if first else 0.0,
        ))
    rows = _with_gains(rows)

    time_profile = None
    if time_t is not None:
        tn_l = time_t[0].cpu().tolist()
        growth, horizon = float(time_t[1]), float(time_t[2])
        peak = _peak(tn_l)
        time_profile = TimeProfile(time_dim=int(time_dim or 0), norms=tn_l, growth=growth, horizon=horizon,
                                   reaches_start=bool(horizon == peak), peak_step=peak)

    recurrent = [_recurrent_profile(c, u, note) for c, u, note in rec_raw]

    from gradguard.preflight.verdict import diagnose

    norms = frozenset(c.name for c in calls if is_norm(c.module))
    findings = diagnose(rows, recurrent, time_profile, loss_value, input_std=input_std, norm_layers=norms)
    return ProbeReport(layers=rows, findings=findings, recurrent=recurrent, time=time_profile, loss=loss_value)


def _norms_and_counts(tensors: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Float64 L2 norms and non-finite counts of ``tensors``.

    The fused float32 norm overflows once Σx² passes 3.4e38, i.e. for finite gradients of size ~1e19 that an
    exploding network reaches easily; only those entries are recomputed from a float64 copy (one host check
    per probe), so the common case stays one fused kernel.
    """
    if not tensors:
        empty = torch.zeros(0, device=device, dtype=torch.float64)
        return empty, empty
    norms = tensor_norms(tensors).to(device).double()
    counts = nonfinite_counts(tensors).to(device).double()
    for i in ((~norms.isfinite()) & (counts == 0)).nonzero().flatten().tolist():
        norms[i] = torch.linalg.vector_norm(tensors[i].detach().double().reshape(-1)).to(device)
    return norms, counts


def _peak(norms: list[float]) -> int:
    # First index of the largest finite value, as torch.argmax picks it in gradient_horizon.
    finite = [i for i, v in enumerate(norms) if math.isfinite(v)]
    return max(finite, key=lambda i: (norms[i], -i)) if finite else 0


def _with_gains(rows: list[LayerRow]) -> list[LayerRow]:
    """Fill ``std_gain`` (vs the previous row) and ``grad_gain`` (vs the next row)."""
    from dataclasses import replace

    out = []
    for i, r in enumerate(rows):
        std_gain = r.std / rows[i - 1].std if i > 0 and rows[i - 1].std > 0 else float("nan")
        nxt = rows[i + 1].grad_rms if i + 1 < len(rows) else float("nan")
        grad_gain = r.grad_rms / nxt if nxt > 0 else float("nan")
        out.append(replace(r, std_gain=std_gain, grad_gain=grad_gain))
    return out


def _recurrent_profile(c: _Call, u: Any, note: str) -> RecurrentProfile:
    spec = cell_spec(c.module)
    assert spec is not None
    gate_name = {"lstm": "forget", "gru": "update"}.get(spec.cell)
    if u is None:
        return RecurrentProfile(
            module=c.name, call=c.call, cell=spec.cell, nonlinearity=spec.nonlinearity, layers=spec.layers,
            steps=0, hidden_norms=[], input_norms=[], last_norms=[], growth=float("nan"),
            horizon=float("nan"), reaches_start=False, mean_derivative=[], gate_mean=[], gate_name=gate_name,
            spectral_radius=[], scaled_radius=[], unroll_error=float("nan"), note=note,
        )
    last = u.last_norms
    growth, horizon = float(growth_factor(last)), float(gradient_horizon(last))
    last_l = last.cpu().tolist()
    err = float(u.unroll_error)
    if err > 1e-3:
        note = "; ".join(filter(None, [note, f"unrolled output differs from the module's by {err:.1e} (relative)"]))
    return RecurrentProfile(
        module=c.name, call=c.call, cell=spec.cell, nonlinearity=spec.nonlinearity, layers=spec.layers,
        steps=u.steps, hidden_norms=u.hidden_norms.cpu().tolist(), input_norms=u.input_norms.cpu().tolist(),
        last_norms=last_l, growth=growth, horizon=horizon, reaches_start=bool(horizon == _peak(last_l)),
        mean_derivative=u.mean_derivative.cpu().tolist(), gate_mean=u.gate_mean.cpu().tolist(),
        gate_name=gate_name, spectral_radius=u.radius.cpu().tolist(), scaled_radius=u.scaled_radius.cpu().tolist(),
        unroll_error=err, note=note,
    )
