"""A compositional Lipschitz bound of a chain of linear maps and slope-restricted activations.

The network ``z_0 = x``, ``z_i = s_i(W_i z_{i-1} + b_i)`` for ``i < l``, ``f(x) = W_l z_{l-1} +
b_l``, where every ``s_i`` acts entrywise and is slope-restricted on ``[alpha_i, beta_i]``
(``0 <= alpha_i <= beta_i``, see :func:`.activations.activation_slope`). This is ECLipsE-Fast
(Xu & Sivaranjani, "ECLipsE: Efficient Compositional Lipschitz Constant Estimation for Deep
Neural Networks", NeurIPS 2024), made a certificate in float64.

Proof. Write ``du = z_{i-1} - z'_{i-1}``, ``dv = W_i du``, ``dw = z_i - z'_i`` (biases cancel)
and ``m = (alpha + beta) / 2``, ``p = alpha beta``. Slope restriction gives, per neuron ``j``,
``(dw_j - alpha dv_j)(dw_j - beta dv_j) <= 0``, i.e. ``-dw_j^2 + 2 m dw_j dv_j - p dv_j^2 >=
0``; summed with a multiplier ``l_i > 0``: ``l_i (-|dw|^2 + 2 m dw^T W du - p |W du|^2) >= 0``.
Claim: ``dz_i^T X_i dz_i <= |dx|^2`` for ``X_0 = I`` and ``X_i`` below. If ::

    M_i = [[X_{i-1} + l_i p W^T W,   -l_i m W^T],
           [-l_i m W,                l_i I - X_i]]  >= 0           (positive semidefinite)

then ``du^T X_{i-1} du - dw^T X_i dw = (du, dw)^T M_i (du, dw) + l_i (QC) >= 0``. ECLipsE-Fast
takes ``X_i = l_i I - l_i^2 m^2 W A^{-1} W^T`` with ``A = X_{i-1} + l_i p W^T W`` (the Schur
complement of ``M_i`` on its positive definite first block vanishes, so ``M_i >= 0``) and
``l_i = t / (m^2 lambda_max(W X_{i-1}^{-1} W^T))`` with ``t = 1/2``: since ``A >= X_{i-1}``
(``p >= 0``), ``l_i m^2 W A^{-1} W^T <= t I`` and ``X_i >= (1 - t) l_i I > 0``. Any ``t`` in
``(0, 1)`` is a valid certificate; this module tries several and keeps the smallest. Last,
``|W_l dz|^2 <= mu dz^T X_{l-1} dz`` whenever ``mu X_{l-1} - W_l^T W_l >= 0``, so ``L = sqrt(mu)``.

Arithmetic. Normalized ``Y_i = X_i / l_i`` (eigenvalues in ``[1 - t, 1]``) and ``s_i =
sqrt(l_i / l_{i-1})``: the congruence ``diag(l_{i-1}^{-1/2}, l_i^{-1/2})`` turns ``M_i`` into
``[[Y_{i-1} + s_i^2 p W^T W, -m s_i W^T], [-m s_i W, I - Y_i]]``; the last condition reads
``[[Y_{l-1}, r W_l^T], [r W_l, I]] >= 0`` with ``L = 1 / (r prod s_i)``. The ``s_i``, ``r``
and ``Y_i`` are whatever float64 numbers the recursion produces (``Y_i`` shrunk by
``max(1e-10, 64 n^2 u) I`` so that the matrices are definite with room to spare): the
certificate is that each of those block matrices, formed in floating point, is proved
positive semidefinite by :func:`certified_psd` (a Cholesky factorization with a rigorous
rounding allowance), the formation error of its entries included. No eigenvalue or inverse
needs to be exact.

An expanding start (:func:`_fast_start`). When ``W_1`` maps ``d_0`` inputs to ``d_1 > d_0``
units (a convolution with more output than input entries) and ``alpha_1 = alpha_2 = 0``
(``p = 0``), the first two steps are taken together and ``Y_1`` (``d_1 x d_1``) is never
formed. With reals ``a_1, a_2 > 0`` (floats, used exactly) put ``s_i = a_i / m_i`` and
*define* ``Y_1 = I - a_1^2 W_1 W_1^T``. Then ``M_1 = [[I, -a_1 W_1^T], [-a_1 W_1, I - Y_1]]``
has Schur complement ``I - Y_1 - a_1^2 W_1 W_1^T = 0`` on its identity block: ``M_1 >= 0``
holds exactly, with nothing to check. ``M_2 = [[Y_1, -a_2 W_2^T], [-a_2 W_2, I - Y_2]]`` is
the Schur complement, on its first (identity) block, of ::

    P = [[I, a_1 W_1^T, 0], [a_1 W_1, I, -a_2 W_2^T], [0, -a_2 W_2, I - Y_2]],

so ``P >= 0`` implies ``M_2 >= 0`` (``v^T M_2 v`` is the minimum over ``u`` of the quadratic
form of ``P`` at ``(u, v)``). The middle block of ``P`` is ``I``; its Schur complement there
is the ``(d_0 + d_2)``-square ::

    S = [[I - a_1^2 W_1^T W_1, a_1 a_2 (W_2 W_1)^T], [a_1 a_2 W_2 W_1, I - Y_2 - a_2^2 W_2 W_2^T]],

and ``P >= 0`` iff ``S >= 0``. So one :func:`certified_psd` of ``S``, formed from the three
products ``W_1^T W_1``, ``W_2 W_1``, ``W_2 W_2^T`` with their rounding errors in the slack,
certifies both steps; ``Y_2`` is any float matrix (chosen as ECLipsE-Fast's, from the
Woodbury identity ``W_2 Y_1^{-1} W_2^T = W_2 W_2^T + a_1^2 W_2 W_1 (I - a_1^2 W_1^T
W_1)^{-1} (W_2 W_1)^T``, unchecked). The products use the zero pattern of the matrices
(:func:`_matmul`, :func:`_gram`): every entry is still a sum of the same nonzero products,
in some order, which is all the error bound ``gamma_k |A| |B|`` needs.

Choices. The fractions are ranked by the unchecked recursion (in float32 when a matrix has
more than ``ROUGH_ABOVE`` rows or columns), and ``lambda_max`` of a matrix above 512 rows is
estimated by block power iteration with a Rayleigh-Ritz step. None of this enters the
certificate: it only picks the floats ``s_i``, ``r`` and ``Y_i`` that the checks then verify
(the best fraction's own checks, run on its unchecked float64 pass when that pass exists).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["certified_psd", "chain_lipschitz_bound", "fast_start_applies"]

_T = TypeVar("_T")
_U = 2.0**-53  # unit roundoff of float64
_RETRIES = (1.0, 1e2, 1e4)  # the shrink of Y_i, retried larger if a check fails
#: Multipliers ``l_i = t / (m^2 lambda_max)`` tried: ``t = 1/2`` is ECLipsE-Fast's choice.
FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9)


def _gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``."""
    return n * _U / (1 - n * _U)


def certified_psd(m: Tensor, slack: float = 0.0) -> bool:
    """True only if every symmetric ``M`` with ``||M - m||_2 <= slack`` is positive
    semidefinite (``m`` a symmetric float64 matrix, exactly as stored).

    Shift test (Rump, "Verification of positive definiteness", BIT 46, 2006): a Cholesky
    factorization of ``A = fl(m - c I)`` that runs to completion gives ``R^T R = A + dA`` with
    ``|dA| <= gamma_{n+1} |R^T| |R|`` (Higham, Accuracy and Stability of Numerical Algorithms,
    2nd ed., Thm 10.3). So ``tr(R^T R) <= tr(A) / (1 - gamma)`` and ``||dA||_2 <= gamma
    ||R||_F^2 <= gamma' tr(A)``, ``gamma' = gamma_{n+1} / (1 - gamma_{n+1})``; the shift
    itself rounds the diagonal by ``u |m_jj - c|``. Hence ``M >= (c - gamma' tr(A) -
    u max|m_jj - c| - slack) I``, nonnegative for the ``c`` below (twice what is needed, so
    that computing ``c`` in floating point cannot make it too small).
    """
    n = m.shape[-1]
    diag = m.diagonal().abs()
    trace = float(diag.sum()) * (1 + 2 * n * _U)  # >= the exact sum of |m_jj|, and >= tr(A)
    need = _gamma(n + 1) / (1 - _gamma(n + 1)) * trace * (1 + _U) + _U * float(diag.max())
    c = 2.0 * (need + slack)
    shifted = m.clone()
    shifted.diagonal().sub_(c)
    factor, info = torch.linalg.cholesky_ex(shifted)
    return int(info) == 0 and bool(torch.isfinite(factor).all())


def _top_eig(b: Tensor) -> float:
    """``lambda_max(b^T b)`` (estimate: it only chooses the multiplier), smaller Gram side."""
    g = b.mT @ b if b.shape[1] <= b.shape[0] else b @ b.mT
    return float(torch.linalg.eigvalsh(g)[-1])


def _slack(block: Tensor, w: Tensor, q: float, ms: float, err: float) -> float:
    """Allowance for a step matrix: every entry was formed with at most a few roundings
    (``6 u ||block||_F``), ``q W^T W`` adds ``q gamma_{d+3} ||W||_F^2``; a matrix known only
    to ``||W_true - W||_2 <= err`` adds ``2 ms err`` (off-diagonal blocks) and
    ``q (2 ||W||_F err + err^2)`` (the first block)."""
    frob = float(torch.linalg.matrix_norm(w)) * 1.01
    extra = q * (_gamma(w.shape[0] + 3) * frob * frob + 2 * frob * err + err * err) if q else 0.0
    return 6 * _U * float(torch.linalg.matrix_norm(block)) + extra + 2.02 * ms * err


def _step_matrix(a: Tensor, w: Tensor, ms: float, y_new: Tensor) -> Tensor:
    """``[[A, -ms W^T], [-ms W, I - Y_i]]`` (symmetric by construction)."""
    off = w * (-ms)
    lower = torch.eye(w.shape[0], dtype=w.dtype) - y_new
    return torch.cat([torch.cat([a, off.mT], 1), torch.cat([off, lower], 1)], 0)


def _shrink(n: int) -> float:
    """The first shrink of ``Y_i``: well above what :func:`certified_psd` can resolve at
    size ``n`` (about ``n^2 u``), tiny against the bound."""
    return max(1e-10, 64 * n * n * _U)


Checks = list[Callable[[], bool]]


def _try_step(y: Tensor, w: Tensor, m: float, p: float, shrink: float, t: float, err: float,
              certify: bool, pending: Checks | None = None) -> tuple[Tensor, float] | None:
    """One step from ``Y_{i-1}``: ``(Y_i, s_i)``, or None if a check fails (``certify=False``:
    the same step unchecked, its check appended to ``pending`` to be run later if wanted)."""
    chol, info = torch.linalg.cholesky_ex(y)
    if int(info):
        return None
    b = torch.linalg.solve_triangular(chol, w.mT, upper=False)  # L^{-1} W^T
    s = math.sqrt(t / (m * m * _top_eig(b)))
    q = s * s * p
    a = y + q * (w.mT @ w) if q else y
    if q:  # otherwise A = Y_{i-1}, whose factor and solve are the ones above
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info):
            return None
        b = torch.linalg.solve_triangular(chol, w.mT, upper=False)
    y_new = (b.mT @ b) * (-(s * s) * (m * m))
    y_new.diagonal().add_(1.0 - shrink)
    y_new = (y_new + y_new.mT) / 2

    def check() -> bool:
        block = _step_matrix(a, w, m * s, y_new)
        return certified_psd(block, _slack(block, w, q, m * s, err))

    return _checked((y_new, s), check, certify, pending)


def _checked(out: _T, check: Callable[[], bool], certify: bool, pending: Checks | None
             ) -> _T | None:
    """``out`` if ``check`` passes (``certify``), else ``out`` with the check put aside."""
    if certify:
        return out if check() else None
    if pending is not None:
        pending.append(check)
    return out


def _step(y: Tensor, w: Tensor, slope: tuple[float, float], t: float, err: float,
          certify: bool, pending: Checks | None) -> tuple[Tensor, float] | None:
    alpha, beta = slope
    m, p = (alpha + beta) / 2, alpha * beta
    for retry in _RETRIES:
        out = _try_step(y, w, m, p, retry * _shrink(sum(w.shape)), t, err, certify, pending)
        if out is not None:
            return out
    return None


def _last(y: Tensor, w: Tensor, err: float, certify: bool, pending: Checks | None = None
          ) -> float | None:
    """``r`` with ``[[Y, r W^T], [r W, I]] >= 0`` certified, or None."""
    chol, info = torch.linalg.cholesky_ex(y)
    if int(info):
        return None
    top = _top_eig(torch.linalg.solve_triangular(chol, w.mT, upper=False))
    for retry in _RETRIES:
        mu = top * (1 + retry * _shrink(sum(w.shape)))
        r = 1.0 / math.sqrt(mu)
        out = _checked(r, functools.partial(_last_check, y, w, r, err), certify, pending)
        if out is not None:
            return out
    return None


def _last_check(y: Tensor, w: Tensor, r: float, err: float) -> bool:
    off = w * r
    block = torch.cat([torch.cat([y, off.mT], 1),
                       torch.cat([off, torch.eye(w.shape[0], dtype=w.dtype)], 1)], 0)
    return certified_psd(block, 3 * _U * float(torch.linalg.matrix_norm(block)) + 2.02 * r * err)


_MAX_GROUPS = 512  # more row patterns than this: a plain dense product is faster


def _row_groups(w: Tensor) -> list[tuple[Tensor, Tensor]] | None:
    """``(rows, cols)`` per set of rows with the same nonzero columns (a convolution's rows at
    one output position share them), or None when there are too many sets to gain."""
    pattern = w != 0
    unique, inverse = torch.unique(pattern, dim=0, return_inverse=True)
    if unique.shape[0] > _MAX_GROUPS:
        return None
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=unique.shape[0]).tolist()
    rows = torch.split(order, counts)
    return [(r, torch.nonzero(u).flatten()) for r, u in zip(rows, unique, strict=True)]


def _matmul(w: Tensor, x: Tensor, groups: list[tuple[Tensor, Tensor]] | None) -> Tensor:
    """``fl(w x)`` skipping the zero blocks of ``w``: each entry is the sum of the products
    ``w_rc x_cj`` over the nonzero ``w_rc`` only, the others being exact zeros."""
    if groups is None:
        return w @ x
    out = x.new_zeros(w.shape[0], x.shape[1])
    for rows, cols in groups:
        out[rows] = w[rows][:, cols] @ x[cols]
    return out


def _gram(w: Tensor, groups: list[tuple[Tensor, Tensor]] | None) -> Tensor:
    """``fl(w^T w)``: per row group its ``(cols x cols)`` Gram matrix, added into place (a
    sum of the same products ``w_rc w_rc'`` over rows ``r``, grouped)."""
    if groups is None:
        return w.mT @ w
    out = w.new_zeros(w.shape[1], w.shape[1])
    for rows, cols in groups:
        block = w[rows][:, cols]
        out[cols.unsqueeze(1), cols] += block.mT @ block
    return out


def _lambda_max(g: Tensor, basis: Tensor | None = None, iterations: int = 10
                ) -> tuple[float, Tensor | None]:
    """Estimate of ``lambda_max`` of a symmetric PSD ``g`` (it only chooses a multiplier) and
    the basis to start from next time: block power iteration with a Rayleigh-Ritz step from
    ``basis`` (a similar matrix's, e.g. the previous fraction's), exact for small ``g``."""
    n = g.shape[0]
    if n <= 512:
        return float(torch.linalg.eigvalsh(g)[-1]), None
    steps = iterations if basis is None else iterations // 2  # a warm start needs fewer
    if basis is None:
        basis = torch.randn(n, 8, dtype=g.dtype, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        basis, _ = torch.linalg.qr(g @ basis)
    return float(torch.linalg.eigvalsh(basis.mT @ g @ basis)[-1]), basis


class _Start:
    """The ``t``-independent parts of the expanding start: ``W_1^T W_1``, ``W_2 W_1``,
    ``W_2 W_2^T``, ``lambda_max(W_1^T W_1)`` and Frobenius norms (rounded up)."""

    def __init__(self, w1: Tensor, w2: Tensor) -> None:
        g1, g2 = _row_groups(w1), _row_groups(w2)
        self.gram1 = _gram(w1, g1)
        self.cross = _matmul(w2, w1, g2)
        self.gram2 = _matmul(w2, w2.mT.contiguous(), g2)
        # Both halves sum the same products (in another order): the mean is as accurate, plus
        # one rounding, which gamma_{n+4} in the slack covers.
        self.gram2 = (self.gram2 + self.gram2.mT) / 2
        self.lam1 = float(torch.linalg.eigvalsh(self.gram1)[-1])
        self.f1 = float(torch.linalg.matrix_norm(w1)) * 1.01
        self.f2 = float(torch.linalg.matrix_norm(w2)) * 1.01
        self.inner = w1.shape[0]
        self.basis: Tensor | None = None  # for :func:`_lambda_max`, carried across fractions

    def astype(self, dtype: torch.dtype) -> _Start:
        """A copy with the products in ``dtype`` (to rank the fractions roughly)."""
        other = copy.copy(self)
        other.gram1, other.cross, other.gram2 = (
            x.to(dtype) for x in (self.gram1, self.cross, self.gram2))
        other.basis = None
        return other


def fast_start_applies(mats: list[Tensor], slopes: Sequence[tuple[float, float]],
                        errs: list[float]) -> bool:
    """The expanding start needs ``d_1 > d_0``, ``alpha_1 = alpha_2 = 0``, exact
    ``W_1, W_2`` and a third matrix (the start ends on a step, not on the last one)."""
    return (len(mats) >= 3 and mats[0].shape[0] > mats[0].shape[1] and slopes[0][0] == 0
            and slopes[1][0] == 0 and errs[0] == 0 and errs[1] == 0)


def _fast_start(start: _Start, slopes: Sequence[tuple[float, float]], t: float, shrink: float,
                certify: bool, pending: Checks | None) -> tuple[Tensor, float] | None:
    """``(Y_2, s_1 s_2)`` of the first two steps, both certified by one check of ``S`` (see
    the module docstring), or None if a check fails."""
    m1, m2 = (sum(slopes[0]) / 2), (sum(slopes[1]) / 2)
    a1 = math.sqrt(t / start.lam1)
    c1 = a1 * a1
    k = -c1 * start.gram1
    k.diagonal().add_(1.0)
    chol, info = torch.linalg.cholesky_ex(k)
    if int(info):
        return None
    b = torch.linalg.solve_triangular(chol, start.cross.mT * a1, upper=False)
    z = start.gram2 + b.mT @ b  # ~ W_2 Y_1^{-1} W_2^T by Woodbury
    lam2, start.basis = _lambda_max(z, start.basis)
    a2 = math.sqrt(t / lam2)
    c2, c3 = a1 * a2, a2 * a2
    y2 = z * (-c3)
    y2.diagonal().add_(1.0 - shrink)
    y2 = (y2 + y2.mT) / 2
    return _checked((y2, (a1 / m1) * (a2 / m2)), lambda: _check_start(start, k, y2, c1, c2, c3),
                    certify, pending)


def _check_start(start: _Start, k: Tensor, y2: Tensor, c1: float, c2: float, c3: float
                 ) -> bool:
    """:func:`certified_psd` of ``S``. Slack: the three products are off by at most
    ``gamma_n`` times the products of Frobenius norms (``n = d_1`` terms per entry), their
    scaling and ``c_i`` itself by a few more roundings (``gamma_{n+4}`` covers them), the
    subtractions by ``u`` times the magnitude of each operand; all doubled."""
    off = start.cross * c2
    lower = start.gram2 * (-c3) - y2
    lower.diagonal().add_(1.0)
    block = torch.cat([torch.cat([k, off.mT], 1), torch.cat([off, lower], 1)], 0)
    f1, f2 = start.f1, start.f2
    products = _gamma(start.inner + 4) * (c1 * f1 * f1 + 2 * c2 * f1 * f2 + c3 * f2 * f2)
    operands = _U * (float(torch.linalg.matrix_norm(block)) + float(
        torch.linalg.matrix_norm(y2)) + math.sqrt(block.shape[0]) + c3 * f2 * f2 + c1 * f1 * f1)
    return certified_psd(block, 2 * (products + 2 * operands))


def _check_chain(weights: Sequence[Tensor], slopes: Sequence[tuple[float, float]]) -> None:
    if len(weights) != len(slopes) + 1 or not weights:
        raise ValueError(f"a chain of {len(weights)} matrices needs {len(weights) - 1} "
                         f"activations, got {len(slopes)}")
    for i in range(1, len(weights)):
        if weights[i].shape[1] != weights[i - 1].shape[0]:
            raise ValueError(f"matrix {i} takes {weights[i].shape[1]} inputs, matrix {i - 1} "
                             f"gives {weights[i - 1].shape[0]}")
    for alpha, beta in slopes:
        if not (0 <= alpha <= beta and math.isfinite(beta) and beta > 0):
            raise ValueError(f"slope bounds need 0 <= alpha <= beta, 0 < beta < inf; got "
                             f"({alpha}, {beta})")


def _chain_value(mats: list[Tensor], slopes: Sequence[tuple[float, float]], t: float,
                 errors: Sequence[float], certify: bool = True,
                 start: _Start | None = None, pending: Checks | None = None) -> float | None:
    """``1 / (r prod s_i)`` for the multipliers of fraction ``t``, or None (unchecked, an
    estimate only, with ``certify=False``: the checks that would make it a certificate are
    appended to ``pending``); ``start``: take the first two steps together."""
    y = torch.eye(mats[0].shape[1], dtype=mats[0].dtype)
    denominator, first = 1.0, 0
    if start is not None:
        out = _start_steps(start, mats, slopes, t, certify, pending)
        if out is None:
            return None
        (y, denominator), first = out, 2
    for w, slope, err in zip(mats[first:-1], slopes[first:], errors[first:], strict=False):
        out = _step(y, w, slope, t, err, certify, pending)
        if out is None:
            return None
        y, s = out
        denominator *= s
    r = _last(y, mats[-1], errors[-1], certify, pending)
    return None if r is None else 1.0 / (r * denominator)


def _start_steps(start: _Start, mats: list[Tensor], slopes: Sequence[tuple[float, float]],
                 t: float, certify: bool, pending: Checks | None
                 ) -> tuple[Tensor, float] | None:
    for retry in _RETRIES:
        shrink = retry * _shrink(mats[0].shape[1] + mats[1].shape[0])
        out = _fast_start(start, slopes, t, shrink, certify, pending)
        if out is not None:
            return out
    return None


def chain_lipschitz_bound(weights: Sequence[Tensor], slopes: Sequence[tuple[float, float]],
                          fractions: Sequence[float] = FRACTIONS,
                          errors: Sequence[float] | None = None,
                          fast_start: bool = True) -> Tensor | None:
    """Certified ECLipsE-Fast bound of ``x -> W_l s_{l-1}(... s_1(W_1 x))`` (biases free).

    Args:
        weights: the dense matrices ``W_1, ..., W_l`` (``W_i`` of shape ``(d_i, d_{i-1})``),
            converted to float64 (exactly).
        slopes: ``(alpha_i, beta_i)`` of the activation after ``W_i``, ``i < l``, with
            ``0 <= alpha_i <= beta_i``, ``beta_i > 0``; ``(1, 1)`` for no activation.
        fractions: the multipliers ``l_i = t l_{i-1} / (m^2 lambda_max(W_i Y_{i-1}^{-1}
            W_i^T))`` are run unchecked for each ``t`` in ``(0, 1)`` here, and the best one
            certified (the next best if its checks fail; each is a certificate of its own).
            ``t = 1/2`` is ECLipsE-Fast; a larger ``t`` weighs the multiplier up against
            ``X_i >= (1 - t) l_i I``.
        errors: ``e_i >= ||W_i^true - W_i||_2`` when the stored matrix is a rounded version of
            the network's (e.g. a product of two layers); the checks then hold for every
            matrix within ``e_i``. Default 0 (the matrices are exact).
        fast_start: take the first two steps together when ``W_1`` expands (see the module
            docstring: the same recursion, ``Y_1`` never formed, one check of size ``d_0 +
            d_2`` instead of two of sizes ``d_0 + d_1`` and ``d_1 + d_2``); False: step by
            step.

    Returns:
        0-dim float64 ``L`` with ``||f(x) - f(x')|| <= L ||x - x'||``, or None when a
        positive semidefiniteness check fails (the caller then uses another bound). The proof
        is in the module docstring; the final ``1 / (r prod s_i)`` is rounded up by
        ``(1 + 4 (l + 3) u)``, more than its ``l + 6`` roundings.

    Raises:
        ValueError: shapes that do not chain, or slope bounds outside the range above.
    """
    _check_chain(weights, slopes)
    mats = [w.detach().to("cpu", torch.float64) for w in weights]
    if any(not bool(torch.isfinite(w).all()) for w in mats):
        return None
    if any(not bool(w.any()) for w in mats):
        return torch.zeros((), dtype=torch.float64)  # a zero map: f is constant
    if not all(0 < t < 1 for t in fractions):
        raise ValueError(f"fractions must lie in (0, 1), got {tuple(fractions)}")
    errs = [0.0] * len(mats) if errors is None else [float(e) for e in errors]
    if len(errs) != len(mats) or not all(e >= 0 for e in errs):
        raise ValueError(f"errors must be {len(mats)} numbers >= 0, got {errors}")
    start = (_Start(mats[0], mats[1]) if fast_start and fast_start_applies(mats, slopes, errs)
             else None)
    if max(max(w.shape) for w in mats) > ROUGH_ABOVE and len(fractions) > 1:
        order = _rough_order(mats, slopes, fractions, errs, start)
    else:
        order, best, checks = _ranked(mats, slopes, fractions, errs, start)
        # The best unchecked pass is a certificate once its own checks pass: no second pass.
        if best is not None and all(check() for check in checks):
            return _rounded_up(best, len(mats))
    for t in order:
        value = _chain_value(mats, slopes, t, errs, start=start)
        if value is not None:
            return _rounded_up(value, len(mats))
    return None


def _rounded_up(value: float, layers: int) -> Tensor:
    return torch.tensor(value * (1 + 4 * (layers + 3) * _U), dtype=torch.float64)


#: Above this many rows or columns in some matrix the fractions are ranked in float32 (about
#: half the time per fraction); only the best one is then run, and certified, in float64.
ROUGH_ABOVE = 1024


def _rough_order(mats: list[Tensor], slopes: Sequence[tuple[float, float]],
                 fractions: Sequence[float], errs: list[float], start: _Start | None
                 ) -> list[float]:
    """:func:`_ranked`'s order from the unchecked recursion in float32: a ranking needs no
    accuracy, the certificate is the float64 pass that follows."""
    rough = [w.float() for w in mats]
    order, _, _ = _ranked(rough, slopes, fractions, errs,
                          None if start is None else start.astype(torch.float32))
    return order


def _ranked(mats: list[Tensor], slopes: Sequence[tuple[float, float]],
            fractions: Sequence[float], errs: list[float], start: _Start | None
            ) -> tuple[list[float], float | None, Checks]:
    """The fractions by their unchecked value, best first (those that break down last), the
    best value and the checks that make it a certificate (only the best one's are kept)."""
    estimates: list[float | None] = []
    best: tuple[float | None, Checks] = (None, [])
    for t in fractions:
        pending: Checks = []
        value = _chain_value(mats, slopes, t, errs, certify=False, start=start, pending=pending)
        estimates.append(value)
        if value is not None and (best[0] is None or value < best[0]):
            best = (value, pending)
    order = sorted(range(len(fractions)),
                   key=lambda i: math.inf if (e := estimates[i]) is None else e)
    return [fractions[i] for i in order], best[0], best[1]
