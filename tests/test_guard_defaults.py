"""The default Guard never hurts a healthy run and still cures explosive ones.

Healthy programs, each the kind of run whose loss or gradient norm rises legitimately (a deep net leaving
its initial plateau, LR warm-up, a one-cycle schedule, batches of 4, a 2-D GAN): the default Guard
intervenes on at most 1 % of the steps, a run it never touched is bit-identical to the unguarded run, and
its final held-out loss is within the seed-to-seed spread of unguarded runs (measured over seeds).

Explosive programs: a word-level LSTM language model trained with truncated BPTT, SGD at lr 20 and 100 and
no clipping (the upstream recipe clips at 0.25; without it the run diverges). The test first measures that
the unguarded run really degraded, then that the guarded one stays finite and ends better than the
unguarded run ever was after its start.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gradguard as gg

Batch = tuple[Tensor, Tensor]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[Batch, Batch]:
    """sklearn digits (offline): 1500 training and 297 held-out images, features in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


@dataclass
class Program:
    """A model, its optimizer, an optional LR schedule, a batch function and a held-out evaluation."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], Batch]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    evaluate: Callable[[], float]
    steps: int
    scheduler: Any = None
    losses: list[float] = field(default_factory=list)

    def run(self, guard: gg.Guard | None = None) -> float:
        """Train for ``steps`` steps (through ``guard`` when given); returns the final held-out loss."""
        for t in range(self.steps):
            x, y = self.batch(t)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            if guard is None:
                self.optimizer.step()
            else:
                guard.step(loss)
            if self.scheduler is not None:
                self.scheduler.step()
            self.losses.append(float(loss.detach()))
        return self.evaluate()


def _classifier(model: nn.Module, optimizer: torch.optim.Optimizer, size: int, steps: int, seed: int,
                scheduler: Any = None) -> Program:
    (x, y), (xv, yv) = _digits()
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(steps * size // len(x) + 1)])

    def batch(t: int) -> Batch:
        idx = order[t * size : (t + 1) * size]
        return x[idx], y[idx]

    def evaluate() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(xv), yv))

    return Program(model, optimizer, batch, nn.functional.cross_entropy, evaluate, steps, scheduler)


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def plateau_exit(seed: int) -> Program:
    """A 12-layer ReLU MLP at PyTorch's default init (signal shrinks with depth): Adam first sits on a
    plateau at the chance loss, then leaves it with gradient norms rising many-fold."""
    torch.manual_seed(seed)
    model = _mlp([64] + [32] * 11 + [10])
    return _classifier(model, torch.optim.Adam(model.parameters(), lr=1e-3), 32, 250, seed)


def warmup(seed: int) -> Program:
    """Adam with a linear LR warm-up over 100 steps to 3e-3 (gradient norms and updates rise throughout)."""
    torch.manual_seed(seed)
    model = _mlp([64, 128, 128, 10])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    return _classifier(model, opt, 64, 300, seed, sched)


def one_cycle(seed: int) -> Program:
    """SGD with momentum under a one-cycle schedule peaking at lr 0.5 (the loss rises near the peak)."""
    torch.manual_seed(seed)
    model = _mlp([64, 128, 128, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=300)
    return _classifier(model, opt, 64, 300, seed, sched)


def tiny_batches(seed: int) -> Program:
    """Batches of 4 with plain SGD: single batch losses far above the median are ordinary."""
    torch.manual_seed(seed)
    model = _mlp([64, 64, 10])
    return _classifier(model, torch.optim.SGD(model.parameters(), lr=0.05), 4, 600, seed)


HEALTHY = [plateau_exit, warmup, one_cycle, tiny_batches]
SEEDS = (0, 1, 2)


# ------------------------------------------------------------------------------ word-level LSTM LM
def _corpus(words: int, seed: int) -> list[str]:
    """Text from a small random grammar (subject verb object, with adjectives), so the model has structure
    to learn and the vocabulary comes from the generated text."""
    g = torch.Generator().manual_seed(seed)
    nouns = ["cat", "dog", "bird", "fish", "horse", "child", "teacher", "farmer", "river", "tree", "house", "garden"]
    verbs = ["sees", "likes", "chases", "finds", "eats", "follows", "watches", "helps"]
    adjectives = ["small", "big", "red", "old", "young", "quiet", "happy", "green"]

    def pick(options: list[str]) -> str:
        return options[int(torch.randint(len(options), (), generator=g))]

    def phrase() -> list[str]:
        return ["the"] + ([pick(adjectives)] if float(torch.rand((), generator=g)) < 0.5 else []) + [pick(nouns)]

    out: list[str] = []
    while len(out) < words:
        out += [*phrase(), pick(verbs), *phrase(), "<eos>"]
    return out[:words]


class WordLM(nn.Module):
    """Embedding → 2-layer LSTM → decoder, the layout of the classic word-level language model example."""

    def __init__(self, vocab: int, emb: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, num_layers=2)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor, hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out, hidden = self.rnn(self.encoder(tokens), hidden)
        return self.decoder(out), hidden


def word_lm(lr: float, clip: float | None, steps: int = 60, seed: int = 0, guard: dict[str, Any] | None = None,
            ) -> tuple[list[float], float, gg.Guard | None]:
    """Truncated BPTT (35 tokens, batch 10, hidden state carried and detached), plain SGD at ``lr``,
    ``clip_grad_norm_(clip)`` when given. Returns the training losses, the held-out loss and the guard."""
    words = _corpus(8000, seed=123)
    vocab = {w: i for i, w in enumerate(sorted(set(words)))}
    ids = torch.tensor([vocab[w] for w in words])
    train, held = ids[:7000], ids[7000:]
    batch, bptt = 10, 35
    train = train[: len(train) // batch * batch].view(batch, -1).t().contiguous()  # (time, batch)
    torch.manual_seed(seed)
    model = WordLM(len(vocab))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = None if guard is None else gg.Guard(model, opt, **guard)
    hidden = (torch.zeros(2, batch, 64), torch.zeros(2, batch, 64))
    losses = []
    for t in range(steps):
        start = (t * bptt) % (len(train) - bptt - 1)
        x, y = train[start : start + bptt], train[start + 1 : start + 1 + bptt]
        hidden = (hidden[0].detach(), hidden[1].detach())
        opt.zero_grad()
        out, hidden = model(x, hidden)
        loss = nn.functional.cross_entropy(out.reshape(-1, len(vocab)), y.reshape(-1))
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if g is None:
            opt.step()
        else:
            g.step(loss)
        losses.append(float(loss.detach()))
    with torch.no_grad():
        h = (torch.zeros(2, 1, 64), torch.zeros(2, 1, 64))
        out, _ = model(held[:-1, None], h)
        held_loss = float(nn.functional.cross_entropy(out[:, 0], held[1:]))
    return losses, held_loss, g


# ------------------------------------------------------------------------------------------ tests
def _stays_degraded(losses: list[float], steps: int = 3) -> bool:
    """The run degraded: a loss turned non-finite, or stayed above twice its best so far for ``steps`` steps."""
    best, above = math.inf, 0
    for v in losses:
        if not math.isfinite(v):
            return True
        above = above + 1 if v > 2 * best else 0
        if above >= steps:
            return True
        best = min(best, v)
    return False


@pytest.mark.parametrize("make", HEALTHY, ids=[m.__name__ for m in HEALTHY])
def test_default_guard_leaves_healthy_runs_alone(make: Callable[[int], Program]) -> None:
    bare = [make(seed) for seed in SEEDS]
    finals = [p.run() for p in bare]
    assert all(f < math.log(10) for f in finals), "the healthy program must learn (held-out below chance)"
    noise = max(finals) - min(finals)  # the seed-to-seed spread of the final held-out loss
    guarded = make(SEEDS[0])
    guard = gg.Guard(guarded.model, guarded.optimizer)  # defaults
    final = guarded.run(guard)
    assert guard.intervened <= 0.01 * guarded.steps, guard.summary()
    assert abs(final - finals[0]) <= noise, (final, finals)
    if guard.intervened == 0:  # untouched: the very same run, bit for bit
        for a, b in zip(guarded.model.parameters(), bare[0].model.parameters(), strict=True):
            assert torch.equal(a, b)
        assert guarded.losses == bare[0].losses


def test_zclip_by_name_keeps_the_package_defaults_and_clips_healthy_runs() -> None:
    """The old default, still available by name: its hard cap of 1.0 trims most steps of a healthy run
    whose gradient norm is above 1, which is why it is not the default any more."""
    p = tiny_batches(0)
    p.steps = 200
    guard = gg.Guard(p.model, p.optimizer, clip="zclip")
    assert isinstance(guard.clip, gg.clip.ZClip) and guard.clip.max_grad_norm == 1.0
    p.run(guard)
    assert guard.clipped > 0.1 * p.steps
    assert not [e for e in guard.events if e.action == "clip" and e.reason != "large_norm"]


@pytest.mark.parametrize("lr", [20.0, 100.0])
def test_default_guard_cures_a_word_lm_without_clipping(lr: float) -> None:
    bare, bare_held, _ = word_lm(lr, clip=None)
    assert _stays_degraded(bare), "without clipping the LM must really diverge"
    losses, held, guard = word_lm(lr, clip=None, guard={})
    assert guard is not None and guard.rollbacks >= 1 and guard.rescue_engaged
    assert all(math.isfinite(v) for v in losses) and math.isfinite(held)
    # Better at the end than the unguarded run ever was after its first step, and than its held-out loss.
    assert held < min(bare[1:]) and held < bare_held, (held, min(bare[1:]), bare_held)
    rollback = next(e for e in guard.events if e.action == "rollback")
    assert rollback.reason == "divergence" and rollback.step <= 4, "a sustained rise is caught within 3 steps"


def test_word_lm_with_its_own_clipping_is_untouched() -> None:
    """The upstream recipe (clip_grad_norm_(0.25) in the loop) is healthy: the Guard never intervenes and
    the run is bit-identical to the unguarded one."""
    bare, bare_held, _ = word_lm(20.0, clip=0.25, steps=30)
    losses, held, guard = word_lm(20.0, clip=0.25, steps=30, guard={})
    assert guard is not None and guard.intervened == 0 and not guard.events
    assert losses == bare and held == bare_held


def test_routine_clips_are_counted_not_events() -> None:
    p = tiny_batches(0)
    p.steps = 50
    guard = gg.Guard(p.model, p.optimizer, clip=gg.clip.ClipNorm(1e-3))  # clips every step, on purpose
    p.run(guard)
    assert guard.clipped == guard.steps == 50 and guard.summary()["clipped"] == 50
    assert guard.events == [] and guard.events[-3:] == []
    guard.events.extend(gg.GuardEvent(k, "skip", "loss_spike") for k in range(5))
    assert [e.step for e in guard.events[-3:]] == [2, 3, 4]


def _loss_driven_guard(**options: Any) -> tuple[gg.Guard, Callable[[float], bool]]:
    """A guard fed chosen losses (learning rate 0, constant gradients: only the loss changes)."""
    p = nn.Parameter(torch.zeros(4))
    guard = gg.Guard(nn.ParameterList([p]), torch.optim.SGD([p], lr=0.0), **options)

    def feed(loss: float) -> bool:
        p.grad = torch.full((4,), 0.5)
        return guard.step(torch.tensor(loss))

    return guard, feed


def _noisy_run(steps: int = 2000) -> list[float]:
    """A loss that falls from 1 to 0.2 over 100 steps, then stays there with ±30 % batch noise."""
    g = torch.Generator().manual_seed(0)
    level = [max(0.2, 1.0 - 0.008 * t) for t in range(steps)]
    noise = (1 + 0.3 * torch.randn(steps, generator=g)).clamp_min(0.05).tolist()
    return [a * b for a, b in zip(level, noise, strict=True)]


def test_divergence_is_judged_against_the_start_not_the_best_so_far() -> None:
    losses = _noisy_run()
    guard, feed = _loss_driven_guard()
    assert all(feed(v) for v in losses) and not guard.events
    # Control: "three losses above twice the best so far" (the best the smallest of three consecutive
    # losses) trips on the same healthy run, because the best so far drifts into the noise's low tail.
    best = min(min(losses[k : k + 3]) for k in range(200))
    assert any(min(losses[k : k + 3]) > 2 * best for k in range(200, len(losses) - 3))
    # A real divergence from the same run, a steady climb of ×1.5 per step (never a 2× jump, so never a
    # spike), is caught on the third step in a row above `divergence` (4) × the start.
    guard, feed = _loss_driven_guard()
    for v in losses[:300]:
        assert feed(v)
    start = min(losses[:3])
    climb = [0.3 * 1.5**k for k in range(1, 14)]
    third = next(k for k in range(2, len(climb)) if min(climb[k - 2 : k + 1]) > guard.divergence * start)
    applied = [feed(v) for v in climb[: third + 1]]
    assert applied == [True] * third + [False]
    assert [(e.action, e.reason) for e in guard.events[:2]] == [("skip", "divergence"), ("rollback", "divergence")]


# --------------------------------------------------------------------------------------------- GAN
_MODES = torch.stack([2 * torch.tensor([math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)]) for k in range(8)])


def gan(seed: int, guarded: bool, steps: int = 400) -> tuple[float, list[gg.Guard]]:
    """A 2-D GAN on 8 Gaussian modes (non-saturating loss, Adam β1 = 0.5), one Guard per optimizer when
    guarded. The generator's loss starts at ln 2 and rises as the discriminator learns (by design).
    Returns the mean distance of 2000 samples to their nearest mode, and the guards."""
    torch.manual_seed(seed)
    gen = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    disc = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt_g = torch.optim.Adam(gen.parameters(), 1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), 1e-3, betas=(0.5, 0.999))
    guards = [gg.Guard(gen, opt_g), gg.Guard(disc, opt_d)] if guarded else []
    g = torch.Generator().manual_seed(seed)
    bce = nn.functional.binary_cross_entropy_with_logits
    ones, zeros = torch.ones(64, 1), torch.zeros(64, 1)
    for _ in range(steps):
        real = _MODES[torch.randint(8, (64,), generator=g)] + 0.05 * torch.randn(64, 2, generator=g)
        z = torch.randn(64, 2, generator=g)
        opt_d.zero_grad()
        loss_d = bce(disc(real), ones) + bce(disc(gen(z).detach()), zeros)
        loss_d.backward()
        guards[1].step(loss_d) if guards else opt_d.step()
        opt_g.zero_grad()
        loss_g = bce(disc(gen(z)), ones)
        loss_g.backward()
        guards[0].step(loss_g) if guards else opt_g.step()
    with torch.no_grad():
        samples = gen(torch.randn(2000, 2, generator=g))
    return float(torch.cdist(samples, _MODES).min(1).values.mean()), guards


def test_default_guards_leave_a_gan_alone() -> None:
    bare = [gan(seed, guarded=False)[0] for seed in SEEDS]
    noise = max(bare) - min(bare)
    distance, guards = gan(SEEDS[0], guarded=True)
    assert all(guard.intervened <= 0.01 * guard.steps for guard in guards), [g.summary() for g in guards]
    assert abs(distance - bare[0]) <= noise
    if not any(guard.intervened for guard in guards):
        assert distance == bare[0]


def test_rescue_is_engaged_by_the_first_rollback_and_survives_a_checkpoint() -> None:
    guard, feed = _loss_driven_guard()
    for _ in range(20):
        assert feed(1.0)
    assert not guard.rescue_engaged and guard.clipped == 0
    for _ in range(guard.rollback_after):
        assert not feed(math.nan)
    assert guard.rescue_engaged and [e.action for e in guard.events][-1] == "rescue"
    assert feed(1.0) and guard.clipped == 1, "AGC bounds a gradient of 0.5 on a zero weight (eps floor)"
    other, _ = _loss_driven_guard()
    other.load_state_dict(guard.state_dict())
    assert other.rescue_engaged and other.summary()["clipped"] == 1
