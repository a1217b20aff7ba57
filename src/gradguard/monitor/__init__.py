"""The training monitor: :func:`watch` and :class:`Monitor` (hooks, schedules, device buffers, replay)."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from gradguard.monitor.entry import watch
from gradguard.monitor.monitor import Monitor
from gradguard.monitor.schedule import Sampling, every


def __getattr__(name: str) -> Any:
    if name == "DEFAULTS":
        warnings.warn("gradguard.monitor.DEFAULTS is deprecated; the options and their defaults are the keyword "
                      "parameters of gg.watch (inspect.signature(gg.watch))", DeprecationWarning, stacklevel=2)
        return {k: p.default for k, p in inspect.signature(watch).parameters.items() if p.kind is p.KEYWORD_ONLY}
    raise AttributeError(f"module 'gradguard.monitor' has no attribute {name!r}")


__all__ = ["Monitor", "Sampling", "every", "watch"]
