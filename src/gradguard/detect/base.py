"""What detection rules receive: host-side statistics gathered by the monitor (rules never touch hooks)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from gradguard.errors import check_number


@dataclass(frozen=True)
class ParamInfo:
    """A watched parameter: qualified name, owning module, shape facts used to normalise its norms.

    ``sparse_rows`` marks lookup tables (``nn.Embedding``): a batch touches only a few rows, so their
    per-element gradient RMS is diluted by the vocabulary size and says nothing about depth. ``dtype`` is
    the storage type as ``str(p.dtype)`` (``"torch.bfloat16"`` for a model cast with ``model.to(torch.bfloat16)``):
    a weight stored in 16 bits drops any step below half a unit in its last place (docs/detection.md).
    """

    name: str
    module: str
    ndim: int
    numel: int
    sparse_rows: bool = False
    dtype: str = "torch.float32"


@dataclass(frozen=True)
class Origin:
    """Producer of a NaN/Inf, as found by the monitor's replay (see ``gradguard.monitor.provenance``)."""

    module: str
    phase: str
    what: str
    evidence: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleOptions:
    """Options of the monitor's detection rules, validated once (``gg.watch(model, rules=RuleOptions(...))``).

    The defaults and their reasons are in docs/detection.md.

    Args:
        spike_z: Gaussian rarity (σ) a spike must reach, before the small-sample correction (> 0).
        spike_factor: a spike is also at least this many times the window's median (≥ 1).
        spike_warning: a spike this many times the median is a warning; smaller ones are info (≥ spike_factor).
        level_ratio: the loss has diverged when it stays at ≥ this many times its best level (> 1).
        level_steps: for this many consecutive steps (≥ 1).
        growth: a gradient-norm explosion is at least this many times the window's median (> 1).
        update_high: a weight tensor whose ‖Δw‖/‖w‖ stays ≥ this is updated too fast (> 0).
        update_target: the ‖Δw‖/‖w‖ a suggested learning rate aims at (> 0, < update_high).
        update_stall: a weight tensor whose ratio stays ≤ this fraction of the other tensors' median is
            stalled (> 0, < 1).
        update_samples: consecutive measured update ratios both tests need (≥ 1).
        forward_gain: per-layer growth of the activations' std that counts as amplifying (> 1).
        forward_growth: total growth over consecutive amplifying layers that is an explosion (> 1).
    """

    spike_z: float = 6.0
    spike_factor: float = 10.0
    spike_warning: float = 100.0
    level_ratio: float = 2.0
    level_steps: int = 3
    growth: float = 10.0
    update_high: float = 0.1
    update_target: float = 3e-3
    update_stall: float = 1e-3
    update_samples: int = 3
    forward_gain: float = 2.0
    forward_growth: float = 100.0

    def __post_init__(self) -> None:
        check_number("spike_z", self.spike_z, low=0.0, low_inclusive=False)
        check_number("spike_factor", self.spike_factor, low=1.0)
        check_number("spike_warning", self.spike_warning, low=self.spike_factor)
        check_number("level_ratio", self.level_ratio, low=1.0, low_inclusive=False)
        check_number("level_steps", self.level_steps, low=1, integer=True)
        check_number("growth", self.growth, low=1.0, low_inclusive=False)
        check_number("update_high", self.update_high, low=0.0, low_inclusive=False)
        check_number("update_target", self.update_target, low=0.0, high=self.update_high, low_inclusive=False,
                     high_inclusive=False)
        check_number("update_stall", self.update_stall, low=0.0, high=1.0, low_inclusive=False,
                     high_inclusive=False)
        check_number("update_samples", self.update_samples, low=1, integer=True)
        check_number("forward_gain", self.forward_gain, low=1.0, low_inclusive=False)
        check_number("forward_growth", self.forward_growth, low=1.0, low_inclusive=False)


#: Consecutive losses whose median is the run's "typical" loss at a step: one lucky mini-batch is not a level.
LEVEL_STEPS = 3


class RunMemory:
    """What the rules remember of the whole run, beyond the sliding window: the best and the first losses.

    ``best`` is the smallest median of :data:`LEVEL_STEPS` consecutive finite losses seen so far (the run's
    best *level*: a median, so one lucky batch of a tiny-batch run does not set it), ``first`` the first
    finite loss, ``chance`` the loss of a classifier that guesses (``ln C`` for ``C`` balanced classes;
    ``None`` when unknown) and ``chance_source`` where it came from. Updated by the monitor on each fetch
    with the new rows (:meth:`update`), read by the rules.

    Args:
        chance: the chance-level loss, or ``None``.
        chance_source: how it was obtained (for messages), e.g. ``"num_classes=10"``.
    """

    def __init__(self, chance: float | None = None, chance_source: str = "") -> None:
        self.chance = chance
        self.chance_source = chance_source
        self.first: float | None = None
        self.first_step: int | None = None
        self.best = math.inf
        self.best_step = -1
        self.steps = 0
        self._last: list[float] = []
        #: per ReLU-like module, the largest dead-unit count judged so far (revival check)
        self.dead_counts: dict[str, int] = {}

    @property
    def uniform(self) -> bool:
        """True when the chance level is ``ln C`` for a whole number ``C ≥ 2`` of classes: the loss of a
        uniform guess (``num_classes`` or the inferred output width), rather than some other ``chance_loss``."""
        if self.chance is None or not self.chance > 0:
            return False
        c = math.exp(self.chance)
        return c >= 2 - 1e-9 and abs(c - round(c)) <= 1e-9 * c

    def update(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Fold new history rows (oldest first) into the memory."""
        for r in rows:
            self.steps += 1
            raw = r.get("loss")
            if not finite(raw):
                continue
            v = float(raw)  # type: ignore[arg-type]  # finite() proved it is a real number
            if self.first is None:
                self.first, self.first_step = v, int(r["step"])
            self._last = [*self._last[-(LEVEL_STEPS - 1) :], v]
            level = sorted(self._last)[len(self._last) // 2]
            if level < self.best:
                self.best, self.best_step = level, int(r["step"])


@dataclass
class Observation:
    """Everything the rules may look at, on the host, at one fetch.

    Attributes:
        step: the newest step fetched.
        rows: recent history rows, oldest first (at most the monitor's window plus the new rows).
        new: how many of ``rows`` (at the end) arrived since the rules last ran.
        params: watched parameters in ``named_parameters()`` order.
        depth: module names in the order their forward finished on the last sampled step (input first).
        activations: per module, the pooled output summary of the latest sampled step.
        saturation_kinds: per module, ``"sigmoid"``/``"tanh"`` when its output can saturate.
        dead_window: per ReLU-like module, each unit's peak output over the window (0: never fired).
        dead_samples: per module, how many sampled steps ``dead_window`` covers.
        time_forward: per recurrent module, RMS of its output at each time step (latest sampled step).
        time_grad: per recurrent module, ‖∂L/∂h_t‖ at each time step (latest sampled step).
        origin: the replay's answer when a non-finite value was flagged in the new rows.
        nonfinite_step: the first new step whose loss or gradients held NaN/Inf, if any.
        input_std: std of the model's first floating input on the latest sampled step, if any.
        norm_layers: names of the normalisation modules (BatchNorm, LayerNorm, ...).
        options: the rules' thresholds (:class:`RuleOptions`).
        window: the monitor's ``window`` option: how many steps the windowed tests look back on.
        run: what the monitor remembers of the whole run (best loss, first losses, chance level).
        lrs: per parameter name, the learning rate of its optimizer group (when the optimizer is known).
    """

    step: int
    rows: Sequence[Mapping[str, Any]]
    new: int
    params: Sequence[ParamInfo]
    depth: Sequence[str] = ()
    activations: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    saturation_kinds: Mapping[str, str] = field(default_factory=dict)
    dead_window: Mapping[str, Tensor] = field(default_factory=dict)
    dead_samples: Mapping[str, int] = field(default_factory=dict)
    time_forward: Mapping[str, Tensor] = field(default_factory=dict)
    time_grad: Mapping[str, Tensor] = field(default_factory=dict)
    origin: Origin | None = None
    nonfinite_step: int | None = None
    nonfinite_counts: Mapping[str, float] = field(default_factory=dict)
    window: int = 200
    input_std: float | None = None
    norm_layers: frozenset[str] = frozenset()
    options: RuleOptions = field(default_factory=RuleOptions)
    run: RunMemory | None = None
    lrs: Mapping[str, float] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # derived values shared by rules within one fetch

    @property
    def new_rows(self) -> Sequence[Mapping[str, Any]]:
        return self.rows[len(self.rows) - self.new :] if self.new else ()

    @property
    def old_rows(self) -> Sequence[Mapping[str, Any]]:
        return self.rows[: len(self.rows) - self.new]


def finite(x: Any) -> bool:
    """True for a real, finite number (``None`` and NaN/Inf are not)."""
    return isinstance(x, int | float) and math.isfinite(x)


def finite_values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """The finite values of ``key`` in ``rows`` (NaN/Inf/missing are dropped, so they never poison a window)."""
    # Inlined test (runs thousands of times per fetch): x - x == 0 holds exactly for finite numbers.
    return [float(v) for r in rows if (v := r.get(key)) is not None and v - v == 0]


def fmt(x: float) -> str:
    """Compact number for messages: 3 significant digits."""
    return f"{x:.3g}"


#: A run whose last losses are all within this factor of its best level has not degraded (mini-batch noise
#: around a falling or settled loss stays inside it; a learning rate far too high lifts the loss beyond it).
NEAR_BEST = 1.1


def loss_near_best(obs: Observation) -> bool:
    """The last three losses are all below :data:`NEAR_BEST` × the run's best (positive) loss level.

    A finding is judged by what the run did: rules whose evidence is a symptom that healthy training also
    shows for a while (large updates early on, units off at an initial plateau) stay at ``info`` while the
    loss holds at its best. A loss stuck at chance from the start is the divergence rule's to judge.
    """
    losses = finite_values(obs.rows, "loss")[-3:]
    best = obs.run.best if obs.run is not None else math.inf
    return len(losses) == 3 and 0 < best < math.inf and max(losses) < NEAR_BEST * best
