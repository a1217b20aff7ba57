"""A NaN carried in a recurrent state is named at the module that received it (the batch itself clean);
a NaN in the batch itself is still blamed on no module."""

from __future__ import annotations

import math

import torch
from torch import nn

import gradguard as gg


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 8)
        self.decoder = nn.Linear(8, 20)

    def forward(self, tokens: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        out, hidden = self.rnn(self.encoder(tokens), hidden)
        return self.decoder(out), hidden


def test_nan_in_the_carried_hidden_state_names_the_rnn() -> None:
    torch.manual_seed(0)
    model = LM()
    mon = gg.watch(model, console=False)
    tokens = torch.randint(20, (6, 2))
    h0, c0 = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)
    h0[0, 1, 3] = math.nan
    out, _ = model(tokens, (h0, c0))
    loss = nn.functional.cross_entropy(out.reshape(-1, 20), tokens.reshape(-1))
    assert not torch.isfinite(loss)  # the fault is real
    loss.backward()
    mon.step(loss)
    (f,) = [f for f in mon.findings if f.kind == "nonfinite"]
    assert f.module == "rnn" and "carried state" in f.message and "`rnn` received it first" in f.message
    mon.close()
