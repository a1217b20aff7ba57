"""Clipping policies against PyTorch, the zclip and autoclip packages, and naive re-implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradguard import clip
from gradguard.errors import ConfigError, InputError

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


def _params(seed: int = 0, poison: str | None = None) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,)]
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g) * 3.0
        params.append(p)
    if poison == "nan":
        params[0].grad[1, 2] = math.nan  # type: ignore[index]
    elif poison == "inf":
        params[2].grad[0, 1, 1] = math.inf  # type: ignore[index]
    return params


def _clone(params: list[nn.Parameter]) -> list[nn.Parameter]:
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()  # type: ignore[union-attr]
        out.append(q)
    return out


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params]  # type: ignore[misc]


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("poison", [None, "nan", "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clipnorm_global_matches_torch(norm_type: float, poison: str | None, max_norm: float) -> None:
    ours = _params(poison=poison)
    ref = _clone(ours)
    result = clip.ClipNorm(max_norm, norm_type=norm_type)(ours)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type)
    torch.testing.assert_close(result.norm_before, ref_norm, rtol=1e-6, atol=0, equal_nan=True)
    for a, b in zip(_grads(ours), _grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("poison", [None, "nan", "inf"])
def test_clipvalue_matches_torch(poison: str | None) -> None:
    ours = _params(poison=poison)
    ref = _clone(ours)
    result = clip.ClipValue(0.5)(ours)
    torch.nn.utils.clip_grad_value_(ref, 0.5)
    for a, b in zip(_grads(ours), _grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert bool(result.clipped)
    assert float(result.threshold) == 0.5


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clipnorm_per_tensor_matches_loop(norm_type: float) -> None:
    ours = _params()
    ref = _clone(ours)
    result = clip.ClipNorm(1.0, norm_type=norm_type, per="tensor")(ours)
    for p in ref:
        torch.nn.utils.clip_grad_norm_([p], 1.0, norm_type=norm_type)
    for a, b in zip(_grads(ours), _grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    per_after = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in _grads(ours)])
    assert torch.all(per_after <= 1.0 + 1e-5)
    assert bool(result.clipped)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("c", [0.1, 2.0])
def test_clipnorm_invariants(norm_type: float, c: float) -> None:
    params = _params()
    policy = clip.ClipNorm(c, norm_type=norm_type)
    first = policy(params)
    actual = torch.linalg.vector_norm(torch.cat([g.flatten() for g in _grads(params)]), norm_type)
    torch.testing.assert_close(actual, torch.tensor(c), rtol=1e-5, atol=0)
    torch.testing.assert_close(first.norm_after, actual, rtol=1e-5, atol=0)
    snapshot = [g.clone() for g in _grads(params)]
    policy(params)
    # After the first clip the norm is c up to float rounding; if rounding lands it a hair above c the
    # second clip scales by c / (c + ulp + 1e-6): a change bounded by 1e-6 / c plus rounding, no more.
    for a, b in zip(_grads(params), snapshot, strict=True):
        torch.testing.assert_close(a, b, rtol=clip.NORM_EPS / c + 1e-6, atol=0)


@pytest.mark.parametrize(
    "policy",
    [clip.ClipValue(0.3), clip.ClipNorm(0.7, per="tensor"), clip.AGC(0.05)],
    ids=["value", "norm-tensor", "agc"],
)
def test_clipping_twice_changes_nothing(policy: clip.ClipPolicy) -> None:
    params = _params()
    policy(params)
    snapshot = [g.clone() for g in _grads(params)]
    policy(params)
    for a, b in zip(_grads(params), snapshot, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0)


def _naive_agc(params: list[nn.Parameter], factor: float, eps: float) -> None:
    for p in params:
        g = p.grad
        assert g is not None
        if p.ndim <= 1:
            wn = max(p.detach().norm().item(), eps)
            gn = g.norm().item()
            if gn / wn > factor:
                g.mul_(factor * wn / gn)
            continue
        for i in range(p.shape[0]):
            wn = max(p.detach()[i].norm().item(), eps)
            gn = g[i].norm().item()
            if gn / wn > factor:
                g[i].mul_(factor * wn / gn)


def test_agc_matches_naive_unit_loop() -> None:
    ours = _params()
    conv = nn.Conv2d(3, 4, 3)
    conv.weight.grad = torch.randn_like(conv.weight)
    conv.weight.data[1] = 0.0  # a dead filter: the eps floor decides its limit
    ours.append(conv.weight)
    ref = _clone(ours)
    result = clip.AGC(0.05, eps=1e-3)(ours)
    _naive_agc(ref, 0.05, 1e-3)
    for a, b in zip(_grads(ours), _grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert bool(result.clipped)


def test_agc_excludes_head() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model(torch.randn(5, 4)).pow(2).sum().mul(100).backward()
    head_grad = model[2].weight.grad.clone()  # type: ignore[union-attr]
    body_grad = model[0].weight.grad.clone()  # type: ignore[union-attr]
    clip.AGC(0.01, exclude=[model[2]])(model.parameters())
    assert torch.equal(model[2].weight.grad, head_grad)
    assert not torch.equal(model[0].weight.grad, body_grad)


def _stream(steps: int = 200, seed: int = 1) -> list[list[torch.Tensor]]:
    """Gradients whose global norm wanders log-normally with occasional 30× spikes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        scale = math.exp(0.5 * float(torch.randn((), generator=g)))
        if t % 37 == 36:
            scale *= 30.0
        out.append([torch.randn(6, 4, generator=g) * scale, torch.randn(6, generator=g) * scale * 0.3])
    return out


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6))


def _set(model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, gr in zip(model.parameters(), grads, strict=True):
        p.grad = gr.clone()


def _rel_equal(a: float, b: float, rtol: float = 1e-6) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(abs(a), abs(b))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_grad_norm": None},
        {"max_grad_norm": None, "clip_option": "mean", "skip_update_on_spike": True},
        {"max_grad_norm": 50.0, "mode": "percentile", "warmup_steps": 10},
    ],
    ids=["defaults", "no-cap", "mean-skip", "percentile"],
)
def test_zclip_thresholds_match_package(options: dict) -> None:
    zclip = pytest.importorskip("zclip")

    class Recorder(zclip.ZClip):  # type: ignore[misc, name-defined]
        def _apply_clipping(self, model, clip_val, total_norm):  # type: ignore[no-untyped-def]
            self.applied = clip_val
            return super()._apply_clipping(model, clip_val, total_norm)

    theirs, ours = _model(), _model()
    ref = Recorder(**options)
    policy = clip.ZClip(**options)
    cap = math.inf if options.get("max_grad_norm", 1.0) is None else options.get("max_grad_norm", 1.0)
    spikes = 0
    for t, grads in enumerate(_stream()):
        _set(theirs, grads)
        _set(ours, grads)
        ref.applied = "warmup"
        ref.step(theirs)
        result = policy(ours.parameters())
        if ref.applied == "warmup":
            expected = cap
        else:
            expected = min(math.inf if ref.applied is None else ref.applied, cap)
            spikes += ref.applied is not None
        assert _rel_equal(float(result.threshold), expected), (t, float(result.threshold), expected)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    assert spikes >= 3, "the stream must exercise the spike branch"
    assert _rel_equal(float(policy.mean), ref.mean) and _rel_equal(float(policy.var), ref.var)  # type: ignore[arg-type]


@pytest.mark.parametrize("global_threshold", [True, False])
def test_quantile_clip_matches_autoclip_package(global_threshold: bool) -> None:
    autoclip_torch = pytest.importorskip("autoclip.torch")
    theirs, ours = _model(), _model()
    ref = autoclip_torch.QuantileClip(
        theirs.parameters(), quantile=0.8, history_length=50, global_threshold=global_threshold
    )
    policy = clip.AutoClip.quantile_clip(quantile=0.8, history_length=50, global_threshold=global_threshold)
    clipped = 0
    for t, grads in enumerate(_stream()):
        _set(theirs, grads)
        _set(ours, grads)
        if global_threshold:
            hist = ref.state["global_history"]
            expected = [math.inf if len(hist) == 0 else float(torch.quantile(hist, 0.8))]
        else:
            expected = []
            for p in theirs.parameters():
                hist = ref.state[p].get("history")
                expected.append(math.inf if hist is None else float(torch.quantile(hist, 0.8)))
        ref.step()
        result = policy(ours.parameters())
        assert _rel_equal(float(result.threshold), max(expected)), (t, float(result.threshold), expected)
        clipped += bool(result.clipped)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    assert clipped > 20


def test_autoclip_paper_rule_matches_numpy_reference() -> None:
    model = _model()
    policy = clip.AutoClip(percentile=10)
    history: list[float] = []
    for grads in _stream():
        _set(model, grads)
        norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
        history.append(norm)
        expected = float(np.percentile(history, 10))
        result = policy(model.parameters())
        assert _rel_equal(float(result.threshold), expected, 1e-5)
        after = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])))
        assert after <= expected * (1 + 1e-5)


def test_autoclip_bounded_history_and_nonfinite() -> None:
    p = nn.Parameter(torch.zeros(3))
    policy = clip.AutoClip(percentile=50, history=4)
    for v in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]:
        p.grad = torch.tensor([v, 0.0, 0.0])
        result = policy([p])
    assert float(result.threshold) == pytest.approx(4.5)  # median of the last four: 3, 4, 5, 6
    p.grad = torch.tensor([math.nan, 0.0, 0.0])
    policy([p])
    p.grad = torch.tensor([100.0, 0.0, 0.0])
    result = policy([p])
    # the NaN norm is held as +inf: the median of {inf, 100, 5, 6} is between 6 and 100, still finite
    assert float(result.threshold) == pytest.approx(53.0), "a NaN norm must not poison the history"
    for _ in range(3):
        p.grad = torch.tensor([math.inf, 0.0, 0.0])
        result = policy([p])
    assert not math.isnan(float(result.threshold)), "two infinite neighbours must not interpolate to NaN"


@pytest.mark.parametrize(
    "policy",
    [clip.ZClip(warmup_steps=5), clip.AutoClip(history=8), clip.AutoClip.quantile_clip(history_length=8)],
    ids=["zclip", "autoclip", "quantileclip"],
)
def test_state_dict_round_trip_reproduces_thresholds(policy: clip.ClipPolicy) -> None:
    stream = _stream(40, seed=3)
    model = _model()
    for grads in stream[:20]:
        _set(model, grads)
        policy(model.parameters())
    state = policy.state_dict()
    first = []
    for grads in stream[20:]:
        _set(model, grads)
        first.append(float(policy(model.parameters()).threshold))
    policy.load_state_dict(state)
    second = []
    for grads in stream[20:]:
        _set(model, grads)
        second.append(float(policy(model.parameters()).threshold))
    assert first == second


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="max_norm"):
        clip.ClipNorm(-1.0)
    with pytest.raises(ConfigError, match="clip_value"):
        clip.ClipValue(-0.5)
    with pytest.raises(ConfigError, match="percentile"):
        clip.AutoClip(percentile=101)
    with pytest.raises(ConfigError, match="percentile"):
        clip.AutoClip(percentile=-1)
    with pytest.raises(ConfigError, match="per"):
        clip.ClipNorm(1.0, per="layer")
    with pytest.raises(ConfigError, match="norm_type"):
        clip.ClipNorm(1.0, norm_type=-2)
    with pytest.raises(ConfigError, match="choose one of"):
        clip.make_policy("clipper")
    model = _model()
    gen = model.parameters()
    list(gen)
    with pytest.raises(ConfigError, match="only once"):
        clip.ClipNorm(1.0)(gen)
    with pytest.raises(InputError):
        clip.ClipNorm(1.0)([1.0, 2.0])  # type: ignore[list-item]


def test_registry_builds_every_policy() -> None:
    required = {"value": {"clip_value": 1.0}, "norm": {"max_norm": 1.0}}
    for name, info in clip.POLICIES.items():
        policy = clip.make_policy(name, **required.get(name, {}))
        assert policy.name == name == info.name
        params = _params()
        result = policy(params)
        assert all(isinstance(t, torch.Tensor) and t.ndim == 0 for t in result)


@pytest.mark.parametrize("incremental", [False, True], ids=["selection", "incremental"])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_history_quantile_by_selection_equals_torch_quantile(
    q: float, incremental: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The history's quantile selects two order statistics instead of sorting (or, on a full ring, updates
    them from the last call's); it must equal torch.quantile (linear interpolation) on every fill level,
    including after the ring wraps and with +inf entries."""
    if incremental:
        monkeypatch.setattr(clip, "_INCREMENTAL_MIN", 1)
    hist = clip._History(capacity=50)
    g = torch.Generator().manual_seed(5)
    rows = []
    for step in range(120):
        row = torch.rand(7, generator=g) * 10
        if step % 17 == 3:
            row[2] = math.inf
        hist.push(row)
        rows.append(row)
        window = torch.stack(rows[-50:])
        finite_ref = torch.quantile(window, q, dim=0)
        ours = hist.quantile(q)
        # torch.quantile gives NaN next to an inf neighbour (inf − inf); the threshold must be inf there
        ref = torch.where(finite_ref.isnan(), math.inf, finite_ref)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


def test_incremental_order_statistics_equal_selection_with_ties() -> None:
    """On a full ring the lower order statistic is updated from the last call's (one replaced value per
    column moves every rank by at most one). With heavy ties, zeros and held infinities — where a rank
    argument could slip — it must stay bit-identical to selecting afresh, every call for 3000 calls."""
    cols, slots, q = 9, 500, 0.9  # 4500 values: above the threshold for the incremental update
    assert cols * slots >= clip._INCREMENTAL_MIN
    hist = clip._History(capacity=slots)
    g = torch.Generator().manual_seed(11)
    incremental_calls = 0
    for step in range(3000):
        row = (torch.rand(cols, generator=g) * 4).round()  # only 0 … 4: every value is tied many times
        if step % 7 == 0:
            row[0] = math.inf
        if step % 5 == 0:
            row[1:4] = math.nan  # non-finite norms count as +inf
        before = hist._lower
        hist.push(row)
        ours = hist.quantile(q)
        if before is not None and before[0] == step and step >= slots:
            incremental_calls += 1
        held = hist.values[:, : min(step + 1, slots)]
        n = held.shape[1]
        pos = q * (n - 1)
        low, high = clip._order_stats(held, math.floor(pos), min(math.floor(pos) + 1, n - 1))
        if held.numel() >= clip._INCREMENTAL_MIN:
            assert hist._lower is not None and torch.equal(hist._lower[2], low), step
        expected = torch.where(high == clip._HELD_INF, math.inf, torch.lerp(low, high, pos - math.floor(pos)))
        assert torch.equal(ours, expected), step
    assert incremental_calls == 3000 - slots
