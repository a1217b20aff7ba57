"""Word-level LSTM language model, in the style of the classic PyTorch word-language-model example.

Truncated BPTT over a corpus laid out in ``batch_size`` columns, the hidden state carried from one chunk
to the next and detached ("repackaged") so gradients stop at the chunk boundary, plain SGD at lr 20 with
``clip_grad_norm_(0.25)``, decoder weights tied to the embedding (``tied=False`` unties them; tied, the
``init_x10`` fault scales the embedding with the decoder). The corpus is generated in code by a
small stochastic grammar (subject–verb–object sentences with topic-dependent nouns), so that the model
has real structure to learn and nothing is downloaded.

Faults: ``no_clip_lr20`` (the clip removed), ``no_clip_lr100`` (removed and lr 100), ``lr_x100`` (lr × 100
at step ``steps // 3``), ``init_x10``, ``nan_hidden`` (one NaN written into the carried hidden state at
step ``steps // 3``).

    cd tests && python -m programs.word_lm --fault no_clip_lr20
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor, nn

from .common import GuardFactory, MonitorFactory, Recorder, RunResult, main, scale_lr, scale_weights

FAULTS = ("no_clip_lr20", "no_clip_lr100", "lr_x100", "init_x10", "nan_hidden")

_TOPICS = {
    "kitchen": ["cook", "pan", "knife", "soup", "bread", "table", "oven", "plate", "spoon", "onion"],
    "garden": ["gardener", "rose", "spade", "tree", "seed", "hedge", "bee", "lawn", "pond", "fence"],
    "harbour": ["sailor", "boat", "net", "fish", "anchor", "wave", "gull", "dock", "rope", "mast"],
    "school": ["teacher", "pupil", "book", "desk", "chalk", "lesson", "bell", "map", "pen", "slate"],
}
_VERBS = ["sees", "takes", "finds", "moves", "holds", "cleans", "drops", "likes", "keeps", "paints"]
_ADJS = ["old", "small", "red", "quiet", "wet", "new", "heavy", "bright", "round", "broken"]


def corpus(n_tokens: int, seed: int) -> list[str]:
    """Sentences ``the [adj] NOUN VERB the [adj] NOUN [and VERB the NOUN] .`` from a topic that changes
    every few sentences (a Markov chain over topics), ``<eos>`` after each."""
    rng = random.Random(seed)
    topics = list(_TOPICS)
    topic = rng.choice(topics)
    words: list[str] = []
    while len(words) < n_tokens:
        if rng.random() < 0.2:
            topic = rng.choice(topics)
        nouns = _TOPICS[topic]
        s = [*_noun_phrase(rng, nouns), rng.choice(_VERBS), *_noun_phrase(rng, nouns)]
        if rng.random() < 0.3:
            s += ["and", rng.choice(_VERBS), *_noun_phrase(rng, nouns)]
        words += [*s, ".", "<eos>"]
    return words[:n_tokens]


def _noun_phrase(rng: random.Random, nouns: list[str]) -> list[str]:
    adj = [rng.choice(_ADJS)] if rng.random() < 0.5 else []
    return ["the", *adj, rng.choice(nouns)]


class RNNModel(nn.Module):
    """Embedding → dropout → multi-layer LSTM → dropout → linear decoder (optionally tied)."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.2,
                 tie_weights: bool = True) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            if nhid != ninp:
                raise ValueError("when tying weights, nhid must equal the embedding size")
            self.decoder.weight = self.encoder.weight
        self.nhid, self.nlayers = nhid, nlayers
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: Tensor, hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        emb = self.drop(self.encoder(tokens))
        output, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(output)), hidden

    def init_hidden(self, bsz: int) -> tuple[Tensor, Tensor]:
        w = next(self.parameters())
        return (w.new_zeros(self.nlayers, bsz, self.nhid), w.new_zeros(self.nlayers, bsz, self.nhid))


def batchify(ids: Tensor, bsz: int) -> Tensor:
    """Lay the token stream out in ``bsz`` columns (the tail that does not fill a row is dropped)."""
    nbatch = ids.size(0) // bsz
    return ids[: nbatch * bsz].view(bsz, -1).t().contiguous()


def get_batch(source: Tensor, i: int, bptt: int) -> tuple[Tensor, Tensor]:
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def repackage_hidden(h: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Detach the hidden state from the graph of the previous chunk (truncated BPTT)."""
    return (h[0].detach(), h[1].detach())


def run(fault: str | None = None, steps: int = 60, seed: int = 0, monitor_factory: MonitorFactory | None = None,
        guard_factory: GuardFactory | None = None, *, stop_on_error: bool = False, after_backward=None,
        tokens: int = 6000, emsize: int = 64, bptt: int = 20, batch_size: int = 10, tied: bool = True) -> RunResult:
    """Train for ``steps`` chunks (wrapping around the training data) and evaluate on held-out text."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault {fault!r} is not one of {FAULTS}")
    torch.manual_seed(seed)
    words = corpus(tokens + tokens // 5, seed=1000 + seed)
    vocab = {w: i for i, w in enumerate(sorted(set(words)))}
    ids = torch.tensor([vocab[w] for w in words])
    train_data = batchify(ids[:tokens], batch_size)
    val_data = batchify(ids[tokens:], batch_size)
    ntokens = len(vocab)

    model = RNNModel(ntokens, emsize, emsize, 2, dropout=0.2, tie_weights=tied)
    lr, clip = 20.0, 0.25
    if fault == "no_clip_lr20":
        clip = None
    if fault == "no_clip_lr100":
        lr, clip = 100.0, None
    if fault == "init_x10":
        scale_weights(model, 10.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    rec = Recorder("word_lm", fault, seed, steps, monitor_factory=monitor_factory, guard_factory=guard_factory,
                   stop_on_error=stop_on_error, after_backward=after_backward)
    rec.attach(model, optimizer)
    if fault in ("no_clip_lr20", "no_clip_lr100", "init_x10"):
        rec.fault_step = 0
    mid = steps // 3

    model.train()
    hidden = model.init_hidden(batch_size)
    i = 0
    with rec.loop():
        for step in range(steps):
            if i >= train_data.size(0) - 2:
                i = 0
            data, targets = get_batch(train_data, i, bptt)
            i += bptt
            if step == mid and fault == "lr_x100":
                scale_lr(optimizer, 100.0)
                rec.fault_step = step
            hidden = repackage_hidden(hidden)
            if step == mid and fault == "nan_hidden":
                hidden[0][0, 0, 0] = math.nan  # a NaN produced upstream, carried in by the state
                rec.fault_step = step
            optimizer.zero_grad()
            output, hidden = model(data, hidden)
            loss = criterion(output.view(-1, ntokens), targets)
            loss.backward()
            rec.backward(loss)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            rec.optimizer_step(loss)
            rec.next_step()

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        h = model.init_hidden(batch_size)
        for j in range(0, val_data.size(0) - 1, bptt):
            data, targets = get_batch(val_data, j, bptt)
            output, h = model(data, h)
            total += float(criterion(output.view(-1, ntokens), targets)) * len(targets)
            count += len(targets)
    val_loss = total / count
    return rec.result(val_loss if math.isfinite(val_loss) else math.inf, "val loss", False,
                      chance_loss=math.log(ntokens))


if __name__ == "__main__":
    main(run, FAULTS)
