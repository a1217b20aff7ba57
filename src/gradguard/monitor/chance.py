"""The chance-level loss of a classifier: from watch()'s options, or inferred from the loss graph.

The divergence rules compare the loss with the loss of a uniform guess over C classes, ln C
(docs/detection.md); ``watch(num_classes=C)`` or ``watch(chance_loss=...)`` give it, and without them the
monitor infers ln C from the output width when the loss is a cross-entropy (:func:`is_cross_entropy`).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from gradguard.errors import ConfigError, check_number


def chance_from_options(num_classes: Any, chance_loss: Any) -> tuple[float | None, str]:
    """The chance-level loss from watch()'s options: ``ln C`` for ``num_classes=C``, or ``chance_loss``."""
    if num_classes is not None and chance_loss is not None:
        raise ConfigError(
            f"give num_classes={num_classes!r} or chance_loss={chance_loss!r}, not both (chance_loss overrides ln C)"
        )
    if num_classes is not None:
        check_number("num_classes", num_classes, low=2, integer=True)
        return math.log(num_classes), f"ln {num_classes}, num_classes={num_classes}"
    if chance_loss is not None:
        check_number("chance_loss", chance_loss, low=0.0, low_inclusive=False)
        return float(chance_loss), "chance_loss"
    return None, ""


def is_cross_entropy(loss: Tensor) -> bool:
    """True when the loss graph ends in a negative log-likelihood (F.cross_entropy / nll_loss), possibly
    scaled or averaged (gradient accumulation): host-side graph metadata only, no device work."""
    fn = loss.grad_fn
    for _ in range(4):
        if fn is None:
            return False
        name = fn.name()
        if name.startswith("NllLoss"):
            return True
        if not name.startswith(("DivBackward", "MulBackward", "MeanBackward", "ViewBackward", "SqueezeBackward")):
            return False
        fn = next((f for f, _ in fn.next_functions if f is not None), None)
    return False
