"""The checks of watch()'s options (one line each, naming the bad value and what is allowed)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gradguard.detect import RuleOptions
from gradguard.errors import InputError, check_number
from gradguard.monitor.chance import chance_from_options
from gradguard.sinks.base import Sink
from gradguard.stats.distributed import is_distributed
from gradguard.stats.scaler import check_scaler


def check_options(
    model: Any,
    *,
    log_every: Any,
    sample_every: Any,
    detail_every: Any,
    window: Any,
    dead_window: Any,
    max_calls: Any,
    history_limit: Any,
    num_classes: Any,
    chance_loss: Any,
    optimizer: Any,
    rules: Any,
    console: Any,
    replay: Any,
    reduce_fn: Any,
    scaler: Any,
    log_dir: Any,
    sinks: Iterable[Any],
) -> tuple[float | None, str, bool | None, bool | None, list[Sink]]:
    """Raise :class:`InputError` / :class:`ConfigError` for a bad option of :func:`gradguard.watch`; return the
    chance level and its source (gradguard.monitor.chance), ``console`` and ``replay`` with their
    torch.distributed defaults, and the sinks as a list."""
    if not isinstance(model, nn.Module):
        raise InputError(f"watch() needs a torch.nn.Module, got {type(model).__name__}: {model!r:.80}")
    check_number("log_every", log_every, low=1, integer=True)
    if sample_every is not None:
        check_number("sample_every", sample_every, low=1, integer=True)
    if detail_every is not None:
        check_number("detail_every", detail_every, low=1, integer=True)
    check_number("window", window, low=10, integer=True)
    check_number("dead_window", dead_window, low=1, integer=True)
    check_number("max_calls", max_calls, low=1, integer=True)
    check_number("history_limit", history_limit, low=1, integer=True)
    chance, chance_source = chance_from_options(num_classes, chance_loss)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise InputError(f"optimizer={optimizer!r:.60} must be a torch.optim.Optimizer or None")
    if rules is not None and not isinstance(rules, RuleOptions):
        raise InputError(f"rules={rules!r:.60} must be a gradguard.detect.RuleOptions or None")
    for name, flag in (("console", console), ("replay", replay)):
        if flag is not None and not isinstance(flag, bool):
            raise InputError(f"{name}={flag!r} must be True, False or None")
    if is_distributed():
        # Under torch.distributed print on rank 0 only, and do not replay by default (a replay re-runs
        # forward/backward on one rank; with collectives inside, the others would not join).
        console = torch.distributed.get_rank() == 0 if console is None else console
        replay = False if replay is None else replay
    if reduce_fn is not None and not callable(reduce_fn):
        raise InputError(f"reduce_fn={reduce_fn!r} must be a callable Tensor -> Tensor or None")
    if scaler is not None:
        check_scaler(scaler)
    if log_dir is not None and not isinstance(log_dir, str | os.PathLike):
        raise InputError(f"log_dir={log_dir!r} must be a path (str or os.PathLike) or None")
    sink_list = list(sinks)
    for s in sink_list:
        if not isinstance(s, Sink):
            raise InputError(f"sinks must hold gradguard.sinks.Sink instances, got {type(s).__name__}")
    return chance, chance_source, console, replay, sink_list
