"""stats.activations.activation_summaries against activation_summary applied tensor by tensor."""

from __future__ import annotations

import math

import torch

from gradguard.stats import activation_summary
from gradguard.stats.activations import activation_summaries


def test_batched_summaries_equal_per_tensor_reference() -> None:
    torch.manual_seed(0)
    xs = [
        torch.randn(7, 5),
        torch.relu(torch.randn(3, 4, 6)),
        torch.tanh(3 * torch.randn(50)),
        torch.sigmoid(4 * torch.randn(9, 9)),
        torch.tensor([1.0, math.nan, -math.inf, 0.0, 2.0]),
        torch.zeros(4),
        torch.randn(1),
    ]
    kinds = [None, None, "tanh", "sigmoid", "tanh", None, "sigmoid"]
    got = activation_summaries(xs, kinds)
    want = torch.stack([activation_summary(x, k) for x, k in zip(xs, kinds, strict=True)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_batched_summaries_equal_lengths_and_no_saturating_rows() -> None:
    """The equal-length path (no padding), a matrix of rows, and no sigmoid/tanh rows match the reference."""
    torch.manual_seed(1)
    xs = [
        torch.randn(4, 8),
        torch.relu(torch.randn(32)),
        torch.tanh(3 * torch.randn(2, 16)),
        torch.tensor([1.0, math.nan, -math.inf, 0.0] * 8),
        torch.zeros(32),
    ]
    matrix = torch.stack([x.reshape(-1) for x in xs])
    for kinds in ([None, None, "tanh", "sigmoid", None], [None] * 5):
        want = torch.stack([activation_summary(x, k) for x, k in zip(xs, kinds, strict=True)])
        torch.testing.assert_close(activation_summaries(xs, kinds), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(activation_summaries(matrix, kinds), want, rtol=1e-5, atol=1e-6)


def test_batched_summaries_empty() -> None:
    assert activation_summaries([], []).shape == (0, 6)


def test_unit_peak_zero_exactly_when_unit_activity_counts_zero() -> None:
    from gradguard.stats import unit_activity
    from gradguard.stats.activations import unit_peak

    torch.manual_seed(0)
    x = torch.relu(torch.randn(16, 12) - 1.5)
    x[:, 3] = 0.0
    assert torch.equal(unit_peak(x) == 0, unit_activity(x) == 0)
    conv = torch.relu(torch.randn(4, 5, 3, 3) - 2.0)
    assert torch.equal(unit_peak(conv, 1) == 0, unit_activity(conv, 1) == 0)
    torch.testing.assert_close(unit_peak(conv, 1), conv.amax(dim=(0, 2, 3)))
