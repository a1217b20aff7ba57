"""gg.probe on recurrent models as people call them: an LSTM with dropout in train mode is measured through
time (dropout off for the measurement, the model left as it was), and a model called as (tokens, hidden) is
profiled at its embedding's output, the report saying which tensor that was."""

from __future__ import annotations

import torch
from torch import nn

import gradguard as gg
from gradguard.preflight import projection_loss


class WordLM(nn.Module):
    def __init__(self, vocab: int = 50, emb: int = 16, hidden: int = 16, dropout: float = 0.5) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, emb)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.LSTM(emb, hidden, num_layers=2, dropout=dropout)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        out, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(out)), hidden


def batch(t: int = 12, b: int = 4) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(50, (t, b), generator=g), (torch.zeros(2, b, 16), torch.zeros(2, b, 16))


def test_lstm_with_dropout_in_train_mode_is_unrolled_with_dropout_off_and_restored() -> None:
    torch.manual_seed(0)
    model = WordLM()
    model.drop = nn.Identity()  # only the LSTM's inter-layer dropout: the reference below is then exact
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, hidden = batch()
    report = gg.probe(model, (tokens, hidden), time_dim=0)
    (prof,) = report.recurrent
    assert prof.steps == 12 and len(prof.last_norms) == 12 and "dropout (p=0.5) off" in prof.note
    assert prof.unroll_error <= 1e-4  # the unroll reproduces the module with its dropout off
    # Reference: the same model without dropout gives the same through-time profile (the projection loss's
    # gradient at the LSTM's outputs does not depend on their values, the decoder being linear).
    plain = WordLM(dropout=0.0)
    plain.drop = nn.Identity()
    plain.load_state_dict(model.state_dict())
    ref = gg.probe(plain, (tokens, hidden), time_dim=0).recurrent[0]
    assert torch.allclose(torch.tensor(prof.last_norms), torch.tensor(ref.last_norms), rtol=1e-4, atol=1e-9)
    assert model.training and model.rnn.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tokens_and_hidden_are_profiled_at_the_embedding_output() -> None:
    torch.manual_seed(0)
    model = WordLM(dropout=0.0)
    tokens, hidden = batch()
    report = gg.probe(model, (tokens, hidden), time_dim=0)
    assert "`encoder` (nn.Embedding)" in report.options["profiled"]
    assert report.time is not None and len(report.time.norms) == 12
    # Reference: ‖∂L/∂e_t‖ at the embedding output, by plain autograd with the probe's projection loss.
    emb = model.encoder(tokens).detach().requires_grad_(True)
    out, h = model.rnn(emb, hidden)
    loss = projection_loss((model.decoder(out), h), seed=0)
    (g,) = torch.autograd.grad(loss, emb)
    ref = g.pow(2).sum(dim=(1, 2)).sqrt()
    assert torch.allclose(torch.tensor(report.time.norms, dtype=torch.float64), ref.double(), rtol=1e-4)
