"""Character-level GPT, in the style of the well-known minimal GPT implementations.

Pre-norm transformer blocks (causal self-attention, 4-times-wide GELU MLP), learned position embeddings,
the output head tied to the token embedding, AdamW (β₂ 0.95, weight decay 0.1 on matrices only) with a
linear warmup and a cosine decay, ``clip_grad_norm_(1.0)``. The text is generated in code over a
96-symbol alphabet (printable ASCII and newline): lines of words drawn from a small lexicon with
punctuation, numbers and capitals, so every symbol occurs and the chance level of the loss is ln 96.

Fault: ``lr_x100`` (the peak LR and the schedule × 100 from step ``steps // 2``), ``init_x10``.

    cd tests && python -m programs.char_gpt --fault lr_x100
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .common import GuardFactory, MonitorFactory, Recorder, RunResult, main, scale_lr, scale_weights

FAULTS = ("lr_x100", "init_x10")

#: the 95 printable ASCII characters and the newline.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
_WORDS = ["the", "model", "learns", "a", "gradient", "flows", "back", "through", "time", "and", "layers",
          "norm", "step", "loss", "falls", "rises", "when", "rate", "is", "too", "high", "low"]


def text(n_chars: int, seed: int) -> str:
    """Lines of lexicon words, sometimes capitalised, with numbers and a random symbol now and then."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 9))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(ALPHABET.strip()))
        line = " ".join(words) + rng.choice(".!?;:") + "\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 2, n_head: int = 4, n_embd: int = 64) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norms and the position table excluded)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "wpe.weight"]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n == "wpe.weight"]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def run(fault: str | None = None, steps: int = 80, seed: int = 0, monitor_factory: MonitorFactory | None = None,
        guard_factory: GuardFactory | None = None, *, stop_on_error: bool = False, after_backward=None,
        block_size: int = 32, batch_size: int = 16, lr: float = 3e-3, warmup: int = 10) -> RunResult:
    """Train on random windows of the generated text; held-out metric: the loss on text of another seed."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault {fault!r} is not one of {FAULTS}")
    torch.manual_seed(seed)
    stoi = {ch: i for i, ch in enumerate(ALPHABET)}
    train = torch.tensor([stoi[c] for c in text(20_000, seed=2000 + seed)])
    val = torch.tensor([stoi[c] for c in text(4_000, seed=9999)])
    model = GPT(len(ALPHABET), block_size)
    if fault == "init_x10":
        scale_weights(model, 10.0)
    optimizer = configure_optimizer(model, lr)

    def lr_lambda(it: int) -> float:
        if it < warmup:
            return (it + 1) / warmup
        progress = (it - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    g = torch.Generator().manual_seed(seed)

    def get_batch(data: Tensor) -> tuple[Tensor, Tensor]:
        ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g)
        x = torch.stack([data[i : i + block_size] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])
        return x, y

    rec = Recorder("char_gpt", fault, seed, steps, monitor_factory=monitor_factory, guard_factory=guard_factory,
                   stop_on_error=stop_on_error, after_backward=after_backward)
    rec.attach(model, optimizer)
    if fault == "init_x10":
        rec.fault_step = 0
    model.train()
    with rec.loop():
        for step in range(steps):
            if step == steps // 2 and fault == "lr_x100":
                scale_lr(optimizer, 100.0, scheduler)
                rec.fault_step = step
            x, y = get_batch(train)
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            rec.backward(loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            rec.optimizer_step(loss)
            scheduler.step()
            rec.next_step()

    model.eval()
    with torch.no_grad():
        n = (len(val) - 1) // block_size
        x = val[: n * block_size].view(n, block_size)
        y = val[1 : n * block_size + 1].view(n, block_size)
        logits = model(x)
        val_loss = float(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)))
    return rec.result(val_loss if math.isfinite(val_loss) else math.inf, "val loss", False,
                      chance_loss=math.log(len(ALPHABET)))


if __name__ == "__main__":
    main(run, FAULTS)
