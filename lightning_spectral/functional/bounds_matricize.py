"""Bounds on a filter's symbol from its matricizations and its taps.

A filter ``W`` of shape ``(c_out, c_in, k_1, ..., k_d)`` has taps ``W_t`` (the
``c_out x c_in`` matrices ``W[:, :, t]``) and symbol ``P(theta) = sum_t W_t exp(-i theta . t)``.
Each function bounds ``S = sup_theta ||P(theta)||_2``, which bounds every layer built on the
filter (see :mod:`.bounds`). Everything is float64 and differentiable with respect to the weight.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_finite_weight
from .matricize import grouped_weight, matricize, row_subsets
from .opnorm import opnorm
from .symbol import taps_last
from .threads import filter_side, with_bound_threads

__all__ = ["fantastic_four", "tap_sum_bound"]


@with_bound_threads(filter_side)
def fantastic_four(weight: Tensor, *, groups: int = 1, reduction: str = "min") -> Tensor:
    """The bound of Singla & Feizi (ICLR 2021): ``sqrt(prod k) * ||M_A||_2`` per subset ``A``.

    Proof: ``P(theta) = (a_A^T kron I) M_A (b_A kron I)`` up to row/column order, with
    ``a_A`` the phase vector over the axes in ``A`` (norm ``sqrt(prod_{i in A} k_i)``) and
    ``b_A`` the one over the other axes; so ``||P(theta)|| <= sqrt(prod k) ||M_A||`` for
    every ``A`` and ``theta``, which bounds ``S`` and therefore every zero/circular
    operator with any stride and dilation, and its adjoint (transposed convolution).

    ``weight``: ``(c_out, c_in / groups, *k)`` (``d = 0``: a linear weight). Norms are exact
    (SVD in float64). ``reduction="min"`` returns ``max_g min_A`` (valid because the
    operator is block diagonal over groups, and tighter than ``min_A max_g``);
    ``reduction="none"`` returns a ``(2^d,)`` tensor whose entry ``m`` is
    ``max_g`` of the bound with subset ``row_subsets(d)[m]``.
    """
    if reduction not in ("min", "none"):
        raise ValueError(f"reduction must be 'min' or 'none', got {reduction!r}")
    check_finite_weight(weight, "weight")
    w = grouped_weight(weight.to(torch.float64), groups)
    d = weight.ndim - 2
    scale = math.sqrt(math.prod(weight.shape[2:]))
    per = torch.stack([opnorm(matricize(w, a, batch_dims=1)) for a in row_subsets(d)])  # (2^d, g)
    per = per * scale
    if reduction == "none":
        return per.amax(dim=1)
    return per.amin(dim=0).amax()


@with_bound_threads(filter_side)
def tap_sum_bound(weight: Tensor, *, groups: int = 1) -> Tensor:
    """``max_g sum_t ||W_t||_2``.

    Proof: ``P(theta) = sum_t W_t e^{-i theta.t}`` and each phase has modulus 1, so
    ``||P(theta)|| <= sum_t ||W_t||`` (triangle inequality); equivalently the operator is a
    sum over taps of a shift (norm <= 1) tensored with ``W_t``.
    """
    w = grouped_weight(weight.to(torch.float64), groups)
    norms = opnorm(taps_last(w))  # (g, *k)
    return norms.flatten(1).sum(dim=1).amax()
