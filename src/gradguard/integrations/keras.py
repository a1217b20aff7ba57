"""Keras 3 on the PyTorch backend: a ``model.fit`` callback that steps a gradguard monitor.

The torch view of a Keras model (readable names, forward hooks that fire) is model adaptation and lives
in :mod:`gradguard.adapt`; its names are re-exported here.

Where the gradients are in ``model.fit``: Keras's torch trainer (``TorchTrainer.train_step``) calls
``zero_grad()``, ``loss.backward()`` and ``optimizer.apply(grads)`` inside one call, and clears the gradients
only at the start of the *next* batch. So in ``Callback.on_train_batch_end`` every ``variable.value.grad``
still holds this batch's raw gradient (before Keras's ``clipvalue``/``clipnorm``, which clip copies).
:class:`GradGuardKerasCallback` steps a gradguard monitor there. The weights it sees are already updated;
update ratios are ‖w_t − w_{t−1}‖/‖w‖ between consecutive batches, which is the same quantity.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import Tensor

from gradguard.adapt import KerasLayer, KerasModel, KerasRecurrent, torch_view
from gradguard.errors import InputError, StateError

# This module is the PyTorch-backend integration: choose that backend unless Keras is already loaded or the
# user chose one, then fail clearly if Keras ended up on another backend.
if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "torch")
import keras

if keras.backend.backend() != "torch":
    raise StateError(
        f"gradguard's Keras integration needs the PyTorch backend, Keras runs on {keras.backend.backend()!r}; "
        "set KERAS_BACKEND=torch before importing keras"
    )


class GradGuardKerasCallback(keras.callbacks.Callback):
    """Step a gradguard monitor in ``model.fit`` (Keras 3, PyTorch backend).

    In ``on_train_batch_end`` the gradients of the batch are still in ``variable.value.grad`` (Keras clears
    them at the start of the next batch), raw — before Keras's own ``clipvalue``/``clipnorm``, which clip
    copies — so the monitor sees what the loss produced. The loss passed to ``mon.step`` is the batch's
    own loss (recovered from Keras's running loss tracker, not the epoch mean in ``logs["loss"]``).

    Args:
        monitor: an existing ``gg.Monitor`` watching ``torch_view(model)``; if ``None`` one is created in
            ``on_train_begin`` with ``gg.watch(torch_view(model), **watch_options)`` and kept open after
            ``fit`` so ``callback.monitor.findings`` can be read (call ``callback.monitor.close()``).
        watch_options: options for ``gg.watch`` when ``monitor`` is ``None``.

    Attributes:
        monitor: the monitor being stepped.

    Example::

        cb = GradGuardKerasCallback()
        model.fit(x, y, epochs=3, callbacks=[cb])
        print(cb.monitor.summary())
    """

    def __init__(self, monitor: Any = None, **watch_options: Any) -> None:
        super().__init__()
        if monitor is not None and watch_options:
            raise InputError(
                f"pass either monitor= or watch options, not both (got options {sorted(watch_options)})"
            )
        self.monitor = monitor
        self._watch_options = watch_options
        self._last_total: Tensor | None = None
        self._last_count: Tensor | None = None

    # Keras sets ``self.model`` before ``on_train_begin``.
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.monitor is None:
            import gradguard as gg

            self.monitor = gg.watch(torch_view(self.model), **self._watch_options)
        self._last_total = self._last_count = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        # Keras resets its loss tracker at every epoch start.
        self._last_total = self._last_count = None

    def _batch_loss(self, logs: dict[str, Any] | None) -> Tensor | None:
        tracker = getattr(self.model, "_loss_tracker", None)
        total = getattr(tracker, "total", None)
        count = getattr(tracker, "count", None)
        if total is None or count is None:
            value = (logs or {}).get("loss")
            return None if value is None else torch.as_tensor(float(value))
        # ``logs["loss"]`` is the running mean of the epoch; the batch's own (sample-weighted) loss is the
        # increment of the tracker's running total over the increment of its sample count. Device tensors,
        # no host sync.
        t, c = total.value.detach().clone(), count.value.detach().clone()
        if self._last_total is None or self._last_count is None:
            loss = t / c
        else:
            loss = (t - self._last_total) / (c - self._last_count)
        self._last_total, self._last_count = t, c
        return loss

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.monitor is None:  # pragma: no cover - on_train_begin always runs first in fit
            return
        self.monitor.step(loss=self._batch_loss(logs))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        # The last steps of fit may still be on the device: hand them to the rules and the sinks now, so a
        # log_dir's metrics.jsonl is complete when fit returns (the monitor stays open and readable).
        if self.monitor is not None:
            self.monitor.flush()


__all__ = [
    "GradGuardKerasCallback",
    "KerasLayer",
    "KerasModel",
    "KerasRecurrent",
    "torch_view",
]
