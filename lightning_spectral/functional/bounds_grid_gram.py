"""Gram iteration per frequency on the DFT grid of a circular convolution, with a rounding account.

Notation as in :mod:`.symbol`. The circular convolution ``C_M`` by the dilated filter on an
``M``-grid has norm ``max_f ||P(dil * theta_f)||_2`` over the grid frequencies (Sedghi, Gupta &
Long, ICLR 2019). Delattre, Barthelemy, Araujo & Allauzen (ICML 2023) bound each ``||P||`` by
Gram iteration; :func:`grid_gram_bound` does so with every floating-point error accounted for,
so the result is a guaranteed upper bound on ``||C_M||``, not an estimate.

Rounding model. ``u`` is the unit roundoff of the arithmetic (``2^-53`` for complex128,
``2^-24`` for complex64), ``gamma_n = n u / (1 - n u)``. A complex product of ``m x n`` by
``n x p`` matrices satisfies, entrywise,

    |fl(AB) - AB| <= c_n |A| |B| + n tiny,       c_n = sqrt(2) gamma_{2n},

whatever order the products are summed in, fused multiply-adds or not: the real and imaginary
parts of each entry are real sums of ``2n`` products, each off by at most ``gamma_{2n}`` times
the sum of the absolute products (Higham, *Accuracy and Stability of Numerical Algorithms*,
2nd ed., eq. 3.5), and ``(|ac| + |bd|)^2 + (|ad| + |bc|)^2 <= 2 |x|^2 |y|^2`` for
``x = a + ib, y = c + id``. ``n tiny`` covers underflow (``tiny``: the smallest normal
number). This assumes the usual ``O(n^3)`` product (no Strassen or 3M method), which is what
the CPU and GPU BLAS behind ``torch.matmul`` compute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .matricize import grouped_weight
from .norms import spectral_norm_exact
from .symbol import grid_nodes, taps_last
from .threads import filter_side, with_bound_threads

__all__ = ["grid_gram_bound", "grid_gram_cost", "symbol_error"]

#: Bytes of complex128 symbol matrices refined at once (memory chunking over the frequencies).
_CHUNK_BYTES = 128 << 20
#: ``u`` of the float64 bookkeeping (Frobenius norms, the back-substitution).
_U64 = 2.0**-53
#: Rounds a float64 result of at most 8 correctly rounded operations up past its exact value.
_UP = 1 + 16 * _U64
#: Error of one computed DFT factor ``exp(-i phase)``: the phase ``fl(fl(r) fl(-2 pi / m))``
#: (``r`` an exact integer) is off by ``gamma_3 2 pi``, and cos / sin by an ulp each; 32 u
#: is above both with room.
_EXP_ERR = 32 * _U64


def _gamma(n: float, u: float) -> float:
    if n * u >= 0.5:
        raise ValueError(f"gamma_{n} undefined for u = {u}: the matrices are too large")
    # the float evaluation is off by a few u_64 relative: 1e-12 puts it above gamma_n.
    return n * u / (1 - n * u) * (1 + 1e-12)


def _unit(dtype: torch.dtype) -> tuple[float, float]:
    """``(u, tiny)`` of a complex dtype."""
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    info = torch.finfo(real)
    return float(info.eps) / 2, float(info.tiny)


def _frequencies(nodes: Tensor, grid: Sequence[int]) -> Tensor:
    """``(len(nodes), d)`` integer frequency vectors of half-grid node numbers (row-major,
    last axis ``M_d // 2 + 1`` long)."""
    sizes = [*grid[:-1], grid[-1] // 2 + 1]
    out = []
    rest = nodes.clone()
    for m in reversed(sizes):
        out.append(rest % m)
        rest = rest // m
    return torch.stack(out[::-1], dim=-1)


def _dft_rows(freqs: Tensor, kernel: Sequence[int], grid: Sequence[int], dil: Sequence[int],
              dtype: torch.dtype) -> Tensor:
    """``E[f, t] = exp(-2 pi i sum_j r_j / M_j)``, ``r_j = (f_j dil_j t_j) mod M_j`` (exact
    integers), for the taps ``t`` in row-major order; float64 phases, rounded to ``dtype``."""
    taps = torch.cartesian_prod(*[torch.arange(k, device=freqs.device) for k in kernel])
    taps = taps.view(-1, len(kernel))
    q = torch.zeros(freqs.shape[0], taps.shape[0], dtype=torch.float64, device=freqs.device)
    for j, m in enumerate(grid):
        r = torch.outer(freqs[:, j] * dil[j], taps[:, j]).remainder(m)
        q = q + r.to(torch.float64) / m
    phase = q * (-2 * math.pi)
    return torch.polar(torch.ones_like(phase), phase).to(dtype)


def symbol_nodes(wg: Tensor, nodes: Tensor, grid: Sequence[int], dil: Sequence[int],
                 dtype: torch.dtype) -> Tensor:
    """``P(dil * theta)`` at the given half-grid nodes, ``(len(nodes) * g, co, ci)`` in
    ``dtype`` (node-major), from one product of the DFT rows with the flattened filter."""
    g, co, ci, *k = wg.shape
    e = _dft_rows(nodes_freq := _frequencies(nodes, grid), k, grid, dil, dtype)
    del nodes_freq
    flat = taps_last(wg).reshape(g, -1, co * ci).transpose(0, 1).reshape(math.prod(k), -1)
    return (e @ flat.to(dtype)).reshape(-1, co, ci)


def symbol_error(wg: Tensor, dtype: torch.dtype) -> Tensor:
    """Per group, a bound on ``||fl(P(theta)) - P(theta)||_2`` at every node (float64).

    :func:`symbol_nodes` computes ``P = E W`` (``E`` the DFT rows, ``W`` the taps flattened)
    with ``W`` rounded to ``dtype`` (``|W^ - W| <= u_w |W|``) and ``E`` from float64
    phases: the phase ``2 pi sum_j r_j / M_j`` (``|.| < 2 pi d``, ``d`` terms) is off by at
    most ``2 pi d gamma_{d+2}``, cos and sin by an ulp each, and the rounding to ``dtype``
    adds ``u``: ``|E^ - E| <= delta``. With ``A = sum_t |W_t|`` (entrywise, ``co x ci``) and
    the product bound of the module docstring over the ``K`` taps,
    ``|P^ - P| <= |fl(E^ W^) - E^ W^| + |E^ - E| |W^| + |E| |W^ - W|
    <= ((1 + c_K)(1 + delta)(1 + u_w) - 1) A``, so ``||P^ - P||_2 <= (that) ||A||_F``.
    """
    d = wg.ndim - 3
    u, _ = _unit(dtype)
    u_w = 0.0 if dtype == torch.complex128 else u
    delta = 2 * math.pi * d * _gamma(d + 2, _U64) + 4 * _U64 + u * 1.01
    taps = math.prod(wg.shape[3:])
    log_growth = (
        math.log1p(math.sqrt(2) * _gamma(2 * taps, u)) + math.log1p(delta) + math.log1p(u_w)
    )
    a = wg.detach().abs().flatten(3).sum(-1)  # (g, co, ci)
    # the factor is far above the float64 errors of its own evaluation: 2x covers them.
    return a.flatten(1).norm(dim=1) * (2 * math.expm1(log_growth))


def _frobenius_up(x: Tensor) -> Tensor:
    """``>= ||x||_F`` for each matrix of a batch (float64), one pass in ``x``'s precision.

    A sum of ``m`` non-negative terms in unit roundoff ``u`` is off by at most ``gamma_m``
    relative, whatever the order; the squares and the square root add ``u`` each:
    ``(1 + gamma_{m + 2})`` covers all three.
    """
    u, _ = _unit(x.dtype)
    m = 2 * x.shape[-1] * x.shape[-2]
    fro = torch.linalg.vector_norm(torch.view_as_real(x), dim=(-3, -2, -1)).to(torch.float64)
    return fro * (1 + _gamma(m + 2, u)) * _UP


def _pow2_scale(x: Tensor) -> Tensor:
    """The exponent ``e`` (float64) with ``max |Re, Im x_ij| 2^-e`` in ``[1/2, 1)`` (0 for x = 0).

    Powers of two make the rescaling exact, so it adds nothing to the rounding account.
    """
    flat = torch.view_as_real(x).reshape(x.shape[0], -1)
    top = torch.maximum(flat.amax(dim=-1), -flat.amin(dim=-1)).to(torch.float64)
    _, e = torch.frexp(torch.where(top > 0, top, torch.ones_like(top)))
    return e.to(torch.float64)


def _pow2(e: Tensor) -> Tensor:
    """``2^e`` for integer-valued float64 ``e`` (exact)."""
    return torch.ldexp(torch.ones_like(e), e)


def _scale_(x: Tensor, e: Tensor) -> Tensor:
    """``x 2^-e`` per matrix, in place: exact, as a power of two (underflow aside, see
    ``_Chain``). On the real view: a complex product would cost four real ones."""
    factor = _pow2(-e).to(x.real.dtype).view(-1, 1, 1, 1)
    torch.view_as_real(x).mul_(factor)
    return x


def cholesky_top(x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Where Cholesky certifies it, ``mu >= lambda_max(H)`` for ``H`` either Hermitian matrix
    that one triangle of ``x`` (and the real part of its diagonal) defines; ``(mu, ok)``.

    ``A = fl(alpha I - x)`` is factored in ``x``'s precision (unit roundoff ``u``); LAPACK
    reads one triangle of ``A`` and the real part of its diagonal. If the factorization runs
    to completion, the computed factor satisfies ``R R^H = A + dA`` with ``|dA| <= c |R|
    |R^H|``, ``c = sqrt(2) gamma_{2n+2}`` (Higham, *Accuracy and Stability*, Theorem 10.3:
    its proof bounds each entry as one inner product evaluated in any order, as blocked
    implementations do; in complex arithmetic each real or imaginary part is a real sum of
    at most ``2n + 1`` terms, then a division by a real number). ``R R^H`` is positive
    semidefinite, so ``lambda_min(A) >= -||dA||_F >= -c ||R||_F^2``; and ``||R||_F^2 = tr(R R^H)
    = tr A + tr dA <= tr A + c ||R||_F^2``, so ``||R||_F^2 <= tr A / (1 - c)`` (the real
    diagonal of ``A`` summed in float64, ``gamma_n`` relative). Forming ``A`` rounds only
    the diagonal, by at most ``u (alpha + max |x_ii|)``. So ``lambda_max(H) = alpha -
    lambda_min(alpha I - H) <= alpha + u (alpha + max |x_ii|) + c ||R||_F^2 + 4 n^3 tiny
    =: mu`` (the last term for underflow). ``alpha`` is used as rounded to ``x``'s precision.
    """
    n = x.shape[-1]
    u, tiny = _unit(x.dtype)
    alpha = alpha.to(x.real.dtype)
    a = -x
    a.diagonal(dim1=-2, dim2=-1).real.add_(alpha.view(-1, 1))
    trace = a.diagonal(dim1=-2, dim2=-1).real.to(torch.float64).sum(dim=-1)
    r, info = torch.linalg.cholesky_ex(a)
    ok = (info == 0) & torch.isfinite(r.diagonal(dim1=-2, dim2=-1).real).all(dim=-1)
    diag = x.diagonal(dim1=-2, dim2=-1).real.abs().amax(dim=-1).to(torch.float64)
    alpha = alpha.to(torch.float64)
    c = math.sqrt(2) * _gamma(2 * n + 2, u)
    fro2 = trace.clamp_min(0) * (1 + _gamma(n, _U64)) / (1 - c) * _UP
    mu = (alpha + u * (alpha + diag) + c * fro2 + 4 * n**3 * tiny) * _UP
    return torch.where(ok, mu, torch.full_like(mu, math.inf)), ok


def cholesky_inflation(n: int, dtype: torch.dtype) -> float:
    """Relative excess of ``mu`` over ``alpha`` for a random-like ``n x n`` Gram matrix
    (``||R||_F^2 = tr(alpha I - H) ~ 3 n alpha / 4``): which precision the ladder uses."""
    u, _ = _unit(dtype)
    return math.sqrt(2) * _gamma(2 * n + 2, u) * 0.75 * n


class _Chain:
    """The Gram chain of a batch of matrices and the upper bounds it certifies.

    ``X_0`` is the (power-of-two rescaled) symbol rounded to the Gram dtype, and
    ``X_{t+1} = fl(X_t^H X_t) 2^-e_t``. Each step satisfies

        ||X_t||_2^2 = ||X_t^H X_t||_2 <= 2^e_t ||X_{t+1}||_2 + c_n F_t^2 + 4 n^3 tiny,

    ``F_t >= ||X_t||_F`` and ``n`` the rows of ``X_t`` (Weyl, with the product bound of the
    module docstring: ``|| |X|^T |X| ||_F <= ||X||_F^2``; ``4 n^3 tiny`` for underflow in the
    product and in the rescaling by ``2^-e_t``, ``e_t <= log2(n^2) + 1`` since the entries
    of ``X_t`` are below 1). Starting from ``b_T = F_T >= ||X_T||_2`` the recursion
    ``b_t = sqrt(2^e_t b_{t+1} + c_n F_t^2 + 4 n^3 tiny)`` gives ``b_0 >= ||X_0||_2`` (every
    float64 step of it rounded up by the factor ``_UP``). The same holds with ``b_1 = mu``
    from :func:`cholesky_top` at level 1: the lower triangle of ``fl(X_0^H X_0)`` is within
    ``c_n |X_0|^H |X_0|`` of the exact ``X_0^H X_0`` entrywise, so ``||X_0||^2 <= 2^e_0 mu
    + c_n F_0^2 + ...`` as well. Without the Cholesky step the bound converges to ``||X_0||``
    like ``r^(1 / 2^(T+1))``, ``r`` the multiplicity of the top singular value.
    """

    def __init__(self, x0: Tensor, fro: Tensor) -> None:
        """``fro >= ||x0||_F`` per node."""
        self.u, self.tiny = _unit(x0.dtype)
        self.exps: list[Tensor] = []  # e_t per node, for t < current level
        self.terms: list[Tensor] = []  # c_n F_t^2 + 4 n^3 tiny per node
        self.x = x0
        self.fro = fro

    @property
    def level(self) -> int:
        return len(self.exps)

    def bound_from(self, top: Tensor, level: int, nodes: Tensor | None = None) -> Tensor:
        """``b_0`` from a bound ``top`` on level ``level``, for ``nodes`` (default: all)."""
        b = top
        for e, term in zip(reversed(self.exps[:level]), reversed(self.terms[:level]), strict=True):
            if nodes is not None:
                e, term = e[nodes], term[nodes]
            b = torch.sqrt(b * _pow2(e) + term) * _UP
        return b

    def level_bound(self) -> Tensor:
        """``b_0`` from the current level ``T`` (``b_T = F_T``), per node."""
        return self.bound_from(self.fro, self.level)

    def step(self) -> None:
        """``X_{t+1}``: one batched Gram product, rescaled by a power of two."""
        n = self.x.shape[-2]
        c = math.sqrt(2) * _gamma(2 * n, self.u)
        self.terms.append((c * self.fro.square() + 4 * n**3 * self.tiny) * _UP)
        k = self.x.mH @ self.x
        e = _pow2_scale(k)
        self.exps.append(e)
        self.x = _scale_(k, e)
        self.fro = _frobenius_up(self.x)

    def keep(self, mask: Tensor) -> None:
        """Drop the nodes outside ``mask`` (their bounds are final)."""
        self.x = self.x[mask]
        self.exps = [e[mask] for e in self.exps]
        self.terms = [t[mask] for t in self.terms]
        self.fro = self.fro[mask]

    def estimate(self, n_iter: int = 6) -> Tensor:
        """Estimates from below of each ``||X_0||^2 / 2^e_0`` (level >= 1; they only steer the
        pruning, so they need no guarantee): power iteration on ``X_1 ~ X_0^H X_0`` from its
        largest column, then the Rayleigh quotient."""
        x = self.x if self.level == 1 else None
        if x is None:
            raise ValueError("estimate needs the chain at level 1")
        col = torch.linalg.vector_norm(torch.view_as_real(x), dim=(-3, -1)).argmax(dim=-1)
        v = torch.take_along_dim(x, col.view(-1, 1, 1), dim=-1)  # (b, n, 1)
        for _ in range(n_iter):
            v = x @ v
            size = torch.linalg.vector_norm(torch.view_as_real(v), dim=(-3, -2, -1))
            v = v / size.clamp_min(1e-30).view(-1, 1, 1)
        return (v.mH @ x @ v).real.reshape(-1).to(torch.float64).clamp_min(0)


def _ladder(
    chain: _Chain, sym_exp: Tensor, floor: float, tol: float, rounds: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Cholesky certificates of level 1 at per-node thresholds ``tau`` (symbol units).

    ``tau`` means ``alpha = (tau / 2^E)^2 / 2^e_0`` at level 1. Every node first tries
    ``floor (1 + tol)``. The few that fail are the candidates for the maximum: their top
    eigenvalue is estimated (``eigvalsh`` of level 1, no guarantee needed) and they try
    ``(1 + tol)`` above it, then ``(1 + tol 2^j)`` times their last threshold while they fail.
    Returns each node's ``b_0`` (``inf`` where no round succeeded within ``rounds``) and the
    mask of certified nodes. A failed round proves nothing: the search only steers.
    """
    m = chain.x.shape[0]
    b0 = torch.full((m,), math.inf, dtype=torch.float64, device=chain.x.device)
    tau = torch.full_like(b0, floor * (1 + tol))
    to_sym = _pow2(chain.exps[0]).sqrt() * _pow2(sym_exp)  # sqrt(level 1) -> symbol units
    todo = torch.arange(m, device=b0.device)
    for j in range(rounds):
        if todo.numel() == 0:
            break
        x = chain.x if todo.numel() == m else chain.x[todo]
        alpha = (tau[todo] / to_sym[todo]).square()
        mu, ok = cholesky_top(x.to(dtype), alpha)
        hit, todo = todo[ok], todo[~ok]
        if hit.numel():
            b0[hit] = chain.bound_from(mu[ok], 1, hit)
        if todo.numel() == 0:
            break
        if j == 0:
            top = torch.linalg.eigvalsh(x[~ok])[..., -1].to(torch.float64).clamp_min(0)
            tau[todo] = torch.maximum(tau[todo], top.sqrt() * to_sym[todo]) * (1 + tol)
        else:
            tau[todo] = tau[todo] * (1 + tol * 2.0**j)
    return b0, torch.isfinite(b0)


def _refine(
    p: Tensor, max_steps: int, tol: float, floor: float, slack: Tensor,
    rounds: int = 12,
    chol_dtype: torch.dtype = torch.complex128,
) -> tuple[Tensor, float]:
    """Guaranteed ``>= ||p_b||_2`` for each matrix of the batch ``p`` (overwritten), pruned.

    ``floor`` is a running lower estimate of the grid maximum; a node stops being refined once
    its bound (``slack``, its share of the symbol error, included) is at most ``floor (1 +
    tol)``: refining it further could not lower the maximum below that. Order: the Frobenius
    norm (level 0), one Gram product (level 1) and its Frobenius bound, the Cholesky ladder
    (:func:`_ladder`) at level 1, and further Gram products for the nodes it leaves.
    Returns the bounds and the updated estimate.
    """
    e_sym = _pow2_scale(p)
    h0 = _scale_(p, e_sym)
    _, tiny = _unit(p.dtype)
    # the rescaling may underflow, by at most tiny an entry
    absolute = 2 * p.shape[-1] * p.shape[-2] * tiny
    chain = _Chain(h0, (_frobenius_up(h0) + absolute) * _UP)
    out = torch.full_like(e_sym, math.inf)
    alive = torch.arange(p.shape[0], device=p.device)

    def record(b0: Tensor, nodes: Tensor) -> None:
        b0 = (b0 + absolute) * _UP
        out[nodes] = torch.minimum(out[nodes], (b0 * _pow2(e_sym[nodes]) + slack[nodes]) * _UP)

    def prune(keep: Tensor) -> None:
        nonlocal alive
        if not bool(keep.all()):
            chain.keep(keep)
            alive = alive[keep]

    record(chain.level_bound(), alive)
    for t in range(max_steps):
        prune(out[alive] > floor * (1 + tol))
        if alive.numel() == 0:
            break
        chain.step()
        if t == 0:
            est = (chain.estimate() * _pow2(chain.exps[0])).sqrt() * _pow2(e_sym[alive])
            floor = max(floor, float(est.amax()))
        record(chain.level_bound(), alive)
        if t == 0 and rounds > 0:
            prune(out[alive] > floor * (1 + tol))
            if alive.numel() == 0:
                break
            b0, ok = _ladder(chain, e_sym[alive], floor, tol, rounds, chol_dtype)
            record(torch.where(ok, b0, math.inf), alive)
            prune(~ok)
    return out, floor


def _symbol_at(wg: Tensor, freq: Sequence[int], grid: Sequence[int], dil: Sequence[int]) -> Tensor:
    """``P(dil * theta)`` at one grid frequency, ``(g, co, ci)`` complex128, differentiable."""
    x = wg.to(torch.complex128)
    for j, (f, m) in enumerate(zip(freq, grid, strict=True)):
        t = torch.arange(wg.shape[3 + j], dtype=torch.float64, device=wg.device)
        phase = (f * dil[j] * t).remainder(m) * (-2 * math.pi / m)
        # each contraction removes axis 3, so the next spatial axis moves into its place
        x = torch.tensordot(x, torch.polar(torch.ones_like(phase), phase), dims=([3], [0]))
    return x


def grid_gram_cost(nodes: int, g: int, co: int, ci: int, steps: int, dtype: torch.dtype) -> float:
    """Multiply-adds (real, complex128 units) of ``steps`` Gram products at every node.

    A complex product counts 4 real ones; complex64 counts half (measured: about 2x faster).
    """
    n_small, n_big = min(co, ci), max(co, ci)
    first = n_small * n_small * n_big
    rest = max(steps - 1, 0) * n_small**3
    factor = 2.0 if dtype == torch.complex64 else 4.0
    return factor * g * nodes * (first + rest)


@with_bound_threads(filter_side)
def grid_gram_bound(
    weight: Tensor,
    grid: Sequence[int],
    *,
    groups: int = 1,
    dilation: Sequence[int] | None = None,
    max_steps: int = 6,
    tol: float = 2e-3,
    dtype: torch.dtype = torch.complex128,
    rounds: int = 12,
    chol_dtype: torch.dtype | None = None,
) -> Tensor:
    """Guaranteed ``>= max_f ||P(dil * theta_f)||_2`` over the ``grid`` frequencies (float64).

    This is the exact norm of the circular convolution on that grid up to the Gram
    iteration's convergence; :mod:`.bounds` turns it into a layer bound. Per frequency the
    symbol ``P^`` is computed in ``dtype`` (error at most :func:`symbol_error`; complex64
    halves the cost of the products), rescaled by a power of two, and Gram-iterated: ``||P||^(2^(t+1)) <= ||(P^H
    P)^(2^t)||_F`` in exact arithmetic (Delattre et al., ICML 2023), here with every product's
    error carried up the chain as in :class:`_Chain`. So for every frequency

        ||P|| <= ||P^|| + err_P <= 2^e0 b_0 + err_P,

    and the bound is the maximum of these over the frequencies.

    Anytime: a running estimate ``L`` of the grid maximum from below (the top column of the
    chain, see :meth:`_Chain.estimate`) retires every frequency whose current bound is at
    most ``L (1 + tol)``; the others are refined up to ``max_steps`` products. Retiring only
    costs tightness: each frequency keeps the guaranteed bound it had. Conjugate symmetry of
    a real filter (``P(-theta) = conj P(theta)``) halves the grid.

    Gradient: the value is computed without autograd; when the weight requires grad, the
    result carries the gradient of the exact ``||P(theta*)||_2`` at the frequency ``theta*``
    that attains the bound (the derivative the Gram bound tends to as it converges).
    """
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    if dtype not in (torch.complex64, torch.complex128):
        raise ValueError(f"dtype must be complex64 or complex128, got {dtype}")
    d = weight.ndim - 2
    if d < 1 or len(grid) != d:
        raise ValueError(f"grid {tuple(grid)} does not match a filter of shape {tuple(weight.shape)}")
    dil = [1] * d if dilation is None else [int(x) for x in dilation]
    grid = [int(m) for m in grid]
    wg = grouped_weight(weight.detach().to(torch.float64), groups)
    if wg.shape[1] < wg.shape[2]:
        wg = wg.transpose(1, 2)  # P^T has P's norm; the Gram side is then the smaller one
    g, co, ci = wg.shape[:3]
    err = symbol_error(wg, dtype)
    if chol_dtype is None:  # complex64 where its rounding costs at most tol / 2
        chol_dtype = (
            torch.complex64 if cholesky_inflation(ci, torch.complex64) <= tol / 2
            else torch.complex128
        )
    total = grid_nodes(grid)
    step = max(1, _CHUNK_BYTES // (g * co * ci * 16))
    floor, best, where = 0.0, None, (0, 0)
    with torch.no_grad():
        for lo in range(0, total, step):
            nodes = torch.arange(lo, min(lo + step, total), device=wg.device)
            p = symbol_nodes(wg, nodes, grid, dil, dtype)  # node-major: row = node * g + group
            bounds, floor = _refine(
                p, max_steps, tol, floor, err.repeat(nodes.numel()), rounds, chol_dtype
            )
            top, arg = bounds.max(dim=0)
            if best is None or top > best:
                best = top
                where = (int(arg) % g, lo + int(arg) // g)
    assert best is not None
    if not (weight.requires_grad and torch.is_grad_enabled()):
        return best
    return best + _gradient_carrier(weight, groups, where, grid, dil)


def _gradient_carrier(
    weight: Tensor, groups: int, where: tuple[int, int], grid: Sequence[int], dil: Sequence[int]
) -> Tensor:
    """``s - s.detach()`` for ``s = ||P(theta*)||_2`` of group ``where[0]``: zero value, the
    exact norm's gradient at the node ``where[1]`` that attains the bound."""
    wg = grouped_weight(weight.to(torch.float64), groups)
    freq = _frequencies(torch.tensor([where[1]]), grid)[0].tolist()
    p = _symbol_at(wg[where[0] : where[0] + 1], freq, grid, dil)[0]
    s = spectral_norm_exact(p)
    return s - s.detach()

