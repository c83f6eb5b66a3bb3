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

__all__ = [
    "cholesky_top",
    "gram_error",
    "gram_nodes",
    "grid_gram_bound",
    "grid_gram_cost",
    "symbol_error",
    "symbol_nodes",
]

#: Bytes of level-0 or level-1 matrices (counted as complex128) refined at once: memory
#: chunking over the frequencies; the running estimate carries over from chunk to chunk.
_CHUNK_BYTES = 128 << 20
#: ``u`` of the float64 bookkeeping (Frobenius norms, the back-substitution).
_U64 = 2.0**-53
#: Rounds a float64 result of at most 8 correctly rounded operations up past its exact value.
_UP = 1 + 16 * _U64


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


def _offsets(lo: Sequence[int], hi: Sequence[int], device: torch.device) -> Tensor:
    """``(T, d)`` integer offsets ``lo <= t < hi`` in row-major order."""
    axes = [torch.arange(a, b, device=device) for a, b in zip(lo, hi, strict=True)]
    return torch.cartesian_prod(*axes).view(-1, len(axes))


def _dft_rows(freqs: Tensor, taps: Tensor, grid: Sequence[int], dil: Sequence[int],
              dtype: torch.dtype) -> Tensor:
    """``E[f, t] = exp(-2 pi i sum_j r_j / M_j)``, ``r_j = (f_j dil_j t_j) mod M_j`` (exact
    integers, any sign of ``t``), for the offsets ``taps`` ``(T, d)``; float64 phases, rounded
    to ``dtype``."""
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
    taps = _offsets([0] * len(k), k, wg.device)
    e = _dft_rows(_frequencies(nodes, grid), taps, grid, dil, dtype)
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


def _correlation_taps(wg: Tensor) -> tuple[Tensor, Tensor]:
    """``K_tau = sum_{t' - t = tau} W_t^T W_t'`` for the offsets ``tau`` in ``(-k, k)``:
    ``(offsets (T, d), K (g, T, ci, ci))`` in float64. ``P^H P (theta) = sum_tau K_tau
    exp(-i theta . dil tau)``. One product ``W^T W`` of the ``co x (K ci)`` tap matrix gives
    every ``W_t^T W_t'``; the blocks are then summed by ``tau``."""
    g, co, ci, *k = wg.shape
    d, taps = len(k), math.prod(k)
    wm = taps_last(wg).reshape(g, taps, co, ci).permute(0, 2, 1, 3).reshape(g, co, taps * ci)
    blocks = (wm.transpose(1, 2) @ wm).reshape(g, taps, ci, taps, ci).transpose(2, 3)
    t = _offsets([0] * d, k, wg.device)
    diff = (t.unsqueeze(0) - t.unsqueeze(1)).reshape(-1, d)  # [t, t'] -> t' - t
    offsets = _offsets([1 - x for x in k], k, wg.device)
    index = torch.zeros(diff.shape[0], dtype=torch.long, device=wg.device)
    for j in range(d):
        index = index * (2 * k[j] - 1) + (diff[:, j] + k[j] - 1)
    out = wg.new_zeros(g, offsets.shape[0], ci, ci)
    out.index_add_(1, index, blocks.reshape(g, taps * taps, ci, ci))
    return offsets, out


def gram_nodes(corr: tuple[Tensor, Tensor], nodes: Tensor, grid: Sequence[int],
               dil: Sequence[int], dtype: torch.dtype) -> Tensor:
    """``P^H P (dil * theta)`` at the half-grid nodes, ``(len(nodes) * g, ci, ci)`` in
    ``dtype`` (node-major): one product of the DFT rows of the offsets with ``K_tau``."""
    offsets, k = corr
    g, t, ci, _ = k.shape
    e = _dft_rows(_frequencies(nodes, grid), offsets, grid, dil, dtype)
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    flat = k.permute(1, 0, 2, 3).reshape(t, -1).to(real)
    # complex times real: two real products, not one complex one with a zero imaginary part
    parts = torch.stack([e.real @ flat, e.imag @ flat], dim=-1)
    return torch.view_as_complex(parts).reshape(-1, ci, ci)


def gram_error(wg: Tensor, dtype: torch.dtype) -> Tensor:
    """Per group, a bound on ``||fl(P^H P) - P^H P||_2`` of :func:`gram_nodes` at every node.

    With ``A = sum_t |W_t|``: the products ``W_t^T W_t'`` are off by ``gamma_co |W_t|^T
    |W_t'|`` (float64), the sums over the at most ``K`` pairs of one ``tau`` by ``gamma_K``
    (float64), their rounding to the DFT's real dtype by ``u_K``, the DFT factors by
    ``delta`` (as in :func:`symbol_error`) and the DFT sums (a complex times a real: each
    part a real sum of ``T`` products) by ``sqrt(2) gamma_T``. Every error is relative to the
    majorant ``sum_{t, t'} |W_t|^T |W_t'| = A^T A``, so ``|G^ - G| <= eta A^T A`` entrywise,
    ``eta = prod (1 + each) - 1``, and ``||G^ - G||_2 <= eta ||A||_F^2`` (``4 (K ci)^2 tiny``
    added for underflow).
    """
    g, co, ci, *k = wg.shape
    d, taps = len(k), math.prod(k)
    u, _ = _unit(dtype)
    u_k = 0.0 if dtype == torch.complex128 else u
    delta = 2 * math.pi * d * _gamma(d + 2, _U64) + 4 * _U64 + (u * 1.01 if u_k else 0.0)
    n_off = math.prod(2 * x - 1 for x in k)
    log_growth = (math.log1p(_gamma(co, _U64)) + math.log1p(_gamma(taps, _U64))
                  + math.log1p(u_k) + math.log1p(delta)
                  + math.log1p(math.sqrt(2) * _gamma(n_off, u)))
    a = wg.detach().abs().flatten(3).sum(-1).flatten(1).norm(dim=1)
    tiny = float(torch.finfo(torch.float64).tiny)
    return (a.square() * (2 * math.expm1(log_growth)) + 4 * (taps * ci) ** 2 * tiny) * _UP


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

    def estimate(self, top_k: int = 4) -> Tensor:
        """Estimates from below of each ``||X_0||^2 / 2^e_0`` (level 1; they only steer the
        pruning and the ladder, so they need no guarantee): the Rayleigh quotient of the
        largest column of ``X_1 ~ X_0^H X_0`` everywhere, and ``lambda_max`` itself
        (``eigvalsh``) at the ``top_k`` nodes where that is largest."""
        if self.level != 1:
            raise ValueError("estimate needs the chain at level 1")
        est = _rayleigh(self.x, 1)
        top = est.topk(min(top_k, est.numel())).indices
        exact = torch.linalg.eigvalsh(self.x[top])[..., -1].to(torch.float64)
        return est.index_put((top,), torch.maximum(est[top], exact))


def _rayleigh(x: Tensor, n_iter: int) -> Tensor:
    """Power iteration on the Hermitian ``x`` from its largest column, then the Rayleigh
    quotient: a lower estimate of ``lambda_max`` (it only steers the pruning and the ladder,
    so it needs no guarantee). ``n_iter`` products with a vector cost ``n_iter / n`` of one
    Gram product."""
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
    eigenvalue is estimated again (:func:`_rayleigh`, more steps) and they try
    ``(1 + tol)`` above it, then ``(1 + tol 2^j)`` times their last threshold while they fail.
    Returns each node's ``b_0`` (``inf`` where no round succeeded within ``rounds``) and the
    mask of certified nodes. A failed round proves nothing: the search only steers.
    """
    m = chain.x.shape[0]
    b0 = torch.full((m,), math.inf, dtype=torch.float64, device=chain.x.device)
    tau = torch.full_like(b0, floor * (1 + tol))
    to_sym = _pow2(chain.exps[0]).sqrt() * _pow2(sym_exp)  # sqrt(level 1) -> symbol units
    todo = torch.arange(m, device=b0.device)
    rounded = _unit(dtype)[0] > _unit(chain.x.dtype)[0]
    u_chol = _unit(dtype)[0]
    for j in range(rounds):
        if todo.numel() == 0:
            break
        x = chain.x if todo.numel() == m else chain.x[todo]
        alpha = (tau[todo] / to_sym[todo]).square()
        mu, ok = cholesky_top(x.to(dtype), alpha)
        if rounded:
            # factoring a rounded copy: the Hermitian matrix of one triangle moves by at most
            # sqrt(2) u ||X_1||_F in norm (each entry by u of itself), so mu moves as much
            mu = (mu + 2 * u_chol * chain.fro[todo]) * _UP
        hit, todo = todo[ok], todo[~ok]
        if hit.numel():
            b0[hit] = chain.bound_from(mu[ok], 1, hit)
        if todo.numel() == 0:
            break
        if j == 0:
            # eigvalsh where it is cheaper than the batched power steps (measured)
            top = (torch.linalg.eigvalsh(x[~ok])[..., -1].to(torch.float64).clamp_min(0)
                   if x.shape[-1] <= 256 else _rayleigh(x[~ok], 48))
            tau[todo] = torch.maximum(tau[todo], top.sqrt() * to_sym[todo]) * (1 + tol)
        else:
            tau[todo] = tau[todo] * (1 + tol * 2.0**j)
    return b0, torch.isfinite(b0)


def _refine(
    chain: _Chain, e_sym: Tensor, slack: Tensor, absolute: float, max_steps: int, tol: float,
    floor: float, rounds: int, chol_dtype: torch.dtype,
) -> tuple[Tensor, float]:
    """Guaranteed ``>= ||P_b||_2`` for each node of ``chain`` (at level 0 or 1), pruned.

    ``||P_b|| <= 2^e_sym (b_0 + absolute) + slack`` for the chain's ``b_0``. ``floor`` is a
    running lower estimate of the grid maximum; a node stops being refined once its bound
    is at most ``floor (1 + tol)``: refining it further could not lower the maximum below
    that. Order: the Frobenius bound of the current level, up to level 1 by a Gram product,
    the Cholesky ladder (:func:`_ladder`) at level 1, and further Gram products (up to
    ``max_steps`` levels) for the nodes it leaves. Returns the bounds and the new estimate.
    """
    out = torch.full_like(e_sym, math.inf)
    alive = torch.arange(e_sym.shape[0], device=e_sym.device)

    def record(b0: Tensor) -> None:
        b0 = (b0 + absolute) * _UP
        bound = (b0 * _pow2(e_sym[alive]) + slack[alive]) * _UP
        out[alive] = torch.minimum(out[alive], bound)

    def prune(keep: Tensor) -> bool:
        nonlocal alive
        if not bool(keep.all()):
            chain.keep(keep)
            alive = alive[keep]
        return alive.numel() > 0

    def estimate() -> float:
        est = (chain.estimate() * _pow2(chain.exps[0])).sqrt() * _pow2(e_sym[alive])
        return max(floor, float(est.amax()))

    record(chain.level_bound())
    if chain.level == 1:
        floor = estimate()
    laddered = False
    while prune(out[alive] > floor * (1 + tol)):
        if chain.level == 1 and rounds > 0 and not laddered:
            laddered = True
            b0, ok = _ladder(chain, e_sym[alive], floor, tol, rounds, chol_dtype)
            record(torch.where(ok, b0, math.inf))
            if not prune(~ok):
                break
        if chain.level >= max_steps:
            break
        chain.step()
        if chain.level == 1:
            floor = estimate()
        record(chain.level_bound())
    return out, floor


def _symbol_chain(wg: Tensor, nodes: Tensor, grid: Sequence[int], dil: Sequence[int],
                  dtype: torch.dtype) -> tuple[_Chain, Tensor, float]:
    """Level 0: the symbol at the nodes, rescaled by powers of two (exact but for
    underflow, at most ``tiny`` an entry: the ``absolute`` term)."""
    p = symbol_nodes(wg, nodes, grid, dil, dtype)  # node-major: row = node * g + group
    e_sym = _pow2_scale(p)
    h0 = _scale_(p, e_sym)
    absolute = 2 * p.shape[-1] * p.shape[-2] * _unit(dtype)[1]
    return _Chain(h0, (_frobenius_up(h0) + absolute) * _UP), e_sym, absolute


def _gram_chain(corr: tuple[Tensor, Tensor], err: Tensor, scale: float, nodes: Tensor,
                grid: Sequence[int], dil: Sequence[int], dtype: torch.dtype
                ) -> tuple[_Chain, Tensor]:
    """Level 1 straight from ``K_tau`` (:func:`gram_nodes`), the filter pre-scaled by
    ``2^-scale``: ``X_1 = G^ 2^-e_0`` and, in the place of the level-0 product's error,
    :func:`gram_error` (``||P||^2 <= ||G^|| + err``, and the same for the Cholesky
    certificate, whichever triangle it reads)."""
    gm = gram_nodes(corr, nodes, grid, dil, dtype)
    e0 = _pow2_scale(gm)
    x1 = _scale_(gm, e0)
    chain = _Chain(x1, _frobenius_up(x1))
    chain.exps = [e0]
    chain.terms = [err.repeat(nodes.numel())]
    return chain, torch.full_like(e0, scale)


def _symbol_at(
    wg: Tensor, freq: Sequence[int], grid: Sequence[int], dil: Sequence[int]
) -> Tensor:
    """``P(dil * theta)`` at one grid frequency, ``(g, co, ci)`` complex128, differentiable."""
    x = wg.to(torch.complex128)
    for j, (f, m) in enumerate(zip(freq, grid, strict=True)):
        t = torch.arange(wg.shape[3 + j], dtype=torch.float64, device=wg.device)
        phase = (f * dil[j] * t).remainder(m) * (-2 * math.pi / m)
        # each contraction removes axis 3, so the next spatial axis moves into its place
        x = torch.tensordot(x, torch.polar(torch.ones_like(phase), phase), dims=([3], [0]))
    return x


def _level_one_costs(shape: Sequence[int], nodes: int) -> tuple[float, float]:
    """Real multiply-adds of level 1 for a filter ``(g, co, ci, *k)`` (``co >= ci``): from
    ``K_tau`` (one float64 product ``(K ci)^2 co``, then ``2 T ci^2`` per node) and from the
    symbol (a complex64 Gram product ``ci^2 co``, two real units, and the DFT per node)."""
    g, co, ci, *k = shape
    taps, n_off = math.prod(k), math.prod(2 * x - 1 for x in k)
    kernel = g * (taps * ci) ** 2 * co + 2 * g * nodes * n_off * ci * ci
    direct = 2 * g * nodes * (ci * ci * co + taps * co * ci)
    return kernel, direct


def _kernel_route_pays(shape: Sequence[int], nodes: int) -> bool:
    kernel, direct = _level_one_costs(shape, nodes)
    return kernel < direct


def grid_gram_cost(shape: Sequence[int], nodes: int, steps: int, dtype: torch.dtype) -> float:
    """Predicted real multiply-adds of :func:`grid_gram_bound` on a filter ``(g, co, ci, *k)``
    at ``nodes`` frequencies: the cheaper level 1 and ``steps - 1`` more products of the
    Gram side (the Cholesky ladder counts as about one). complex64 products count half
    (measured: about 2x faster than complex128)."""
    g, co, ci, *k = shape
    oriented = (g, max(co, ci), min(co, ci), *k)
    kernel, direct = _level_one_costs(oriented, nodes)
    factor = 1.0 if dtype == torch.complex64 else 2.0
    rest = max(steps - 1, 0) * 2 * g * nodes * min(co, ci) ** 3
    return min(kernel, direct * factor) + rest * factor


@with_bound_threads(filter_side)
def grid_gram_bound(
    weight: Tensor,
    grid: Sequence[int],
    *,
    groups: int = 1,
    dilation: Sequence[int] | None = None,
    max_steps: int = 6,
    tol: float = 3e-3,
    dtype: torch.dtype = torch.complex128,
    rounds: int = 12,
    chol_dtype: torch.dtype | None = None,
    route: str | None = None,
) -> Tensor:
    """Guaranteed ``>= max_f ||P(dil * theta_f)||_2`` over the ``grid`` frequencies (float64).

    That maximum is the exact norm of the circular convolution on the grid (Sedghi et al.);
    :mod:`.bounds` turns it into a layer bound. Per frequency (half grid: a real filter has
    ``P(-theta) = conj P(theta)``), with ``u`` the unit roundoff of ``dtype``:

    * Level 1, ``G = P^H P`` on the smaller channel side, either from the computed symbol
      (:func:`symbol_nodes`, error :func:`symbol_error`, then one batched Gram product) or,
      where cheaper, straight from the self-correlation ``K_tau`` of the filter
      (:func:`gram_nodes`, error :func:`gram_error`); every matrix rescaled by a power of two.
    * Gram iteration (Delattre, Barthelemy, Araujo & Allauzen, ICML 2023): ``||P||^(2^(t+1))
      <= ||(P^H P)^(2^t)||_F`` in exact arithmetic; here every product's error is carried up
      the chain as in :class:`_Chain`, so each level gives a guaranteed bound ``b_0``.
    * A Cholesky certificate at level 1 (:func:`cholesky_top`, :func:`_ladder`): ``lambda_max(G)
      <= mu`` as soon as ``alpha I - G`` factors, for thresholds just above an estimate of the
      grid maximum. One factorization costs a sixth of a Gram product, and its bound is
      within ``tol`` of the top at once, where Gram iteration needs ``log2(log n / tol)``
      products.

    For every frequency ``||P|| <= 2^E b_0 + err``, and the result is the maximum over the
    frequencies. Anytime: a running estimate ``L`` of the grid maximum from below
    (:meth:`_Chain.estimate`) retires every frequency whose current bound is at most ``L (1 +
    tol)``; the others are refined up to ``max_steps`` Gram levels. Retiring, the estimates
    and failed factorizations only cost tightness, never validity: each frequency keeps the
    guaranteed bound it had. ``rounds=0`` is plain Gram iteration with the rounding account.
    ``route``: ``"symbol"`` or ``"kernel"`` for level 1 (default: the cheaper; ``"kernel"``
    needs ``max_steps >= 1``); ``chol_dtype``: the certificate's precision (default:
    complex64 where its rounding costs at most ``tol``).

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
        shape = tuple(weight.shape)
        raise ValueError(f"grid {tuple(grid)} does not match a filter of shape {shape}")
    dil = [1] * d if dilation is None else [int(x) for x in dilation]
    grid = [int(m) for m in grid]
    wg = grouped_weight(weight.detach().to(torch.float64), groups)
    if wg.shape[1] < wg.shape[2]:
        wg = wg.transpose(1, 2)  # P^T has P's norm; the Gram side is then the smaller one
    g, co, ci = wg.shape[:3]
    if chol_dtype is None:  # complex64 where its rounding costs at most tol
        chol_dtype = (
            torch.complex64 if cholesky_inflation(ci, torch.complex64) <= tol
            else torch.complex128
        )
    total = grid_nodes(grid)
    if route not in (None, "symbol", "kernel") or (route == "kernel" and max_steps < 1):
        raise ValueError(
            f"route must be None, 'symbol' or 'kernel' (with max_steps >= 1), got {route!r}"
        )
    kernel_route = route == "kernel" or (
        route is None and max_steps >= 1 and _kernel_route_pays(wg.shape, total))
    if kernel_route:
        # pre-scale by a power of two (exact): K_tau then neither overflows nor underflows
        scale = float(_pow2_scale(wg.reshape(1, 1, -1).to(torch.complex128))[0])
        ws = wg * 2.0**-scale
        corr = _correlation_taps(ws)
        err = gram_error(ws, dtype)
    else:
        err = symbol_error(wg, dtype)
    step = max(1, _CHUNK_BYTES // (g * co * ci * 16))
    floor, best, where = 0.0, None, (0, 0)
    with torch.no_grad():
        for lo in range(0, total, step):
            nodes = torch.arange(lo, min(lo + step, total), device=wg.device)
            if kernel_route:
                chain, e_sym = _gram_chain(corr, err, scale, nodes, grid, dil, dtype)
                slack, absolute = torch.zeros_like(e_sym), 0.0
            else:
                chain, e_sym, absolute = _symbol_chain(wg, nodes, grid, dil, dtype)
                slack = err.repeat(nodes.numel())
            bounds, floor = _refine(chain, e_sym, slack, absolute, max_steps, tol, floor,
                                    rounds, chol_dtype)
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

