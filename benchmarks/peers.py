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
import re
import sys
import tempfile
import types
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    return _cockpit(w, track_interval=1)


def cockpit_economy_every_256(w: Workload) -> Step:
    # The same loop with the economy quantities tracked on every 256th step only (schedules.linear(256)):
    # on the other steps Cockpit's context only disables BackPACK (its `disable()` context), no extension runs.
    return _cockpit(w, track_interval=256)


def _cockpit(w: Workload, track_interval: int) -> Step:
    with _pkg_resources_shim():
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.utils import schedules
        from cockpit.utils.configuration import configuration

    model = extend(w.model)
    loss_fn = extend(torch.nn.MSELoss(reduction="mean"))
    individual_loss_fn = torch.nn.MSELoss(reduction="none")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    quantities = configuration("economy", track_schedule=schedules.linear(track_interval))
    cockpit = Cockpit(model.parameters(), quantities=quantities)
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


def hf_debug_underflow_overflow(w: Workload) -> Step:
    # transformers' DebugUnderflowOverflow(model) as its docs show it: forward hooks on every module that
    # record the abs min/max of its weights, inputs and outputs and test them for inf/nan (`.item()` per
    # tensor), keeping the last 21 frames to print before it raises.
    from transformers.debug_utils import DebugUnderflowOverflow

    opt = torch.optim.Adam(w.model.parameters(), lr=LR)
    DebugUnderflowOverflow(w.model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(w.model(w.x), w.y)
        loss.backward()
        opt.step()

    return step


def wandb_watch_default(w: Workload) -> Step:
    # wandb.watch(model, log="gradients") at its default log_freq=1000, in an offline run (see _wandb_run:
    # mode="offline", a temporary folder, nothing sent), the loss logged every 10th step as in wandb's
    # example (`if batch_idx % log_interval == 0: wandb.log({"loss": loss})`).
    return _wandb(w, log_freq=1000)


def wandb_watch_every_10(w: Workload) -> Step:
    # The same with log_freq=10: a 64-bin histogram of every parameter's gradient every 10th backward.
    return _wandb(w, log_freq=10)


def _wandb(w: Workload, log_freq: int) -> Step:
    run = _wandb_run()
    opt = torch.optim.Adam(w.model.parameters(), lr=LR)
    run.watch(w.model, log="gradients", log_freq=log_freq)
    _WANDB.setdefault("hooked", {})[log_freq] = w.model._wandb_hook_names  # checked against the run file
    count = [0]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(w.model(w.x), w.y)
        loss.backward()
        if count[0] % 10 == 0:
            run.log({"loss": loss})
        count[0] += 1
        opt.step()

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


_WANDB: dict[str, Any] = {}


def _wandb_run() -> Any:
    """One offline wandb run shared by the wandb configurations of this process, in a temporary folder.

    ``mode="offline"`` writes the run to that folder and sends nothing (``mode="disabled"`` would make
    ``watch`` a no-op and time nothing); console capture is off so that the benchmark's own output is not
    copied into the run. :func:`close_peers` finishes it and removes the folder.
    """
    if "run" not in _WANDB:
        import wandb

        folder = tempfile.TemporaryDirectory(prefix="gradguard-bench-wandb-")
        run = wandb.init(mode="offline", dir=folder.name, project="gradguard-bench",
                         settings=wandb.Settings(console="off", silent=True))
        _WANDB.update(run=run, folder=folder)
    return _WANDB["run"]


def _wandb_logged() -> set[bytes] | None:
    """The ``gradients/<parameter>`` names found in the run file wandb has written so far (the evidence that
    its hooks ran and logged: the file is wandb's own record of the run), None without a run."""
    folder = _WANDB.get("folder")
    if folder is None:
        return None
    return {m for f in Path(folder.name).rglob("*.wandb") for m in re.findall(rb"gradients/[\w.]+", f.read_bytes())}


def close_peers() -> None:
    """Finish what a peer left open in this process (the offline wandb run) and remove its files."""
    run = _WANDB.pop("run", None)
    folder = _WANDB.pop("folder", None)
    _WANDB.clear()
    if run is not None:
        run.finish()
    if folder is not None:
        folder.cleanup()


def _children_cpu_s() -> float | None:
    """CPU seconds used so far by this process's children (wandb's service process), None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            total += t.user + t.system
    return total


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Amortized:
    """A configuration whose expensive work runs every ``period``-th step only, none of which falls in the
    timed steps; the same work every ``every``-th step is timed by configuration ``like``. With c the
    ratio of the cheap steps and r that of ``like``, the extra cost of one expensive step is every·(r − c)
    and the ratio amortized over ``period`` steps is c + (every / period)·(r − c)."""

    like: str
    every: int
    period: int

    def ratio(self, cheap: float, like: float) -> float:
        """The amortized ratio from the cheap steps' ratio and the ratio of configuration ``like``."""
        return cheap + self.every / self.period * (like - cheap)


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
    amortized: Amortized | None = None


MONITOR_TARGETS = {"mlp": 1.05, "lstm": 1.02}
COCKPIT = f"Cockpit {_version('cockpit-for-pytorch')} economy"
WANDB = f"wandb {_version('wandb')} `watch(model, log=\"gradients\")`"
COCKPIT_REPORTS = ("loss, gradient norm, 1-d gradient histogram, distance from init, update size, step-size α of "
                   "the local parabola, norm / inner-product / orthogonality tests (from per-sample gradients)")
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
    Config("surgeon", f"torch-surgeon {_version('torch-surgeon')} `Surgeon`", torch_surgeon, ("torch_surgeon",),
           reports="per leaf module: mean, std, norm of the output gradient, ratio to its EMA (vanishing, "
           "exploding, stagnant), fraction of near-zero outputs"),
    Config("hf_debug", f"transformers {_version('transformers')} `DebugUnderflowOverflow`",
           hf_debug_underflow_overflow, ("transformers",),
           reports="forward only, every module on every step: abs min/max of its weights, inputs and outputs; "
           "on the first inf/nan among them an error, after printing the last 21 modules' values; nothing on "
           "gradients"),
    Config("wandb", f"{WANDB}, `log_freq=1000` (default)", wandb_watch_default, ("wandb",),
           amortized=Amortized("wandb_10", 10, 1000),
           reports="a 64-bin histogram of every parameter's gradient every 1000th backward, written to the run "
           "(offline here), to look at; no detection"),
    Config("wandb_10", f"{WANDB}, `log_freq=10`", wandb_watch_every_10, ("wandb",),
           reports="the same histograms every 10th backward"),
    Config("cockpit", COCKPIT + ", every step", cockpit_economy, ("cockpit", "backpack"), max_steps=10,
           reports=COCKPIT_REPORTS + ", every step"),
    Config("cockpit_256", COCKPIT + ", every 256th step", cockpit_economy_every_256, ("cockpit", "backpack"),
           amortized=Amortized("cockpit", 1, 256), reports="the same, every 256th step"),
)
BY_KEY = {c.key: c for c in CONFIGS}


def why_unavailable(cfg: Config) -> str | None:
    """A sentence saying why ``cfg`` cannot run here, or None."""
    missing = [p for p in cfg.packages if importlib.util.find_spec(p) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (`make bench` installs the `bench` extra)"
    return None


def source(cfg: Config) -> str:
    """The code that builds ``cfg``'s training step, exactly as run: its function, then the helpers of this
    module that it calls (shared by two schedules of one peer), except the import workaround for Cockpit."""
    shown: list[Callable[..., object]] = []
    todo: list[Callable[..., object]] = [cfg.build]
    while todo:
        fn = todo.pop(0)
        if fn in shown:
            continue
        shown.append(fn)
        todo += [f for name in fn.__code__.co_names
                 if name.startswith("_") and name != "_pkg_resources_shim"
                 and inspect.isfunction(f := globals().get(name)) and f.__module__ == __name__]
    return "\n\n\n".join(inspect.getsource(fn).rstrip() for fn in shown)


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
_LSTM_LAYERS = ("BackPACK 1.7.1's `nn.LSTM` derivatives support one layer only (a 2-layer LSTM raises "
                "`NotImplementedError: only num_layers = 1 is supported` under BatchGrad)")
_NO_ATTENTION = ("BackPACK 1.7.1 has no per-sample-gradient extension for `MultiheadAttention` (in_proj, "
                 "out_proj) or `LayerNorm`: those parameters get no `grad_batch`, which Cockpit's quantities need")
KNOWN_FAILURES = {  # both Cockpit schedules track step 0, so both fail at their first step
    (cockpit, workload): why
    for cockpit in ("cockpit", "cockpit_256")
    for workload, why in (("lstm", _LSTM_LAYERS), ("transformer", _NO_ATTENTION))
}


def run(opts: harness.Options) -> harness.Section:
    """The ``## Monitor overhead`` section: one table per workload, every configuration interleaved."""
    # workload → (timed rounds, warm-up rounds, steps per period). gradguard samples densely for its first
    # 50 steps and then every 50th step (docs/monitor.md): the warm-up covers the dense start where the
    # workload is long enough to time steady state, and a period holds one steady-state sampled step.
    plan = {
        "mlp": (300, 60, 50),
        "lstm": (100, 60, 50),
        "transformer": (20, 1, 10),
    }
    if opts.smoke:
        plan = dict.fromkeys(plan, (3, 1, 1))
    body: list[str] = [
        "Every configuration trains its own copy of the same model on the same batch with Adam (lr 1e-4) and "
        "MSE; they take turns step by step in one process, the order reversed every round. Ratio = median over "
        "periods (50 steps on (a) and (b), after 60 warm-up steps, so that gradguard is timed in its steady "
        "state with one sampled step per period; 10 steps on (c)) of the paired ratio (configuration / bare "
        "loop, same rounds), with the "
        "interquartile range in brackets. Peak RSS: each configuration alone in a fresh child process "
        f"({CHILD_STEPS} steps), its `VmHWM` (see Method), and in brackets what the configuration's set-up "
        "and steps added to the peak reached with the model built (so a tool's own imports count against it).",
        "`benchmarks/overhead.py` is the standalone two-way version (bare against gradguard only).",
        "A configuration whose expensive steps come every N-th step only and so fall outside the timed steps "
        "(Cockpit every 256th step, wandb at `log_freq=1000`) is timed on its cheap steps, and its ratio "
        "amortized over N steps is given beside, with the cost of one expensive step taken from the row that "
        "does the same work more often (see `Amortized` in `benchmarks/peers.py`).",
        "",
    ]
    targets: list[harness.Target] = []
    summary: dict[str, dict[str, str]] = {c.key: {} for c in CONFIGS}
    try:
        for key, (rounds, warmup, period) in plan.items():
            body += _workload(key, rounds, warmup, period, opts, targets, summary)
    finally:
        close_peers()
    body += _breakdown(opts)
    columns = list(dict.fromkeys(col for row in summary.values() for col in row))
    body += ["### What each configuration reports, beside what it costs", "",
             "Ratio to the bare loop on each workload (from the tables above; amortized where so marked).", "",
             harness.table(["configuration", "what the user gets", *columns],
                           [[c.label, c.reports, *(summary[c.key].get(k, "—") for k in columns)] for c in CONFIGS],
                           "ll" + "r" * len(columns)), ""]
    body += ["### Code of each configuration", ""]
    for cfg in CONFIGS:
        body += [f"**{cfg.label}**", "", "```python", source(cfg), "```", ""]
    return harness.Section("## Monitor overhead", "\n".join(body), targets)


def _workload(key: str, rounds: int, warmup: int, period: int, opts: harness.Options, targets: list[harness.Target],
              summary: dict[str, dict[str, str]]) -> list[str]:
    """The table of one workload; appends its targets and its ratios (``summary[config]["(a)"]``)."""
    base = models.build(key, smoke=opts.smoke, device=opts.device)
    col = base.label.split(" ", 1)[0]
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
    cpu0 = _children_cpu_s()
    times = harness.interleave_steps(steps, rounds=rounds, warmup=warmup, device=opts.device, limits=limits)
    logged, cpu1 = _wandb_logged(), _children_cpu_s()
    syncs = {k: harness.count_syncs(s, 3, opts.device) for k, s in steps.items()}
    # A smoke run checks the child path once (gradguard on the first workload) instead of 30 processes.
    rss_keys = [k for k in steps if not opts.smoke or (k == "gradguard" and key == "mlp")]
    rss: dict[str, dict[str, object]] = {}
    if opts.rss:  # memory, not time: two children at a time (nothing is being timed meanwhile)
        with ThreadPoolExecutor(max_workers=2) as pool:
            n = len(rss_keys)
            rss = dict(zip(rss_keys, pool.map(_child_rss, [key] * n, rss_keys, [opts] * n), strict=True))
    ratios = {k: harness.period_ratios(times, k, "bare", period) for k in steps}
    rows = []
    for cfg in CONFIGS:
        if cfg.key in failed:
            rows.append([cfg.label, "—", "could not run: " + failed[cfg.key], "—", "—", "—"])
            summary[cfg.key][col] = "could not run"
            continue
        t = times[cfg.key]
        ms = 1e3 * harness.quartiles(t)[1]
        mid = harness.quartiles(ratios[cfg.key])[1]
        summary[cfg.key][col] = f"{mid:.2f}×"
        limit = (cfg.target or {}).get(key)
        verdict = "—"
        if limit is not None and opts.smoke:
            verdict = f"≤ {limit:.2f}× (not judged in a smoke run)"
        elif limit is not None:
            met = mid <= limit
            targets.append(harness.Target(f"{cfg.label} on {base.label}", mid, limit, met))
            verdict = f"≤ {limit:.2f}× {harness.mark(met)}"
            if not met and opts.profile:
                verdict += " (profile below)"
        note = f" ({len(t)} timed steps)" if len(t) < rounds else ""
        am = cfg.amortized
        if am is not None and am.like in ratios:
            amortized = am.ratio(mid, harness.quartiles(ratios[am.like])[1])
            note += (f"; amortized over its {am.period}-step period, the expensive step costing as in the row "
                     f"{BY_KEY[am.like].label}: ≈ {amortized:.3f}×")
            summary[cfg.key][col] = f"{amortized:.2f}× amortized ({mid:.2f}× timed)"
        rows.append([cfg.label, f"{ms:.1f}", harness.ratio_text(ratios[cfg.key]) + note,
                     _rss_text(rss.get(cfg.key)), _sync_text(syncs.get(cfg.key)), verdict])
    timing = f"{rounds} timed rounds after {warmup} warm-up round(s), in periods of {period} steps."
    body = [f"### {base.label}", "", timing, "",
            harness.table(["configuration", "ms / step", "ratio to bare", "peak RSS MiB", "syncs / step", "target"],
                          rows, "lrrrrl"), ""]
    if "wandb_10" in steps and logged is not None:
        hooked = {n.encode() for n in _WANDB["hooked"][10]}
        service = ("; wandb's service process, outside this process's CPU clock, used "
                   f"{1e3 * (cpu1 - cpu0) / (rounds + warmup):.1f} ms of CPU per round for the wandb rows together"
                   if cpu0 is not None and cpu1 is not None else "")
        body += [f"wandb: by the end of these rounds the offline run file held gradient histograms of "
                 f"{len(hooked & logged)} of the {len(hooked)} parameters watched at `log_freq=10` (the service "
                 f"writes it asynchronously, in blocks){service}.", ""]
    for tg in targets:
        if not tg.met and base.label in tg.what and opts.profile:
            top = harness.pyspy_top(_child_args(key, "gradguard", opts, steps=4 * harness.PERIOD),
                                    "<locals>.step (peers.py")
            body += [harness.profile_text(top, f"gradguard default on {base.label}"), ""]
    return body


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(steps):
                step()
        return {"peak_rss_mib": harness.peak_rss_mib(), "rss_before_mib": before}
    finally:
        close_peers()


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
