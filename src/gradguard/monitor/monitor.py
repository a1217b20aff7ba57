"""``gg.watch(model)``: the training monitor.

Data flows one way: hooks and per-step fused statistics (device) → fetched on the logging schedule
(host) → detection rules → findings → sinks. The steady state costs one fused norm over the gradients
per step (see :mod:`gradguard.monitor.params`); activation hooks exist only on sampled steps
(:mod:`gradguard.monitor.activations`); provenance of a NaN/Inf is found by replaying the step
(:mod:`gradguard.monitor.provenance`).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.detect import Observation, ParamInfo, RuleOptions, RunMemory, Sentinel, run_rules
from gradguard.detect.base import Origin
from gradguard.detect.forward import is_norm
from gradguard.errors import ConfigError, InputError, StateError, check_number
from gradguard.findings import KINDS, Finding
from gradguard.integrations import as_module
from gradguard.monitor.activations import ActivationTap, Sample, pool_summaries
from gradguard.monitor.params import ParamStats, ReduceFn, RowMeta
from gradguard.monitor.provenance import Call, localize, tensors_in
from gradguard.monitor.schedule import Schedule, every
from gradguard.sinks.base import Sink
from gradguard.sinks.console import ConsoleSink
from gradguard.sinks.jsonl import JsonlSink
from gradguard.stats.activations import SUMMARY_FIELDS
from gradguard.stats.distributed import is_distributed, make_reduce_fn

#: Option names accepted by :func:`watch`, with their defaults.
DEFAULTS: dict[str, Any] = {
    "log_every": 10,
    "sample_every": 10,
    "detail_every": None,
    "window": 200,
    "dead_window": 5,
    "log_dir": None,
    "console": True,
    "sinks": (),
    "replay": True,
    "reduce_fn": None,
    "max_calls": 8,
    "num_classes": None,
    "chance_loss": None,
    "optimizer": None,
    "rules": None,
}

#: Steps after watch() at which the rules run at every step: nothing is known about the run yet, and a run
#: that is bad from its first step must be visible within a few steps (one fetch per step, 16 in all).
EARLY_STEPS = 16


class Monitor:
    """Watches one model during training; create it with :func:`watch`.

    Usage (``mon.step`` after ``backward()`` and before ``optimizer.step()``)::

        mon = gg.watch(model)
        for x, y in data:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
        print(mon.summary())

    See :func:`watch` for the options.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        log_every: int = 10,
        sample_every: int = 10,
        detail_every: int | None = None,
        window: int = 200,
        dead_window: int = 5,
        log_dir: str | os.PathLike[str] | None = None,
        console: bool = True,
        sinks: Iterable[Sink] = (),
        replay: bool = True,
        reduce_fn: ReduceFn | None = None,
        max_calls: int = 8,
        num_classes: int | None = None,
        chance_loss: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        rules: RuleOptions | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"watch() needs a torch.nn.Module, got {type(model).__name__}: {model!r:.80}")
        check_number("log_every", log_every, low=1, integer=True)
        check_number("sample_every", sample_every, low=1, integer=True)
        if detail_every is not None:
            check_number("detail_every", detail_every, low=1, integer=True)
        check_number("window", window, low=10, integer=True)
        check_number("dead_window", dead_window, low=1, integer=True)
        check_number("max_calls", max_calls, low=1, integer=True)
        chance, chance_source = _chance(num_classes, chance_loss)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise InputError(f"optimizer={optimizer!r:.60} must be a torch.optim.Optimizer or None")
        if rules is not None and not isinstance(rules, RuleOptions):
            raise InputError(f"rules={rules!r:.60} must be a gradguard.detect.RuleOptions or None")
        for name, flag in (("console", console), ("replay", replay)):
            if not isinstance(flag, bool):
                raise InputError(f"{name}={flag!r} must be True or False")
        if reduce_fn is not None and not callable(reduce_fn):
            raise InputError(f"reduce_fn={reduce_fn!r} must be a callable Tensor -> Tensor or None")
        if log_dir is not None and not isinstance(log_dir, str | os.PathLike):
            raise InputError(f"log_dir={log_dir!r} must be a path (str or os.PathLike) or None")
        sink_list = list(sinks)
        for s in sink_list:
            if not isinstance(s, Sink):
                raise InputError(f"sinks must hold gradguard.sinks.Sink instances, got {type(s).__name__}")
        named = list(model.named_parameters())
        if not named:
            raise ConfigError(
                f"watch() got a {type(model).__name__} with no parameters; allowed: a module with at least one "
                "parameter (there is no gradient to watch)"
            )
        self.model = model
        self.log_every = log_every
        self.sample_every: Schedule = every(sample_every)
        self.detail_every: Schedule = every(sample_every if detail_every is None else detail_every)
        self.replay_enabled = replay
        self.max_calls = max_calls
        self.window = window
        self.optimizer = optimizer
        self.rules = rules if rules is not None else RuleOptions()
        # What the rules remember of the whole run; the chance level is inferred later when not given.
        self._run = RunMemory(chance, chance_source)
        self._infer_chance = chance is None
        self._width: int | None = None
        self._sentinel = Sentinel(self.rules, EARLY_STEPS, chance)
        self._warned_no_grad = False
        self._input_std: Tensor | None = None  # of the sampled step in progress
        self._sample_input: Tensor | None = None  # of the last sampled step, until the next fetch
        self._latest_input_std: float | None = None

        owner: dict[int, str] = {}
        lookup: set[int] = set()
        for mname, m in model.named_modules():
            for _, p in m.named_parameters(recurse=False):
                owner.setdefault(id(p), mname)
                if isinstance(m, nn.Embedding | nn.EmbeddingBag):
                    lookup.add(id(p))
        self.params = [
            ParamInfo(n, owner.get(id(p), ""), p.dim(), p.numel(), sparse_rows=id(p) in lookup) for n, p in named
        ]
        self._names = [p.name for p in self.params]
        self._keys = {
            stat: [f"{stat}/{n}" for n in self._names]
            for stat in ("grad_norm", "nonfinite", "grad_max", "weight_norm", "update_ratio")
        }
        if reduce_fn is None:
            # integrations (issue 6): sharded (FSDP2/DTensor) parameters get the one-collective reduction of
            # the squared-norm block automatically; None (no collective) for replicated/DDP/single process.
            reduce_fn = make_reduce_fn([p for _, p in named])
        self._stats = ParamStats([p for _, p in named], rows=log_every, reduce_fn=reduce_fn)
        self._tap = ActivationTap(model, {n: m for n, m in model.named_modules() if n != ""})
        self._saturation_kinds = {n: k for n, k in self._tap.kinds.items() if k is not None}
        self._norm_layers = frozenset(n for n, m in model.named_modules() if is_norm(m))

        self.sinks: list[Sink] = []
        if log_dir is not None:
            self.sinks.append(JsonlSink(log_dir))
        if console:
            self.sinks.append(ConsoleSink())
        self.sinks.extend(sink_list)

        self._step = 0
        self._rows: list[dict[str, Any]] = []
        self._window: deque[dict[str, Any]] = deque(maxlen=window + log_every)
        self._findings: dict[tuple[str, str], Finding] = {}
        self._samples: list[Sample] = []
        self._dead: dict[str, deque[Tensor]] = {}
        self._dead_window = dead_window
        self._latest_act: dict[str, dict[str, float]] = {}
        self._act_keys: dict[str, list[str]] = {}
        self._time_forward: dict[str, Tensor] = {}
        self._time_grad: dict[str, Tensor] = {}
        self._depth: list[str] = []
        self._calls: list[Call] = []
        self._replaying = False
        self._bad_episode = False
        self._origin: tuple[int, Origin | None, dict[str, float]] | None = None
        self._closed = False
        self._root_handles = [
            # Weak references to the monitor, for the same reason as in ActivationTap (no reference cycle
            # through the model's hook dicts).
            model.register_forward_pre_hook(_weak(self, "_root_pre"), with_kwargs=True),
            model.register_forward_hook(_weak(self, "_root_post")),
        ]
        if self.sample_every(0):
            self._tap.arm(0)

    # ----------------------------------------------------------------- replay recording (root hooks)
    def _training_call(self) -> bool:
        return self.replay_enabled and not self._replaying and torch.is_grad_enabled() and self.model.training

    def _root_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._tap.armed and self._input_std is None and torch.is_grad_enabled() and self.model.training:
            # The scale the first layer receives, for the forward-growth rule (a device scalar; read on fetch).
            x = next((t for t in tensors_in((args, kwargs)) if t.is_floating_point() and t.numel() > 1), None)
            if x is not None:
                self._input_std = x.detach().float().std()
        # Keep *references* to the inputs and the RNG state before the forward: enough to replay the
        # step bit-for-bit (dropout masks included) if a NaN/Inf is flagged. No copy, no sync.
        if not self._training_call():
            return
        cuda = None
        # No CUDA tensor can exist before CUDA is initialised: skip walking the inputs on CPU-only runs.
        if torch.cuda.is_initialized() and any(t.is_cuda for t in tensors_in((args, kwargs))):
            cuda = torch.cuda.get_rng_state_all()
        if len(self._calls) >= self.max_calls:
            self._calls.pop(0)
        self._calls.append(Call(args=args, kwargs=dict(kwargs), rng_cpu=torch.get_rng_state(), rng_cuda=cuda))

    def _root_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._width is None and type(output) is Tensor and output.dim() in (2, 3) and output.is_floating_point():
            self._width = int(output.shape[-1])  # classes of (N, C) or (N, T, C) logits, if a classifier's
        # Remember the gradient that reaches each output: replaying the backward from it needs no loss_fn.
        if not self._training_call() or not self._calls:
            return
        call = self._calls[-1]
        outs = [output] if type(output) is Tensor else list(tensors_in(output))
        call.output_grads = [None] * len(outs)
        for i, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(functools.partial(_keep_grad, call.output_grads, i))

    # ----------------------------------------------------------------- the per-step entry point
    def step(self, loss: Tensor | None = None) -> None:
        """Record this step's statistics. Call after ``loss.backward()`` and before ``optimizer.step()``.

        Args:
            loss: the scalar loss tensor of this step (optional; enables loss-spike detection).

        Raises:
            StateError: after :meth:`close`.
            InputError: ``loss`` is not a tensor.
            ConfigError: ``loss`` has more than one element.
        """
        if self._closed:
            raise StateError("Monitor.step() called after close(); create a new monitor with gg.watch(model)")
        if loss is not None:
            if not isinstance(loss, Tensor):
                raise InputError(f"loss={loss!r:.60} must be a scalar torch.Tensor or None, got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ConfigError(
                    f"loss must be a scalar tensor (1 element), got shape {tuple(loss.shape)}; "
                    "reduce it first (e.g. loss.mean())"
                )
        step = self._step
        if self._infer_chance and loss is not None and self._width is not None:
            self._infer_chance = False
            if self._width >= 2 and _is_cross_entropy(loss):
                self._run.chance = self._sentinel.chance = math.log(self._width)
                self._run.chance_source = f"ln {self._width}, inferred from the output width"
        present, grads = self._stats.gradients()
        if not grads:
            self._no_gradients(step)
            return
        device = grads[0].device
        if self._stats.device is not None and device != self._stats.device:
            self._flush()  # the model moved: read the old device's rows before re-allocating
        self._stats.ensure_device(device)
        meta, values = self._stats.record(step, loss, self.detail_every(step), present, grads)
        if self.detail_every(step + 1):
            self._stats.snapshot(step)  # weights before the optimizer step feed the next update ratio
        sample = self._tap.disarm()
        if sample is not None:
            self._samples.append(sample)
            self._sample_input, self._input_std = self._input_std, None
        force = False
        if device.type == "cpu" and self._stats.reduce_fn is None:
            # (issue 6) With a distributed reduce_fn the flag of a local shard may differ between ranks, and
            # a flush made on one rank only would wait forever in the collective: flush on schedule only.
            # Reading a CPU tensor is a memory load, not a device synchronisation, so the non-finite flag
            # is checked at every step and a NaN is localised on the very step it appears. On
            # accelerators the flag waits for the logging schedule (see _flush). Summed as Python floats
            # (float64) so that large finite norms cannot overflow into a false alarm.
            host = values.tolist()
            flagged = not math.isfinite(sum(host))
            if flagged or self._bad_episode:
                force = self._check_nonfinite(meta, flagged, loss)
            if not flagged:
                # The same host floats feed the tripwire that runs the rules before the schedule (see
                # gradguard.detect.sentinel): a finding is visible within a step of the evidence.
                norms = host[:-1] if loss is not None else host
                gn = math.sqrt(math.fsum(v * v for v in norms))
                force = self._sentinel.check(step, host[-1] if loss is not None else None, gn) or force
        elif step < EARLY_STEPS and self._stats.reduce_fn is None:
            # Accelerators: one fetch per step at the start only, then the logging schedule. Not with a
            # distributed reduce_fn, whose collective belongs to the logging schedule.
            force = True
        if self.sample_every(step + 1):
            self._tap.arm(step + 1)
        self._step += 1
        if force or self._stats.pending() >= self.log_every:
            self._flush()
        self._calls.clear()

    def _check_nonfinite(self, meta: RowMeta, flagged: bool, loss: Tensor | None) -> bool:
        """Replay the step once per non-finite episode; True when the caller must flush now."""
        if not flagged:
            self._bad_episode = False
            return False
        if self._bad_episode:
            return False
        self._bad_episode = True
        self._stats.count_nonfinite(meta)
        origin = None
        if self.replay_enabled and self._calls:
            loss_value = float(loss.detach().float()) if loss is not None else None
            self._replaying = True
            try:
                origin = self._localize(loss_value)
            finally:
                self._replaying = False
        counts: dict[str, float] = {}
        if meta.nonfinite_counts is not None:
            for j, c in zip(meta.present, meta.nonfinite_counts.tolist(), strict=True):
                counts[self.params[j].name] = c
        self._origin = (meta.step, origin, counts)
        return True

    def _localize(self, loss_value: float | None) -> Origin | None:
        """Replay the recorded forwards; a replay that fails must never break the user's training step."""
        try:
            return localize(self.model, self._calls, loss_value)
        except Exception as exc:  # the model's own code runs here: any error is possible
            return Origin(
                "", "forward", f"the replay that localises it failed ({type(exc).__name__}: {exc})",
                {"replay_error": repr(exc)},
            )

    def _no_gradients(self, step: int) -> None:
        self._tap.disarm()
        if self.sample_every(step + 1):
            self._tap.arm(step + 1)
        self._step += 1
        self._calls.clear()
        # A call-order mistake, not a gradient pathology (no finding kind describes it): warn once.
        if not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn(
                f"mon.step() at step {step} found no gradient on any of the {len(self.params)} parameters; nothing "
                "was recorded for this step. Call loss.backward() before mon.step(), and mon.step() before "
                "optimizer.zero_grad().",
                UserWarning,
                stacklevel=3,
            )

    # ----------------------------------------------------------------- logging schedule
    def _flush(self) -> None:
        metas, host = self._stats.fetch()
        samples, self._samples = self._samples, []
        if not metas and not samples:
            return
        lists = {k: v.tolist() for k, v in host.items()}  # Python floats once, not per element
        new_rows = [self._row(i, m, lists) for i, m in enumerate(metas)]
        by_step = {r["step"]: r for r in new_rows}
        for sample in samples:
            self._absorb_sample(sample, by_step.get(sample.step))
        if self._origin is None and any(self._row_bad(r) for r in new_rows) and not self._bad_episode:
            # Accelerator path: the flag is read here, on the logging schedule.
            bad_meta = next(m for m, r in zip(metas, new_rows, strict=True) if self._row_bad(r))
            self._bad_episode = True
            origin = None
            if self.replay_enabled and self._calls:
                self._replaying = True
                try:
                    origin = self._localize(None)
                finally:
                    self._replaying = False
            self._origin = (bad_meta.step, origin, {})
        elif not any(self._row_bad(r) for r in new_rows):
            self._bad_episode = False
        self._rows.extend(new_rows)
        self._window.extend(new_rows)
        for sink in self.sinks:
            for r in new_rows:
                sink.on_step(r)
            for name, prof in self._time_forward.items():
                if samples:
                    sink.on_histogram(samples[-1].step, f"time_forward/{name}", prof)
        nonfinite_step, origin, counts = self._origin if self._origin else (None, None, {})
        self._origin = None
        if not new_rows:
            return
        self._run.update(new_rows)
        if samples and self._sample_input is not None:
            self._latest_input_std, self._sample_input = float(self._sample_input), None
        lrs: dict[str, float] = {}
        if self.optimizer is not None:
            by_id = {id(p): float(g["lr"]) for g in self.optimizer.param_groups for p in g["params"]
                     if isinstance(g.get("lr"), int | float)}
            lrs = {n: by_id[id(p)] for n, p in self.model.named_parameters() if id(p) in by_id}
        obs = Observation(
            step=new_rows[-1]["step"],
            rows=list(self._window),
            new=len(new_rows),
            params=self.params,
            depth=self._depth,
            activations=self._latest_act,
            saturation_kinds=self._saturation_kinds,
            dead_window=self._dead_peaks(),
            dead_samples={n: len(d) for n, d in self._dead.items()},
            time_forward=self._time_forward,
            time_grad=self._time_grad,
            origin=origin,
            nonfinite_step=nonfinite_step,
            nonfinite_counts=counts,
            window=self.window,
            input_std=self._latest_input_std,
            norm_layers=self._norm_layers,
            options=self.rules,
            run=self._run,
            lrs=lrs,
        )
        for f in run_rules(obs):
            self._update_finding(f)

    @staticmethod
    def _row_bad(row: Mapping[str, Any]) -> bool:
        loss = row.get("loss")
        return not math.isfinite(row["grad_norm"]) or (loss is not None and not math.isfinite(loss))

    def _row(self, i: int, meta: RowMeta, host: Mapping[str, Any]) -> dict[str, Any]:
        gsq = host["grad_sq"][i]
        present = meta.present
        row: dict[str, Any] = {
            "step": meta.step,
            "loss": host["loss"][i] if meta.has_loss else None,
            "grad_norm": math.sqrt(sum(gsq[j] for j in present)),
        }
        counts = meta.nonfinite_counts.tolist() if meta.nonfinite_counts is not None else None
        keys = self._keys
        for k, j in enumerate(present):
            g = gsq[j]
            row[keys["grad_norm"][j]] = math.sqrt(g)
            if counts is not None:
                row[keys["nonfinite"][j]] = float(counts[k])
            else:
                # Exact counts cost two passes, so they are taken only on flagged steps; a finite norm
                # proves the count is 0, a non-finite one (seen only on accelerators) means "some".
                row[keys["nonfinite"][j]] = 0.0 if math.isfinite(g) else math.nan
        if meta.detail:
            wsq, dsq, gmax = host["weight_sq"][i], host["delta_sq"][i], host["grad_max"][i]
            for j in present:
                row[keys["grad_max"][j]] = gmax[j]
            for j in range(len(keys["weight_norm"])):
                w = math.sqrt(wsq[j])
                row[keys["weight_norm"][j]] = w
                if math.isfinite(dsq[j]):
                    # ‖Δw‖/‖w‖ of the optimizer step just taken (Karpathy's ≈1e-3 rule of thumb).
                    row[keys["update_ratio"][j]] = math.sqrt(dsq[j]) / w if w > 0 else math.inf
        return row

    def _absorb_sample(self, sample: Sample, row: dict[str, Any] | None) -> None:
        if sample.order:
            self._depth = list(sample.order)
        if sample.matrix is not None:
            host = sample.matrix.cpu()  # one host transfer for every module's summaries
            values = host.tolist()
            for name, idx in sample.rows.items():
                if len(idx) == 1:
                    pooled = dict(zip(SUMMARY_FIELDS, values[idx[0]], strict=True))
                else:
                    pooled = pool_summaries(host[idx])
                self._latest_act[name] = pooled
                if row is not None:
                    keys = self._act_keys.get(name)
                    if keys is None:
                        keys = self._act_keys[name] = [f"act/{name}/{field}" for field in SUMMARY_FIELDS]
                    row.update(zip(keys, pooled.values(), strict=True))
                act = sample.activity.get(name)
                if act is not None and pooled["nonfinite"] == 0:
                    # A NaN output is "not > 0" everywhere; counting it would call live units dead.
                    self._dead.setdefault(name, deque(maxlen=self._dead_window)).append(act.cpu())
        for name, prof in sample.time_forward.items():
            self._time_forward[name] = prof.cpu()
        for name, prof in sample.time_grad.items():
            self._time_grad[name] = prof.cpu()

    def _dead_peaks(self) -> dict[str, Tensor]:
        """Per ReLU-like module, each unit's peak output over its window of sampled steps.

        Modules whose windows hold tensors of the same shapes are reduced together: one stack and one
        ``amax`` for all of them instead of two kernels per module.
        """
        groups: dict[tuple[torch.Size, ...], list[str]] = {}
        for name, d in self._dead.items():
            if d:
                groups.setdefault(tuple(t.shape for t in d), []).append(name)
        out: dict[str, Tensor] = {}
        for shapes, names in groups.items():
            block = torch.stack([t for n in names for t in self._dead[n]])
            peaks = block.reshape(len(names), len(shapes), *shapes[0]).amax(1)
            out.update(zip(names, peaks.unbind(0), strict=True))
        return out

    def _update_finding(self, finding: Finding) -> None:
        old = self._findings.get(finding.key)
        if old is not None and old.step == finding.step and old.rank > finding.rank:
            # The same event seen by a second reporter (the Guard skipping the NaN step this monitor already
            # localised): a less severe, less specific account must not replace the diagnosis.
            return
        self._findings[finding.key] = finding
        if old is None or (old.severity, old.message) != (finding.severity, finding.message):
            for sink in self.sinks:
                sink.on_finding(finding)

    # ----------------------------------------------------------------- public read side
    def report(self, finding: Finding) -> None:
        """Add a finding produced elsewhere (Guard, integrations) to this monitor's findings and sinks."""
        if not isinstance(finding, Finding):
            raise InputError(f"report() needs a gradguard.Finding, got {type(finding).__name__}")
        self._update_finding(finding)

    @property
    def step_count(self) -> int:
        """Number of ``step()`` calls so far (the next step's index)."""
        return self._step

    @property
    def findings(self) -> list[Finding]:
        """Deduplicated findings (one per kind and module, newest state), worst first. Fetches pending stats."""
        self._flush()
        return sorted(self._findings.values(), key=lambda f: (-f.rank, KINDS.index(f.kind), f.module))

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per recorded step (``step``, ``loss``, ``grad_norm``, ``grad_norm/<param>``, ...).

        Keys: ``grad_norm/<p>`` and ``nonfinite/<p>`` every step for each parameter that had a gradient;
        on sampled steps also ``grad_max/<p>``, ``weight_norm/<p>``, ``update_ratio/<p>`` (from the second
        sampled step on) and ``act/<module>/<field>`` for the fields of
        :data:`gradguard.stats.activations.SUMMARY_FIELDS`. ``loss`` is ``None`` when ``step()`` got no loss.
        Reading it fetches whatever is still pending on the device.
        """
        self._flush()
        return list(self._rows)

    @property
    def time_profiles(self) -> dict[str, dict[str, Tensor]]:
        """Latest per-time-step profiles of recurrent modules: ``{"forward"|"grad": {module: vector}}``."""
        self._flush()
        return {"forward": dict(self._time_forward), "grad": dict(self._time_grad)}

    def summary(self) -> str:
        """A per-layer table (latest and median gradient norm, weight norm, update ratio) and the findings."""
        findings = self.findings
        rows = list(self._window)
        lines = [f"gradguard monitor: {self._step} steps, {len(self.params)} parameter tensors"]
        header = f"{'parameter':40s} {'grad norm':>11s} {'median':>11s} {'weight norm':>11s} {'update ratio':>12s}"
        lines += [header, "-" * len(header)]
        for p in self.params:
            fin = sorted(float(r[key]) for r in rows if _isfinite(r.get(key := f"grad_norm/{p.name}")))
            last = _last(rows, f"grad_norm/{p.name}")
            med = fin[len(fin) // 2] if fin else float("nan")
            w = _last(rows, f"weight_norm/{p.name}")
            u = _last(rows, f"update_ratio/{p.name}")
            lines.append(f"{p.name[:40]:40s} {_num(last):>11s} {_num(med):>11s} {_num(w):>11s} {_num(u):>12s}")
        lines.append("")
        if not findings:
            lines.append("No findings.")
        for f in findings:
            where = f"`{f.module}`" if f.module else "model"
            lines.append(f"[{f.severity}] {f.kind} at {where} (step {f.step}): {f.message}")
            lines.append(f"    advice: {f.advice}")
        return "\n".join(lines)

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Fetch what is pending, remove every hook and close the sinks. Idempotent."""
        if self._closed:
            return
        self._flush()
        for h in self._root_handles:
            h.remove()
        self._root_handles.clear()
        self._tap.disarm()
        self._calls.clear()
        for sink in self.sinks:
            sink.close()
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort: never leave hooks on a model whose monitor is gone. Only remove handles here: no
        # torch computation in a finaliser (at interpreter exit that aborts inside torch).
        try:
            if not self._closed:
                for h in [*self._root_handles, *self._tap.handles]:
                    h.remove()
        except Exception:
            pass


def _chance(num_classes: Any, chance_loss: Any) -> tuple[float | None, str]:
    """The chance-level loss from watch()'s options: ``ln C`` for ``num_classes=C``, or ``chance_loss``."""
    if num_classes is not None and chance_loss is not None:
        raise ConfigError(
            f"give num_classes={num_classes!r} or chance_loss={chance_loss!r}, not both (chance_loss overrides ln C)"
        )
    if num_classes is not None:
        check_number("num_classes", num_classes, low=2, integer=True)
        return math.log(num_classes), f"ln {num_classes}, num_classes={num_classes}"
    if chance_loss is not None:
        check_number("chance_loss", chance_loss, low=0.0, low_inclusive=False)
        return float(chance_loss), "chance_loss"
    return None, ""


def _is_cross_entropy(loss: Tensor) -> bool:
    """True when the loss graph ends in a negative log-likelihood (F.cross_entropy / nll_loss), possibly
    scaled or averaged (gradient accumulation): host-side graph metadata only, no device work."""
    fn = loss.grad_fn
    for _ in range(4):
        if fn is None:
            return False
        name = fn.name()
        if name.startswith("NllLoss"):
            return True
        if not name.startswith(("DivBackward", "MulBackward", "MeanBackward", "ViewBackward", "SqueezeBackward")):
            return False
        fn = next((f for f, _ in fn.next_functions if f is not None), None)
    return False


def _keep_grad(grads: list[Tensor | None], i: int, g: Tensor) -> None:
    """Tensor hook: remember the gradient that reached a model output (a reference, no copy)."""
    grads[i] = g.detach()


def _weak(obj: object, method: str) -> Any:
    """A hook that calls ``obj.method`` through a weak reference (a no-op once ``obj`` is gone)."""
    ref = weakref.ref(obj)

    def hook(*args: Any) -> None:
        target = ref()
        if target is not None:
            getattr(target, method)(*args)

    return hook


def _last(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    for r in reversed(rows):
        v = r.get(key)
        if v is not None:
            return float(v)
    return float("nan")


def _isfinite(x: Any) -> bool:
    return isinstance(x, float | int) and math.isfinite(x)


def _num(x: float) -> str:
    return "-" if x != x else f"{x:.3g}"


def watch(model: nn.Module, **options: Any) -> Monitor:
    """Attach a :class:`Monitor` to ``model``; usable as ``with gg.watch(model) as mon:``.

    Per step (fused ``torch._foreach_norm``, kept on the device): per-parameter gradient L2 norm, the
    global norm ‖g‖ = (Σ_i ‖g_i‖²)^½ and a NaN/Inf flag, which makes the per-parameter non-finite count
    exact (0 when the norm is finite, counted on the step itself when not; on accelerators "some" until
    the logging schedule). On sampled steps also max|g|, ‖w‖, the update ratio ‖Δw‖/‖w‖ and per-module
    output summaries (mean, std, fraction of zeros / saturated, non-finite
    count, per-unit activity, per-time-step profiles of recurrent modules). Statistics reach the host on
    the logging schedule or when ``history``/``findings``/``summary()`` is read.

    Options:
        log_every (int, 10): steps between fetches (detection and sinks run then). The rules also run at
            each of the first 16 steps and, on CPU, whenever a step's loss or gradient norm trips
            gradguard.detect.Sentinel, so a finding is visible within a step or two of its evidence.
        sample_every (int, 10): steps between sampled steps (activation hooks).
        detail_every (int, None → sample_every): steps between max|g|, ‖w‖ and update-ratio measurements.
            1 = every step, at the cost of one weight copy and four extra passes over gradients and weights
            per step: measured 1.12× the bare step on the 20-layer MLP of ``benchmarks/overhead.py``, against
            ≈ 1.05× for the default, which is why these three are sampled (see gradguard.monitor.params).
        window (int ≥ 10, 200): steps of history the rules look back on (and the spike test's window).
        dead_window (int, 5): sampled steps over which a ReLU unit must never fire (peak output 0) to be
            called dead.
        log_dir (path, None): also append history and findings to ``<log_dir>/metrics.jsonl``.
        console (bool, True): print each new finding once (rich). Under ``torch.distributed``: rank 0 only.
        sinks (iterable of gradguard.sinks.Sink, ()): extra sinks.
        replay (bool, True): keep references to the last inputs and replay a step that produced NaN/Inf
            to name the module that produced it. Under ``torch.distributed`` (world size > 1): False.
        reduce_fn (callable, None): the hook point for torch.distributed. Applied once per fetch to the
            stacked per-tensor *squared* norms, one block of shape (rows, 3 · n_params) (gradient, weight
            and update squared norms side by side, columns in named_parameters() order, NaN where not
            measured), before they become norms; must return the reduced block, e.g. one all-reduce(SUM)
            across FSDP shards (gradguard.stats.distributed.make_reduce_fn, chosen automatically when
            parameters are sharded DTensors).
        max_calls (int, 8): training forwards per step kept for replay (gradient accumulation).
        num_classes (int ≥ 2, None): classes of a classification loss; its chance level is ln C. Without it
            and ``chance_loss``, ln C is inferred from the width C of a plain 2-d/3-d output tensor when the
            loss is a cross-entropy. Label smoothing, ``ignore_index`` and skewed labels put the real chance
            level below ln C: pass ``chance_loss`` then (see docs/detection.md).
        chance_loss (float > 0, None): the chance-level loss itself (instead of ``num_classes``).
        optimizer (torch.optim.Optimizer, None): lets the update-size rule name the learning rate that
            would bring a layer's ‖Δw‖/‖w‖ back to ≈ 3e-3.
        rules (gradguard.detect.RuleOptions, None): the detection rules' thresholds (docs/detection.md).

    Raises:
        InputError: ``model`` is not an ``nn.Module`` or an option has the wrong type.
        ConfigError: unknown option name, value out of range, or a model without parameters.
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown watch() option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(DEFAULTS)}")
    if is_distributed():
        # integrations (issue 6): under torch.distributed print on rank 0 only, and do not replay by default
        # (a replay re-runs forward/backward on one rank; with collectives inside, the others would not join).
        options.setdefault("console", torch.distributed.get_rank() == 0)
        options.setdefault("replay", False)
    # integrations (issue 6): a Keras 3 model (PyTorch backend) is watched through its readable torch view.
    return Monitor(as_module(model), **options)
