"""Clipping on real gradients: gradguard's policies against torch, ``zclip`` and ``autoclip``.

The gradients are those of workload (a), the 20-layer MLP, and (c), the transformer encoder, on 8
different batches. Every variant clips its own copy of the model's gradients; before each call the next
batch's gradients are copied in (not timed), so norms vary from call to call as in training and the
policies' histories hold real spread — clipping the same gradients again and again would feed them
identical norms, which flatters history-based policies (selecting from tied values is cheap). The
variants take turns call by call, the order reversed every round, after 1000 untimed calls that fill
QuantileClip's 1000-norm history; each ratio is the median over periods of 20 calls of the paired ratio
to torch's ``clip_grad_norm_`` (interquartile range in brackets).

Targets: ``ClipNorm`` ≤ 1.05×; ``ZClip``, ``AutoClip`` (paper rule) and per-tensor ``ClipNorm`` ≤ 1.2×;
``AutoClip.quantile_clip()`` (one 1000-norm history per tensor) and ``AGC`` (which also reads every weight)
≤ 2.0× ``clip_grad_norm_``, the price of their plain formulation (docs/remedies.md). A second ratio
compares each gradguard policy with the same rule elsewhere (``clip_grad_value_``, the ``autoclip``
package's ``QuantileClip``, the ``zclip`` package's ``ZClip``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import models
from clip import loader

from gradguard import clip

CALLS = 20
#: Different batches whose gradients the calls cycle through (so norms vary as in training).
BANK = 8
#: Untimed calls first: fills QuantileClip's 1000-norm history, so its steady state is what is timed.
WARMUP = 1000


@dataclass(frozen=True)
class Variant:
    label: str
    make: Callable[[nn.Module], Callable[[], object]]  # model → one clipping call
    target: float | None = None
    package: str | None = None
    peer: str | None = None  # the variant doing the same thing elsewhere (torch or a package)


def _zclip_package(model: nn.Module) -> Callable[[], object]:
    from zclip import ZClip

    z = ZClip()  # the package's defaults: alpha 0.97, z_thresh 2.5, max_grad_norm 1.0, mode "zscore"
    return lambda: z.step(model)


def _autoclip_package(model: nn.Module) -> Callable[[], object]:
    from autoclip.torch import QuantileClip

    q = QuantileClip(model.parameters())  # the package's defaults: quantile 0.9, history 1000, per tensor
    return q.step


def _policy(p: clip.ClipPolicy) -> Callable[[nn.Module], Callable[[], object]]:
    return lambda model: (lambda: p(model.parameters()))


TORCH_NORM, TORCH_VALUE = "torch `clip_grad_norm_(1.0)`", "torch `clip_grad_value_(0.5)`"
AUTOCLIP_PKG, ZCLIP_PKG = "autoclip `QuantileClip()`", "zclip `ZClip()`"
VARIANTS: tuple[Variant, ...] = (
    Variant(TORCH_NORM, lambda m: lambda: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)),
    Variant("gradguard `ClipNorm(1.0)`", lambda m: _policy(clip.ClipNorm(1.0))(m), 1.05, peer=TORCH_NORM),
    Variant("gradguard `ClipNorm(1.0, per=\"tensor\")`", lambda m: _policy(clip.ClipNorm(1.0, per="tensor"))(m), 1.2),
    Variant(TORCH_VALUE, lambda m: lambda: torch.nn.utils.clip_grad_value_(m.parameters(), 0.5)),
    Variant("gradguard `ClipValue(0.5)`", lambda m: _policy(clip.ClipValue(0.5))(m), peer=TORCH_VALUE),
    Variant("gradguard `AutoClip(0.1)` (paper rule)", lambda m: _policy(clip.AutoClip(0.1))(m), 1.2),
    Variant(AUTOCLIP_PKG, _autoclip_package, package="autoclip"),
    Variant("gradguard `AutoClip.quantile_clip()`", lambda m: _policy(clip.AutoClip.quantile_clip())(m), 2.0,
            peer=AUTOCLIP_PKG),
    Variant("gradguard `AGC(0.01)`", lambda m: _policy(clip.AGC(0.01))(m), 2.0),
    Variant(ZCLIP_PKG, _zclip_package, package="zclip"),
    Variant("gradguard `ZClip()`", lambda m: _policy(clip.ZClip())(m), 1.2, peer=ZCLIP_PKG),
)
BASE = VARIANTS[0].label


def _gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _bank(key: str, model: nn.Module, smoke: bool, device: str) -> list[list[torch.Tensor]]:
    """The model's gradients on ``BANK`` different batches (those of the workload built with seeds 1, 2, …)."""
    batches = [models.build(key, smoke=smoke, device=device, seed=s) for s in range(1, BANK + 1)]
    return [_gradients(model, b.x, b.y) for b in batches]


def run(opts: harness.Options) -> harness.Section:
    """The ``## Clipping`` section: one table per workload."""
    # Full run: 600 timed calls per variant, in periods of CALLS, after WARMUP untimed calls.
    periods, period, warmup = (2, 2, 2) if opts.smoke else (30, CALLS, WARMUP)
    body = [str(__doc__).split("\n\n", 1)[1].strip(), "",
            "AGC has no installed peer package (timm's `adaptive_clip_grad` is the usual reference; timm is not a "
            "dependency), so it is compared with `clip_grad_norm_` only. `benchmarks/clip.py` is the standalone "
            "version on synthetic gradients of the same shapes (`python benchmarks/clip.py`).", ""]
    targets: list[harness.Target] = []
    for key in ("mlp", "transformer"):
        w = models.build(key, smoke=opts.smoke, device=opts.device)
        model = w.model
        bank = _bank(key, model, opts.smoke, opts.device)
        n = sum(p.numel() for p in model.parameters())
        steps: dict[str, Callable[[], None]] = {}
        prepare: dict[str, Callable[[], None]] = {}
        missing: dict[str, str] = {}
        for v in VARIANTS:
            if v.package and importlib.util.find_spec(v.package) is None:
                missing[v.label] = f"not installed: `{v.package}`"
                continue
            twin = copy.deepcopy(model)
            params = list(twin.parameters())
            for p, g in zip(params, bank[0], strict=True):
                p.grad = g.clone()
            prepare[v.label] = loader(params, bank)
            call = v.make(twin)
            steps[v.label] = lambda call=call: call()  # type: ignore[misc]
        times = harness.interleave_steps(
            steps, rounds=periods * period, warmup=warmup, device=opts.device, prepare=prepare
        )
        rows = []
        profiles: list[str] = []
        for v in VARIANTS:
            if v.label in missing:
                rows.append([v.label, "—", missing[v.label], "—", "—"])
                continue
            ratios = harness.period_ratios(times, v.label, BASE, period=period)
            us = 1e6 * harness.quartiles(times[v.label])[1]
            verdict = "—"
            if v.target is not None:
                mid = harness.quartiles(ratios)[1]
                if opts.smoke:
                    verdict = f"≤ {v.target:.2f}× (not judged in a smoke run)"
                else:
                    met = mid <= v.target
                    targets.append(harness.Target(f"{v.label} on {w.label}", mid, v.target, met))
                    verdict = f"≤ {v.target:.2f}× {harness.mark(met)}"
                    if not met and opts.profile:
                        top = harness.torch_profile_top(steps[v.label], 3, n=6)
                        profiles.append(harness.profile_text(
                            top, f"{v.label} on {w.label}", "torch.profiler, operators by share of self CPU time"))
            same = "—"
            if v.peer is not None and v.peer in times:
                same = f"{harness.ratio_text(harness.period_ratios(times, v.label, v.peer, period=period))} vs {v.peer}"
            rows.append([v.label, f"{us:.0f}", harness.ratio_text(ratios), same, verdict])
        body += [f"### Gradients of {w.label} ({n / 1e6:.2f}M values)", "",
                 f"{periods * period} timed calls per variant, taking turns call by call, summed in periods of "
                 f"{period} calls, after {warmup} untimed calls; gradients of {BANK} batches in turn.", "",
                 harness.table(["variant", "µs / call", "ratio to clip_grad_norm_", "ratio to the same rule elsewhere",
                               "target"], rows, "lrrll"), ""]
        for text in profiles:
            body += [text, ""]
    return harness.Section("## Clipping", "\n".join(body).rstrip(), targets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=str(__doc__).splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(run(harness.Options(device=args.device, smoke=args.smoke, rss=False)).body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
