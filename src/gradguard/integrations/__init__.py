"""Framework integrations: Lightning (:mod:`.lightning`), Keras 3 on PyTorch (:mod:`.keras`).

Importing this package imports no framework; each submodule imports its own (an optional extra). Model
adaptation (a Keras model's torch view) lives at the bottom of the stack, in :mod:`gradguard.adapt`.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from gradguard import adapt


def is_keras_model(obj: object) -> bool:
    """Deprecated alias of :func:`gradguard.adapt.is_keras_model` (kept for one release)."""
    warnings.warn("gradguard.integrations.is_keras_model is deprecated; use gradguard.adapt.is_keras_model",
                  DeprecationWarning, stacklevel=2)
    return adapt.is_keras_model(obj)


def as_module(model: Any) -> nn.Module:
    """Deprecated alias of :func:`gradguard.adapt.as_module` (kept for one release)."""
    warnings.warn("gradguard.integrations.as_module is deprecated; use gradguard.adapt.as_module",
                  DeprecationWarning, stacklevel=2)
    return adapt.as_module(model)


__all__ = ["as_module", "is_keras_model"]
