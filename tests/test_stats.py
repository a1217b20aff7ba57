"""Every statistic against a naive per-tensor reference."""

import math

import pytest
import torch
from torch import nn

from gradguard.stats import (
    RingBuffer,
    Window,
    activation_summary,
    nonfinite_counts,
    robust_zscore,
    saturation_kind,
    tensor_norms,
    total_norm,
    unit_activity,
)


def _tensors() -> list[torch.Tensor]:
    return [torch.randn(7, 3), torch.randn(11) * 100, torch.randn(2, 3, 4) * 1e-4, torch.zeros(5)]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf, 0.0])
def test_tensor_norms_match_naive(p: float) -> None:
    ts = _tensors()
    got = tensor_norms(ts, p)
    want = torch.stack([torch.linalg.vector_norm(t.reshape(-1), p) for t in ts])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_total_norm_matches_concatenation(p: float) -> None:
    ts = _tensors()
    got = total_norm(tensor_norms(ts, p), p)
    want = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in ts]), p)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_total_norm_matches_torch_clip_grad_norm() -> None:
    params = [nn.Parameter(t.clone()) for t in _tensors()]
    for p in params:
        p.grad = torch.randn_like(p)
    norms = tensor_norms([p.grad for p in params if p.grad is not None])
    want = torch.nn.utils.clip_grad_norm_(params, max_norm=1e9)
    torch.testing.assert_close(total_norm(norms), want, rtol=1e-6, atol=0)


def test_nonfinite_counts_match_naive() -> None:
    a = torch.tensor([1.0, float("nan"), 3.0, float("-inf")])
    b = torch.randn(4, 4)
    b[1, 2] = float("inf")
    c = torch.randn(3)
    got = nonfinite_counts([a, b, c])
    want = torch.tensor([float((~t.isfinite()).sum()) for t in (a, b, c)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_activation_summary_matches_naive() -> None:
    x = torch.tanh(torch.randn(64, 32) * 3)
    x[0, 0] = 0.0
    got = activation_summary(x, "tanh")
    want = torch.tensor(
        [
            x.mean().item(),
            x.std(unbiased=False).item(),
            (x == 0).float().mean().item(),
            (x.abs() > 0.99).float().mean().item(),
            0.0,
            float(x.numel()),
        ]
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_activation_summary_ignores_nonfinite_for_scale() -> None:
    x = torch.tensor([1.0, 3.0, float("nan"), float("inf")])
    mean, std, _, _, nonfinite, numel = activation_summary(x).tolist()
    assert (nonfinite, numel) == (2.0, 4.0)
    assert (mean, std) == pytest.approx((2.0, 1.0), rel=1e-6)


def test_activation_summary_std_of_huge_outputs_is_finite() -> None:
    """A float32 square overflows beyond 1.8e19: the std of a blowing-up layer must still be measured."""
    x = torch.tensor([1e20, -1e20, 3e20, -3e20])
    mean, std, *_ = activation_summary(x).tolist()
    want = x.double().std(unbiased=False).item()
    assert mean == pytest.approx(0.0, abs=1e13)
    assert std == pytest.approx(want, rel=1e-6)


def test_sigmoid_saturation_fraction() -> None:
    x = torch.tensor([0.001, 0.5, 0.995, 0.3])
    assert activation_summary(x, "sigmoid")[3].item() == pytest.approx(0.5)
    assert saturation_kind(nn.Sigmoid()) == "sigmoid"
    assert saturation_kind(nn.Tanh()) == "tanh"
    assert saturation_kind(nn.ReLU()) is None


def test_unit_activity_counts_positive_per_unit() -> None:
    x = torch.randn(5, 3, 4, 4)
    x[:, 1] = -1.0
    got = unit_activity(x, unit_dim=1)
    want = torch.tensor([float((x[:, c] > 0).sum()) for c in range(3)])
    torch.testing.assert_close(got, want)
    assert got[1].item() == 0


def test_robust_zscore_matches_numpy_median_mad() -> None:
    import numpy as np

    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0, float("nan")])
    z = robust_zscore(torch.tensor(10.0), w)
    finite = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    med = np.median(finite)
    mad = np.median(np.abs(finite - med))
    # torch.nanmedian returns the lower of the two middle values for even counts; here n is odd.
    assert z.item() == pytest.approx((10 - med) / (1.4826 * mad), rel=1e-5)


def test_window_stores_nan_for_nonfinite_and_wraps() -> None:
    buf = Window(3)
    for v in [1.0, float("inf"), 2.0, 3.0]:
        buf.push(torch.tensor(v))
    assert buf.count().tolist() == [2]
    assert sorted(x for x in buf.values[0].tolist() if not math.isnan(x)) == [2.0, 3.0]
    state = buf.state_dict()
    buf.push(torch.tensor(9.0))
    buf.load_state_dict(state)
    assert buf.pushes == 4


def test_ring_buffer_is_a_deprecated_alias_of_a_one_row_window() -> None:
    with pytest.warns(DeprecationWarning, match="Window"):
        buf = RingBuffer(4)
    assert isinstance(buf, Window) and buf.values.shape == (1, 4)


def test_spike_rule_against_a_naive_median_mad_reference() -> None:
    import numpy as np

    from gradguard.stats import SpikeRule, spike_threshold

    rng = np.random.default_rng(0)
    window = (1.0 + 0.1 * rng.standard_normal(64)).tolist()
    rule = SpikeRule()
    for x in (1.05, 1.5, 2.1, 3.0, 50.0):
        w = np.array(window)
        med = np.median(w)  # n even: torch.nanmedian takes the lower middle value, so compare loosely
        lo = np.sort(w)[len(w) // 2 - 1]
        mad = np.sort(np.abs(w - lo))[len(w) // 2 - 1]
        z = (x - lo) / (1.4826 * mad)
        naive = bool(z > spike_threshold(6.0, 64) and x > 1.1 * lo and x > 2 * max(window[-8:]))
        spike, zz, factor = rule.scan([x], window)[0]
        assert spike == naive, x
        assert zz == pytest.approx(z, rel=1e-6) and factor == pytest.approx(x / lo, rel=1e-9)
        assert abs(factor - x / med) < 0.05 * x
    assert not rule.scan([50.0], window[:15])[0][0], "fewer than min_history values: never a spike"
