"""The grid Gram bounds: the smaller zero-padding grid, the rounding account, the layer bounds.

References are built independently of the code under test: explicit operator matrices
(``oracles``), and grid norms from ``torch.fft`` of the wrapped dilated kernel with a full SVD.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.oracles import operator_norm
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_bounds import _filter, layers
from torch import nn

from lightning_spectral.functional.bounds import grid_gram_bound, layer_bounds
from lightning_spectral.functional.bounds_grid_gram import (
    _correlation_taps,
    _pow2,
    _pow2_scale,
    _scale_,
    cholesky_top,
    gram_error,
    gram_nodes,
    symbol_error,
    symbol_nodes,
)
from lightning_spectral.functional.geometry import Geometry, gram_grid, polyphase_grid
from lightning_spectral.functional.matricize import grouped_weight


def _fft_grid_norm(w: torch.Tensor, grid, dil, groups: int = 1) -> float:
    """``max ||P(dil theta)||`` over the full ``grid``: the dilated kernel wrapped onto the grid
    (taps summed mod M, as a circular convolution on a small grid does), ``fftn``, SVD."""
    wg = grouped_weight(w.detach().to(torch.float64), groups)  # (g, co, ci, *k)
    d = wg.ndim - 3
    x = wg
    for j in range(d):
        k = x.shape[3 + j]
        idx = (torch.arange(k) * dil[j]) % grid[j]
        shape = list(x.shape)
        shape[3 + j] = grid[j]
        wrapped = x.new_zeros(shape)
        wrapped.index_add_(3 + j, idx, x)
        x = wrapped
    sym = torch.fft.fftn(x, dim=tuple(range(3, 3 + d)))
    mats = sym.movedim((1, 2), (-2, -1))
    return float(torch.linalg.svdvals(mats)[..., 0].max())


# ----------------------------------------------------------------------------- the grids


def _conv_matrix(w: torch.Tensor, n: int, s: int, dil: int, pl: int, pr: int) -> torch.Tensor:
    """Explicit matrix of ``x -> conv1d(pad(x, (pl, pr)), w, stride=s, dilation=dil)``."""
    ci = w.shape[1]
    eye = torch.eye(ci * n, dtype=torch.float64).reshape(-1, ci, n)
    out = F.conv1d(F.pad(eye, (pl, pr)), w, stride=s, dilation=dil)
    return out.reshape(ci * n, -1).T  # rows (co, o)


def _circular_matrix(w: torch.Tensor, big_n: int, dil: int) -> torch.Tensor:
    """Explicit ``C_N``: ``(C z)[r] = sum_t W_t z[(r + dil t) mod N]``, rows (co, r)."""
    co, ci, k = w.shape
    c = torch.zeros(co, big_n, ci, big_n, dtype=torch.float64)
    for r in range(big_n):
        for t in range(k):
            c[:, r, :, (r + dil * t) % big_n] += w[:, :, t]
    return c


@settings(max_examples=150)
@given(n=st.integers(1, 9), k=st.integers(1, 4), s=st.integers(1, 3), dil=st.integers(1, 3),
       pl=st.integers(0, 4), pr=st.integers(0, 4))
def test_gram_grid_rows_are_distinct_rows_of_the_circular_convolution(n, k, s, dil, pl, pr):
    """Every row i of J is row (i s - pl) mod N of C_N E (E: columns [0, n)), the non-zero
    ones distinct, for N = gram_grid; and that N is never above Geometry.grid's."""
    ext = dil * (k - 1) + 1
    assume(n + pl + pr >= ext)
    conv = nn.Conv1d(2, 3, k, stride=s, dilation=dil)
    conv._reversed_padding_repeated_twice = [pl, pr]  # what Geometry reads; forward unused
    geo = Geometry(conv)
    (big_n,) = gram_grid(geo, (n,))
    assert big_n <= geo.grid((n,))[0]
    assert big_n <= n + max(pl, pr)
    w = torch.randn(3, 2, k, dtype=torch.float64)
    j = _conv_matrix(w, n, s, dil, pl, pr)
    o = j.shape[0] // 3
    j = j.reshape(3, o, 2, n)
    c = _circular_matrix(w, big_n, dil)[:, :, :, :n]
    rows = [(i * s - pl) % big_n for i in range(o)]
    torch.testing.assert_close(j, c[:, rows], rtol=0, atol=0)
    nonzero = [r for i, r in enumerate(rows) if bool(j[:, i].abs().sum() > 0)]
    assert len(set(nonzero)) == len(nonzero)


def test_gram_grid_is_smaller_for_resnet_padding() -> None:
    geo = Geometry(nn.Conv2d(4, 4, 3, padding=1))
    assert gram_grid(geo, (7, 7)) == [8, 8] and geo.grid((7, 7)) == [9, 9]
    strided = Geometry(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert polyphase_grid(strided, (56, 56)) == [29, 29]


# ----------------------------------------------------------------------------- rounding account


def test_power_of_two_rescaling_is_exact() -> None:
    x = torch.randn(5, 4, 3, dtype=torch.complex64) * torch.logspace(-30, 30, 5).view(-1, 1, 1)
    e = _pow2_scale(x)
    y = _scale_(x.clone(), e)
    top = torch.view_as_real(y).abs().flatten(1).amax(1)
    assert bool(((top >= 0.5) & (top < 1)).all())
    back = y * _pow2(e).to(torch.float32).view(-1, 1, 1)
    assert torch.equal(back, x)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_symbol_error_covers_the_computed_symbol(dtype) -> None:
    torch.manual_seed(0)
    shape = (2, 6, 5, 3, 4)
    w = torch.randn(*shape, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, shape)
    grid, dil = [7, 5], [2, 1]
    nodes = torch.arange(7 * 3)
    got = symbol_nodes(w, nodes, grid, dil, dtype).to(torch.complex128)
    ref = symbol_nodes(w, nodes, grid, dil, torch.complex128)
    err = symbol_error(w, dtype)
    gap = torch.linalg.matrix_norm(got - ref, 2).reshape(-1, 2).amax(0)
    assert bool((gap <= err).all())
    a = w.abs().flatten(3).sum(-1).flatten(1).norm(dim=1)
    assert bool((err <= (1e-5 if dtype == torch.complex64 else 1e-13) * a).all())
    # the symbol itself, against torch.fft
    exact = _fft_grid_norm(w[0], grid, dil)
    top = float(torch.linalg.svdvals(ref.reshape(-1, 2, 6, 5)[:, 0])[..., 0].max())
    assert top == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_gram_error_covers_the_kernel_route(dtype) -> None:
    torch.manual_seed(5)
    shape = (1, 7, 6, 3, 2)
    w = torch.randn(*shape, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, shape)
    grid, dil = [6, 5], [1, 2]
    nodes = torch.arange(6 * 3)
    got = gram_nodes(_correlation_taps(w), nodes, grid, dil, dtype).to(torch.complex128)
    p = symbol_nodes(w, nodes, grid, dil, torch.complex128)
    ref = p.mH @ p
    gap = float(torch.linalg.matrix_norm(got - ref, 2).max())
    err = float(gram_error(w, dtype)[0])
    assert gap <= err
    a = float(w.abs().flatten(3).sum(-1).norm()) ** 2
    assert err <= (1e-4 if dtype == torch.complex64 else 1e-12) * a


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_cholesky_top_certifies_above_and_refuses_below(dtype) -> None:
    torch.manual_seed(1)
    p = torch.randn(6, 40, 30, dtype=dtype)
    g = p.mH @ p
    top = torch.linalg.eigvalsh(g.to(torch.complex128))[..., -1].to(torch.float64)
    mu, ok = cholesky_top(g, top * 1.01)
    assert bool(ok.all()) and bool((mu >= top).all()) and bool((mu <= top * 1.02).all())
    _, ok = cholesky_top(g, top * 0.99)
    assert not bool(ok.any())


# ----------------------------------------------------------------------------- the bound


@st.composite
def filters(draw):
    d = draw(st.sampled_from([1, 1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    co, ci = groups * draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kernel = tuple(draw(st.integers(1, {1: 5, 2: 3, 3: 2}[d])) for _ in range(d))
    grid = [draw(st.integers(1, {1: 12, 2: 7, 3: 4}[d])) for _ in range(d)]
    dil = [draw(st.integers(1, 3)) for _ in range(d)]
    w = _filter(draw, (co, ci, *kernel))
    return w, groups, grid, dil


@settings(max_examples=150)
@given(case=filters(), dtype=st.sampled_from([torch.complex64, torch.complex128]),
       max_steps=st.sampled_from([0, 1, 2, 6]), rounds=st.sampled_from([0, 1, 12]),
       tol=st.sampled_from([0.0, 2e-3, 0.5]), route=st.sampled_from([None, "symbol", "kernel"]),
       chol=st.sampled_from([None, torch.complex64, torch.complex128]))
def test_grid_gram_bound_is_sound(case, dtype, max_steps, rounds, tol, route, chol) -> None:
    w, groups, grid, dil = case
    exact = _fft_grid_norm(w, grid, dil, groups)
    if route == "kernel" and max_steps == 0:
        route = None
    got = grid_gram_bound(w, grid, groups=groups, dilation=dil, dtype=dtype, route=route,
                          max_steps=max_steps, rounds=rounds, tol=tol, chol_dtype=chol).item()
    assert got >= exact, (got, exact)
    if max_steps >= 1 and rounds == 12 and dtype == chol == torch.complex128 and exact > 0:
        # the ladder certifies within (1 + tol) of the top, or the pruning stops there
        assert got <= exact * (1 + 2 * tol) * (1 + 1e-9) + 1e-300


def test_grid_gram_bound_is_tight_on_wide_random_filters() -> None:
    torch.manual_seed(2)
    w = torch.randn(48, 40, 3, 3, dtype=torch.float64)
    exact = _fft_grid_norm(w, [11, 11], [1, 1])
    for dtype in (torch.complex64, torch.complex128):
        got = grid_gram_bound(w, [11, 11], dtype=dtype).item()
        assert exact <= got <= exact * 1.004
    # without the Cholesky ladder: plain Gram iteration with its rounding account
    for route in ("symbol", "kernel"):
        plain = grid_gram_bound(w, [11, 11], rounds=0, max_steps=7, tol=0.0, route=route)
        assert exact <= plain.item() <= exact * 1.01
        loose = grid_gram_bound(w, [11, 11], rounds=0, max_steps=1, tol=0.0, route=route)
        assert loose.item() > 1.5 * exact


def test_grid_gram_gradient_is_the_top_frequencys() -> None:
    torch.manual_seed(3)
    w = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(grid_gram_bound(w, [9]), w)
    wg = grouped_weight(w, 1)
    p = symbol_nodes(wg, torch.arange(5), [9], [1], torch.complex128)
    (ref,) = torch.autograd.grad(torch.linalg.matrix_norm(p, 2).max(), w)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- layer bounds


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=100)
@given(layers())
def test_grid_bounds_are_sound_on_every_layer(case) -> None:
    layer, size = case
    assume(not isinstance(layer, nn.Linear))
    exact = operator_norm(layer, size).item()
    bounds = layer_bounds(layer, size)
    strided = any(s > 1 for s in layer.stride) and layer.padding_mode != "circular"
    name = "polyphase_grid_gram" if strided else "grid_gram"
    if strided:
        taps = [-(-(d * (k - 1) + 1) // s) for k, s, d in
                zip(layer.kernel_size, layer.stride, layer.dilation, strict=True)]
    else:
        taps = list(layer.kernel_size)
    assert (name in bounds) == (math.prod(taps) > 1)
    for name in ("grid_gram", "polyphase_grid_gram"):
        if name in bounds:
            assert bounds[name].item() >= exact, (name, bounds[name].item(), exact)


@pytest.mark.parametrize("stride", [1, 2])
def test_grid_bounds_are_tight_on_a_random_zero_padded_layer(stride) -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(12, 12, 3, padding=1, stride=stride, bias=False).double()
    exact = operator_norm(conv, (9, 9)).item()
    bounds = layer_bounds(conv, (9, 9), max_cost=1e10)
    best = bounds["grid_gram" if stride == 1 else "polyphase_grid_gram"].item()
    assert exact <= best <= exact * (1.03 if stride == 1 else 1.2)
    # below every bound that holds at all sizes (the grid's gain); the exact norm of
    # another grid, ``fft``, may be either side of it
    assert best < min(v.item() for k, v in bounds.items()
                      if "fantastic" in k or "sampled" in k or "tap_sum" in k)


def test_grid_bounds_respect_the_cost_cap() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, stride=2)
    assert "polyphase_grid_gram" not in layer_bounds(conv, (8, 8), max_cost=0)
    assert math.isfinite(float(layer_bounds(conv, (8, 8))["polyphase_grid_gram"]))
    assert "grid_gram" not in layer_bounds(nn.Conv2d(8, 8, 1), (8, 8))  # constant symbol


def test_benchmark_grid_gram_method_is_sound() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.boundspeed.config import Config
    from benchmarks.boundspeed.measure import measure
    from benchmarks.boundspeed.methods import METHODS, SIZED_PROVABLE

    cfg = Config(quick=True, threads=1, device=torch.device("cpu"), time_budget=0.0)
    for stride, k in ((1, 3), (2, 3), (2, 1)):
        conv = nn.Conv2d(3, 5, k, stride=stride, padding=k // 2)
        exact = operator_norm(conv, (7, 7)).item()
        value = measure(METHODS["grid-Gram"].build(conv, (7, 7), cfg), cfg).value
        assert value >= exact and "grid-Gram" in SIZED_PROVABLE
