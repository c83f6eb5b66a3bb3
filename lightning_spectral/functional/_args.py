"""Argument checks shared by the functional modules (no Lightning, no state).

Each raises ``ValueError`` naming the argument and the value received, before any work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_count(name: str, value: Any, *, positive: bool = False) -> int:
    """``value`` as an int if it equals a non-negative (``positive``: ``>= 1``) integer.

    Integral floats such as ``3.0`` pass, as they always have for the iteration counts.
    """
    low = 1 if positive else 0
    if int(value) != value or value < low:
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")
    return int(value)


def check_finite(weight: Tensor, what: str) -> None:
    """Refuse NaN/Inf entries: no finite bound exists, and every norm routine would return one
    silently (one host sync, acceptable off the training hot path where bounds are computed)."""
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(
            f"{what} contains non-finite values (NaN or Inf); no finite spectral bound exists"
        )
