"""Initialisation schemes applied module by module, with a report of what changed and what was skipped.

``apply(model, scheme, **options)`` walks ``model.named_modules()`` and applies the scheme to each
module's own parameters: ``Linear``/``Conv*``/``Embedding`` weights by the scheme and biases to the
constant ``bias``; recurrent weights one gate block at a time; normalisation layers and modules without a
rule are left alone and listed in the report. docs/remedies.md describes the layouts and the choices.

====================  ===========================================================================
``normal``            W ~ N(0, std²), constant bias (a fixed-std baseline)
``xavier_uniform``    W ~ U(±gain·√(6/(fan_in+fan_out)))   (Glorot & Bengio 2010)
``xavier_normal``     W ~ N(0, gain²·2/(fan_in+fan_out))   (Glorot & Bengio 2010)
``he_uniform``        W ~ U(±gain·√(3/fan)), fan = fan_in | fan_out | fan_avg   (He et al. 2015)
``he_normal``         W ~ N(0, gain²/fan); with the ReLU gain √2 this is Var = 2/fan_in   (He et al. 2015)
``lecun``             W ~ N(0, gain²/fan_in)   (LeCun et al. 1998; SELU's init)
``orthogonal``        W = gain · Q, Q orthogonal (Saxe et al. 2014)
``identity``          W_hh = scale · I in plain ReLU/tanh RNNs, biases 0 (IRNN, Le, Jaitly & Hinton 2015)
``lstm_forget_bias``  forget-gate bias = value (Gers et al. 2000; Jozefowicz et al. 2015)
``lsuv``              orthonormal, then scale each layer to unit output std (Mishkin & Matas 2016)
====================  ===========================================================================

Gains come from ``torch.nn.init.calculate_gain(activation, param)``; ``gain=`` overrides.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.adapt import call_model, model_arguments
from gradguard.errors import ConfigError, InputError, check_choice, check_number
from gradguard.nn import LSTM as GGLSTM
from gradguard.nn import NORM_LAYERS

__all__ = ["SCHEMES", "InitReport", "SchemeInfo", "apply", "lsuv", "scheme_names"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_ACTIVATIONS = (
    "linear", "conv1d", "conv2d", "conv3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu",
)  # fmt: skip


@dataclass(frozen=True)
class InitReport:
    """What :func:`apply` or :func:`lsuv` did.

    Attributes:
        scheme: the scheme name.
        options: the resolved options (defaults filled in).
        changed: qualified names of the parameters that were written.
        skipped: ``(qualified name, reason)`` for every parameter left alone.
        details: scheme-specific numbers (LSUV: per-layer output std and iterations).
    """

    scheme: str
    options: Mapping[str, Any]
    changed: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    details: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"init {self.scheme}: {len(self.changed)} changed, {len(self.skipped)} skipped"]
        lines += [f"  changed {name}" for name in self.changed]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _gain(options: Mapping[str, Any], default_activation: str) -> float:
    if options.get("gain") is not None:
        return float(check_number("gain", options["gain"], low=0.0, low_inclusive=False))
    activation = check_choice("activation", options.get("activation") or default_activation, _ACTIVATIONS)
    return float(nn.init.calculate_gain(activation, options.get("param")))


def _fans(t: Tensor) -> tuple[int, int]:
    if t.ndim < 2:
        return t.numel(), t.numel()
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(t)
    return fan_in, fan_out


def _fill_normal(t: Tensor, std: float, gen: torch.Generator | None) -> None:
    with torch.no_grad():
        t.normal_(0.0, std, generator=gen)


def _fill_uniform(t: Tensor, bound: float, gen: torch.Generator | None) -> None:
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=gen)


# Weight rules: (block, options, generator) -> None. One per scheme; biases are handled separately.
def _w_normal(t: Tensor, o: Mapping[str, Any], g: torch.Generator | None) -> None:
    _fill_normal(t, o["std"], g)


def _w_xavier_uniform(t: Tensor, o: Mapping[str, Any], g: torch.Generator | None) -> None:
    fan_in, fan_out = _fans(t)
    _fill_uniform(t, _gain(o, "linear") * math.sqrt(6.0 / (fan_in + fan_out)), g)


def _w_xavier_normal(t: Tensor, o: Mapping[str, Any], g: torch.Generator | None) -> None:
    fan_in, fan_out = _fans(t)
    _fill_normal(t, _gain(o, "linear") * math.sqrt(2.0 / (fan_in + fan_out)), g)


def _he_std(t: Tensor, o: Mapping[str, Any]) -> float:
    fan_in, fan_out = _fans(t)
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[o["mode"]]
    return _gain(o, "relu") / math.sqrt(fan)


def _w_he_uniform(t: Tensor, o: Mapping[str, Any], g: torch.Generator | None) -> None:
    _fill_uniform(t, math.sqrt(3.0) * _he_std(t, o), g)


def _w_he_normal(t: Tensor, o: Mapping[str, Any], g: torch.Generator | None) -> None:
    _fill_normal(t, _he_std(t, o), g)


def _w_lecun(t: Tensor, o: Mapping[str, Any], g: torch.Generator | None) -> None:
    std = _gain(o, "linear") / math.sqrt(_fans(t)[0])
    if o["distribution"] == "uniform":
        _fill_uniform(t, math.sqrt(3.0) * std, g)
    else:
        _fill_normal(t, std, g)


def _w_orthogonal(t: Tensor, o: Mapping[str, Any], g: torch.Generator | None) -> None:
    if t.ndim < 2:
        raise ConfigError("orthogonal init needs a weight with at least 2 dimensions")
    with torch.no_grad():
        nn.init.orthogonal_(t, gain=_gain(o, "linear"), generator=g)


@dataclass(frozen=True)
class SchemeInfo:
    """Registry record of an initialisation scheme (listed by the CLI and the lab).

    Attributes:
        name: registry key.
        summary: one line with the formula.
        options: the keyword arguments of :func:`apply` the scheme uses.
        reference: the paper.
        needs_inputs: True for data-dependent schemes (LSUV), which need ``inputs=``.
    """

    name: str
    summary: str
    options: tuple[str, ...]
    reference: str
    needs_inputs: bool = False

    @property
    def defaults(self) -> Mapping[str, Any]:
        """The scheme's options with their defaults (those of :func:`apply`'s signature)."""
        return {name: _APPLY_DEFAULTS[name] for name in self.options}

    @property
    def needs_batch(self) -> bool:
        """Deprecated: :attr:`needs_inputs`."""
        warnings.warn("SchemeInfo.needs_batch is deprecated; use needs_inputs", DeprecationWarning, stacklevel=2)
        return self.needs_inputs


_COMMON = ("bias", "generator")
_GAINED = ("activation", "param", "gain")

#: Every initialisation scheme by name (read-only), in the order the docs list them.
SCHEMES: Mapping[str, SchemeInfo] = MappingProxyType(
    {
        "normal": SchemeInfo("normal", "W ~ N(0, std²), bias constant", ("std", *_COMMON), "fixed-std baseline"),
        "xavier_uniform": SchemeInfo(
            "xavier_uniform", "W ~ U(±gain·√(6/(fan_in+fan_out)))", (*_GAINED, *_COMMON), "Glorot & Bengio 2010"
        ),
        "xavier_normal": SchemeInfo(
            "xavier_normal", "W ~ N(0, gain²·2/(fan_in+fan_out))", (*_GAINED, *_COMMON), "Glorot & Bengio 2010"
        ),
        "he_uniform": SchemeInfo("he_uniform", "W ~ U(±gain·√(3/fan))", ("mode", *_GAINED, *_COMMON), "He et al. 2015"),
        "he_normal": SchemeInfo("he_normal", "W ~ N(0, gain²/fan)", ("mode", *_GAINED, *_COMMON), "He et al. 2015"),
        "lecun": SchemeInfo(
            "lecun", "W ~ N(0, gain²/fan_in)", ("distribution", *_GAINED, *_COMMON), "LeCun et al. 1998"
        ),
        "orthogonal": SchemeInfo("orthogonal", "W = gain·Q, QᵀQ = I", (*_GAINED, *_COMMON), "Saxe et al. 2014"),
        "identity": SchemeInfo(
            "identity", "RNN W_hh = scale·I, biases 0", ("scale",), "Le, Jaitly & Hinton 2015 (IRNN)"
        ),
        "lstm_forget_bias": SchemeInfo(
            "lstm_forget_bias", "LSTM forget-gate bias = value", ("value",), "Gers et al. 2000"
        ),
        "lsuv": SchemeInfo(
            "lsuv",
            "orthonormal, then rescale each layer to output std target_std",
            ("inputs", "target_std", "tol", "max_iter", "orthonormal"),
            "Mishkin & Matas 2016",
            needs_inputs=True,
        ),
    }
)

_WEIGHT_RULES: Mapping[str, Callable[[Tensor, Mapping[str, Any], torch.Generator | None], None]] = MappingProxyType(
    {
        "normal": _w_normal,
        "xavier_uniform": _w_xavier_uniform,
        "xavier_normal": _w_xavier_normal,
        "he_uniform": _w_he_uniform,
        "he_normal": _w_he_normal,
        "lecun": _w_lecun,
        "orthogonal": _w_orthogonal,
    }
)


def scheme_names() -> tuple[str, ...]:
    """Names of every scheme, in the order of the module's table (formula and paper: ``SCHEMES[name]``)."""
    return tuple(SCHEMES)


def _check_options(scheme: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``scheme`` uses, validated; an option it does not use must be left at its default."""
    if not isinstance(scheme, str):
        raise InputError(f"scheme must be a string, got {type(scheme).__name__}")
    check_choice("scheme", scheme, SCHEMES)
    used = SCHEMES[scheme].options
    unused = [n for n in given if n not in used and not _is_default(given[n], _APPLY_DEFAULTS[n])]
    if unused:
        raise ConfigError(
            f"init scheme {scheme!r} does not take {', '.join(unused)}; its options are: {', '.join(used)}"
        )
    options = {n: given[n] for n in used}
    if "std" in options:
        check_number("std", options["std"], low=0.0)
    if "scale" in options:
        check_number("scale", options["scale"])
    if "value" in options:
        check_number("value", options["value"])
    if options.get("bias") is not None:
        check_number("bias", options["bias"])
    if "mode" in options:
        check_choice("mode", options["mode"], ("fan_in", "fan_out", "fan_avg"))
    if "distribution" in options:
        check_choice("distribution", options["distribution"], ("normal", "uniform"))
    if "activation" in options:
        _gain(options, "linear")  # validates activation / gain now rather than mid-walk
    gen = options.get("generator")
    if gen is not None and not isinstance(gen, torch.Generator):
        raise InputError(f"generator must be a torch.Generator, got {type(gen).__name__}")
    return options


def _is_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    if isinstance(default, str):
        return isinstance(value, str) and value == default
    return isinstance(default, int | float) and isinstance(value, int | float) and value == default


def _recurrent_gates(module: nn.Module) -> int | None:
    """Number of gate blocks stacked in a recurrent module's weights, or None if it is not recurrent."""
    if isinstance(module, GGLSTM):
        return 4
    if isinstance(module, nn.RNNBase):
        return _GATES[module.mode]
    if isinstance(module, nn.LSTMCell):
        return 4
    if isinstance(module, nn.GRUCell):
        return 3
    if isinstance(module, nn.RNNCell):
        return 1
    return None


def _is_plain_rnn(module: nn.Module) -> bool:
    return (isinstance(module, nn.RNNBase) and module.mode in ("RNN_TANH", "RNN_RELU")) or isinstance(
        module, nn.RNNCell
    )


def _is_lstm(module: nn.Module) -> bool:
    return isinstance(module, GGLSTM | nn.LSTMCell) or (isinstance(module, nn.RNNBase) and module.mode == "LSTM")


class _Walk:
    """Collects changed and skipped parameter names while a scheme is applied."""

    def __init__(self) -> None:
        self.changed: list[str] = []
        self.skipped: list[tuple[str, str]] = []

    def report(self, scheme: str, options: Mapping[str, Any], details: Mapping[str, Any] | None = None) -> InitReport:
        shown = {k: v for k, v in options.items() if k not in ("generator", "inputs")}
        return InitReport(scheme, shown, tuple(self.changed), tuple(self.skipped), dict(details or {}))


def _qual(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _set_bias(t: Tensor, value: float) -> None:
    with torch.no_grad():
        t.fill_(value)


def apply(
    model: nn.Module,
    scheme: str,
    *,
    std: float = 0.1,
    bias: float | None = 0.0,
    activation: str | None = None,
    param: float | None = None,
    gain: float | None = None,
    mode: str = "fan_in",
    distribution: str = "normal",
    scale: float = 1.0,
    value: float = 1.0,
    generator: torch.Generator | None = None,
    inputs: Any = None,
    target_std: float = 1.0,
    tol: float = 0.1,
    max_iter: int = 10,
    orthonormal: bool = True,
    batch: Any = None,
) -> InitReport:
    """Initialise every supported module of ``model`` with ``scheme``; returns an :class:`InitReport`.

    The formulas and papers are in the module's table (``SCHEMES[scheme].summary`` / ``.reference``).

    Args:
        model: any ``nn.Module``.
        scheme: a name from :data:`SCHEMES` (``gradguard.init.scheme_names()``).
        std: ``normal``'s standard deviation (≥ 0).
        bias: the constant every bias is set to; ``None`` leaves biases alone.
        activation, param: the nonlinearity after the layer, for ``torch.nn.init.calculate_gain``.
        gain: overrides the activation's gain (> 0).
        mode: the He fan, ``"fan_in"``, ``"fan_out"`` or ``"fan_avg"``.
        distribution: ``lecun``'s ``"normal"`` or ``"uniform"``.
        scale: ``identity``'s diagonal value.
        value: ``lstm_forget_bias``'s forget-gate bias.
        generator: a ``torch.Generator`` for reproducible draws.
        inputs, target_std, tol, max_iter, orthonormal: ``lsuv``'s arguments (see :func:`lsuv`).
        batch: deprecated name of ``inputs``.

    A scheme uses only its own options (``SCHEMES[scheme].options``); another option set away from its
    default is refused. Unknown keywords are a ``TypeError``, as for any Python function.

    Raises:
        ConfigError: unknown scheme (the message lists the allowed ones), an option the scheme does not
            take, or a value out of range (the message names it and the allowed range).

    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> apply(net, "he_normal").changed
    ('0.weight', '0.bias', '2.weight', '2.bias')
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if batch is not None:
        warnings.warn("init.apply(batch=) is deprecated; use inputs=", DeprecationWarning, stacklevel=2)
        if inputs is not None:
            raise TypeError("apply() got both inputs and its deprecated alias batch")
        inputs = batch
    given = {
        "std": std, "bias": bias, "activation": activation, "param": param, "gain": gain, "mode": mode,
        "distribution": distribution, "scale": scale, "value": value, "generator": generator, "inputs": inputs,
        "target_std": target_std, "tol": tol, "max_iter": max_iter, "orthonormal": orthonormal,
    }  # fmt: skip
    options = _check_options(scheme, given)
    if scheme == "lsuv":
        if inputs is None:
            raise ConfigError("init scheme 'lsuv' needs inputs=... (a batch): it measures each layer's output")
        return lsuv(model, inputs, target_std=target_std, tol=tol, max_iter=max_iter, orthonormal=orthonormal)
    walk = _Walk()
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, NORM_LAYERS):
            walk.skipped += [(_qual(prefix, n), "normalisation layer (kept at γ=1, β=0)") for n, _ in own]
            continue
        gates = _recurrent_gates(module)
        if gates is not None:
            _apply_recurrent(module, prefix, own, gates, scheme, options, generator, walk)
        elif isinstance(module, nn.Linear | nn.modules.conv._ConvNd | nn.Embedding | nn.Bilinear):
            _apply_feedforward(module, prefix, own, scheme, options, generator, walk)
        else:
            walk.skipped += [(_qual(prefix, n), f"no rule for {type(module).__name__}") for n, _ in own]
    return walk.report(scheme, options)


#: The keyword-only options of :func:`apply` with their defaults: the one place they are written is its signature.
_APPLY_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        name: p.default
        for name, p in inspect.signature(apply).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "batch"
    }
)


def _apply_feedforward(
    module: nn.Module,
    prefix: str,
    own: list[tuple[str, nn.Parameter]],
    scheme: str,
    options: Mapping[str, Any],
    gen: torch.Generator | None,
    walk: _Walk,
) -> None:
    rule = _WEIGHT_RULES.get(scheme)
    for name, p in own:
        qual = _qual(prefix, name)
        if rule is None:
            walk.skipped.append((qual, f"{scheme} applies to recurrent layers only"))
        elif name == "bias":
            if options["bias"] is None:
                walk.skipped.append((qual, "bias=None"))
            else:
                _set_bias(p, options["bias"])
                walk.changed.append(qual)
        else:
            rule(p, options, gen)
            walk.changed.append(qual)
    if rule is not None and isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()


def _apply_recurrent(
    module: nn.Module,
    prefix: str,
    own: list[tuple[str, nn.Parameter]],
    gates: int,
    scheme: str,
    options: Mapping[str, Any],
    gen: torch.Generator | None,
    walk: _Walk,
) -> None:
    for name, p in own:
        qual = _qual(prefix, name)
        is_bias = name.startswith("bias")
        if scheme == "lstm_forget_bias":
            if not _is_lstm(module):
                walk.skipped.append((qual, f"not an LSTM ({type(module).__name__})"))
            elif not is_bias:
                walk.skipped.append((qual, "lstm_forget_bias changes forget-gate biases only"))
            else:
                # Gate order i, f, g, o: the forget block is rows [H, 2H). The effective bias is
                # bias_ih + bias_hh, so bias_ih carries the whole value and bias_hh's block is zero.
                hidden = p.shape[0] // 4
                with torch.no_grad():
                    p[hidden : 2 * hidden].fill_(options["value"] if name.startswith("bias_ih") else 0.0)
                walk.changed.append(qual)
            continue
        if scheme == "identity":
            if not _is_plain_rnn(module):
                walk.skipped.append((qual, "identity (IRNN) is defined for plain RNNs, not gated ones"))
            elif name.startswith("weight_hh"):
                with torch.no_grad():
                    p.copy_(options["scale"] * torch.eye(p.shape[0], p.shape[1], dtype=p.dtype, device=p.device))
                walk.changed.append(qual)
            elif is_bias:
                _set_bias(p, 0.0)
                walk.changed.append(qual)
            else:
                walk.skipped.append((qual, "identity sets hidden-to-hidden weights and biases only"))
            continue
        if is_bias:
            if options["bias"] is None:
                walk.skipped.append((qual, "bias=None"))
            else:
                _set_bias(p, options["bias"] if name.startswith("bias_ih") else 0.0)
                walk.changed.append(qual)
            continue
        blocks = p.chunk(gates, dim=0) if name.startswith(("weight_ih", "weight_hh")) else (p,)
        for block in blocks:
            _WEIGHT_RULES[scheme](block, options, gen)
        walk.changed.append(qual)


def _weight(module: nn.Module) -> Tensor:
    w = module.weight
    assert isinstance(w, Tensor)
    return w


#: Marks ``inputs`` as not given, so that the deprecated ``batch=`` keyword can stand in for it.
_MISSING: Any = object()


def lsuv(
    model: nn.Module,
    inputs: Any = _MISSING,
    *,
    target_std: float = 1.0,
    tol: float = 0.1,
    max_iter: int = 10,
    orthonormal: bool = True,
    batch: Any = _MISSING,
) -> InitReport:
    """Layer-sequential unit-variance init (Mishkin & Matas 2016, "All you need is a good init").

    1. If ``orthonormal``: every ``Linear``/``Conv*`` weight ← orthogonal (Saxe et al. 2014), bias ← 0.
    2. For each such layer in the order the forward pass calls them: run ``inputs`` through the model,
       measure the std s of the layer's output, and rescale ``W ← W · target_std / (s + 1e-8)`` until
       ``|s − target_std| ≤ tol`` or ``max_iter`` rescalings were made.

    The model runs in eval mode under ``no_grad`` and its train/eval mode is restored. Other layers are left
    as they are (listed as skipped). ``details["std"]`` holds each layer's final output std and
    ``details["iterations"]`` the rescalings it took.

    Args:
        model: the network.
        inputs: a batch: a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or a mapping
            (``model(**inputs)``), as :func:`gradguard.adapt.call_model` reads it. Required.
        target_std: wanted output std of each layer (> 0).
        tol: allowed deviation from ``target_std`` (> 0).
        max_iter: most rescalings per layer (≥ 1).
        orthonormal: start from orthonormal weights (step 1).
        batch: deprecated name of ``inputs``.
    """
    if batch is not _MISSING:
        warnings.warn("lsuv(batch=) is deprecated; use inputs=", DeprecationWarning, stacklevel=2)
        if inputs is not _MISSING:
            raise TypeError("lsuv() got both inputs and its deprecated alias batch")
        inputs = batch
    if inputs is _MISSING:
        raise TypeError("lsuv() missing 1 required argument: 'inputs'")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model_arguments(inputs, name="lsuv inputs")  # refuse a batch without data before any weight is touched
    check_number("target_std", target_std, low=0.0, low_inclusive=False)
    check_number("tol", tol, low=0.0, low_inclusive=False)
    check_number("max_iter", max_iter, low=1, integer=True)
    candidates: dict[nn.Module, str] = {
        m: name for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)
    }
    walk = _Walk()
    order: list[nn.Module] = []
    captured: dict[str, Tensor] = {}

    def record(module: nn.Module, _inp: Any, _out: Any) -> None:
        if module not in order:
            order.append(module)

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(record) for m in candidates]
    stds: dict[str, float] = {}
    iters: dict[str, int] = {}
    try:
        with torch.no_grad():
            if orthonormal:
                for m, name in candidates.items():
                    nn.init.orthogonal_(_weight(m))
                    walk.changed.append(_qual(name, "weight"))
                    if isinstance(m.bias, Tensor):
                        m.bias.zero_()
                        walk.changed.append(_qual(name, "bias"))
            call_model(model, inputs)
            for h in handles:
                h.remove()
            handles = []
            for layer in order:
                name = candidates[layer]

                def grab(_m: nn.Module, _i: Any, out: Any) -> None:
                    captured["out"] = (out[0] if isinstance(out, tuple) else out).detach()

                handle = layer.register_forward_hook(grab)
                handles.append(handle)
                call_model(model, inputs)
                std = captured["out"].float().std()
                n = 0
                while abs(float(std) - target_std) > tol and n < max_iter:
                    _weight(layer).mul_(float(target_std / (std + 1e-8)))
                    call_model(model, inputs)
                    std = captured["out"].float().std()
                    n += 1
                handle.remove()
                handles.remove(handle)
                stds[name] = float(std)
                iters[name] = n
                if not orthonormal:
                    walk.changed.append(_qual(name, "weight"))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for m, name in candidates.items():
        if m not in order:
            walk.skipped.append((_qual(name, "weight"), "layer not called by the forward pass"))
    for prefix, module in model.named_modules():
        if module in candidates:
            continue
        for n, _ in module.named_parameters(recurse=False):
            why = f"LSUV rescales Linear/Conv layers only, not {type(module).__name__}"
            walk.skipped.append((_qual(prefix, n), why))
    options = {"target_std": target_std, "tol": tol, "max_iter": max_iter, "orthonormal": orthonormal}
    return walk.report("lsuv", options, {"std": stds, "iterations": iters})
