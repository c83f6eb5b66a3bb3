"""The symbol of a filter on a frequency grid, and its largest norm there.

A filter ``W`` of shape ``(g, c_out, c_in, k_1, ..., k_d)`` (grouped, see
:func:`.matricize.grouped_weight`) has per group the symbol

    P(theta) = sum_t W_t exp(-i theta . t),      theta in the torus [0, 2 pi)^d.

The circular convolution by the dilated filter on an ``M``-grid is block-diagonalized by the
DFT (Sedghi, Gupta & Long, ICLR 2019), so its norm is ``max ||P(dil * theta)||_2`` over the
``prod M`` frequencies ``theta_j = 2 pi f_j / M_j``: :func:`max_symbol_norm`. Both the exact
references (:mod:`.exact`) and the guaranteed bounds (:mod:`.bounds`) use this one routine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .norms import spectral_norm_exact
from .threads import grouped_side, with_bound_threads

#: Bytes of complex symbol matrices evaluated at once (memory chunking over the first axis).
_CHUNK_BYTES = 64 << 20


def taps_last(wg: Tensor) -> Tensor:
    """(g, co, ci, *k) -> (g, *k, co, ci)."""
    return wg.movedim((1, 2), (-2, -1))


def grid_nodes(grid: Sequence[int]) -> int:
    """Frequencies of the half grid: ``prod M[:-1] * (M[-1] // 2 + 1)``."""
    return math.prod(grid[:-1]) * (grid[-1] // 2 + 1)


def symbol_on_grid(
    wg: Tensor,
    grid: Sequence[int],
    dilation: Sequence[int] | None = None,
    first: tuple[int, int] | None = None,
) -> Tensor:
    """``P(dil * theta)`` at ``theta_j = 2 pi f_j / M_j``, half spectrum.

    Returns ``(g, nodes, co, ci)`` complex. Real filters satisfy ``P(-theta) =
    conj(P(theta))`` (same norm), so the last axis keeps ``f in [0, M // 2]``. Explicit
    DFT matrices (not ``fftn``) so any ``M`` (also smaller than the kernel: the taps then
    wrap around, as in a circular convolution on a small grid) and any dilation work.
    ``first = (start, stop)`` restricts the first axis's frequencies (memory chunking).
    """
    d = wg.ndim - 3
    dil = [1] * d if dilation is None else list(dilation)
    x = wg.to(torch.complex128)
    for j in range(d):
        m = int(grid[j])
        nf = m // 2 + 1 if j == d - 1 else m
        lo, hi = first if (j == 0 and first is not None) else (0, nf)
        f = torch.arange(lo, hi, dtype=torch.float64, device=wg.device)
        t = torch.arange(wg.shape[3 + j], dtype=torch.float64, device=wg.device)
        # integer phases reduced mod m first (exact in float64) so large grids lose nothing
        phase = torch.outer(f, t * dil[j]).remainder_(m) * (-2 * math.pi / m)
        e = torch.polar(torch.ones_like(phase), phase)  # (nf, k_j)
        x = torch.movedim(torch.tensordot(x, e, dims=([3 + j], [1])), -1, 3 + j)
    g, co, ci = wg.shape[:3]
    return taps_last(x).reshape(g, -1, co, ci)


@with_bound_threads(grouped_side)
def max_symbol_norm(
    wg: Tensor, grid: Sequence[int], dilation: Sequence[int] | None = None
) -> Tensor:
    """``max_nodes ||P(dil * node)||_2`` over the half grid (exact, no margin), in chunks.

    0-dim float64, differentiable with respect to ``wg``. Callers that certify multiply by
    their rounding margin; ``fl(x (1 + e))`` is non-decreasing in ``x``, so the margin
    commutes with the maximum bit for bit. Runs under the bound thread limit
    (:mod:`.threads`) whoever calls it, so the exact reference and the bound see the same
    arithmetic.
    """
    d = wg.ndim - 3
    nf0 = grid[0] // 2 + 1 if d == 1 else int(grid[0])
    per_row = grid_nodes(grid) // nf0 * wg.shape[0] * wg.shape[1] * wg.shape[2] * 16
    step = max(1, _CHUNK_BYTES // max(per_row, 1))
    maxima = [
        spectral_norm_exact(symbol_on_grid(wg, grid, dilation, (lo, min(lo + step, nf0)))).amax()
        for lo in range(0, nf0, step)
    ]
    return torch.stack(maxima).amax()
