"""Character-level GPT trained with AdamW, in the manner of the small educational GPT examples.

Causal self-attention blocks (pre-norm, GELU MLP), weight-tied embedding, cosine-free constant LR,
``clip_grad_norm_(1.0)``, ``optimizer.zero_grad(set_to_none=True)``. The text is embedded below.

Faults (``--fault``): ``lr100`` multiplies the learning rate by 100; ``noclip`` drops the clipping and
raises the learning rate thirtyfold; ``nan`` puts a NaN in the attention mask bias of one batch's
forward (as a corrupted padding mask would).
``--watch DIR`` is the same program instrumented by hand with ``gg.watch`` (the reference for the tests).
"""

import argparse

import torch
from torch import nn
from torch.nn import functional as F

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--fault", choices=["none", "lr100", "noclip", "nan"], default="none")
parser.add_argument("--watch", default=None, help="instrument by hand with gg.watch, logging to this folder")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(1)

TEXT = (
    "the gradient of a deep network is a product of many factors, one per layer; when each factor is a "
    "little below one the product fades away, and when each is a little above one it grows without bound. "
    "careful initialisation, normalisation and residual paths keep the factors near one, and clipping "
    "stops the rare step whose gradient has grown too large from undoing the work of many steps before. "
) * 4
chars = sorted(set(TEXT))
stoi = {c: i for i, c in enumerate(chars)}
data = torch.tensor([stoi[c] for c in TEXT], dtype=torch.long)
BLOCK, BATCH, EMBD, HEADS, LAYERS = 16, 8, 32, 2, 2
lr, clip = args.lr, 1.0
if args.fault == "lr100":
    lr *= 100
elif args.fault == "noclip":
    lr, clip = lr * 30, None
NAN_STEP = 30


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(EMBD, 3 * EMBD)
        self.proj = nn.Linear(EMBD, EMBD)
        self.register_buffer("mask", torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK))
        self.corrupt = False

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(EMBD, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (k.size(-1) ** 0.5)
        att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf"))
        if self.corrupt:
            att = att + float("nan")
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(EMBD), CausalSelfAttention()
        self.ln2 = nn.LayerNorm(EMBD)
        self.mlp = nn.Sequential(nn.Linear(EMBD, 4 * EMBD), nn.GELU(), nn.Linear(4 * EMBD, EMBD))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, EMBD)
        self.pos = nn.Embedding(BLOCK, EMBD)
        self.blocks = nn.Sequential(*[Block() for _ in range(LAYERS)])
        self.ln_f = nn.LayerNorm(EMBD)
        self.head = nn.Linear(EMBD, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx, targets=None):
        t = idx.size(1)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        logits = self.head(self.ln_f(self.blocks(x)))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def get_batch(g: torch.Generator):
    ix = torch.randint(len(data) - BLOCK - 1, (BATCH,), generator=g)
    return torch.stack([data[i : i + BLOCK] for i in ix]), torch.stack([data[i + 1 : i + 1 + BLOCK] for i in ix])


model = GPT(len(chars))
optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
mon = None
if args.watch:
    import gradguard as gg

    mon = gg.watch(model, log_dir=args.watch, console=False)
g = torch.Generator().manual_seed(args.seed)
for step in range(args.steps):
    x, y = get_batch(g)
    model.blocks[0].attn.corrupt = args.fault == "nan" and step == NAN_STEP
    _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if mon is not None:
        mon.step(loss)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    if step % 10 == 0:
        print(f"step {step}: loss {loss.item():.4f}")
if mon is not None:
    mon.close()
finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
print(f"final loss {loss.item():.6f} | weights finite {finite}")
