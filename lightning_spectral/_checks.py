"""Argument checkers shared by the callback, the certification tracker, the metrics and the
tensor math of :mod:`lightning_spectral.functional` (no Lightning import here).

Each raises ``ValueError`` naming the argument and the value received, so that a bad value is
reported when an object is constructed, before any work depends on it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_finite_weight",
    "check_int",
    "check_patterns",
    "check_real",
    "check_reals",
    "is_finite_real",
]


def is_finite_real(value: Any) -> bool:
    """A finite real number; ``bool`` is not one (``True`` is an ``int`` to Python)."""
    return (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    )


def _bound_text(low: float, strict: bool) -> str:
    return f"> {low}" if strict else f">= {low}"


def _at_least(value: Any, low: float, strict: bool) -> bool:
    return value > low if strict else value >= low


def check_real(name: str, value: Any, *, low: float, strict: bool = False) -> float:
    """``value`` as a float, if it is a finite real ``>= low`` (``> low`` when ``strict``)."""
    if not is_finite_real(value) or not _at_least(value, low, strict):
        raise ValueError(
            f"{name} must be a finite number {_bound_text(low, strict)}, got {value!r}"
        )
    return float(value)


def check_int(name: str, value: Any, *, low: int) -> int:
    """``value`` if it is an integer (not a ``bool``) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not merely truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_patterns(name: str, value: Any) -> list[str] | None:
    """Glob patterns as a list (one string is one pattern); ``None`` stays ``None``."""
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{name} must be a list of non-empty glob patterns, got {value!r}")
    return list(patterns)


def check_reals(
    name: str, value: Any, *, low: float, strict: bool = False, scalar: bool = True
) -> list[float]:
    """A non-empty list of finite reals, each ``>= low`` (``> low`` when ``strict``).

    Accepted: a sequence of reals (numpy scalars included), a 0-d or 1-d tensor, and, when
    ``scalar``, one real number (a list of one).
    """
    values: Any = value
    if scalar and isinstance(value, Tensor) and value.ndim <= 1:
        values = value.detach().reshape(-1).tolist()
    elif scalar and isinstance(value, numbers.Real):
        values = [value]
    ok = isinstance(values, Sequence) and not isinstance(values, (str, bytes)) and values
    if not ok or not all(is_finite_real(v) and _at_least(v, low, strict) for v in values):
        one = "a finite number " + _bound_text(low, strict) + " or " if scalar else ""
        raise ValueError(
            f"{name} must be {one}a non-empty list of finite numbers {_bound_text(low, strict)}"
            f", got {value!r}"
        )
    return [float(v) for v in values]


def check_finite_weight(weight: Tensor, what: str) -> None:
    """Refuse a weight with NaN/Inf entries: no finite bound exists, and every norm routine
    would return one silently (one host sync, acceptable off the training hot path where
    bounds are computed). ``what`` names the weight in the ``ValueError``."""
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(
            f"{what} contains non-finite values (NaN or Inf); no finite spectral bound exists"
        )
