"""Smoke version of the reliability campaign (``reliability/run.py``), and regression tests of bugs it found.

The full campaign (``make reliability``) injects ≥ 200 seeded faults into MLP/CNN/LSTM/transformer runs
and writes RELIABILITY.md; this file runs a handful of the same faults and asserts the same properties:
with ``gg.Guard`` + ``gg.watch`` on defaults every run completes with finite weights, a finding of the
right kind names the faulted module, and the final held-out loss stays within 5 % of the fault-free twin.
The control (no gradguard) runs are checked to really be damaged by the fault.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import gradguard as gg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reliability.models import MODELS


# ----------------------------------------------------------------------------- regression tests
def test_provenance_names_attention_when_out_proj_grad_is_nan() -> None:
    """Regression (found by the campaign): ``nn.MultiheadAttention`` never calls its ``out_proj`` module,
    so a NaN in ``out_proj``'s parameter gradient had no module to blame and the monitor said "producer
    unknown". The nearest ancestor that ran (the attention module) must be named."""
    model, task = MODELS["transformer"].make(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = gg.watch(model, console=False)
    handle = model.attn.out_proj.bias.register_hook(lambda g: g * float("nan"))
    x, y = task.batch(0)
    loss = task.loss_fn(model(x), y)
    loss.backward()
    assert not torch.isfinite(model.attn.out_proj.bias.grad).all()  # the fault really happened
    mon.step(loss)
    handle.remove()
    opt.step()
    blamed = [f.module for f in mon.findings if f.kind == "nonfinite"]
    mon.close()
    assert blamed == ["attn"]
