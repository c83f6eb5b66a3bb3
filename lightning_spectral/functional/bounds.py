"""Guaranteed upper bounds on the spectral norm of convolution and linear layers.

Notation. A filter ``W`` of shape ``(c_out, c_in, k_1, ..., k_d)`` has taps ``W_t`` (the
``c_out x c_in`` matrices ``W[:, :, t]``) and symbol

    P(theta) = sum_t W_t exp(-i theta . t),      theta in the torus [0, 2 pi)^d.

Write ``S = sup_theta ||P(theta)||_2``. Every layer this module supports factors as

    J = Sel o C_N o E

with ``C_N`` the circular convolution by the *dilated* filter on an ``N``-grid, ``E`` an
embedding (zero padding), the identity (circular padding), or an embedding after a pixel
copying matrix (reflect/replicate), and ``Sel`` a row selection (stride, cropping):

* zero padding, any stride/dilation: the zero-padded operator is a sub-matrix of the
  circular convolution on a grid big enough that nothing wraps around (``N >= n + pl +
  pr``); a sub-matrix has a smaller norm.
* transposed convolutions: ``nn.ConvTransposeNd`` is the adjoint of the convolution with
  the same stored tensor (output cropped by ``padding``, extended by ``output_padding``),
  again a sub-matrix of the adjoint of a circular convolution: same norm bound.
* circular / reflect / replicate: see :mod:`lightning_spectral.functional.padding`; the
  norm of ``Sel`` / ``E`` is ``padding_factor`` (1 for zeros and for same-size circular).

``C_N`` is block-diagonalized by the DFT (Sedghi et al., ICLR 2019): its norm is the
maximum of ``||P(dil * theta)||`` over the ``N``-grid frequencies, hence ``<= S``
(dilation maps the torus into itself). So

    ||J||_2 <= padding_factor * ||C_N|| <= padding_factor * S,

and every bound on ``S`` ("symbol bounds") gives a layer bound. Groups make ``J``
block diagonal: bounds are computed per group and maximized. Everything is float64 and
differentiable with respect to the weight.

The symbol bounds live by family in :mod:`.bounds_matricize` (Fantastic Four, tap sum),
:mod:`.bounds_gram` (Gram kernel) and :mod:`.bounds_frequency` (circular grid norm, sampled
frequencies); the layer's factorization in :mod:`.geometry`. This module combines them per
layer, within a cost budget, and re-exports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .bounds_frequency import (
    circular_grid_norm,
    sampled_grid,
    sampled_inflation,  # noqa: F401 (re-exported: part of this module's interface)
    sampled_symbol_bound,
)
from .bounds_gram import gram_kernel_bound, gram_step_cost
from .bounds_grid_gram import grid_gram_bound, grid_gram_cost
from .bounds_matricize import fantastic_four, tap_sum_bound
from .geometry import SUPPORTED_LAYERS, Geometry, gram_grid, polyphase_filter, polyphase_grid
from .matricize import row_subsets
from .operator_power import layer_operator
from .opnorm import opnorm, opnorm_cost
from .padding import padding_factor
from .symbol import grid_nodes
from .threads import module_side, with_bound_threads

__all__ = [
    "SUPPORTED_LAYERS",
    "layer_factor",
    "fantastic_four",
    "tap_sum_bound",
    "gram_kernel_bound",
    "sampled_symbol_bound",
    "circular_grid_norm",
    "grid_gram_bound",
    "layer_bounds",
    "layer_spectral_bound",
    "polyphase_filter",
]

# Self-correlation steps of the Gram-kernel bound by d (its kernel grows as 2^t (k - 1) + 1
# per axis, and in practice the sampled bound is as tight at a fraction of the time).
_GRAM_MAX_STEPS = {1: 3, 2: 2, 3: 1}
# Inflation of the sampled bound above which the Gram-kernel bound is tried as well.
_GRAM_IF_RHO = 1.2
# Default cost budget of each optional bound: this many times the Fantastic-Four cost, at
# least _MIN_BUDGET (multiply-add units of ``opnorm_cost``). 4x keeps the sampled bound's
# inflation near 1.2 on large 3x3 layers (about 30% below FF on random filters) at a few
# times FF's run time; small layers get the 1.05 target from the floor.
_BUDGET_FACTOR = 4
_MIN_BUDGET = 2e8
# Default cost cap of the grid Gram bounds (multiply-add units of ``grid_gram_cost``, about
# 2e9 a second on one CPU thread): every ResNet-18 layer at its input size gets them.
_GRID_BUDGET = 4e10
# Gram products per frequency the cost model counts: the first, and the Cholesky ladder
# (a factorization or two of the Gram matrix, about one more product).
_GRID_STEPS = 2


def _ff_cost(wg_shape: Sequence[int]) -> float:
    """Cost of the ``2^d`` Fantastic-Four norms (and, below it, of the tap sum's)."""
    g, co, ci, *k = wg_shape
    ff_cost = 0.0
    for a in row_subsets(len(k)):
        rows = co * math.prod(k[i] for i in a)
        ff_cost += g * opnorm_cost(rows, co * ci * math.prod(k) // rows)
    return ff_cost


def _default_budget(wg_shape: Sequence[int], d: int) -> float:
    """``max(_MIN_BUDGET, _BUDGET_FACTOR x the cost of the 2^d Fantastic-Four norms)``."""
    return max(_MIN_BUDGET, _BUDGET_FACTOR * _ff_cost(wg_shape))


def _grid_dtype(c_small: int) -> torch.dtype:
    """complex64 for the Gram products of wide layers (twice as fast; its rounding, a
    relative ``~ c u_32``, is accounted for), complex128 for narrow ones (cheap anyway)."""
    return torch.complex64 if c_small >= 64 else torch.complex128


def _grid_gram(w: Tensor, g: int, grid: Sequence[int], dilation: Sequence[int] | None,
               cap: float) -> Tensor | None:
    """:func:`grid_gram_bound` of ``w`` on ``grid`` when its predicted cost fits ``cap``."""
    co, ci = w.shape[0] // g, w.shape[1]
    dtype = _grid_dtype(min(co, ci))
    cost = grid_gram_cost((g, co, ci, *w.shape[2:]), grid_nodes(grid), _GRID_STEPS, dtype)
    if cost > cap:
        return None
    return grid_gram_bound(w, grid, groups=g, dilation=dilation, dtype=dtype)


def _node_cost(g: int, co: int, ci: int, taps: int) -> float:
    """Cost of one frequency node: a complex ``co x ci`` norm (4x real) and its DFT terms."""
    return 4 * g * opnorm_cost(co, ci) + g * co * ci * taps


def _gram_steps(
    kernel: list[int], g: int, c_small: int, c_big: int, budget: float
) -> tuple[int, list[int]]:
    """As many self-correlation steps as the budget allows (up to ``_GRAM_MAX_STEPS``), and
    the kernel size they lead to.

    Each step costs one grouped correlation; the bound is then evaluated on the final
    kernel (about ``3 c_small^3`` per tap), which must fit as well.
    """
    cost, ksize, steps = 0.0, list(kernel), 0
    c_in_step = c_big
    while steps < _GRAM_MAX_STEPS[len(kernel)]:
        new = [2 * x - 1 for x in ksize]
        step = gram_step_cost(g, c_small, c_in_step, math.prod(ksize), math.prod(new))
        evaluate = g * math.prod(new) * c_small**3 * 3
        if cost + step + evaluate > budget:
            break
        cost += step
        ksize, c_in_step, steps = new, c_small, steps + 1
    return steps, ksize


def _symbol_bounds(w: Tensor, g: int, budget: float, essential: bool = True) -> dict[str, Tensor]:
    """Every bound on ``sup ||P(theta)||`` of the filter ``w`` that fits ``budget``.

    ``essential=False`` (a grid bound is there, at least as tight up to its tolerance): the
    Fantastic-Four and tap-sum bounds too only where they cost at most ``_MIN_BUDGET``.
    """
    co, ci = w.shape[0] // g, w.shape[1]
    kernel = [int(k) for k in w.shape[2:]]
    d = len(kernel)
    out: dict[str, Tensor] = {}
    if essential or _ff_cost((g, co, ci, *kernel)) <= _MIN_BUDGET:
        out["fantastic_four"] = fantastic_four(w, groups=g)
    if essential or g * math.prod(kernel) * opnorm_cost(co, ci) <= _MIN_BUDGET:
        out["tap_sum"] = tap_sum_bound(w, groups=g)
    c_small, c_big = min(co, ci), max(co, ci)
    taps = math.prod(kernel)
    sampled = sampled_grid(kernel, budget / _node_cost(g, co, ci, taps))
    if sampled is not None:
        out["sampled_frequency"] = sampled_symbol_bound(w, sampled[0], groups=g)
    if taps > 1 and (sampled is None or sampled[1] > _GRAM_IF_RHO):
        # Gram kernel, only where the sampled bound is absent or loose (elsewhere it is
        # never tighter in practice).
        steps, ksize = _gram_steps(kernel, g, c_small, c_big, budget)
        if steps:
            subsets = "all" if g * (c_small * max(ksize)) ** 3 * 2**d <= budget else "ends"
            out["gram_kernel"] = gram_kernel_bound(w, groups=g, n_steps=steps, subsets=subsets)
    return out


def _check_input_size(input_size: Sequence[int] | None, d: int) -> tuple[int, ...] | None:
    if input_size is None:
        return None
    size = tuple(int(n) for n in input_size)
    if len(size) != d or min(size) < 1:
        raise ValueError(f"input_size must be {d} positive spatial sizes, got {tuple(size)}")
    return size



def layer_factor(geo: Geometry, input_size: tuple[int, ...] | None) -> float:
    """The padding factor of the layer (1 for transposed convolutions: zeros only)."""
    if geo.transposed:
        return 1.0
    return padding_factor(geo.mode, geo.kernel, geo.stride, geo.dilation, geo.pads, input_size)


@with_bound_threads(module_side)
def layer_bounds(
    module: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    max_cost: float | None = None,
) -> dict[str, Tensor]:
    """Every provable upper bound on ``module``'s spectral norm (bias excluded), by name.

    ``nn.Linear``: ``{"matrix_norm": ||W||_2}`` (exact). Convolutions (and transposed
    ones): each symbol bound times the padding factor (module docstring), namely
    ``fantastic_four``, ``tap_sum``, and, when their cost fits, ``sampled_frequency`` and
    (if that one is absent or inflated by more than 1.2) ``gram_kernel``; for strided
    layers (not circular mode) the same bounds of the polyphase filter, named
    ``polyphase_<name>`` (see :func:`polyphase_filter`). With
    ``input_size`` (the spatial size of the layer's input) the padding factor is exact for
    that size and ``fft`` (the exact norm of ``C_N``, equal to the layer's norm for
    circular same-size stride-1 layers) joins when it fits, and so does ``operator_matrix``
    for small layers: the norm of the layer's explicit matrix at that size, built from the
    layer's own map on the basis vectors (exact up to the rounding margin of every matrix
    norm here).

    Cost cap: each optional bound is computed only if its multiply-add count (an ``m x n``
    SVD counts ``min(m,n)^2 max(m,n)``, a complex one 4 times that) is at most
    ``max_cost``; the default is ``max(2e8, 4 x the Fantastic-Four cost)``, so the extras
    cost a small multiple of the four bounds themselves.
    """
    geo = Geometry(module)
    w = geo.weight
    if geo.linear:
        return {"matrix_norm": opnorm(w.to(torch.float64))}
    size = _check_input_size(input_size, len(geo.kernel))
    wg_shape = (geo.groups, w.shape[0] // geo.groups, *w.shape[1:])
    g, co, ci = wg_shape[:3]
    budget = _default_budget(wg_shape, len(geo.kernel)) if max_cost is None else float(max_cost)
    factor = layer_factor(geo, size)
    grid = geo.grid(size) if size is not None else None
    strided = any(st > 1 for st in geo.stride) and (geo.transposed or geo.mode != "circular")
    poly = polyphase_filter(w, geo.stride, geo.dilation) if strided else None
    grids = {} if size is None else _grid_bounds(geo, size, poly, max_cost)
    # with a grid bound the other bounds must be cheap to be worth their time
    sym_budget = budget if not grids else min(budget, _MIN_BUDGET)
    out = _symbol_bounds(w, g, sym_budget, essential=not grids)
    if poly is not None:
        # Not for circular mode: its factor counts rows of C_n, a decomposition in which
        # the stride lives in the row selection, not in the convolution.
        extra = _symbol_bounds(poly, g, sym_budget, essential=not grids)
        out.update({f"polyphase_{k}": v for k, v in extra.items()})
    node_cost = _node_cost(g, co, ci, math.prod(geo.kernel))
    if grid is not None and grid_nodes(grid) * node_cost <= sym_budget:
        out["fft"] = circular_grid_norm(w, grid, groups=g, dilation=geo.dilation)
    out.update(grids)
    if factor != 1.0:
        out = {name: value * factor for name, value in out.items()}
    if size is not None:
        explicit = _explicit_norm(cast(_ConvNd, module), size, budget)  # not geo.linear
        if explicit is not None:
            out["operator_matrix"] = explicit
    return out


def _grid_bounds(
    geo: Geometry, size: tuple[int, ...], poly: Tensor | None, max_cost: float | None
) -> dict[str, Tensor]:
    """The grid Gram bound of the layer at ``size`` when its predicted cost fits ``max_cost``
    (default ``_GRID_BUDGET``): for strided layers (not circular) ``polyphase_grid_gram``,
    the polyphase filter on :func:`.geometry.polyphase_grid` (the stride-1 embedding leaves
    the stride's row selection out: on ResNet-18's stride-2 layers it is 30% looser at
    several times the cost); else ``grid_gram``, the filter on :func:`.geometry.gram_grid`.
    None for a single-tap filter: its symbol is constant, and the Fantastic-Four bound is
    already its exact norm."""
    cap = _GRID_BUDGET if max_cost is None else float(max_cost)
    if poly is not None:
        name, w, grid, dil = "polyphase_grid_gram", poly, polyphase_grid(geo, size), None
    else:
        name, w, grid, dil = "grid_gram", geo.weight, gram_grid(geo, size), geo.dilation
    if math.prod(w.shape[2:]) == 1:
        return {}
    value = _grid_gram(w, geo.groups, grid, dil, cap)
    return {} if value is None else {name: value}


def _explicit_norm(module: _ConvNd, size: tuple[int, ...], budget: float) -> Tensor | None:
    """``opnorm`` of the layer's explicit matrix at ``size``, when building and factoring it
    fits ``budget``: the norm itself (no padding factor, no symbol), for small layers.

    The matrix is the layer's own map (stride, dilation, groups, padding mode) applied to the
    ``n`` basis vectors of its input in float64, differentiable in the weight; its norm is
    computed as every other matrix norm here, raised by the rounding margin of ``opnorm``.
    """
    channels = module.weight.shape[0] if isinstance(
        module, _ConvTransposeNd) else module.weight.shape[1] * module.groups
    n_in = channels * math.prod(size)
    with torch.no_grad():
        probe = layer_operator(module)(
            torch.zeros(1, channels, *size, dtype=module.weight.dtype,
                        device=module.weight.device), module.weight)
    n_out = probe.numel()
    # Building: n_in convolutions of cost n_out * taps * c_in / groups each, bounded by the
    # dense product n_in * n_out * c_in; factoring: the Gram eigenproblem.
    build = float(n_in) * n_out * max(1, module.weight.shape[1])
    if build + opnorm_cost(n_out, n_in) > budget:
        return None
    eye = torch.eye(n_in, dtype=torch.float64, device=module.weight.device)
    out = layer_operator(module)(eye.reshape(n_in, channels, *size),
                                 module.weight.to(torch.float64))
    return opnorm(out.reshape(n_in, n_out))


@with_bound_threads(module_side)
def layer_spectral_bound(
    module: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    max_cost: float | None = None,
) -> Tensor:
    """The tightest provable bound: ``min(layer_bounds(module, input_size).values())``.

    0-dim float64, differentiable with respect to ``module.weight``. Without
    ``input_size`` it holds for every input size torch accepts; with it, for that size.
    """
    return torch.stack(list(layer_bounds(module, input_size, max_cost=max_cost).values())).min()
