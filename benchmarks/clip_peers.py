"""Clipping on real gradients: gradguard's policies against torch, ``zclip`` and ``autoclip`` (issue 7, part 2).

The gradients are those of one training batch of workload (a), the 20-layer MLP, and (c), the transformer
encoder. Every variant clips its own copy of them, 20 calls per block; the variants take turns
block by block, the order reversed every round, and each ratio is the median over rounds of the paired
ratio to torch's ``clip_grad_norm_`` (interquartile range in brackets). After the first call the gradients
are already clipped; every variant still measures and scales them on every call, as it would in training
(denormals are flushed to zero, as adaptive thresholds follow the shrinking norms down).

Targets: ``ClipNorm`` ≤ 1.05× and the adaptive policies (AutoClip, AGC, ZClip) and per-tensor ``ClipNorm``
≤ 1.2× ``clip_grad_norm_``. A second ratio compares each gradguard policy with the same rule elsewhere
(``clip_grad_value_``, the ``autoclip`` package's ``QuantileClip``, the ``zclip`` package's ``ZClip``).
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

from gradguard import clip

CALLS = 20


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
    Variant("gradguard `AutoClip(10)` (paper rule)", lambda m: _policy(clip.AutoClip(10))(m), 1.2),
    Variant(AUTOCLIP_PKG, _autoclip_package, package="autoclip"),
    Variant("gradguard `AutoClip.quantile_clip()`", lambda m: _policy(clip.AutoClip.quantile_clip())(m), 1.2,
            peer=AUTOCLIP_PKG),
    Variant("gradguard `AGC(0.01)`", lambda m: _policy(clip.AGC(0.01))(m), 1.2),
    Variant(ZCLIP_PKG, _zclip_package, package="zclip"),
    Variant("gradguard `ZClip()`", lambda m: _policy(clip.ZClip())(m), 1.2, peer=ZCLIP_PKG),
)
BASE = VARIANTS[0].label


def _with_grads(w: models.Workload) -> nn.Module:
    model = w.model
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(w.x), w.y).backward()
    return model


def _copy(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.detach().clone()
    return twin


def run(opts: harness.Options) -> harness.Section:
    """The ``## Clipping`` section: one table per workload."""
    rounds, calls = (2, 2) if opts.smoke else (30, CALLS)
    body = [str(__doc__).split("\n\n", 1)[1].strip(), "",
            "AGC has no installed peer package (timm's `adaptive_clip_grad` is the usual reference; timm is not a "
            "dependency), so it is compared with `clip_grad_norm_` only. `benchmarks/clip.py` is the standalone "
            "version on synthetic gradients of the same shapes (`python benchmarks/clip.py`).", ""]
    targets: list[harness.Target] = []
    for key in ("mlp", "transformer"):
        w = models.build(key, smoke=opts.smoke, device=opts.device)
        model = _with_grads(w)
        n = sum(p.numel() for p in model.parameters())
        blocks: dict[str, Callable[[], None]] = {}
        missing: dict[str, str] = {}
        for v in VARIANTS:
            if v.package and importlib.util.find_spec(v.package) is None:
                missing[v.label] = f"not installed: `{v.package}`"
                continue
            call = v.make(_copy(model))

            def block(call: Callable[[], object] = call) -> None:
                for _ in range(calls):
                    call()

            blocks[v.label] = block
        # Clipped in place call after call, adaptive thresholds follow the shrinking norms down; flushing
        # denormals keeps the arithmetic at normal speed (torch's default is off, restored below).
        torch.set_flush_denormal(True)
        try:
            times = harness.interleave_steps(blocks, rounds=rounds, warmup=1, device=opts.device)
        finally:
            torch.set_flush_denormal(False)
        rows = []
        profiles: list[str] = []
        for v in VARIANTS:
            if v.label in missing:
                rows.append([v.label, "—", missing[v.label], "—", "—"])
                continue
            ratios = harness.period_ratios(times, v.label, BASE, period=1)
            us = 1e6 * harness.quartiles(times[v.label])[1] / calls
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
                        top = harness.torch_profile_top(blocks[v.label], 3, n=6)
                        profiles.append(harness.profile_text(
                            top, f"{v.label} on {w.label}", "torch.profiler, operators by share of self CPU time"))
            same = "—"
            if v.peer is not None and v.peer in times:
                same = f"{harness.ratio_text(harness.period_ratios(times, v.label, v.peer, period=1))} vs {v.peer}"
            rows.append([v.label, f"{us:.0f}", harness.ratio_text(ratios), same, verdict])
        body += [f"### Gradients of {w.label} ({n / 1e6:.2f}M values)", "",
                 f"{calls} calls per block, {rounds} interleaved blocks per variant after 1 warm-up block.", "",
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
