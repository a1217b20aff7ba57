"""Framework integrations: Lightning (:mod:`.lightning`), Keras 3 on PyTorch (:mod:`.keras`).

Importing this package imports no framework; each submodule imports its own (an optional extra). The
helpers here let core entry points accept framework objects without importing the framework.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def is_keras_model(obj: object) -> bool:
    """True if ``obj`` is a Keras 3 layer or model (decided from its class hierarchy, without importing Keras)."""
    return any(cls.__module__.startswith("keras.") and cls.__name__ == "Layer" for cls in type(obj).__mro__)


def as_module(model: Any) -> nn.Module:
    """The ``torch.nn.Module`` gradguard should hook for ``model``.

    A Keras 3 model (PyTorch backend) becomes :func:`gradguard.integrations.keras.torch_view` of it —
    readable names, working forward hooks, the same parameters; anything else is returned unchanged.
    ``gg.watch`` and ``gg.probe`` call this so Keras models can be passed to them directly.
    """
    if is_keras_model(model):
        from gradguard.integrations.keras import torch_view

        return torch_view(model)
    return model


__all__ = ["as_module", "is_keras_model"]
