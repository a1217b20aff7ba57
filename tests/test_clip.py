"""Clipping policies against PyTorch, the zclip and autoclip packages, and naive references (the papers' rules)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

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
    assert float(result.value_limit) == 0.5
    assert math.isinf(float(result.norm_limit)) and math.isinf(float(result.ratio_limit))


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


def _global_norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors])))


def test_agc_reports_global_norms_and_its_ratio() -> None:
    params = _params()
    before = _global_norm(_grads(params))
    result = clip.AGC(0.05)(params)
    # float32 sums of ~100 values, combined from unit norms rather than in one pass: a few ulps apart.
    assert float(result.norm_before) == pytest.approx(before, rel=1e-5)
    assert float(result.norm_after) == pytest.approx(_global_norm(_grads(params)), rel=1e-5)
    assert float(result.ratio_limit) == pytest.approx(0.05, rel=1e-7)  # λ held as a float32 tensor
    assert math.isinf(float(result.norm_limit))


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
def test_zclip_limits_match_package(options: dict) -> None:
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
        # The package computes in Python floats (float64), ours in float64 on the device: equal to rounding.
        assert _rel_equal(float(result.norm_limit), expected), (t, float(result.norm_limit), expected)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    assert spikes >= 3, "the stream must exercise the spike branch"
    assert _rel_equal(float(policy.mean), ref.mean) and _rel_equal(float(policy.var), ref.var)  # type: ignore[arg-type]


def test_zclip_ignores_a_nonfinite_norm_in_its_statistics() -> None:
    model = _model()
    policy = clip.ZClip(warmup_steps=5, max_grad_norm=None)
    for grads in _stream(10):
        _set(model, grads)
        policy(model.parameters())
    mean, var = float(policy.mean), float(policy.var)  # type: ignore[arg-type]
    _set(model, [torch.full((6, 4), math.nan), torch.zeros(6)])
    result = policy(model.parameters())
    assert bool(result.clipped), "a NaN norm cannot be bounded: it must read as clipped"
    assert (float(policy.mean), float(policy.var)) == (mean, var)  # type: ignore[arg-type]


@pytest.mark.parametrize("global_threshold", [True, False])
def test_quantile_clip_matches_autoclip_package(global_threshold: bool) -> None:
    autoclip_torch = pytest.importorskip("autoclip.torch")
    theirs, ours = _model(), _model()
    ref = autoclip_torch.QuantileClip(
        theirs.parameters(), quantile=0.8, history_length=50, global_threshold=global_threshold
    )
    policy = clip.AutoClip.quantile_clip(0.8, history_length=50, global_threshold=global_threshold)
    field = "norm_limit" if global_threshold else "tensor_norm_limit"
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
        # Same float32 values, interpolated in float32 by both: equal up to one rounding of the lerp.
        assert _rel_equal(float(getattr(result, field)), max(expected)), (t, float(getattr(result, field)), expected)
        clipped += bool(result.clipped)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    assert clipped > 20


def _naive_quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default, Hyndman & Fan type 7), by hand;
    an infinite upper neighbour gives inf (a non-finite norm is a huge norm, never NaN)."""
    xs = sorted(values)
    h = q * (len(xs) - 1)
    lo = math.floor(h)
    if h == lo:
        return xs[lo]
    if math.isinf(xs[lo + 1]):
        return math.inf
    return xs[lo] + (h - lo) * (xs[lo + 1] - xs[lo])


def test_autoclip_paper_rule_matches_numpy_reference() -> None:
    model = _model()
    policy = clip.AutoClip(0.1)
    history: list[float] = []
    for grads in _stream():
        _set(model, grads)
        history.append(_global_norm(grads))
        expected = float(np.quantile(history, 0.1))
        result = policy(model.parameters())
        # norms are float32 on our side, float64 in numpy: agreement to float32 precision.
        assert _rel_equal(float(result.norm_limit), expected, 1e-5)
        assert _global_norm(_grads(list(model.parameters()))) <= expected * (1 + 1e-5)


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("include_current", [True, False])
def test_bounded_history_quantile_matches_naive_reference_with_infinite_norms(q: float, include_current: bool) -> None:
    """Ring of 50 norms over 120 steps (it wraps), with ties and non-finite norms (NaN and inf count as +inf)."""
    p = nn.Parameter(torch.zeros(3))
    policy = clip.AutoClip(q, history=50, include_current=include_current)
    g = torch.Generator().manual_seed(5)
    seen: list[float] = []
    for step in range(120):
        norm = round(float(torch.rand((), generator=g)) * 10) / 2  # 11 distinct values, 0 included: many ties
        bad = {3: math.inf, 20: math.nan, 21: math.inf}.get(step % 23)
        p.grad = torch.tensor([norm if bad is None else bad, 0.0, 0.0])
        held = norm if bad is None else math.inf
        window = [*seen[-49:], held] if include_current else seen[-50:]
        expected = _naive_quantile(window, q) if window else math.inf
        result = policy([p])
        seen.append(held)
        # halves are exact in float32; one float32 lerp: within 1e-6 relative.
        assert _rel_equal(float(result.norm_limit), expected), (step, float(result.norm_limit), expected)


def test_autoclip_per_tensor_limits_each_tensor_by_its_own_history() -> None:
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))]
    policy = clip.AutoClip(0.5, history=4, per="tensor")
    histories: list[list[float]] = [[], []]
    for v in [1.0, 2.0, 3.0, 4.0, 9.0]:
        for k, p in enumerate(params):
            p.grad = torch.tensor([v * (k + 1), 0.0] + [0.0] * k)
            histories[k].append(v * (k + 1))
        result = policy(params)
    limits = [_naive_quantile(h[-4:], 0.5) for h in histories]  # medians of (2, 3, 4, 9) and (4, 6, 8, 18)
    assert float(result.tensor_norm_limit) == pytest.approx(max(limits), rel=1e-6)
    for p, limit in zip(params, limits, strict=True):
        assert float(p.grad.norm()) == pytest.approx(limit, rel=1e-5)  # type: ignore[union-attr]


def _result_fields(result: clip.ClipResult) -> list[torch.Tensor]:
    return [t.clone() for t in result]


@pytest.mark.parametrize(
    "make",
    [
        lambda: clip.ZClip(warmup_steps=5),
        lambda: clip.AutoClip(0.3, history=8),
        lambda: clip.AutoClip(0.9),
        lambda: clip.AutoClip.quantile_clip(0.7, history_length=8),
        lambda: clip.AGC(0.02),
        lambda: clip.ClipNorm(2.0),
        lambda: clip.ClipValue(0.5),
    ],
    ids=["zclip", "autoclip-bounded", "autoclip-unbounded", "quantileclip", "agc", "norm", "value"],
)
def test_state_dict_round_trip_mid_run_continues_identically(make: Callable[[], clip.ClipPolicy]) -> None:
    """Save after 20 steps, load into a fresh policy: its next 20 steps clip exactly as the original's."""
    stream = _stream(40, seed=3)
    model, twin = _model(), _model()
    twin.load_state_dict(model.state_dict())
    policy = make()
    for grads in stream[:20]:
        _set(model, grads)
        policy(model.parameters())
    buffer = io.BytesIO()
    torch.save(policy.state_dict(), buffer)  # through bytes: the state must be plain values and tensors
    restored = make()
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for grads in stream[20:]:
        _set(model, grads)
        _set(twin, grads)
        ours, theirs = policy(model.parameters()), restored(twin.parameters())
        for a, b in zip(_result_fields(ours), _result_fields(theirs), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)


def test_state_dict_holds_state_not_options() -> None:
    assert clip.ClipNorm(1.0).state_dict() == {}
    assert clip.ClipValue(1.0).state_dict() == {}
    assert clip.AGC(0.01).state_dict() == {}
    assert set(clip.AutoClip(0.2, history=5).state_dict()) == {"norms"}
    assert set(clip.ZClip().state_dict()) == {"steps", "warmup", "mean", "var"}


def test_result_has_one_field_per_kind_of_limit() -> None:
    cases = {
        "norm_limit": clip.ClipNorm(0.5),
        "tensor_norm_limit": clip.ClipNorm(0.5, per="tensor"),
        "value_limit": clip.ClipValue(0.5),
        "ratio_limit": clip.AGC(0.5),
    }
    for field, policy in cases.items():
        result = policy(_params())
        assert all(isinstance(t, torch.Tensor) and t.ndim == 0 for t in result)
        for other in ("norm_limit", "tensor_norm_limit", "value_limit", "ratio_limit"):
            value = float(getattr(result, other))
            assert value == 0.5 if other == field else math.isinf(value), (field, other, value)


def test_deprecated_threshold_is_the_limit_the_policy_set() -> None:
    result = clip.ClipNorm(0.5)(_params())
    with pytest.warns(DeprecationWarning, match="norm_limit"):
        assert torch.equal(result.threshold, result.norm_limit)
    result = clip.ClipValue(0.25)(_params())
    with pytest.warns(DeprecationWarning, match="value_limit"):
        assert float(result.threshold) == 0.25


def test_deprecated_percentile_is_quantile_times_100() -> None:
    stream = _stream(30)
    with pytest.warns(DeprecationWarning, match="quantile=p/100"):
        old = clip.AutoClip(percentile=30)
    new, a, b = clip.AutoClip(0.3), _model(), _model()
    with pytest.warns(DeprecationWarning, match="AutoClip.quantile"):
        assert old.percentile == pytest.approx(30.0)
    for grads in stream:
        _set(a, grads)
        _set(b, grads)
        assert torch.equal(old(a.parameters()).norm_limit, new(b.parameters()).norm_limit)


def test_deprecated_agc_clip_factor_is_max_ratio() -> None:
    with pytest.warns(DeprecationWarning, match="max_ratio"):
        old = clip.AGC(clip_factor=0.05)
    with pytest.warns(DeprecationWarning, match="max_ratio"):
        assert old.clip_factor == 0.05
    ours, ref = _params(), _params()
    old(ours)
    clip.AGC(0.05)(ref)
    for a, b in zip(_grads(ours), _grads(ref), strict=True):
        assert torch.equal(a, b)


def test_optional_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        clip.ClipNorm(1.0, 2.0)  # type: ignore[misc]
    with pytest.raises(TypeError):
        clip.AutoClip(0.1, 100)  # type: ignore[misc]
    with pytest.raises(TypeError):
        clip.AGC(0.01, 1e-3)  # type: ignore[misc]
    with pytest.raises(TypeError):
        clip.ZClip(0.97)  # type: ignore[misc]


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="max_norm"):
        clip.ClipNorm(-1.0)
    with pytest.raises(ConfigError, match="clip_value"):
        clip.ClipValue(-0.5)
    with pytest.raises(ConfigError, match=r"quantile=10 is out of range; allowed: \[0.0, 1.0\]"):
        clip.AutoClip(10)
    with pytest.raises(ConfigError, match="max_ratio"):
        clip.AGC(0.0)
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
        result = policy(_params())
        assert all(isinstance(t, torch.Tensor) and t.ndim == 0 for t in result)
