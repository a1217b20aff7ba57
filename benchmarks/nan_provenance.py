"""NaN provenance: time to name the module that produced a NaN, and the steady-state cost before it (issue 7, part 3).

Workload: model (a), the 20-layer MLP, with a module named ``fault`` after the tenth ReLU. While armed it
multiplies its input by +inf, so it is the *producer*: zeros become NaN and everything after it is
non-finite. Two tools:

- gradguard: ``gg.watch(model)`` with its defaults (``replay=True``); the finding of kind ``nonfinite``
  names the module and reaches the sinks (here a sink that records it; nothing polls the monitor) on CPU
  on the very step, on accelerators at the next fetch, ≤ 10 steps later;
- PyTorch ``torch.autograd.detect_anomaly()`` left on for the whole run: it raises in the backward pass at
  the first autograd function whose output holds a NaN and names that *function*.

Steady state: bare loop, gradguard with ``replay=False``, gradguard default and ``detect_anomaly`` (plus a
second bare copy as an A/A control that shows the resolution of the measurement) are interleaved step by
step on healthy steps. "No measurable cost" means: the paired ratio replay-on / replay-off is not above
the A/A control's upper quartile (nor above 1.01 when that is tighter).
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from models import LR

import gradguard as gg
from gradguard.sinks import Sink


class Fault(nn.Module):
    """Identity until armed; then multiplies by +inf (0·inf = NaN), the producer of the non-finite values."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: Tensor) -> Tensor:
        return x * math.inf if self.armed else x


def faulty_mlp(smoke: bool, device: str) -> tuple[nn.Sequential, Tensor, Tensor]:
    width, depth, batch = (32, 4, 8) if smoke else (256, 20, 128)
    torch.manual_seed(0)
    layers: list[tuple[str, nn.Module]] = []
    for i in range(depth):
        layers += [(f"linear{i}", nn.Linear(width, width)), (f"relu{i}", nn.ReLU())]
        if i == depth // 2 - 1:
            layers.append(("fault", Fault()))
    model = nn.Sequential(OrderedDict(layers)).to(device)
    return model, torch.randn(batch, width, device=device), torch.randn(batch, width, device=device)


def _arm(model: nn.Module, on: bool) -> None:
    fault = model.get_submodule("fault")
    assert isinstance(fault, Fault)
    fault.armed = on


class Named(Sink):
    """Receives findings the way a user's sink does (at the monitor's fetch), keeps the first ``nonfinite``."""

    def __init__(self) -> None:
        self.finding: gg.Finding | None = None

    def on_finding(self, finding: gg.Finding) -> None:
        if finding.kind == "nonfinite" and self.finding is None:
            self.finding = finding


def trainer(
    model: nn.Module, x: Tensor, y: Tensor, tool: str, sink: Named | None = None
) -> tuple[Callable[[], None], gg.Monitor | None]:
    """One training step of ``tool`` ("bare", "gg_noreplay", "gradguard", "detect_anomaly")."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    mon = None
    if tool in ("gradguard", "gg_noreplay"):
        mon = gg.watch(model, console=False, replay=tool == "gradguard", sinks=[sink] if sink else [])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if tool == "detect_anomaly":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.autograd.detect_anomaly():
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
        else:
            loss = F.mse_loss(model(x), y)
            loss.backward()
            if mon is not None:
                mon.step(loss)
        opt.step()

    return step, mon


def time_to_name(tool: str, smoke: bool, device: str, healthy: int, max_steps: int = 20) -> dict[str, object]:
    """Run ``healthy`` good steps, arm the fault, and time the steps until ``tool`` names a producer."""
    model, x, y = faulty_mlp(smoke, device)
    sink = Named()
    step, mon = trainer(model, x, y, tool, sink)
    now = harness.clock(device)
    good: list[float] = []
    for _ in range(healthy):
        t0 = now()
        step()
        harness.sync(device)
        good.append(now() - t0)
    _arm(model, True)
    named, steps, t0 = None, 0, now()
    while named is None and steps < max_steps:
        steps += 1
        try:
            step()
        except RuntimeError as e:  # detect_anomaly
            m = re.search(r"Function '(\w+)' returned nan", str(e))
            named = f"autograd function `{m.group(1)}`" if m else f"error: {str(e)[:80]}"
            break
        if sink.finding is not None:  # delivered by the monitor's own schedule; nothing is polled
            named = f"module `{sink.finding.module}`" if sink.finding.module else "the loss"
    harness.sync(device)
    elapsed = now() - t0
    if mon is not None:
        mon.close()
    return {"named": named or f"nothing after {max_steps} steps", "steps": steps, "seconds": elapsed,
            "healthy_step": harness.quartiles(good)[1] if good else math.nan}


def run(opts: harness.Options) -> harness.Section:
    """The ``## NaN provenance`` section."""
    rounds, warmup, healthy, reps = (3, 1, 3, 1) if opts.smoke else (60, 2, 20, 3)
    model, x, y = faulty_mlp(opts.smoke, opts.device)
    tools = {
        "bare": "bare loop",
        "bare_aa": "bare loop, second copy (A/A control)",
        "gg_noreplay": "gradguard `gg.watch(model, replay=False)`",
        "gradguard": "gradguard default (`replay=True`)",
        "detect_anomaly": "`detect_anomaly()` on for the whole run",
    }
    steps = {k: trainer(copy.deepcopy(model), x, y, "bare" if k == "bare_aa" else k)[0] for k in tools}
    times = harness.interleave_steps(steps, rounds=rounds, warmup=warmup, device=opts.device)
    ratios = {k: harness.period_ratios(times, k, "bare") for k in tools}
    on_off = harness.period_ratios(times, "gradguard", "gg_noreplay")
    aa_hi = harness.quartiles(ratios["bare_aa"])[2]
    limit = max(1.01, aa_hi)
    cost = harness.quartiles(on_off)[1]
    met = cost <= limit
    rows = [[label, f"{1e3 * harness.quartiles(times[k])[1]:.1f}", harness.ratio_text(ratios[k])]
            for k, label in tools.items()]
    named = {t: [time_to_name(t, opts.smoke, opts.device, healthy) for _ in range(reps)]
             for t in ("gradguard", "detect_anomaly")}
    name_rows = []
    for t, runs in named.items():
        secs = harness.quartiles([float(r["seconds"]) for r in runs])[1]  # type: ignore[arg-type]
        step_s = harness.quartiles([float(r["healthy_step"]) for r in runs])[1]  # type: ignore[arg-type]
        name_rows.append([tools[t], str(runs[0]["named"]), f"{runs[0]['steps']}", f"{1e3 * secs:.1f}",
                          f"{1e3 * step_s:.1f}", f"{secs / step_s:.1f}"])
    judged = "not judged in a smoke run" if opts.smoke else f"≤ {limit:.3f}× {harness.mark(met)}"
    body = [
        str(__doc__).split("\n\n", 1)[1].strip(),
        "",
        f"### Steady state ({rounds} interleaved rounds after {warmup} warm-up, healthy steps)",
        "",
        harness.table(["configuration", "ms / step", "ratio to bare"], rows, "lrr"),
        "",
        f"Cost of provenance (replay on / replay off, paired periods): **{harness.ratio_text(on_off)}**; "
        f"target: no measurable cost, i.e. {judged} (A/A control upper quartile {aa_hi:.3f}).",
        "",
        f"### Time to name the producer (fault armed after {healthy} healthy steps; median of {reps})",
        "",
        harness.table(["tool", "what it names", "steps until named", "ms from arming to the name",
                       "ms per healthy step", "in healthy steps"], name_rows, "llrrrr"),
        "",
        "The producer is the module `fault`: gradguard names it; `detect_anomaly` names the first backward "
        "function whose output holds a NaN, which is downstream of the producer (the loss's backward), and "
        "its forward traceback points at the line that computed the loss.",
    ]
    targets = [] if opts.smoke else [harness.Target("NaN provenance steady-state cost (replay on / off)", cost,
                                                    limit, met)]
    return harness.Section("## NaN provenance", "\n".join(body), targets)


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
