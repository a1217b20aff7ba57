"""Guard: cures of explosive setups, fault injection, bit-exact rollback, AMP, LR backoff, one sync per step."""

from __future__ import annotations

import collections
import copy
import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import clip
from gradguard.errors import ConfigError, InputError
from gradguard.guard import Guard, GuardEvent

# --------------------------------------------------------------------------------------- sick setups
Batch = tuple[torch.Tensor, torch.Tensor]


def _series(n: int = 300) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float32)
    s = torch.sin(t * 0.2) + 0.5 * torch.sin(t * 0.05)
    return (s - s.min()) / (s.max() - s.min())  # normalised to [0, 1]


def _windows(steps: int) -> Batch:
    s = _series()
    x = torch.stack([s[i : i + steps] for i in range(len(s) - steps - 1)]).unsqueeze(-1)
    y = torch.stack([s[i + steps] for i in range(len(s) - steps - 1)]).unsqueeze(-1)
    return x, y


class _SeqRegressor(nn.Module):
    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class Setup:
    """A model, its optimizer, a batch stream and a fixed evaluation set; optional gradient tampering."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Batch,
        batch_fn: Callable[[int, Batch], Batch] | None = None,
        tamper: Callable[[int, nn.Module], None] | None = None,
        eval_data: Batch | None = None,
    ) -> None:
        self.model, self.optimizer, self.data = model, optimizer, data
        self.batch_fn, self.tamper = batch_fn, tamper
        self.eval_data = eval_data if eval_data is not None else data
        self.rng = torch.Generator().manual_seed(1)

    def batch(self, t: int) -> Batch:
        x, y = self.data
        idx = torch.randint(0, len(x), (32,), generator=self.rng)
        xb, yb = x[idx], y[idx]
        return self.batch_fn(t, (xb, yb)) if self.batch_fn else (xb, yb)

    def evaluate(self) -> float:
        with torch.no_grad():
            x, y = self.eval_data
            return float(nn.functional.mse_loss(self.model(x), y))


def relu_lstm_normal_init() -> Setup:
    """ReLU LSTM, weights N(0, 1), biases 0.1, Adam."""
    x, y = _windows(20)
    model = _SeqRegressor(gg.nn.LSTM(1, 16, num_layers=2, activation="relu"), 16)
    gg.init.apply(model, "normal", std=1.0, bias=0.1)
    return Setup(model, torch.optim.Adam(model.parameters(), lr=1e-2), (x, y), eval_data=(x[::3], y[::3]))


def relu_rnn_double_orthogonal() -> Setup:
    """ReLU RNN with W_hh = 2 × orthogonal (spectral radius 2), plain SGD."""
    x, y = _windows(30)
    model = _SeqRegressor(nn.RNN(1, 32, nonlinearity="relu", batch_first=True), 32)
    gg.init.apply(model.rnn, "orthogonal", gain=2.0)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=1e-2), (x, y), eval_data=(x[::3], y[::3]))


def _mlp_data() -> Batch:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 10, generator=g)
    y = torch.tanh(x @ torch.randn(10, 1, generator=g)) + 0.1 * torch.randn(512, 1, generator=g)
    return x, y


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


STABLE_LR = 0.1  # checked to be stable in test_mlp_reference_lr_is_stable


def mlp(lr: float = STABLE_LR, **kw: Any) -> Setup:
    model = _mlp()
    return Setup(model, torch.optim.SGD(model.parameters(), lr=lr), _mlp_data(), **kw)


def mlp_ten_times_lr() -> Setup:
    return mlp(lr=10 * STABLE_LR)


def corrupted_outlier_batch() -> Setup:
    """One batch whose targets were multiplied by 1e4 (a corrupted record), at step 60."""
    return mlp(batch_fn=lambda t, b: (b[0], b[1] * 1e4) if t == 60 else b)


def nan_injected_gradients() -> Setup:
    """From step 20, with probability 0.1 per step, one gradient entry becomes NaN."""
    rng = torch.Generator().manual_seed(4)

    def tamper(t: int, model: nn.Module) -> None:
        if t >= 20 and float(torch.rand((), generator=rng)) < 0.1:
            params = list(model.parameters())
            grad = params[int(torch.randint(0, len(params), (), generator=rng))].grad
            assert grad is not None
            grad.view(-1)[0] = math.nan

    return mlp(tamper=tamper)


def train(setup: Setup, steps: int, guard: Guard | None = None) -> list[float]:
    """Evaluation loss before training and after every step."""
    losses = [setup.evaluate()]
    for t in range(steps):
        x, y = setup.batch(t)
        setup.optimizer.zero_grad()
        loss = nn.functional.mse_loss(setup.model(x), y)
        loss.backward()
        if setup.tamper:
            setup.tamper(t, setup.model)
        if guard is None:
            setup.optimizer.step()
        else:
            guard.step(loss)
        losses.append(setup.evaluate())
    return losses


def _exploded(losses: list[float]) -> bool:
    """Diverged: the loss turned non-finite or rose more than tenfold above the best loss seen before it."""
    best = math.inf
    for v in losses:
        if not math.isfinite(v) or v > 10 * best:
            return True
        best = min(best, v)
    return False


CURES = [
    (relu_lstm_normal_init, 150),
    (relu_rnn_double_orthogonal, 60),
    (mlp_ten_times_lr, 150),
    (corrupted_outlier_batch, 150),
    (nan_injected_gradients, 150),
]


@pytest.mark.parametrize(("make", "steps"), CURES, ids=[m.__name__ for m, _ in CURES])
def test_guard_cures_explosive_setup(make: Callable[[], Setup], steps: int) -> None:
    torch.manual_seed(0)
    bare = make()
    bare_losses = train(bare, steps)
    assert _exploded(bare_losses), "the unguarded run must really explode"
    bare_best = min(v for v in bare_losses if math.isfinite(v))

    torch.manual_seed(0)
    sick = make()
    guard = Guard(sick.model, sick.optimizer)  # default settings
    guarded = train(sick, steps, guard)
    assert all(torch.isfinite(p).all() for p in sick.model.parameters())
    # The first update of a run is applied unjudged (no history, no routine clip by default): a run bad
    # from step 0 may be non-finite until the guard's first rollback, never after it.
    first = min((e.step for e in guard.events if e.action == "rollback"), default=-1)
    assert all(math.isfinite(v) for v in guarded[first + 2 :])
    assert guarded[-1] <= bare_best, (guarded[-1], bare_best)
    assert guard.applied > steps // 2


def test_mlp_reference_lr_is_stable() -> None:
    losses = train(mlp(), 150)
    assert not _exploded(losses) and losses[-1] < 0.2 * losses[0]


# --------------------------------------------------------------------------------- fault injection
def test_fault_injection_hundreds_of_nan_inf_in_grads_and_losses() -> None:
    setup = mlp()
    guard = Guard(setup.model, setup.optimizer)
    rng = torch.Generator().manual_seed(7)
    injected = 0
    first = setup.evaluate()
    for t in range(500):
        x, y = setup.batch(t)
        setup.optimizer.zero_grad()
        loss = nn.functional.mse_loss(setup.model(x), y)
        loss.backward()
        u = float(torch.rand((), generator=rng))
        bad = [math.nan, math.inf, -math.inf][int(torch.randint(0, 3, (), generator=rng))]
        if u < 0.125:
            params = list(setup.model.parameters())
            grad = params[int(torch.randint(0, len(params), (), generator=rng))].grad
            assert grad is not None
            grad.view(-1)[int(torch.randint(0, grad.numel(), (), generator=rng))] = bad
            injected += 1
        elif u < 0.25:
            loss = loss.detach() + bad
            injected += 1
        guard.step(loss)
        assert all(torch.isfinite(p).all() for p in setup.model.parameters()), f"non-finite weight at step {t}"
    assert injected >= 100
    assert guard.steps == 500 and guard.skipped >= injected
    assert setup.evaluate() < 0.5 * first, "training must still make progress"


# ---------------------------------------------------------------------------------------- rollback
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _state(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: Any) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "model": {**dict(model.named_parameters()), **dict(model.named_buffers())},
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "scaler": scaler.state_dict(),
        }
    )


def _assert_bit_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)  # exact; NaN == NaN
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_bit_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bit_equal(x, y, f"{path}/{i}")
    else:
        assert a == b or (a != a and b != b), (path, a, b)


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_rollback_restores_everything_bit_exactly(on_disk: bool, tmp_path: Any) -> None:
    model = _Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    guard = Guard(
        model, opt, scaler=scaler, scheduler=sched, snapshot_every=1000, snapshot_dir=tmp_path if on_disk else None
    )
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)) for _ in range(20)]

    def one(x: torch.Tensor, y: torch.Tensor, poison: bool = False) -> bool:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        applied = guard.step(loss * math.nan if poison else loss)
        sched.step()
        return applied

    for x, y in data[:7]:
        assert one(x, y)
    guard.snapshot()
    saved = _state(model, opt, sched, scaler)
    assert saved["opt"]["state"][0]["step"] == 7.0 and saved["sched"]["last_epoch"] == 7
    for x, y in data[7:12]:
        assert one(x, y)
    changed = _state(model, opt, sched, scaler)
    assert not torch.equal(changed["model"]["body.0.weight"], saved["model"]["body.0.weight"])
    assert not torch.equal(changed["model"]["body.1.running_mean"], saved["model"]["body.1.running_mean"])
    for x, y in data[12:17]:
        assert not one(x, y, poison=True)
    assert guard.rollbacks == 1
    sched_after = sched.state_dict()
    # the user's scheduler.step() after the rolled-back step advanced it once more: compare the rest exactly
    assert sched_after["last_epoch"] == saved["sched"]["last_epoch"] + 1
    restored = _state(model, opt, sched, scaler)
    restored["sched"] = saved["sched"]
    _assert_bit_equal(restored["model"], saved["model"], "model")
    _assert_bit_equal(restored["opt"], saved["opt"], "optimizer")
    _assert_bit_equal(restored["scaler"], saved["scaler"], "scaler")
    actions = [e.action for e in guard.events]
    assert actions.count("rollback") == 1 and actions.count("lr_backoff") == 1
    # a second rollback restores the same snapshot again (the snapshot survives being used)
    for x, y in data[:5]:
        one(x, y, poison=True)
    _assert_bit_equal(_state(model, opt, sched, scaler)["model"], saved["model"], "model again")


def test_rollback_restores_scheduler_state_exactly() -> None:
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9**e)
    guard = Guard(model, opt, scheduler=sched, clip=None, snapshot_every=1000)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    for _ in range(4):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        sched.step()
    guard.snapshot()
    saved = copy.deepcopy({"sched": sched.state_dict(), "opt": opt.state_dict()})
    for _ in range(3):
        sched.step()
    guard.restore()
    _assert_bit_equal(sched.state_dict(), saved["sched"], "scheduler")
    _assert_bit_equal(opt.state_dict(), saved["opt"], "optimizer")


# --------------------------------------------------------------------------------- LR and AMP
def test_lr_backoff_applies_only_inside_the_step_and_recovers_gradually() -> None:
    model = nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt, clip=None, rescue=None, recover_steps=10, backoff=0.5)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def step(poison: bool = False) -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        before = model.weight.detach().clone()
        guard.step(loss + math.inf if poison else loss)
        return model.weight.detach() - before

    for _ in range(guard.rollback_after):
        step(poison=True)
    assert guard.lr_factor == 0.5
    grad = model.weight.grad
    assert grad is not None
    delta = step()
    torch.testing.assert_close(delta, -0.1 * 0.5 * grad, rtol=1e-6, atol=0)
    assert opt.param_groups[0]["lr"] == 0.1, "the scheduler-visible lr is untouched"
    factors = [guard.lr_factor]
    for _ in range(9):
        step()
        factors.append(guard.lr_factor)
    assert all(b > a for a, b in itertools.pairwise(factors))
    assert factors[-1] == 1.0
    assert [e.action for e in guard.events][-1] == "lr_restored"


class _Recorder(clip.ClipNorm):
    def __init__(self) -> None:
        super().__init__(1e9)
        self.norms: list[torch.Tensor] = []

    def __call__(self, parameters: Any) -> clip.ClipResult:
        result = super().__call__(parameters)
        self.norms.append(result.norm_before)
        return result


def test_grad_scaler_unscales_before_clipping_and_overflow_is_its_own_skip() -> None:
    torch.manual_seed(0)
    plain, amp = _mlp(), _mlp()
    amp.load_state_dict(plain.state_dict())
    x, y = _mlp_data()
    x, y = x[:32], y[:32]
    rec_plain, rec_amp = _Recorder(), _Recorder()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05)
    opt_amp = torch.optim.SGD(amp.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    g_plain = Guard(plain, opt_plain, clip=rec_plain)
    g_amp = Guard(amp, opt_amp, clip=rec_amp, scaler=scaler)
    applied = []
    overflowing = 2 * g_amp.rollback_after  # more than a rollback's worth: they must not count
    for t in range(overflowing + 2):
        opt_amp.zero_grad()
        loss = nn.functional.mse_loss(amp(x), y)
        scaler.scale(loss).backward()
        if t < overflowing:  # what a too-large loss scale does: an Inf in the scaled gradients
            amp[0].weight.grad[0, 0] = math.inf  # type: ignore[index]
        applied.append(g_amp.step(loss))
    assert applied == [False] * overflowing + [True, True]
    assert [e.reason for e in g_amp.events if e.action == "skip"] == ["amp_overflow"] * overflowing
    assert g_amp.rollbacks == 0, "overflow skips are the scaler's business, not a reason to roll back"
    assert scaler.get_scale() == 2.0**16 * 0.5**overflowing, "the scaler backed off once per overflow"
    # the first applied AMP step saw the same unscaled gradient norm as a plain run from the same weights
    opt_plain.zero_grad()
    loss = nn.functional.mse_loss(plain(x), y)
    loss.backward()
    g_plain.step(loss)
    torch.testing.assert_close(rec_amp.norms[overflowing], rec_plain.norms[0], rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------ events and monitor
def test_events_and_monitor_findings() -> None:
    setup = corrupted_outlier_batch()
    mon = gg.watch(setup.model)
    guard = Guard(setup.model, setup.optimizer, monitor=mon, clip="zclip")
    for t in range(70):
        x, y = setup.batch(t)
        setup.optimizer.zero_grad()
        loss = nn.functional.mse_loss(setup.model(x), y)
        loss.backward()
        if 30 <= t < 35:
            loss = loss * math.nan
        mon.step(loss)
        guard.step(loss)
    mon.close()
    skips = [e for e in guard.events if e.action == "skip"]
    assert [e.reason for e in skips] == ["nonfinite_loss"] * 5 + ["loss_spike"]
    assert skips[-1].step == 60 and skips[-1].numbers["z_loss"] > 6
    assert all(isinstance(e, GuardEvent) for e in guard.events)
    assert any(e.action == "rollback" and e.step == 34 for e in guard.events)
    kinds = {f.kind for f in mon.findings}
    assert {"nonfinite", "loss_spike", "exploding"} <= kinds
    growth = next(f for f in mon.findings if f.kind == "exploding")
    assert growth.step == 60 and growth.evidence["grad_norm"] >= 10 * growth.evidence["typical_grad_norm"]
    # routine clipping (ZClip's cap of 1.0 trims most steps here) is counted; only the large clip is an event
    assert guard.clipped > 10
    assert [(e.step, e.reason) for e in guard.events if e.action == "clip"] == [(60, "large_norm")]
    summary = guard.summary()
    assert summary["skipped"] == 6 and summary["rollbacks"] == 1 and summary["steps"] == 70
    assert summary["clipped"] == guard.clipped
    assert summary["events"]["skip:nonfinite_loss"] == 5 and summary["events"]["skip:loss_spike"] == 1


@pytest.mark.parametrize("with_scaler", [False, True], ids=["plain", "grad-scaler"])
def test_exactly_one_host_sync_per_step(monkeypatch: pytest.MonkeyPatch, with_scaler: bool) -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if with_scaler else None
    guard = Guard(model, opt, scaler=scaler, clip="zclip", rescue="agc")  # the longest path: ZClip + spike windows
    guard.rescue_engaged = True  # and the rescue clip after it
    x, y = _mlp_data()

    def backward() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[:32]), y[:32])
        (loss if scaler is None else scaler.scale(loss)).backward()
        return loss

    for _ in range(40):  # past ZClip's warm-up and the spike window's min_history
        guard.step(backward())
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *a: Any, _o: Any = original, _n: str = name, **k: Any) -> Any:
            calls.append(_n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    loss = backward()
    calls.clear()
    opt.step()  # the optimizer's own host reads (single-tensor Adam reads its step count), not ours
    own = list(calls)
    calls.clear()
    assert guard.step(loss)
    assert calls == ["tolist", *own], calls


def test_a_healthy_step_adds_only_the_norm_the_gather_and_the_fetch() -> None:
    """Without clipping, what a guarded step adds to the bare step is the decision's floor: a ``detach`` of
    the loss, one fused ``_foreach_norm``, one ``stack`` and the ``.tolist()`` (``resolve_conj`` and
    ``resolve_neg``): the spike and divergence tests run on the host."""
    from torch.profiler import ProfilerActivity, profile

    def top_level_ops(step: Callable[[], None]) -> collections.Counter[str]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        return collections.Counter(
            e.name for e in prof.events()
            if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        )

    x, y = _mlp_data()
    counts = []
    for guarded in (False, True):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        guard = Guard(model, opt) if guarded else None

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt, guard: Guard | None = guard) -> None:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[:32]), y[:32])
            loss.backward()
            guard.step(loss) if guard is not None else opt.step()

        for _ in range(20):  # past min_history: the spike test runs
            step()
        counts.append(top_level_ops(step))
    added = counts[1] - counts[0]
    assert added == collections.Counter(
        ["aten::detach", "aten::_foreach_norm", "aten::stack", "aten::resolve_conj", "aten::resolve_neg"]
    ), added
    assert not counts[0] - counts[1]  # and removes nothing


def test_guard_state_dict_round_trip() -> None:
    setup = nan_injected_gradients()
    guard = Guard(setup.model, setup.optimizer, rollback_after=2)
    train(setup, 60, guard)
    state = guard.state_dict()
    other = Guard(setup.model, setup.optimizer, rollback_after=2)
    other.load_state_dict(state)
    _assert_bit_equal(other.state_dict(), state, "guard")
    assert other.lr_factor == guard.lr_factor and other.skipped == guard.skipped > 0


def test_load_state_dict_mid_run_continues_exactly_as_without_saving() -> None:
    """Save a guard mid-run (after a rollback: LR factor below 1, rescue engaged, full windows), rebuild the
    model, optimizer and guard in a fresh set of objects, load, and continue both on the same batches with
    one-off non-finite skips: parameters, counters and events must agree bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, rollback_after=2, snapshot_every=7)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)) for _ in range(90)]

    def step(m: nn.Module, o: torch.optim.Optimizer, gd: Guard, i: int) -> bool:
        x, y = data[i]
        o.zero_grad()
        loss = nn.functional.mse_loss(m(x), y)
        loss.backward()
        return gd.step(loss * math.nan if i in (20, 21, 50, 70) else loss)

    for i in range(40):
        step(model, opt, guard, i)
    assert guard.rollbacks == 1 and guard.lr_factor < 1 and guard.rescue_engaged  # the state is not trivial
    torch.save(guard.state_dict(), buf := __import__("io").BytesIO())
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain values only: a weights_only checkpoint reads it
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict keeps the tensors it is given
    guard2 = Guard(model2, opt2, rollback_after=2, snapshot_every=7)
    guard2.load_state_dict(saved)
    for i in range(40, 90):
        assert step(model, opt, guard, i) == step(model2, opt2, guard2, i), i
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert guard.summary() == guard2.summary() and guard.skipped >= 3
    assert [repr(e) for e in guard.events] == [repr(e) for e in guard2.events]  # repr: NaN numbers compare unequal
    _assert_bit_equal(guard2.state_dict(), guard.state_dict(), "guard")


def test_host_spike_test_agrees_with_the_device_rule() -> None:
    """The Guard's windows live on the host; its test must give the decisions and z-scores of
    ``SpikeRule.test`` on a device ``Window`` holding the same values (the shared definition)."""
    from gradguard.stats.windows import SpikeRule, Window

    g = torch.Generator().manual_seed(0)
    rule = SpikeRule()
    for trial in range(40):
        size = [16, 31, 128][trial % 3]
        pushes = size + trial * 5
        series = torch.exp(torch.randn(pushes, 2, generator=g, dtype=torch.float64) * (0.05 + trial / 40))
        model = nn.Linear(1, 1)
        guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), window=size, min_history=16)
        device_window = Window(size, rows=2, dtype=torch.float64)
        for row in series:
            guard._windows.push(row.tolist())
            device_window.push(row)
        held = min(pushes, size)
        limit = rule.threshold(held)
        last = series[-8:].amax(0)
        current = last * torch.tensor([1.0 + trial / 10, 3.0 - trial / 20], dtype=torch.float64)
        spike, z, med = rule.test(current, device_window, limit)
        for r in range(2):
            m, mad = guard._windows.median_mad(r)
            top = guard._windows.recent_max(r, rule.recent)
            host_spike, host_z = rule.judge(float(current[r]), m, mad, top, limit)
            assert host_spike == bool(spike[r]) and m == float(med[r]), (trial, r)
            assert math.isclose(host_z, float(z[r]), rel_tol=1e-12), (trial, r)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.LBFGS(ps, lr=0.5),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=False),
    ],
    ids=["lbfgs-closure", "rmsprop", "adagrad", "adamw"],
)
def test_works_with_other_optimizers(make_opt: Callable[[Any], torch.optim.Optimizer]) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = x @ torch.randn(5, 1)
    model = nn.Linear(5, 1)
    opt = make_opt(model.parameters())
    guard = Guard(model, opt)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(30):
        loss = closure()
        assert guard.step(loss, closure)
    assert float(closure().detach()) < 0.5 * first


# --------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_clearly() -> None:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(InputError, match="optimizer"):
        Guard(model, "sgd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs a threshold"):
        Guard(model, opt, clip="norm")
    with pytest.raises(ConfigError, match="choose one of"):
        Guard(model, opt, clip="clippy")
    with pytest.raises(ConfigError, match="backoff"):
        Guard(model, opt, backoff=1.5)
    with pytest.raises(ConfigError, match="spike_z"):
        Guard(model, opt, spike_z=-1)
    with pytest.raises(InputError, match="report"):
        Guard(model, opt, monitor=object())
    guard = Guard(model, opt)
    with pytest.raises(InputError, match="loss"):
        guard.step(1.0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"scalar tensor \(1 element\), got shape \(3,\)"):
        guard.step(torch.ones(3))  # a per-sample loss not reduced: a bad input, as in Monitor.step and probe
    with pytest.raises(InputError, match="scalar"):
        guard.record_loss(torch.ones(2, 2))


# ------------------------------------------------------------------ campaign regressions: snapshots, windows
def _stepper(model: nn.Module, opt: torch.optim.Optimizer, guard: Guard) -> Callable[..., bool]:
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)) for _ in range(8)]
    count = itertools.count()

    def one(poison: bool = False, scale: float = 1.0) -> bool:
        x, y = data[next(count) % len(data)]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y * scale)
        loss.backward()
        return guard.step(loss * math.nan if poison else loss)

    return one


def test_snapshot_is_committed_only_after_the_next_step_is_healthy() -> None:
    """A periodic snapshot taken right after a bad but finite update must never become the rollback target.

    Regression: the campaign's lr_jump runs rolled back to a snapshot taken right after the 100× update.
    Here the update that precedes the 10th snapshot is made destructive (the learning rate ×1e3 for that
    step), the next steps fail, and the rollback must land on the previous, committed snapshot.
    """
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, clip=None, snapshot_every=5)
    one = _stepper(model, opt, guard)
    for _ in range(5):
        assert one()
    assert guard.candidate_step == 5 and guard.snapshot_step == 0
    candidate = copy.deepcopy(dict(model.state_dict()))
    assert one()  # step 5 is healthy: the state after update 4 becomes the rollback target
    assert guard.candidate_step is None and guard.snapshot_step == 5
    for _ in range(3):
        assert one()
    opt.param_groups[0]["lr"] = 10.0  # a schedule bug on the update that precedes the next snapshot
    assert one()
    opt.param_groups[0]["lr"] = 1e-2
    assert guard.candidate_step == 10
    damaged = copy.deepcopy(dict(model.state_dict()))
    for _ in range(guard.rollback_after):  # the damaged state fails every batch (NaN stands for "fails")
        assert not one(poison=True)
    assert guard.rollbacks == 1 and guard.candidate_step is None and guard.snapshot_step == 5
    for k, t in model.state_dict().items():
        assert torch.equal(t, candidate[k]), k
    assert not torch.equal(model.state_dict()["body.0.weight"], damaged["body.0.weight"])


def test_guard_still_judges_spikes_right_after_rolling_back_to_the_start() -> None:
    """Regression: the windows used to be restored with the construction snapshot, i.e. emptied, so after a
    rollback to step 0 the guard applied anything finite for min_history steps."""
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, clip=None, snapshot_every=1000)
    one = _stepper(model, opt, guard)
    for _ in range(40):
        assert one()
    for _ in range(guard.rollback_after):
        assert not one(poison=True)
    assert guard.rollbacks == 1 and guard.snapshot_step == 0
    assert not one(scale=1e3), "an outlier batch right after the rollback must be skipped"
    assert guard.events[-1].reason == "loss_spike"
    assert one(), "and ordinary batches applied"


def test_spike_threshold_is_the_student_t_equivalent_of_spike_z() -> None:
    stats = pytest.importorskip("scipy.stats")
    from gradguard.stats import spike_threshold

    # 0.3675: the asymptotic efficiency of the MAD against the standard deviation for Gaussian data
    # (variance 1.3605·σ²/n against σ²/(2n)), i.e. the degrees of freedom a MAD of n points is worth per point.
    for z in (3.0, 6.0):
        for n in (2, 16, 40, 128, 5000):
            nu = max(1.0, 0.3675 * (n - 1))
            ref = math.sqrt(1 + math.pi / (2 * n)) * stats.t.isf(stats.norm.sf(z), nu)
            assert spike_threshold(z, n) == pytest.approx(ref, rel=1e-7), (z, n)
    assert spike_threshold(6.0, 16) > 70 and 7 < spike_threshold(6.0, 128) < 8
    assert spike_threshold(6.0, 10**8) == pytest.approx(6.0, rel=1e-3)
    # A rarity no finite z-score reaches with so few values (erfc underflows past z ≈ 37): never a spike.
    assert spike_threshold(50.0, 4) == math.inf and spike_threshold(1e9, 128) == math.inf
    assert math.isfinite(spike_threshold(40.0, 128))
    Guard(nn.Linear(2, 1), torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), spike_z=1e9, min_history=2)


# The first 16 gradient norms of the campaign's clean CNN run (seed 1) and its steps 16, 21-23: the network
# leaving its initial plateau. The 16 values cluster (MAD 0.02 for a spread of std 0.07), so the old rule
# saw z = 7.7 and skipped six healthy steps, rolled back to step 0 and halved the LR (final loss 2× worse).
CLEAN_CNN_NORMS = [0.536, 0.451, 0.431, 0.422, 0.431, 0.559, 0.467, 0.319, 0.429, 0.434, 0.448, 0.346, 0.548,
                   0.441, 0.584, 0.491]


def _norm_driven_guard(window: list[float], **options: Any) -> tuple[Guard, Callable[[float], bool]]:
    """A guard fed gradients of chosen norms (learning rate 0: the state never moves)."""
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=0.0)
    options.setdefault("spikes", ("loss", "grad_norm"))
    guard = Guard(nn.ParameterList([p]), opt, clip=None, **options)

    def feed(norm: float) -> bool:
        p.grad = torch.full((4,), norm / 2.0)  # ‖g‖ = 2 · entry
        return guard.step(torch.tensor(1.0))

    for v in window:
        assert feed(v)
    return guard, feed


def test_early_gradient_rise_on_a_short_clustered_window_is_not_a_spike() -> None:
    from gradguard.stats import robust_zscore

    z_old = float(robust_zscore(torch.tensor(0.65), torch.tensor(CLEAN_CNN_NORMS)))
    assert z_old > 6, "the old rule (z > 6 on 16 values) would skip this step"
    _, feed = _norm_driven_guard(CLEAN_CNN_NORMS)
    assert all(feed(v) for v in (0.65, 0.794, 0.842, 1.028))
    # ... while a real spike on the same short window is still skipped,
    guard, feed = _norm_driven_guard(CLEAN_CNN_NORMS)
    assert not feed(20.0) and guard.events[-1].reason == "grad_spike"
    # and with a full window of the same distribution the threshold approaches spike_z again.
    rng = torch.Generator().manual_seed(0)
    history = (0.45 + 0.07 * torch.randn(128, generator=rng)).tolist()
    guard, feed = _norm_driven_guard(history)
    assert not feed(0.45 + 0.07 * 1.4826 * 12)


def test_a_steady_climb_is_not_a_spike_but_a_jump_from_it_is() -> None:
    """A deep net leaving a plateau raises its gradient norm many-fold over a few dozen steps (measured:
    0.0016 → 0.017 for a 20-layer ReLU MLP with Adam between steps 140 and 163). Against a quiet 128-step
    window every step of the climb is a many-MAD outlier, so the z-score alone skipped healthy steps and
    rolled back; the climb must be applied, and a sudden jump on top of it still skipped."""
    rng = torch.Generator().manual_seed(0)
    quiet = (0.002 * (1 + 0.1 * torch.randn(128, generator=rng))).tolist()
    climb = [quiet[-1] * 1.08**k for k in range(1, 41)]  # 1.08× per step: 22× in 40 steps
    # Without the jump margin (spike_jump=1: above the recent maximum is enough, which every step of a
    # climb is) the z-score rule alone skips the climb and rolls back.
    old, feed_old = _norm_driven_guard(quiet, spike_jump=1.0)
    assert not all([feed_old(v) for v in climb])
    assert any(e.action == "rollback" for e in old.events)
    guard, feed = _norm_driven_guard(quiet)
    assert all(feed(v) for v in climb), [(e.step, e.reason) for e in guard.events]
    assert not [e for e in guard.events if e.action in ("skip", "rollback")]
    top = max(climb)
    assert not feed(top * 10) and guard.events[-1].reason == "grad_spike"
    assert not feed(top * 10), "skipped values are not pushed: the reference stays below the jump"
    assert feed(top * 1.05), "back to the climb's level: applied"
