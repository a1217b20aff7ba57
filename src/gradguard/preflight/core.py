"""``gg.probe``: one forward and one backward pass on a batch, measured per module and per time step.

Most vanishing and exploding gradients are already decided at initialisation (Hochreiter 1991; Bengio et
al. 1994; Glorot & Bengio 2010): the product of per-layer (or per-step) Jacobians keeps its size, shrinks
or grows. The probe measures that product on one batch before any training. Data flows
:mod:`~gradguard.preflight.measure` → :mod:`~gradguard.preflight.verdict` →
:mod:`~gradguard.preflight.report`; ``docs/probe.md`` gives the quantities and the rules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.adapt import as_module, model_arguments, unwrap_compiled
from gradguard.errors import ConfigError, GradGuardError, InputError, check_number
from gradguard.preflight.loss import probe_loss
from gradguard.preflight.measure import Recorder, measure
from gradguard.preflight.report import ProbeReport
from gradguard.preflight.state import preserved
from gradguard.preflight.verdict import diagnose


def _positional_options(extra: tuple[Any, ...], targets: Tensor | None,
                        loss_fn: Callable[..., Tensor] | None) -> tuple[Tensor | None, Callable[..., Tensor] | None]:
    """``targets`` and ``loss_fn`` passed positionally (deprecated): warn and use them."""
    if not extra:
        return targets, loss_fn
    if len(extra) > 2:
        raise InputError(f"probe() takes model, inputs and keyword options; got {len(extra) + 2} positional arguments")
    warnings.warn("passing targets and loss_fn to gg.probe positionally is deprecated; "
                  "use gg.probe(model, inputs, targets=..., loss_fn=...)", DeprecationWarning, stacklevel=3)
    if targets is not None or (len(extra) == 2 and loss_fn is not None):
        raise InputError("targets/loss_fn given both positionally and by keyword")
    return extra[0], (extra[1] if len(extra) == 2 else loss_fn)


def _check_arguments(model: Any, targets: Any, loss_fn: Any, train: Any, seed: Any) -> tuple[nn.Module, bool]:
    """The module to probe and whether it was a ``torch.compile`` wrapper; raises on bad arguments."""
    model = as_module(model)  # a Keras 3 model (PyTorch backend) is probed through its torch view
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
    return model, compiled


def _check_finite(args: list[Any], kwargs: dict[str, Any]) -> None:
    # A NaN in the batch would be reported as a NaN "born" in the first layer: refuse the batch instead.
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in [*enumerate(args), *kwargs.items()]
           if isinstance(v, Tensor) and v.is_floating_point()}
    if any(bad.values()):
        where = ", ".join(f"input {k!r}: {n}" for k, n in bad.items() if n)
        raise ConfigError(f"the probe batch holds NaN/Inf values ({where}); probe a finite batch")


def _time_dim(time_dim: int | None, profiled: Tensor | None) -> int | None:
    """``time_dim`` as a non-negative dimension of the profiled tensor; raises when out of range."""
    if time_dim is None:
        return None
    check_number("time_dim", time_dim, integer=True)
    if profiled is None:
        raise ConfigError("time_dim was given but the inputs contain no floating-point tensor")
    if not -profiled.dim() <= time_dim < profiled.dim():
        raise ConfigError(f"time_dim={time_dim} is out of range for an input of shape {tuple(profiled.shape)}")
    return time_dim % profiled.dim()


def _run_model(model: nn.Module, args: list[Any], kwargs: dict[str, Any]) -> Any:
    try:
        return model(*args, **kwargs)
    except GradGuardError:
        raise
    except Exception as exc:  # the user's model: a rejected input is a usage error, in one line
        shapes = ", ".join(str(tuple(t.shape)) for t in [*args, *kwargs.values()] if isinstance(t, Tensor))
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"the model rejected inputs of shape {shapes}: {type(exc).__name__}: {first}") from exc


def probe(
    model: nn.Module,
    inputs: Any,
    *positional: Any,
    targets: Tensor | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
    time_dim: int | None = None,
    train: bool = True,
    seed: int = 0,
    unroll: bool = True,
) -> ProbeReport:
    """Diagnose a model on one batch, before training: one forward and one backward pass, measured.

    Per module call: the output's mean, std, zero and saturated shares, dead ReLU units, ``‖∂L/∂y‖`` and
    its ratio to the next module's (Glorot & Bengio 2010; He et al. 2015); with ``time_dim``,
    ``‖∂L/∂x_t‖`` per input step; for every ``nn.RNN``/``LSTM``/``GRU``/``gradguard.nn.LSTM`` call,
    ``‖∂L/∂h_t‖`` per step from an unroll with its own weights, the per-step growth factor, the horizon,
    ``ρ(W_hh)·mean f'`` and the mean forget gate (Bengio et al. 1994; Hochreiter & Schmidhuber 1997). The
    verdict is a list of :class:`gradguard.Finding` with remedies; formulae and thresholds are in
    ``docs/probe.md``. The model is left as found: parameters, ``.grad``, buffers, train/eval flags and
    the global random state.

    Args:
        model: any ``nn.Module`` (a ``torch.compile`` wrapper or a Keras 3 model on the PyTorch backend).
        inputs: a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or a mapping
            (``model(**inputs)``); the first floating tensor is the one profiled through time.
        targets: targets for ``loss_fn``; without ``loss_fn``, integer targets mean cross-entropy and
            floating targets of the output's shape mean MSE.
        loss_fn: ``loss_fn(output, targets)`` (``loss_fn(output)`` without targets) returning a scalar.
            With neither, the loss is :func:`~gradguard.preflight.loss.projection_loss`.
        time_dim: dimension of the first floating input that indexes time (e.g. 1 for batch-first).
        train: run the pass in training mode (dropout, batch statistics) as a training step would.
        seed: seed of the projection loss's private generator.
        unroll: unroll recurrent modules (costs more than the fused kernels; see ``BENCHMARKS.md``).
        *positional: deprecated: ``targets`` and ``loss_fn`` given positionally (DeprecationWarning).

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
    targets, loss_fn = _positional_options(positional, targets, loss_fn)
    model, compiled = _check_arguments(model, targets, loss_fn, train, seed)
    args, kwargs = model_arguments(inputs)
    _check_finite(args, kwargs)
    keyed = [(k, v) for k, v in [*enumerate(args), *kwargs.items()] if isinstance(v, Tensor)]
    first_key = next((k for k, v in keyed if v.is_floating_point()), None)
    # Integer first input (token ids, as in model(tokens, hidden)): the signal starts at the embedding's
    # output, so that is the tensor profiled through time, not the first floating one (a zero hidden state).
    tokens_key = keyed[0][0] if keyed and not keyed[0][1].is_floating_point() else None
    tokens_first = tokens_key is not None and any(isinstance(m, nn.Embedding) for m in model.modules())
    x_leaf = None
    if first_key is not None:
        holder: Any = args if isinstance(first_key, int) else kwargs
        x_leaf = holder[first_key] = holder[first_key].detach().clone().requires_grad_(True)
    time_dim = _time_dim(time_dim, keyed[0][1] if tokens_first else x_leaf)

    with preserved(model, train=train):
        recorder = Recorder(model, track_embedding=tokens_first)
        try:
            output = _run_model(model, args, kwargs)
        finally:
            recorder.remove()
        loss, loss_kind = probe_loss(output, targets, loss_fn, seed)
        profiled, what = x_leaf, "none (no floating input)" if x_leaf is None else f"input {first_key!r}"
        if recorder.embedding is not None:
            emb_name, profiled = recorder.embedding
            what = f"output of `{emb_name}` (nn.Embedding) for the integer input {tokens_key!r}"
        input_std = float(profiled.detach().double().std()) if profiled is not None and profiled.numel() > 1 else None
        measured = measure(recorder.calls, loss, profiled, time_dim=time_dim, unroll=unroll)
    findings = diagnose(measured.rows, measured.recurrent, measured.time, measured.loss, input_std=input_std,
                        norm_layers=measured.norm_layers)
    options = {"train": train, "seed": seed, "time_dim": time_dim, "unroll": unroll, "loss": loss_kind,
               "profiled": what, "compiled": compiled}
    return ProbeReport(layers=measured.rows, findings=findings, recurrent=measured.recurrent, time=measured.time,
                       loss=measured.loss, loss_kind=loss_kind, options=options)
