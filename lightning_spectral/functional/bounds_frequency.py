"""Bounds on a filter's symbol from its values on a frequency grid.

``circular_grid_norm`` is the exact norm of a circular convolution (the DFT diagonalizes it);
``sampled_symbol_bound`` turns the largest norm on a finite grid into a bound on the supremum
over the whole torus. Notation as in :mod:`.symbol`; float64, differentiable in the weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .matricize import grouped_weight
from .opnorm import with_margin
from .symbol import grid_nodes, max_symbol_norm
from .threads import filter_side, with_bound_threads

__all__ = ["circular_grid_norm", "sampled_inflation", "sampled_grid", "sampled_symbol_bound"]

# Norm inflation the sampled-frequency bound aims for, and the largest one worth computing.
_SAMPLED_TARGET = 1.05
_SAMPLED_MAX = 1.5


@with_bound_threads(filter_side)
def circular_grid_norm(
    weight: Tensor, grid: Sequence[int], *, groups: int = 1, dilation: Sequence[int] | None = None
) -> Tensor:
    """Exact norm of the circular convolution by the dilated filter on an ``N``-grid.

    Sedghi, Gupta & Long (ICLR 2019): the DFT block-diagonalizes the operator, so its norm
    is the max over the ``prod N`` frequencies of ``||P(dil * theta)||``. Cost: that many
    ``c_out x c_in`` SVDs (half of them, by conjugate symmetry).
    """
    wg = grouped_weight(weight.to(torch.float64), groups)
    return with_margin(max_symbol_norm(wg, grid, dilation))


def sampled_inflation(kernel: Sequence[int], grid: Sequence[int]) -> float | None:
    """``prod_j (1 - (pi D_j / M_j)^2 / 2)^(-1/2)``, ``D_j = k_j - 1``; None if a factor is <= 0."""
    denom = 1.0
    for k, m in zip(kernel, grid, strict=True):
        factor = 1 - (math.pi * (k - 1) / m) ** 2 / 2
        if factor <= 0:
            return None
        denom *= factor
    return denom ** (-0.5)


def sampled_grid(kernel: Sequence[int], nodes_cap: float) -> tuple[list[int], float] | None:
    """Grid sizes ``M_j`` for the sampled bound and its norm inflation ``rho``.

    Rule: every axis with ``D_j = k_j - 1 > 0`` gets the same ``delta = pi D_j / M_j``, i.e.
    ``M_j = ceil(pi D_j / delta)`` (``M_j = 1`` where ``D_j = 0``: the symbol is constant
    along that axis). ``delta`` starts where ``rho = sampled_inflation`` is
    ``_SAMPLED_TARGET`` (1.05; a 21 x 21 grid for 3 x 3) and grows by 10% steps until the
    half grid fits ``nodes_cap``; ``None`` if then ``rho > _SAMPLED_MAX`` (1.5).
    """
    dd = [k - 1 for k in kernel]
    active = sum(1 for x in dd if x > 0)
    if active == 0:
        return ([1] * len(dd), 1.0) if nodes_cap >= 1 else None
    delta = math.sqrt(2 * (1 - _SAMPLED_TARGET ** (-2 / active)))
    while True:
        grid = [max(1, math.ceil(math.pi * x / delta)) if x > 0 else 1 for x in dd]
        if grid_nodes(grid) <= nodes_cap or delta >= math.sqrt(2):
            break
        delta *= 1.1
    rho = sampled_inflation(kernel, grid)
    if rho is None or rho > _SAMPLED_MAX or grid_nodes(grid) > nodes_cap:
        return None
    return grid, rho


@with_bound_threads(filter_side)
def sampled_symbol_bound(weight: Tensor, grid: Sequence[int], *, groups: int = 1) -> Tensor:
    """``S^2 <= max_nodes ||P(node)||^2 / prod_j (1 - (pi D_j / M_j)^2 / 2)``, ``D_j = k_j - 1``.

    Nodes: the ``M_1 x ... x M_d`` grid ``2 pi f / M``; every factor must be positive.

    Lemma (one axis). Let ``h >= 0`` be a real trigonometric polynomial of degree ``D``
    with maximum ``H`` at ``x*``. Then ``h(x) >= H (1 - (D (x - x*))^2 / 2)``. Proof:
    ``h'(x*) = 0``; ``h`` is of exponential type ``D`` and ``|h| <= H``, so Bernstein's
    inequality (twice) gives ``|h''| <= D^2 H``; Taylor's theorem concludes. At the nearest
    of ``M`` equispaced nodes ``|x - x*| <= pi / M``.

    Proof of the bound. Let ``(theta*, u*)`` maximize ``u^H Q(theta) u`` over the torus and
    unit ``u`` (``Q = P^H P``; the maximum is ``F = S^2``). ``f = u*^H Q u*`` is real,
    non-negative, of degree ``D_j`` in ``theta_j`` (the taps of ``Q`` are differences
    ``t' - t``), with maximum ``F``. Apply the lemma along axis 1 with the other
    coordinates at ``theta*``: some node ``a_1`` has ``f(a_1, theta*_2, ...) >= F c_1``,
    ``c_j = 1 - (pi D_j / M_j)^2 / 2``. Then along axis 2 at the maximum of
    ``f(a_1, ., theta*_3, ...)`` (at least ``F c_1``): a node ``a_2`` with
    ``f(a_1, a_2, theta*_3, ...) >= F c_1 c_2``; and so on over all axes. Finally
    ``f(node) <= ||P(node)||^2``. Real filters need half of the nodes
    (``P(-theta) = conj P(theta)``). Raises ValueError if a factor is not positive.
    """
    kernel = weight.shape[2:]
    rho = sampled_inflation(kernel, grid) if len(kernel) else None
    if rho is None:
        raise ValueError(f"grid {tuple(grid)} too coarse for kernel {tuple(kernel)}")
    wg = grouped_weight(weight.to(torch.float64), groups)
    return with_margin(max_symbol_norm(wg, grid)) * rho
