"""gradguard.errors: the validators raise the documented exception with the bad value in one line."""

from __future__ import annotations

import pytest
import torch

from gradguard.errors import GradGuardError, InputError, check_scalar_loss


@pytest.mark.parametrize("loss", [torch.tensor(1.5), torch.ones(1), torch.ones(1, 1)])
def test_check_scalar_loss_accepts_one_element(loss: torch.Tensor) -> None:
    assert check_scalar_loss(loss) is loss


@pytest.mark.parametrize(("loss", "needle"), [(torch.ones(12, 3), r"shape \(12, 3\)"), (torch.ones(0), r"shape \(0,\)"),
                                             (1.5, "got float"), (None, "got NoneType")])
def test_check_scalar_loss_rejects_other_inputs(loss: object, needle: str) -> None:
    with pytest.raises(InputError, match=needle) as info:
        check_scalar_loss(loss)
    assert isinstance(info.value, GradGuardError) and "\n" not in str(info.value)
