"""Healthy programs whose loss or gradient norm rises legitimately; a diagnosis must stay silent on them.

* :func:`plateau_mlp`: a 16-layer ReLU MLP (width 32) at PyTorch's default init (its signal shrinks with depth) with
  Adam on the digits features: a long plateau near ln 10, then the gradient norm climbs many-fold as it
  leaves it.
* :func:`new_head`: transfer learning: an MLP body pretrained on digits 0–4 (inside the run, unwatched),
  then a fresh head for digits 5–9 trained with the body, the first steps' gradients large.
* :func:`residual_mlp`: an unnormalised residual network (16 blocks ``x + W₂ relu(W₁ x)`` at PyTorch's
  default init): its residual stream legitimately grows block after block.
* :func:`gan`: a 2-D GAN on a ring of 8 Gaussians (MLP generator and discriminator, Adam β₁ 0.5), the two
  losses oscillating by design; two models, each watched and guarded on its own (``netD``/``netG``).

The warmup (``char_gpt``), one-cycle (``digits_cnn.run(schedule="onecycle")``) and tiny-batch
(``digits_cnn.run(batch_size=4)``) runs are the programs' own healthy variants.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .common import GuardFactory, MonitorFactory, Recorder, RunResult
from .digits_cnn import digits


def _digit_features() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits()
    return images.flatten(1) / 16.0, labels


def plateau_mlp(fault: str | None = None, steps: int = 200, seed: int = 0,
                monitor_factory: MonitorFactory | None = None, guard_factory: GuardFactory | None = None, *,
                stop_on_error: bool = False, after_backward=None, depth: int = 16, width: int = 32,
                lr: float = 1e-3) -> RunResult:
    """Full-batch-ish (256) Adam at 1e-3 on a deep default-init ReLU MLP; metric: training-set accuracy."""
    torch.manual_seed(seed)
    x, y = _digit_features()
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rec = Recorder("plateau_mlp", None, seed, steps, monitor_factory=monitor_factory, guard_factory=guard_factory,
                   stop_on_error=stop_on_error, after_backward=after_backward)
    rec.attach(model, optimizer)
    g = torch.Generator().manual_seed(seed)
    with rec.loop():
        for _ in range(steps):
            idx = torch.randint(len(y), (256,), generator=g)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            rec.backward(loss)
            rec.optimizer_step(loss)
            rec.next_step()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    return rec.result(acc, "train accuracy", True, chance_loss=math.log(10))


def new_head(fault: str | None = None, steps: int = 60, seed: int = 0,
             monitor_factory: MonitorFactory | None = None, guard_factory: GuardFactory | None = None, *,
             stop_on_error: bool = False, after_backward=None, pretrain_steps: int = 150) -> RunResult:
    """Pretrain body+head on digits 0–4, replace the head for 5–9, fine-tune all (body at a tenth of the LR)."""
    torch.manual_seed(seed)
    x, y = _digit_features()
    old, new = y < 5, y >= 5
    body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    head = nn.Linear(64, 5)
    pre = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    xo, yo = x[old], y[old]
    for _ in range(pretrain_steps):
        idx = torch.randint(len(yo), (64,), generator=g)
        pre.zero_grad()
        F.cross_entropy(head(body(xo[idx])), yo[idx]).backward()
        pre.step()
    xn, yn = x[new], y[new] - 5
    perm = torch.randperm(len(yn), generator=g)
    train, test = perm[: len(perm) * 3 // 4], perm[len(perm) * 3 // 4 :]
    model = nn.Sequential(body, nn.Linear(64, 5))  # the fresh head
    optimizer = torch.optim.Adam([{"params": body.parameters(), "lr": 3e-4},
                                  {"params": model[1].parameters(), "lr": 3e-3}])
    rec = Recorder("new_head", None, seed, steps, monitor_factory=monitor_factory, guard_factory=guard_factory,
                   stop_on_error=stop_on_error, after_backward=after_backward)
    rec.attach(model, optimizer)
    with rec.loop():
        for _ in range(steps):
            idx = train[torch.randint(len(train), (32,), generator=g)]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xn[idx]), yn[idx])
            loss.backward()
            rec.backward(loss)
            rec.optimizer_step(loss)
            rec.next_step()
    with torch.no_grad():
        acc = float((model(xn[test]).argmax(1) == yn[test]).float().mean())
    return rec.result(acc, "test accuracy", True, chance_loss=math.log(5))


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


def residual_mlp(fault: str | None = None, steps: int = 60, seed: int = 0,
                 monitor_factory: MonitorFactory | None = None, guard_factory: GuardFactory | None = None, *,
                 stop_on_error: bool = False, after_backward=None, blocks: int = 16, width: int = 64) -> RunResult:
    """Adam at 1e-3, batches of 64 digits; metric: accuracy on held-out digits."""
    torch.manual_seed(seed)
    x, y = _digit_features()
    split = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = split[:1400], split[1400:]
    model = nn.Sequential(nn.Linear(64, width), *[_Block(width) for _ in range(blocks)], nn.ReLU(),
                          nn.Linear(width, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rec = Recorder("residual_mlp", None, seed, steps, monitor_factory=monitor_factory, guard_factory=guard_factory,
                   stop_on_error=stop_on_error, after_backward=after_backward)
    rec.attach(model, optimizer)
    g = torch.Generator().manual_seed(seed)
    with rec.loop():
        for _ in range(steps):
            idx = train[torch.randint(len(train), (64,), generator=g)]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            rec.backward(loss)
            rec.optimizer_step(loss)
            rec.next_step()
    with torch.no_grad():
        acc = float((model(x[test]).argmax(1) == y[test]).float().mean())
    return rec.result(acc, "test accuracy", True, chance_loss=math.log(10))


def ring(n: int, g: torch.Generator) -> torch.Tensor:
    """Samples of 8 Gaussians (std 0.05) on the unit circle."""
    k = torch.randint(8, (n,), generator=g)
    angle = k.float() * (2 * math.pi / 8)
    return torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(n, 2, generator=g)


def gan(fault: str | None = None, steps: int = 300, seed: int = 0,
        monitor_factory: MonitorFactory | None = None, guard_factory: GuardFactory | None = None, *,
        stop_on_error: bool = False, after_backward=None, batch_size: int = 64) -> RunResult:
    """Non-saturating GAN updates (D then G each iteration); metric: mean distance of 512 generated points
    to the nearest mode (lower is better; the recorded loss is D's)."""
    torch.manual_seed(seed)
    netG = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    netD = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    optD = torch.optim.Adam(netD.parameters(), lr=1e-3, betas=(0.5, 0.999))
    optG = torch.optim.Adam(netG.parameters(), lr=1e-3, betas=(0.5, 0.999))
    criterion = nn.BCEWithLogitsLoss()
    rec = Recorder("gan", None, seed, steps, monitor_factory=monitor_factory, guard_factory=guard_factory,
                   stop_on_error=stop_on_error, after_backward=after_backward)
    rec.attach(netD, optD, "netD")
    rec.attach(netG, optG, "netG")
    g = torch.Generator().manual_seed(seed)
    ones, zeros = torch.ones(batch_size, 1), torch.zeros(batch_size, 1)
    with rec.loop():
        for _ in range(steps):
            real = ring(batch_size, g)
            fake = netG(torch.randn(batch_size, 2, generator=g))
            optD.zero_grad()
            errD = criterion(netD(real), ones) + criterion(netD(fake.detach()), zeros)
            errD.backward()
            rec.backward(errD, "netD")
            rec.optimizer_step(errD, "netD")
            optG.zero_grad()
            errG = criterion(netD(fake), ones)
            errG.backward()
            netD.zero_grad(set_to_none=True)  # D's gradients from G's loss are not D's update
            rec.backward(errG, "netG")
            rec.optimizer_step(errG, "netG")
            rec.next_step()
    with torch.no_grad():
        pts = netG(torch.randn(512, 2, generator=g))
        modes = torch.stack([torch.tensor([math.cos(a), math.sin(a)]) for a in torch.arange(8) * (2 * math.pi / 8)])
        dist = float(torch.cdist(pts, modes).min(1).values.mean())
    return rec.result(dist if math.isfinite(dist) else math.inf, "distance to modes", False)
