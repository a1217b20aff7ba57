"""Word-level LSTM language model with truncated BPTT and hand-written SGD updates.

In the manner of the classic word-language-model example: the hidden state is carried from batch to
batch and detached at each boundary, the gradient is clipped with ``clip_grad_norm_``, and the weights
are updated by hand (``p.data.add_(p.grad, alpha=-lr)``) with no optimizer. The corpus is a synthetic
first-order Markov chain over a small vocabulary (nothing is downloaded).

Faults (``--fault``): ``lr100`` multiplies the learning rate by 100 (clipping kept); ``noclip`` drops the
clipping and raises the learning rate fivefold.
``--watch DIR`` is the same program instrumented by hand with ``gg.watch`` (the reference for the tests).
"""

import argparse
import math

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--lr", type=float, default=20.0)
parser.add_argument("--clip", type=float, default=0.25)
parser.add_argument("--bptt", type=int, default=12)
parser.add_argument("--fault", choices=["none", "lr100", "noclip"], default="none")
parser.add_argument("--watch", default=None, help="instrument by hand with gg.watch, logging to this folder")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(1)

VOCAB, BATCH = 40, 8
lr, clip = args.lr, args.clip
if args.fault == "lr100":
    lr *= 100
elif args.fault == "noclip":
    lr, clip = lr * 5, None


def corpus(n: int) -> torch.Tensor:
    """Tokens of a Markov chain whose rows each favour a few successors."""
    g = torch.Generator().manual_seed(1234)
    table = torch.softmax(3.0 * torch.randn(VOCAB, VOCAB, generator=g), dim=1)
    out = torch.empty(n, dtype=torch.long)
    out[0] = 0
    for i in range(1, n):
        out[i] = torch.multinomial(table[out[i - 1]], 1, generator=g)
    return out


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


class RNNModel(nn.Module):
    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid = nlayers, nhid
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x, hidden):
        emb = self.drop(self.encoder(x))
        output, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(output)).view(-1, VOCAB), hidden

    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def repackage_hidden(h):
    return tuple(v.detach() for v in h) if isinstance(h, tuple) else h.detach()


train_data = batchify(corpus(BATCH * (args.bptt * 20 + 1)), BATCH)
model = RNNModel(VOCAB, 16, 32, 2)
criterion = nn.CrossEntropyLoss()
mon = None
if args.watch:
    import gradguard as gg

    mon = gg.watch(model, log_dir=args.watch, console=False)

model.train()
hidden = model.init_hidden(BATCH)
total, step = 0.0, 0
while step < args.steps:
    for i in range(0, train_data.size(0) - 1 - args.bptt, args.bptt):
        if step >= args.steps:
            break
        data, targets = train_data[i : i + args.bptt], train_data[i + 1 : i + 1 + args.bptt].reshape(-1)
        hidden = repackage_hidden(hidden)
        model.zero_grad()
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()
        if mon is not None:
            mon.step(loss)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        total += loss.item()
        step += 1
        if step % 10 == 0:
            print(f"step {step:4d} | lr {lr:g} | loss {total / 10:.4f}")
            total = 0.0
if mon is not None:
    mon.close()
finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
print(f"final loss {loss.item():.6f} | weights finite {finite} | ppl {math.exp(min(loss.item(), 50)):.2f}")
