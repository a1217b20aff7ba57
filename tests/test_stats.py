"""Every statistic against a naive per-tensor reference."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradguard.stats import (
    RingBuffer,
    Window,
    activation_summaries,
    activation_summary,
    is_recurrent,
    nonfinite_counts,
    robust_zscore,
    saturation_kind,
    tensor_norms,
    total_norm,
    unit_activity,
    unit_dim,
    unit_peak,
)
from gradguard.stats.foreach import by_device, local_norms


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


def _naive_summary(x: torch.Tensor, saturation: str | None) -> list[float]:
    """The summary fields computed entry by entry in float64 Python arithmetic."""
    values = [float(v) for v in x.reshape(-1).tolist()]
    finite = [v for v in values if math.isfinite(v)]
    n = max(len(finite), 1)
    mean = sum(finite) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / n)
    if saturation == "sigmoid":
        sat = sum(v < 0.01 or v > 0.99 for v in finite)
    elif saturation == "tanh":
        sat = sum(abs(v) > 0.99 for v in finite)
    else:
        sat = 0
    zeros = sum(v == 0 for v in values)
    return [mean, std, zeros / max(len(values), 1), sat / n, float(len(values) - len(finite)), float(len(values))]


#: (name, tensor, saturation kind): ordinary, sparse, saturating, non-finite, empty and beyond float32's
#: square range (|x| > 1.8e19, where x² overflows: std 1.479e20, not inf).
SUMMARY_CASES = [
    ("normal", torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), None),
    ("relu", torch.relu(torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))), None),
    ("tanh", torch.tanh(3 * torch.randn(50, generator=torch.Generator().manual_seed(2))), "tanh"),
    ("sigmoid", torch.sigmoid(4 * torch.randn(9, 9, generator=torch.Generator().manual_seed(3))), "sigmoid"),
    ("nonfinite", torch.tensor([1.0, 3.0, math.nan, math.inf, -math.inf, 0.0]), "tanh"),
    ("all-nonfinite", torch.tensor([math.nan, math.inf]), None),
    ("zeros", torch.zeros(5), None),
    ("empty", torch.zeros(0), None),
    ("huge", torch.tensor([1e20, -1e20, 3e20, 0.0]), None),
    ("huge-offset", torch.tensor([3e25, 3e25 + 1e19, 3e25 - 1e19, 3e25]), None),
    ("tiny", torch.tensor([1e-40, -2e-40, 3e-40, 0.0]), None),
]


def _assert_matches_naive(got: torch.Tensor, x: torch.Tensor, kind: str | None) -> None:
    want = torch.tensor(_naive_summary(x, kind), dtype=torch.float64)
    # float32 results: relative 1e-5 of the value, or 1e-5 of the row's scale for a mean/std near 0.
    scale = max((abs(v) for v in x.reshape(-1).tolist() if math.isfinite(v)), default=0.0)
    atol = torch.tensor([1e-5 * scale, 1e-5 * scale, 1e-7, 1e-7, 0, 0], dtype=torch.float64)
    assert torch.isfinite(got).all()
    assert ((got.double() - want).abs() <= atol + 1e-5 * want.abs()).all(), (got.tolist(), want.tolist())


@pytest.mark.parametrize(("x", "kind"), [c[1:] for c in SUMMARY_CASES], ids=[c[0] for c in SUMMARY_CASES])
def test_activation_summary_matches_naive_float64(x: torch.Tensor, kind: str | None) -> None:
    _assert_matches_naive(activation_summary(x, kind), x, kind)


def test_activation_summaries_match_naive_float64_row_by_row() -> None:
    # Rows of different lengths (padded), then equal lengths as a list and as one matrix.
    xs, kinds = [c[1] for c in SUMMARY_CASES], [c[2] for c in SUMMARY_CASES]
    for row, x, kind in zip(activation_summaries(xs, kinds), xs, kinds, strict=True):
        _assert_matches_naive(row, x, kind)
    equal = [x.reshape(-1) for x in xs if x.numel() == 4]
    assert len(equal) >= 3
    for batch in (equal, torch.stack(equal)):
        for row, x in zip(activation_summaries(batch, [None] * len(equal)), equal, strict=True):
            _assert_matches_naive(row, x, None)
    assert activation_summaries([], []).shape == (0, 6)


def test_single_and_batched_summaries_share_the_rescaling_beyond_float32_squares() -> None:
    # 3e20² overflows float32 (max 3.4e38): without the max|x| rescaling the std would be inf.
    x = torch.tensor([1e20, -1e20, 3e20, 0.0])
    want = float(np.std(np.array([1e20, -1e20, 3e20, 0.0], dtype=np.float64)))  # population std, ddof=0
    single = activation_summary(x)[1].item()
    padded = activation_summaries([x, torch.ones(7)], [None, None])[0, 1].item()
    matrix = activation_summaries(torch.stack([x, x.flip(0)]), [None, None])[:, 1].tolist()
    for got in (single, padded, *matrix):
        assert math.isfinite(got) and got == pytest.approx(want, rel=1e-6)  # float32 rounding: ~6e-8 relative


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


@pytest.mark.parametrize(
    ("module", "shape", "after_conv", "want"),
    [
        (nn.Linear(3, 4), (8, 4), False, -1),
        (nn.Linear(3, 4), (8, 10, 4), False, -1),  # a sequence through a Linear: features last
        (nn.Conv1d(3, 4, 3), (8, 4, 10), False, 1),  # Conv1d counts channels, not positions
        (nn.Conv2d(3, 4, 3), (8, 4, 5, 5), False, 1),
        (nn.Conv3d(3, 4, 3), (8, 4, 2, 5, 5), False, 1),
        (nn.ReLU(), (8, 4, 10), True, 1),  # ReLU after a Conv1d: still channels
        (nn.ReLU(), (8, 4, 10), False, -1),  # ReLU after a Linear on a sequence
        (nn.ReLU(), (8, 4, 5, 5), False, 1),  # images are channels-first whatever the module
        (nn.ReLU(), (8, 4), True, -1),
        (nn.LSTM(3, 4, batch_first=True), (8, 10, 4), False, -1),
    ],
)
def test_unit_dim_indexes_features_or_channels(module: nn.Module, shape: tuple[int, ...], after_conv: bool,
                                               want: int) -> None:
    assert unit_dim(torch.zeros(shape), module, after_conv=after_conv) == want


def test_dead_channel_of_a_conv1d_counted_once_by_unit_dim() -> None:
    # Reference: channel c is dead when no batch element and no position is positive.
    conv = nn.Conv1d(2, 3, 3)
    y = torch.relu(conv(torch.randn(4, 2, 9)))
    y[:, 1] = 0.0
    counts = unit_activity(y, unit_dim(y, conv))
    want = torch.tensor([float((y[:, c] > 0).sum()) for c in range(3)])
    torch.testing.assert_close(counts, want)
    assert (unit_peak(y, unit_dim(y, conv)) == 0).tolist() == (want == 0).tolist() == [False, True, False]


def test_is_recurrent() -> None:
    from gradguard.nn import LSTM as GGLSTM

    class Marked(nn.Module):
        gradguard_recurrent = True

    recurrent = [nn.RNN(2, 3), nn.LSTM(2, 3), nn.GRU(2, 3), GGLSTM(2, 3), Marked()]
    other = [nn.Linear(2, 3), nn.RNNCell(2, 3), nn.LSTMCell(2, 3), nn.Sequential(nn.LSTM(2, 3))]
    assert [is_recurrent(m) for m in recurrent] == [True] * len(recurrent)
    assert [is_recurrent(m) for m in other] == [False] * len(other)


def test_by_device_groups_indices_in_first_seen_order() -> None:
    meta, cpu = torch.empty(2, device="meta"), torch.zeros(2)
    assert by_device([cpu, meta, cpu, meta]) == {torch.device("cpu"): [0, 2], torch.device("meta"): [1, 3]}
    assert by_device([]) == {}


@pytest.mark.parametrize("p", [2.0, math.inf, 0.0])
def test_local_norms_match_naive(p: float) -> None:
    ts = _tensors()
    want = torch.stack([torch.linalg.vector_norm(t.reshape(-1), p) for t in ts])
    torch.testing.assert_close(local_norms(ts, p), want, rtol=1e-6, atol=0)
    assert local_norms([], p).shape == (0,)


def test_host_window_matches_torch_nanmedian_and_the_device_spike_test() -> None:
    """HostWindow's median and MAD (lower middle values, as torch.nanmedian) and recent maximum over a ring
    that has wrapped, against torch on the last ``size`` values; SpikeRule.scan (host) against SpikeRule.test
    (device Window) on the same values."""
    from gradguard.stats import HostWindow, SpikeRule, Window

    gen = torch.Generator().manual_seed(0)
    size, pushed = 37, 100
    series = (torch.randn(pushed, generator=gen, dtype=torch.float64).exp() * 3).tolist()
    ring = HostWindow(size, rows=1)
    for k, v in enumerate(series):
        ring.push((v,))
        held = torch.tensor(series[max(0, k + 1 - size) : k + 1], dtype=torch.float64)
        med, mad = ring.median_mad(0)
        ref_med = float(torch.nanmedian(held))
        assert med == ref_med
        assert mad == float(torch.nanmedian((held - ref_med).abs()))
        assert ring.recent_max(0, 8) == float(held[-8:].max())
    rule = SpikeRule()
    window, values = series[-size:], [series[-1] * 20.0, series[-1], 0.5]
    device = Window(size, rows=len(values), dtype=torch.float64)
    device.values.copy_(torch.tensor(window, dtype=torch.float64).expand(len(values), -1))
    device.pushes = size
    spike, z, _ = rule.test(torch.tensor(values, dtype=torch.float64), device, rule.threshold(size))
    host = rule.scan(values, window)
    assert [h[0] for h in host] == spike.tolist() and host[0][0]
    assert [h[1] for h in host] == pytest.approx(z.tolist(), rel=1e-12)
