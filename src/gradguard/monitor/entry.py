"""``gg.watch(model)``: the monitor's entry point and the documentation of its options."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from gradguard.adapt import as_module
from gradguard.detect import RuleOptions
from gradguard.monitor.monitor import Monitor
from gradguard.monitor.params import ReduceFn
from gradguard.sinks.base import Sink


def watch(
    model: nn.Module,
    *,
    log_every: int = 10,
    sample_every: int | None = None,
    detail_every: int | None = None,
    window: int = 200,
    dead_window: int = 5,
    log_dir: str | os.PathLike[str] | None = None,
    console: bool | None = None,
    sinks: Iterable[Sink] = (),
    replay: bool | None = None,
    reduce_fn: ReduceFn | None = None,
    max_calls: int = 8,
    scaler: torch.amp.GradScaler | None = None,
    history_limit: int = 1000,
    num_classes: int | None = None,
    chance_loss: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    rules: RuleOptions | None = None,
) -> Monitor:
    """Attach a :class:`Monitor` to ``model``; usable as ``with gg.watch(model) as mon:``.

    Per step (fused ``torch._foreach_norm``, kept on the device): per-parameter gradient L2 norm, the
    global norm ‖g‖ = (Σ_i ‖g_i‖²)^½ and a NaN/Inf flag, which makes the per-parameter non-finite count
    exact (0 when the norm is finite, counted on the step itself when not; on accelerators "some" until
    the logging schedule). On sampled steps also max|g|, ‖w‖, the update ratio ‖Δw‖/‖w‖ and per-module
    output summaries (mean, std, fraction of zeros / saturated, non-finite
    count, per-unit activity, per-time-step profiles of recurrent modules). Statistics reach the host on
    the logging schedule or when ``history``/``findings``/``summary()`` is read.

    Options:
        log_every (int, 10): steps between fetches (detection and sinks run then). The rules also run at
            each of the first 16 steps and, on CPU, whenever a step's loss or gradient norm trips
            gradguard.detect.Sentinel, so a finding is visible within a step or two of its evidence.
        sample_every (int or None, None): steps between sampled steps (activation hooks, and the detail
            statistics below). None: the adaptive schedule of docs/monitor.md, every 10 steps for the first
            ``dead_window`` sampled steps and again after anything suspicious (a new or worse finding, a
            loss or gradient-norm jump, a non-finite value, a module whose outputs changed, an update-ratio
            jump), every 50 steps otherwise; an int: that fixed period (``Monitor.sample_every``).
        detail_every (int, None → the sampled steps): steps between max|g|, ‖w‖ and update-ratio
            measurements. 1 = every step, at the cost of one weight copy and four extra passes over
            gradients and weights per step (see gradguard.monitor.params and BENCHMARKS.md).
        window (int ≥ 10, 200): steps of history the rules look back on (and the spike test's window).
        dead_window (int, 5): sampled steps over which a ReLU unit must never fire (peak output 0) to be
            called dead.
        log_dir (path, None): also append history and findings to ``<log_dir>/metrics.jsonl``.
        console (bool or None, None): print each new finding once (rich); None: True, except on the ranks
            other than 0 under ``torch.distributed``.
        sinks (iterable of gradguard.sinks.Sink, ()): extra sinks.
        replay (bool or None, None): keep references to the last inputs and replay a step that produced
            NaN/Inf to name the module that produced it; None: True, except under ``torch.distributed``.
        reduce_fn (callable, None): the hook point for torch.distributed. Applied once per fetch to the
            stacked per-tensor *squared* norms, one block of shape (rows, 3 · n_params) (gradient, weight
            and update squared norms side by side, columns in named_parameters() order, NaN where not
            measured), before they become norms; must return the reduced block, e.g. one all-reduce(SUM)
            across FSDP shards (gradguard.stats.distributed.make_reduce_fn, chosen automatically when
            parameters are sharded DTensors).
        max_calls (int, 8): training forwards per step kept for replay (gradient accumulation): the first
            ``max_calls`` micro-batches of a step are replayed one by one, and a NaN/Inf born in a later one
            is reported as such (see :mod:`gradguard.monitor.provenance` for the memory this keeps).
        history_limit (int, 1000): steps of ``mon.history`` kept in full; older steps are downsampled to at
            most as many more (every 2^j-th step, warnings, errors and non-finite steps kept), of which only
            the global scalars are kept unless marked, so memory stays flat on long runs (docs/monitor.md).
            The rules look at their own ``window`` and are unaffected.
        scaler (torch.amp.GradScaler, None): the loss scaler of a mixed-precision loop. History then holds
            unscaled norms (‖∇L‖, not ‖S·∇L‖; ``loss_scale`` per row), a step the scaler skips on an fp16
            overflow is counted as an ``info`` finding instead of a non-finite error, and a collapsing scale
            (20 skips in a row, or a scale ≤ 1 that still overflows) is an error naming the module whose
            fp16 values overflow. The scale is read as a device tensor (gradguard.stats.scaler): no sync.

        num_classes (int ≥ 2, None): classes of a classification loss; its chance level is ln C. Without it
            and ``chance_loss``, ln C is inferred from the width C of a plain 2-d/3-d output tensor when the
            loss is a cross-entropy. Label smoothing, ``ignore_index`` and skewed labels put the real chance
            level below ln C: pass ``chance_loss`` then (see docs/detection.md).
        chance_loss (float > 0, None): the chance-level loss itself (instead of ``num_classes``).
        optimizer (torch.optim.Optimizer, None): lets the update-size rule name the learning rate that
            would bring a layer's ‖Δw‖/‖w‖ back to ≈ 3e-3.
        rules (gradguard.detect.RuleOptions, None): the detection rules' thresholds (docs/detection.md).
    torch.compile: pass the compiled wrapper (``gg.watch(torch.compile(model))``); names and parameters
    are the original module's. The monitor's hooks compile to nothing, so a non-sampled step adds no graph
    break and no recompilation; a sampled step's activation statistics come from one extra eager forward
    (``Monitor._eager_pass``), and a NaN/Inf is localised by replaying the step eagerly, the finding saying
    whether the replay reproduced it. Watching a model that is later compiled, or compiled in place
    (``model.compile()``), keeps the gradient statistics and warns that activations and replay are lost.

    Raises:
        InputError: ``model`` is not an ``nn.Module`` or an option has the wrong type.
        ConfigError: a value out of range, or a model without parameters.
        TypeError: an unknown option name (the signature is explicit).
    """
    return Monitor(
        as_module(model), log_every=log_every, sample_every=sample_every, detail_every=detail_every, window=window,
        dead_window=dead_window, log_dir=log_dir, console=console, sinks=sinks, replay=replay, reduce_fn=reduce_fn,
        max_calls=max_calls, scaler=scaler, history_limit=history_limit, num_classes=num_classes,
        chance_loss=chance_loss, optimizer=optimizer, rules=rules,
    )
