"""gradguard.adapt: what a model is called with, and the module gradguard hooks for what it is given."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradguard.adapt import as_module, call_model, model_arguments
from gradguard.errors import InputError


class Recorder(nn.Module):
    """Returns exactly the arguments it was called with."""

    def forward(self, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs


def test_model_arguments_by_kind_of_batch() -> None:
    x, y = torch.zeros(2, 3), torch.ones(2)
    packed = pack_padded_sequence(torch.zeros(2, 4, 3), [4, 2], batch_first=True)
    assert call_model(Recorder(), x) == ((x,), {})
    assert call_model(Recorder(), (x, y)) == ((x, y), {})
    assert call_model(Recorder(), [x, 3]) == ((x, 3), {})
    assert call_model(Recorder(), {"input_ids": x, "mask": y}) == ((), {"input_ids": x, "mask": y})
    # A PackedSequence is a tuple subclass: it is one argument, not four.
    args, kwargs = model_arguments(packed)
    assert args == [packed] and kwargs == {}


@pytest.mark.parametrize("bad", [3.0, "x", None, (), [1, 2], {"a": 1}])
def test_a_batch_without_a_tensor_is_an_input_error(bad: Any) -> None:
    with pytest.raises(InputError, match=r"^lsuv batch must be a tensor, .* got \w+"):
        model_arguments(bad, name="lsuv batch")


def test_as_module_returns_torch_modules_unchanged() -> None:
    lin = nn.Linear(2, 2)
    assert as_module(lin) is lin
