"""Time-step profiles and spectral statistics against naive references."""

import math

import numpy as np
import pytest
import torch

from gradguard.errors import ConfigError, InputError
from gradguard.stats import (
    activation_derivative,
    gradient_horizon,
    growth_factor,
    scaled_spectral_radius,
    spectral_radius,
    time_step_norms,
)


def _naive_horizon(norms: list[float], threshold: float = 1e-3) -> float:
    """Walk back from the peak one step at a time; interpolate the crossing on a log scale."""
    finite = [i for i, v in enumerate(norms) if math.isfinite(v)]
    p = max(finite, key=lambda i: (norms[i], -i))
    peak = norms[p]
    for k in range(1, p + 1):
        r = norms[p - k] / peak
        if r < threshold:
            r_prev = norms[p - k + 1] / peak
            if r == 0:
                return k - 1.0
            return k - 1 + (math.log(r_prev) - math.log(threshold)) / (math.log(r_prev) - math.log(r))
    return float(p)


@pytest.mark.parametrize("time_dim", [0, 1, 2, -1])
def test_time_step_norms_match_naive(time_dim: int) -> None:
    x = torch.randn(3, 5, 4)
    got = time_step_norms(x, time_dim)
    want = torch.tensor([x.select(time_dim, t).norm().item() for t in range(x.shape[time_dim])])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("g", [0.3, 0.9, 1.0, 1.7])
def test_growth_factor_recovers_exact_geometric_profile(g: float) -> None:
    steps = 30
    # Norm at step t is c·g^(T−1−t): the peak is at the last step when g < 1 and at the first when g > 1.
    norms = torch.tensor([2.5 * g ** (steps - 1 - t) for t in range(steps)], dtype=torch.float64)
    got = growth_factor(norms.float(), floor=1e-30)
    assert got.item() == pytest.approx(g, rel=1e-4)


def test_growth_factor_matches_least_squares_on_noisy_profile() -> None:
    gen = torch.Generator().manual_seed(3)
    steps = 40
    k = np.arange(steps)[::-1].astype(float)  # steps back from the last
    noise = torch.randn(steps, generator=gen).numpy() * 0.2
    norms = np.exp(-0.4 * k + noise)
    norms[-1] = norms.max() * 2  # make the last step the peak, as for a many-to-one model
    keep = norms >= 1e-6 * norms.max()
    slope = np.polyfit(k[keep], np.log(norms[keep]), 1)[0]
    got = growth_factor(torch.tensor(norms, dtype=torch.float32))
    assert got.item() == pytest.approx(math.exp(slope), rel=1e-4)


def test_growth_factor_is_nan_with_fewer_than_two_points() -> None:
    assert math.isnan(growth_factor(torch.tensor([1.0])).item())
    assert math.isnan(growth_factor(torch.tensor([0.0, 0.0, 1.0])).item())  # only the peak is usable


@pytest.mark.parametrize(
    "norms",
    [
        [1e-4, 1e-2, 1.0],
        [0.0, 0.0, 1.0],
        [5.0, 3.0, 1.0, 0.5],  # rising back in time: never falls, horizon = peak index 0
        [1e-9, 1e-7, 1e-5, 2e-3, 0.5, 1.0, 0.3],  # peak inside the sequence
        [0.2, 0.3, 0.4, 1.0],  # never falls below 1e-3: horizon = 3 (reaches the first step)
    ],
)
def test_gradient_horizon_matches_naive(norms: list[float]) -> None:
    got = gradient_horizon(torch.tensor(norms)).item()
    assert got == pytest.approx(_naive_horizon(norms), abs=1e-5)


def test_gradient_horizon_on_geometric_profile_is_log_ratio() -> None:
    g, steps = 0.6, 60
    norms = torch.tensor([g ** (steps - 1 - t) for t in range(steps)], dtype=torch.float64)
    want = math.log(1e-3) / math.log(g)
    assert gradient_horizon(norms.float()).item() == pytest.approx(want, rel=1e-4)


def test_gradient_horizon_nan_cases() -> None:
    assert math.isnan(gradient_horizon(torch.tensor([float("nan"), float("nan")])).item())
    assert math.isnan(gradient_horizon(torch.zeros(4)).item())
    # A NaN between the start and the peak is not "small": the horizon runs through it.
    assert gradient_horizon(torch.tensor([0.5, float("nan"), 1.0])).item() == 2.0


def test_spectral_radius_matches_numpy() -> None:
    w = torch.randn(12, 12)
    want = np.abs(np.linalg.eigvals(w.double().numpy())).max()
    assert spectral_radius(w).item() == pytest.approx(want, rel=1e-6)
    q = torch.empty(16, 16)
    torch.nn.init.orthogonal_(q)
    assert spectral_radius(0.5 * q).item() == pytest.approx(0.5, rel=1e-5)
    assert scaled_spectral_radius(0.5 * q, 0.8).item() == pytest.approx(0.4, rel=1e-5)


def test_spectral_radius_rejects_non_square() -> None:
    with pytest.raises(InputError, match="square"):
        spectral_radius(torch.randn(8, 4))


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "relu", "identity"])
def test_activation_derivative_matches_autograd(name: str) -> None:
    z = torch.randn(50, dtype=torch.float64, requires_grad=True)
    fn = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "identity": lambda t: t * 1.0}[name]
    y = fn(z)
    (want,) = torch.autograd.grad(y.sum(), z)
    torch.testing.assert_close(activation_derivative(y, name), want, rtol=1e-12, atol=1e-12)


def test_activation_derivative_rejects_unknown() -> None:
    with pytest.raises(ConfigError, match="nonlinearity"):
        activation_derivative(torch.randn(3), "gelu")
