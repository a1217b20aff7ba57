"""Shared test configuration: deterministic, single-threaded torch so runs are reproducible."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
