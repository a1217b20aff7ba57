"""Leave the model as the probe found it: train/eval flags, buffers and the global random state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def preserved(model: nn.Module, *, train: bool) -> Iterator[None]:
    """Run the body with ``model.train(train)``, then restore what a forward pass may change.

    Restored on exit, also after an exception: every module's ``training`` flag, every buffer's value
    (batch-norm running statistics move in a training-mode forward pass), the global CPU and CUDA random
    states (dropout draws from them; ``torch.random.fork_rng``) and ``torch.backends.cudnn.enabled``, which
    is switched off for an eval-mode pass on CUDA because cuDNN's fused RNN kernels have no backward in
    eval mode (the native kernels do). Parameters and ``.grad`` are never written by the probe.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})
    cudnn_was = torch.backends.cudnn.enabled
    try:
        with torch.random.fork_rng(devices=cuda):
            if cuda and not train:
                torch.backends.cudnn.enabled = False
            model.train(train)
            yield
    finally:
        torch.backends.cudnn.enabled = cudnn_was
        for m, was_training in modes:
            m.training = was_training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
