"""Offline datasets for the lab: nothing here downloads anything.

- :func:`sunspots_windows`: yearly sunspot numbers 1700–2008 (``statsmodels``), min-max scaled to [0, 1],
  cut into sliding windows for next-value regression (a real series, not a synthetic one).
- :func:`digits`: scikit-learn's 8×8 handwritten digits (1,797 images, 64 features, 10 classes).
- :func:`mnist1d`: MNIST-1D (Greydanus 2020), generated locally by ``mnist1d.make_dataset`` with explicit
  arguments (40 features, 10 classes).
- :func:`adding_problem` and :func:`copy_task`: the classic long-memory tasks (Hochreiter & Schmidhuber 1997;
  Arjovsky et al. 2016).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gradguard.errors import check_number


@dataclass(frozen=True)
class Split:
    """Train and test tensors: inputs ``x`` and targets ``y``."""

    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor


def sunspots_series() -> np.ndarray:
    """Yearly sunspot activity 1700–2008 (309 values) min-max scaled to [0, 1]."""
    from statsmodels.datasets import sunspots

    values = sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(dtype=np.float64)
    return (values - values.min()) / (values.max() - values.min())


def sunspots_windows(window: int, test_fraction: float = 0.2) -> Split:
    """Sliding windows of the scaled sunspot series: ``x`` is ``(n, window, 1)``, ``y`` the next value ``(n, 1)``.

    The split is chronological (the last ``test_fraction`` of windows are the test set), as forecasting
    requires.
    """
    check_number("window", window, low=1, high=200, integer=True)
    check_number("test_fraction", test_fraction, low=0.0, high=0.9)
    s = sunspots_series()
    idx = np.arange(len(s) - window)[:, None] + np.arange(window + 1)[None, :]
    win = torch.tensor(s[idx], dtype=torch.float32)
    x, y = win[:, :window, None], win[:, window:]
    cut = round(len(x) * (1 - test_fraction))
    return Split(x[:cut], y[:cut], x[cut:], y[cut:])


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Feature scaling with the training set's statistics only, so the test set stays unseen.
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (train - mean) / std, (test - mean) / std


def digits(rng: np.random.Generator, test_fraction: float = 0.2) -> Split:
    """scikit-learn digits, standardised per feature, shuffled and split with ``rng``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = rng.permutation(len(data.target))
    x, y = data.data[order].astype(np.float64), data.target[order]
    cut = round(len(y) * (1 - test_fraction))
    xtr, xte = _standardise(x[:cut], x[cut:])
    return Split(
        torch.tensor(xtr, dtype=torch.float32), torch.tensor(y[:cut]),
        torch.tensor(xte, dtype=torch.float32), torch.tensor(y[cut:]),
    )


def mnist1d(num_samples: int = 5000, seed: int = 42) -> Split:
    """MNIST-1D generated in memory by ``mnist1d.make_dataset`` with its standard arguments spelled out.

    ``make_dataset`` seeds NumPy's and Python's global generators; their previous states are restored so
    that building the data does not change any other random stream.
    """
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    check_number("num_samples", num_samples, low=100, integer=True)
    args = ObjectView({
        "num_samples": num_samples, "train_split": 0.8, "template_len": 12, "padding": [36, 60],
        "scale_coeff": 0.4, "max_translation": 48, "corr_noise_scale": 0.25, "iid_noise_scale": 2e-2,
        "shear_scale": 0.75, "shuffle_seq": False, "final_seq_length": 40, "seed": seed,
        "url": "",  # never used: make_dataset generates, it does not download
    })
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return Split(
        torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"]),
        torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"]),
    )


def adding_problem(n: int, steps: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The adding problem: ``x`` is ``(n, steps, 2)``, ``y`` is ``(n, 1)``.

    Channel 0 holds values ~ U(0, 1); channel 1 marks one position in each half of the sequence; the target
    is the sum of the two marked values. Predicting the constant 1 gives the baseline MSE
    Var(u₁ + u₂) = 2/12 ≈ 0.167, so a model must beat that to show it remembers (Arjovsky et al. 2016 setup).
    """
    check_number("n", n, low=1, integer=True)
    check_number("steps", steps, low=2, integer=True)
    values = torch.rand(n, steps, generator=generator)
    half = steps // 2
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, steps, (n,), generator=generator)
    marks = torch.zeros(n, steps)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    y = (values[rows, first] + values[rows, second])[:, None]
    return torch.stack([values, marks], dim=-1), y


#: Baseline MSE of the adding problem (always predicting 1): Var(U₁ + U₂) = 1/6.
ADDING_BASELINE_MSE = 1.0 / 6.0


def copy_task(
    n: int, length: int, delay: int, symbols: int = 8, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The copy task: remember ``length`` symbols over ``delay`` blank steps, then reproduce them.

    ``x`` is one-hot ``(n, length + delay + length, symbols + 2)`` (symbol ids, blank ``symbols``, go-marker
    ``symbols + 1`` on the step before recall); ``y`` holds class ids ``(n, length + delay + length)`` with the
    blank id everywhere except the last ``length`` steps, which hold the input symbols. Predicting blanks and
    then uniform guesses gives the baseline cross-entropy ``length·log(symbols)/(2·length + delay)``.
    """
    check_number("n", n, low=1, integer=True)
    check_number("length", length, low=1, integer=True)
    check_number("delay", delay, low=1, integer=True)
    check_number("symbols", symbols, low=2, integer=True)
    total = 2 * length + delay
    seq = torch.randint(0, symbols, (n, length), generator=generator)
    ids = torch.full((n, total), symbols)
    ids[:, :length] = seq
    ids[:, length + delay - 1] = symbols + 1
    y = torch.full((n, total), symbols)
    y[:, length + delay:] = seq
    return torch.nn.functional.one_hot(ids, symbols + 2).float(), y
