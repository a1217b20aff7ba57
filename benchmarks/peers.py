"""Monitoring overhead: gradguard and the tools users would otherwise pick, side by side (issue 7, part 1).

Each configuration trains its own copy of the same workload (same weights, same batch, Adam) and all of
them take turns step by step in one process (:func:`harness.interleave_steps`). The peers are set up the
way their documentation recommends; the code of every configuration is the function below that builds it,
and ``run_all.py`` prints that source into BENCHMARKS.md.

Child mode (used by the harness for peak RSS and profiles)::

    python benchmarks/peers.py --child mlp gradguard --steps 12 [--smoke] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import inspect
import io
import json
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import models
from models import LR, Workload

import gradguard as gg

Step = Callable[[], None]


# --------------------------------------------------------------------------- configurations (shown verbatim)
def bare(w: Workload) -> Step:
    opt = torch.optim.Adam(w.model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(w.model(w.x), w.y)
        loss.backward()
        opt.step()

    return step


def gradguard_default(w: Workload) -> Step:
    opt = torch.optim.Adam(w.model.parameters(), lr=LR)
    mon = gg.watch(w.model, console=False)  # console=False: no finding is printed into the timing

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(w.model(w.x), w.y)
        loss.backward()
        mon.step(loss)
        opt.step()

    return step


def gradguard_activations_every_step(w: Workload) -> Step:
    opt = torch.optim.Adam(w.model.parameters(), lr=LR)
    mon = gg.watch(w.model, console=False, sample_every=1)  # activation hooks and detail stats every step

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(w.model(w.x), w.y)
        loss.backward()
        mon.step(loss)
        opt.step()

    return step


def detect_anomaly(w: Workload) -> Step:
    # torch.autograd.detect_anomaly() as the PyTorch docs show it: forward and backward inside the context
    # (check_nan=True). The context manager, not set_detect_anomaly(True), so the other configurations
    # interleaved in this process are not affected.
    opt = torch.optim.Adam(w.model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autograd.detect_anomaly():
            loss = F.mse_loss(w.model(w.x), w.y)
            loss.backward()
        opt.step()

    return step


def lightning_grad_norm_clip(w: Workload) -> Step:
    # What a LightningModule does with the docs' recipe: grad_norm() in on_before_optimizer_step, logged with
    # self.log_dict (values reach the logger every log_every_n_steps=50), and Trainer(gradient_clip_val=0.5)
    # (gradient_clip_algorithm="norm" → torch.nn.utils.clip_grad_norm_).
    from lightning.pytorch.utilities import grad_norm

    opt = torch.optim.Adam(w.model.parameters(), lr=LR)
    logged: list[dict[str, float]] = []
    count = [0]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(w.model(w.x), w.y)
        loss.backward()
        norms = grad_norm(w.model, norm_type=2)
        if count[0] % 50 == 0:
            logged.append({k: float(v) for k, v in norms.items()})
        count[0] += 1
        torch.nn.utils.clip_grad_norm_(w.model.parameters(), 0.5)
        opt.step()

    return step


def torch_surgeon(w: Workload) -> Step:
    # The package README: Surgeon(model, rules="default").attach(), training loop unchanged. Its default
    # rules print a summary every 10 steps (verbose=True); the printing goes to a null stream here.
    from torch_surgeon import Surgeon

    opt = torch.optim.Adam(w.model.parameters(), lr=LR)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        Surgeon(w.model, rules="default").attach()

    def step() -> None:
        with contextlib.redirect_stdout(sink):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(w.model(w.x), w.y)
            loss.backward()
            opt.step()
        sink.seek(0)
        sink.truncate()

    return step


def cockpit_economy(w: Workload) -> Step:
    # Cockpit's documented loop with configuration("economy") (every step, its default schedule): BackPACK
    # extend() on model and loss, per-sample losses, backward inside the cockpit context.
    with _pkg_resources_shim():
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.utils.configuration import configuration

    model = extend(w.model)
    loss_fn = extend(torch.nn.MSELoss(reduction="mean"))
    individual_loss_fn = torch.nn.MSELoss(reduction="none")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    cockpit = Cockpit(model.parameters(), quantities=configuration("economy"))
    global_step = [0]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        outputs = model(w.x)
        loss = loss_fn(outputs, w.y)
        losses = individual_loss_fn(outputs, w.y).flatten(1).mean(1)
        info = {"batch_size": w.x.shape[0], "individual_losses": losses, "loss": loss, "optimizer": opt}
        with cockpit(global_step[0], info=info):
            loss.backward(create_graph=cockpit.create_graph(global_step[0]))
        opt.step()
        global_step[0] += 1

    return step


@contextlib.contextmanager
def _pkg_resources_shim() -> Iterator[None]:
    """cockpit 1.0.2's ``__init__`` imports ``pkg_resources`` (gone from setuptools ≥ 81) only to read its
    own version: while it is imported, provide those two names from ``importlib.metadata`` when the module
    is missing, then take the stand-in out of ``sys.modules`` so that nothing else in the process sees it
    (pytest, for one, calls into a ``pkg_resources`` it finds there)."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        yield
        return
    shim = types.ModuleType("pkg_resources")

    class DistributionNotFound(Exception):
        pass

    def get_distribution(name: str) -> types.SimpleNamespace:
        try:
            return types.SimpleNamespace(version=importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError as e:
            raise DistributionNotFound(name) from e

    shim.DistributionNotFound = DistributionNotFound  # type: ignore[attr-defined]
    shim.get_distribution = get_distribution  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = shim
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Config:
    """One row of the overhead table."""

    key: str
    label: str
    build: Callable[[Workload], Step]
    packages: tuple[str, ...] = ()  # importable modules it needs
    target: dict[str, float] | None = None  # workload key → limit on the ratio to bare
    max_steps: int | None = None  # timed steps when it is far slower than the bare loop
    reports: str = ""  # what the user gets for the cost


MONITOR_TARGETS = {"mlp": 1.05, "lstm": 1.02}
CONFIGS: tuple[Config, ...] = (
    Config("bare", "bare loop", bare, reports="nothing"),
    Config("gradguard", "gradguard default `gg.watch(model)`", gradguard_default, target=MONITOR_TARGETS,
           reports="every step: per-parameter gradient norms, global norm, NaN/Inf flag; every 10th step: max|g|, "
           "‖w‖, update ratio, per-module activation summaries (mean, std, zeros, saturation, per-unit activity, "
           "per-time-step profiles of recurrent modules); findings: exploding, vanishing, non-finite with the "
           "producing module, dead units, saturation, loss spikes"),
    Config("gradguard_act", "gradguard, activation statistics every step", gradguard_activations_every_step,
           reports="the same, with the 10th-step statistics on every step"),
    Config("detect_anomaly", "PyTorch `detect_anomaly`", detect_anomaly,
           reports="an error at the first backward function that returns NaN, with the forward traceback"),
    Config("lightning", "Lightning `grad_norm` + `clip_grad_norm_`", lightning_grad_norm_clip, ("lightning",),
           reports="per-parameter and total gradient norms (logged every 50 steps), norm clipping"),
    Config("surgeon", "torch-surgeon 0.1.0 `Surgeon`", torch_surgeon, ("torch_surgeon",),
           reports="per leaf module: mean, std, norm of the output gradient, ratio to its EMA (vanishing, "
           "exploding, stagnant), fraction of near-zero outputs"),
    Config("cockpit", "Cockpit 1.0.2 economy", cockpit_economy, ("cockpit", "backpack"), max_steps=2,
           reports="loss, gradient norm, 1-d gradient histogram, distance from init, update size, step-size "
           "α of the local parabola, norm / inner-product / orthogonality tests (from per-sample gradients)"),
)
BY_KEY = {c.key: c for c in CONFIGS}


def why_unavailable(cfg: Config) -> str | None:
    """A sentence saying why ``cfg`` cannot run here, or None."""
    missing = [p for p in cfg.packages if importlib.util.find_spec(p) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (`make bench` installs the `bench` extra)"
    return None


def source(cfg: Config) -> str:
    """The code that builds ``cfg``'s training step, exactly as run."""
    return inspect.getsource(cfg.build).rstrip()


def prepare(cfg: Config, base: Workload) -> tuple[Step | None, str | None]:
    """Build ``cfg`` on its own copy of ``base`` and run one step; (step, None) or (None, why it failed)."""
    why = why_unavailable(cfg)
    if why:
        return None, why
    w = Workload(base.key, base.label, copy.deepcopy(base.model), base.x, base.y)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = cfg.build(w)
            step()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"fails at its first step with `{type(e).__name__}: {first[:160]}`"
    return _quiet(step), None


def _quiet(step: Step) -> Step:
    # detect_anomaly warns on every entry and BackPACK on unsupported modules: keep warnings out of the timing.
    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step()

    return run


# --------------------------------------------------------------------------- the benchmark
KNOWN_FAILURES = {
    ("cockpit", "lstm"): "BackPACK 1.7.1's `nn.LSTM` derivatives support one layer only (a 2-layer LSTM raises "
    "`NotImplementedError: only num_layers = 1 is supported` under BatchGrad)",
    ("cockpit", "transformer"): "BackPACK 1.7.1 has no per-sample-gradient extension for `MultiheadAttention` "
    "(in_proj, out_proj) or `LayerNorm`: those parameters get no `grad_batch`, which Cockpit's quantities need",
}


def run(opts: harness.Options) -> harness.Section:
    """The ``## Monitor overhead`` section: one table per workload, every configuration interleaved."""
    plan = {  # workload → (timed rounds, warm-up rounds)
        "mlp": (100, 2),
        "lstm": (40, 2),
        "transformer": (20, 1),
    }
    if opts.smoke:
        plan = dict.fromkeys(plan, (3, 1))
    body: list[str] = [
        "Every configuration trains its own copy of the same model on the same batch with Adam (lr 1e-4) and "
        "MSE; they take turns step by step in one process, the order reversed every round. Ratio = median over "
        "periods of 10 steps of the paired ratio (configuration / bare loop, same rounds), with the "
        "interquartile range in brackets. Peak RSS: each configuration alone in a fresh child process "
        f"({CHILD_STEPS} steps), its `VmHWM` (see Method), and in brackets what the configuration's set-up "
        "and steps added to the peak reached with the model built (so a tool's own imports count against it).",
        "`benchmarks/overhead.py` is the standalone two-way version (bare against gradguard only).",
        "",
    ]
    targets: list[harness.Target] = []
    for key, (rounds, warmup) in plan.items():
        base = models.build(key, smoke=opts.smoke, device=opts.device)
        steps: dict[str, Step] = {}
        failed: dict[str, str] = {}
        for cfg in CONFIGS:
            step, why = prepare(cfg, base)
            if step is None:
                known = KNOWN_FAILURES.get((cfg.key, key))
                failed[cfg.key] = f"{known}: {why}" if known else str(why)
            else:
                steps[cfg.key] = step
        limits = {c.key: c.max_steps for c in CONFIGS if c.max_steps is not None and not opts.smoke}
        times = harness.interleave_steps(steps, rounds=rounds, warmup=warmup, device=opts.device, limits=limits)
        syncs = {k: harness.count_syncs(s, 3, opts.device) for k, s in steps.items()}
        # A smoke run checks the child path once (gradguard on the first workload) instead of 21 processes.
        rss_keys = [k for k in steps if not opts.smoke or (k == "gradguard" and key == "mlp")]
        rss: dict[str, dict[str, object]] = {}
        if opts.rss:  # memory, not time: two children at a time (nothing is being timed meanwhile)
            with ThreadPoolExecutor(max_workers=2) as pool:
                n = len(rss_keys)
                rss = dict(zip(rss_keys, pool.map(_child_rss, [key] * n, rss_keys, [opts] * n), strict=True))
        rows = []
        for cfg in CONFIGS:
            if cfg.key in failed:
                rows.append([cfg.label, "—", "could not run: " + failed[cfg.key], "—", "—", "—"])
                continue
            t = times[cfg.key]
            ms = 1e3 * harness.quartiles(t)[1]
            ratios = harness.period_ratios(times, cfg.key, "bare")
            limit = (cfg.target or {}).get(key)
            verdict = "—"
            if limit is not None and opts.smoke:
                verdict = f"≤ {limit:.2f}× (not judged in a smoke run)"
            elif limit is not None:
                met = harness.quartiles(ratios)[1] <= limit
                targets.append(harness.Target(f"{cfg.label} on {base.label}", harness.quartiles(ratios)[1],
                                              limit, met))
                verdict = f"≤ {limit:.2f}× {harness.mark(met)}"
                if not met and opts.profile:
                    verdict += " (profile below)"
            note = f" ({len(t)} timed steps)" if len(t) < rounds else ""
            rows.append([cfg.label, f"{ms:.1f}", harness.ratio_text(ratios) + note, _rss_text(rss.get(cfg.key)),
                         _sync_text(syncs.get(cfg.key)), verdict])
        body += [f"### {base.label}", "", f"{rounds} timed rounds after {warmup} warm-up round(s).", ""]
        body.append(harness.table(["configuration", "ms / step", "ratio to bare", "peak RSS MiB", "syncs / step",
                                   "target"], rows, "lrrrrl"))
        body.append("")
        for tg in targets:
            if not tg.met and base.label in tg.what and opts.profile:
                top = harness.pyspy_top(_child_args(key, "gradguard", opts, steps=4 * harness.PERIOD),
                                       "<locals>.step (peers.py")
                body += [harness.profile_text(top, f"gradguard default on {base.label}"), ""]
    body += _breakdown(opts)
    body += ["### What each configuration reports", "",
             harness.table(["configuration", "what the user gets"], [[c.label, c.reports] for c in CONFIGS]), ""]
    body += ["### Code of each configuration", ""]
    for cfg in CONFIGS:
        body += [f"**{cfg.label}**", "", "```python", source(cfg), "```", ""]
    return harness.Section("## Monitor overhead", "\n".join(body), targets)


def _breakdown(opts: harness.Options) -> list[str]:
    """``benchmarks/overhead.py``'s per-part timing of the monitor on workload (a), as a table."""
    try:
        import overhead

        steps = 20 if opts.smoke else 100
        parts = overhead.breakdown(overhead.mlp_case, steps, opts.smoke)
    except Exception as e:  # another helper's script: report, do not lose the other tables
        return [f"(`benchmarks/overhead.py` breakdown unavailable: `{type(e).__name__}: {e}`)", ""]
    rows = [[("↳ " if label.startswith(" ") else "") + label.strip(), f"{ms:.2f}"] for label, ms in parts.items()]
    return [
        "### Where gradguard's time goes on (a)",
        "",
        "`benchmarks/overhead.py`'s breakdown: each part of the default monitor timed with the training thread's "
        f"CPU time over {steps} steps, in ms per 10-step period (one sampled step, one fetch).",
        "",
        harness.table(["part", "ms / period"], rows, "lr"),
        "",
    ]


CHILD_STEPS = 2  # the first step allocates the optimizer state; the second holds it with a full graph


def _child_args(workload: str, config: str, opts: harness.Options, steps: int = CHILD_STEPS) -> list[str]:
    args = [str(Path(__file__).resolve()), "--child", workload, config, "--steps", str(steps),
            "--device", opts.device, "--threads", str(opts.threads)]
    return [*args, "--smoke"] if opts.smoke else args


def _child_rss(workload: str, config: str, opts: harness.Options) -> dict[str, object]:
    return harness.child(_child_args(workload, config, opts))


def _rss_text(r: dict[str, object] | None) -> str:
    if r is None:
        return "—"
    if "error" in r:
        return f"n/a ({r['error']})"
    peak, before = float(r["peak_rss_mib"]), float(r["rss_before_mib"])  # type: ignore[arg-type]
    return f"{peak:.0f} (+{peak - before:.0f})"


def _sync_text(n: float | None) -> str:
    return "n/a (CPU)" if n is None else f"{n:g}"


def child_main(workload: str, config: str, steps: int, smoke: bool, device: str) -> dict[str, float]:
    """Run ``steps`` steps of one configuration alone and report this process's peak RSS."""
    w = models.build(workload, smoke=smoke, device=device)
    before = harness.peak_rss_mib()
    step = BY_KEY[config].build(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            step()
    return {"peak_rss_mib": harness.peak_rss_mib(), "rss_before_mib": before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "CONFIG"))
    parser.add_argument("--steps", type=int, default=CHILD_STEPS)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        workload, config = args.child
        print(json.dumps(child_main(workload, config, steps=args.steps, smoke=args.smoke, device=args.device)))
        return 0
    section = run(harness.Options(device=args.device, smoke=args.smoke, threads=args.threads, rss=False))
    print(section.body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
