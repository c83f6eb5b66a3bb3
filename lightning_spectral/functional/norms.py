"""Guaranteed matrix spectral norms: exact (float64) and Gram iteration.

Both functions are batched over leading axes, compute in float64 (complex128 for
complex input), rescale so that entries anywhere in the float64 range neither overflow
nor underflow, and are differentiable. Unlike power iteration (:mod:`.power`), which
approaches ``||M||_2`` from below, these may be called provable (up to float64 rounding,
a relative ``~1e-15``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int
from .threads import matrix_side, with_bound_threads

__all__ = ["spectral_norm_exact", "gram_iteration_bound"]


def _as_matrix64(matrix: Tensor, name: str) -> Tensor:
    if not isinstance(matrix, Tensor) or matrix.ndim < 2:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"{name} expects a (..., m, n) tensor, got {shape}")
    if matrix.is_complex():
        return matrix.to(torch.complex128)
    return matrix.to(torch.float64)


def _max_abs(matrix: Tensor) -> Tensor:
    """Per-matrix ``max |m_ij|`` (detached; 1 for an all-zero matrix), shaped ``(..., 1, 1)``.

    Both norms are positively homogeneous, ``f(M) = s f(M / s)``, and their gradient is
    invariant to scaling, so a detached scale changes neither value nor gradient.
    """
    scale = matrix.detach().abs().amax(dim=(-2, -1), keepdim=True)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


@with_bound_threads(matrix_side)
def spectral_norm_exact(matrix: Tensor) -> Tensor:
    """Exact ``||M||_2`` (largest singular value) of a batch ``(..., m, n)`` -> ``(...)``, float64.

    Computed as ``s * sqrt(lambda_max(N^H N))`` with ``N = M / s``, ``s = max |m_ij|``, and
    the Gram matrix on the smaller side (``n x n`` or ``m x m``, same nonzero spectrum).
    The largest eigenvalue of a symmetric matrix is well conditioned (Weyl: it moves by at
    most ``||E||_2``), so squaring costs no accuracy for the TOP singular value, while
    ``eigvalsh`` of a Gram matrix is an order of magnitude faster than an SVD on CPU.
    Differentiable: the gradient is ``u_1 v_1^H``, well defined when ``sigma_1`` is simple
    and nonzero (the all-zero matrix gets a zero gradient instead of NaN).
    """
    m64 = _as_matrix64(matrix, "spectral_norm_exact")
    if m64.shape[-1] == 0 or m64.shape[-2] == 0:
        return torch.zeros(m64.shape[:-2], dtype=torch.float64, device=m64.device)
    scale = _max_abs(m64)
    n = m64 / scale
    gram = n.mH @ n if n.shape[-1] <= n.shape[-2] else n @ n.mH
    top = torch.linalg.eigvalsh(gram)[..., -1]
    # Only the all-zero matrix has top <= 0 (after scaling its largest entry is 1, so
    # top >= 1 otherwise); sqrt'(0) is infinite, hence the double where for a 0 gradient.
    pos = top > 0
    root = torch.sqrt(torch.where(pos, top, torch.ones_like(top)))
    return torch.where(pos, root, torch.zeros_like(root)) * scale[..., 0, 0]


@with_bound_threads(matrix_side)
def gram_iteration_bound(matrix: Tensor, n_iter: int = 6) -> Tensor:
    """Gram-iteration upper bound on ``||M||_2`` (Delattre et al., ICML 2023), batched, float64.

    ``G_0 = M``, ``G_{t+1} = G_t^H G_t``. Then ``||M||_2 <= ||G_t||_F^(1/2^t)`` for every
    ``t``. Proof: ``G_t`` has singular values ``sigma_i^(2^t)`` (induction: ``G^H G`` has
    singular values ``sigma_i(G)^2``), so ``||G_t||_F^2 = sum_i sigma_i^(2^(t+1)) >=
    sigma_1^(2^(t+1))``. The sequence is non-increasing in ``t`` because
    ``||G^H G||_F <= ||G||_F^2`` and converges to ``sigma_1`` as ``r^(1/2^t)``, ``r`` the
    number of singular values tied with ``sigma_1``.

    ``G_t`` overflows for ``t`` around 10 even for modest matrices, so it is kept as
    ``G_t = s_t H_t`` with ``||H_t||_F = 1`` and only ``l_t = log(s_t) / 2^t`` tracked:
    ``H_{t+1} = K / ||K||_F`` with ``K = H_t^H H_t``, ``l_{t+1} = l_t + log ||K||_F / 2^(t+1)``,
    and the bound is ``exp(l_t)``. ``l_0 = log ||M||_F`` is taken after dividing by the
    largest entry, so entries of magnitude ``1e+-300`` are fine. The first product uses the
    smaller Gram matrix (``M M^H`` when ``m < n``: same Frobenius norm). ``n_iter = 0`` is
    the Frobenius norm. Differentiable (every step is).
    """
    check_int("n_iter", n_iter, low=0)
    m64 = _as_matrix64(matrix, "gram_iteration_bound")
    if m64.shape[-1] == 0 or m64.shape[-2] == 0:
        return torch.zeros(m64.shape[:-2], dtype=torch.float64, device=m64.device)
    scale = _max_abs(m64)
    h = m64 / scale
    fro = torch.linalg.matrix_norm(h, "fro")
    # An all-zero matrix: normalize by 1 instead of 0 and report exp(-inf) = 0 at the end.
    zero = fro == 0
    safe = torch.where(zero, torch.ones_like(fro), fro)
    h = h / safe[..., None, None]
    log_bound = torch.log(scale[..., 0, 0]) + torch.log(safe)
    for t in range(int(n_iter)):
        k = (h.mH @ h if h.shape[-1] <= h.shape[-2] else h @ h.mH) if t == 0 else h.mH @ h
        k_fro = torch.linalg.matrix_norm(k, "fro")
        k_safe = torch.where(k_fro > 0, k_fro, torch.ones_like(k_fro))
        h = k / k_safe[..., None, None]
        log_bound = log_bound + torch.log(k_safe) / 2.0 ** (t + 1)
    return torch.where(zero, torch.zeros_like(log_bound), torch.exp(log_bound))
