"""Bound on a filter's symbol from repeated self-correlation of its kernel (Gram kernel).

Notation as in :mod:`.bounds_matricize`; float64 and differentiable with respect to the weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_finite_weight
from .matricize import grouped_weight, matricize, row_subsets
from .opnorm import opnorm
from .symbol import taps_last
from .threads import filter_side, with_bound_threads

__all__ = ["gram_kernel_bound", "gram_step_cost"]


def _self_correlation(kg: Tensor) -> Tensor:
    """Filter whose symbol is ``P^H P``: ``K[tau] = sum_{t' - t = tau} W_t^T W_t'``.

    ``kg``: ``(g, co, ci, *k)`` -> ``(g, ci, ci, *(2k - 1))``, one grouped ``F.convNd`` of
    the channel-transposed filter with itself (padding ``k - 1``). The index is shifted by
    ``k - 1``, a phase of modulus 1 that changes no norm.
    """
    g, co, ci, *k = kg.shape
    d = len(k)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    x = kg.permute(2, 0, 1, *range(3, 3 + d)).reshape(ci, g * co, *k)
    w = kg.permute(0, 2, 1, *range(3, 3 + d)).reshape(g * ci, co, *k)
    out = conv(x, w, padding=[kk - 1 for kk in k], groups=g)  # (ci_b, g * ci_a, *(2k-1))
    out = out.reshape(ci, g, ci, *out.shape[2:])
    return out.permute(1, 2, 0, *range(3, 3 + d))


def _gram_oriented(kg: Tensor) -> Tensor:
    """Orient the filter so the Gram side is the smaller channel count (``||P|| = ||P^T||``)."""
    return kg.transpose(1, 2) if kg.shape[1] < kg.shape[2] else kg


def gram_step_cost(g: int, c_small: int, c_big: int, taps: int, taps_out: int) -> float:
    return float(g) * c_small * c_small * c_big * taps * taps_out


@with_bound_threads(filter_side)
def gram_kernel_bound(
    weight: Tensor, *, groups: int = 1, n_steps: int = 2, subsets: str = "all"
) -> Tensor:
    """Bound on ``S`` from repeated self-correlation of the kernel (Delattre et al., 2024).

    ``K_1`` is the self-correlation of the filter (symbol ``Q = P^H P``, kernel ``2k - 1``)
    and ``K_{t+1}`` that of ``K_t``; ``K_t`` has symbol ``(P^H P)^(2^(t-1))``, a Hermitian
    PSD power, so ``sup ||K_t(theta)|| = S^(2^t)``. Any symbol bound ``B`` applied to
    ``K_t`` (here the smaller of the tap sum and the Fantastic-Four bound of ``K_t``) gives
    ``S <= B(K_t)^(1 / 2^t)``; the ``sqrt(prod k)`` type factors of ``B`` are taken to the
    power ``1 / 2^t``, which is how the bound tightens with ``t``. The smaller channel
    count is used as Gram side (``||P P^H|| = ||P^H P||``), and every step is divided by
    its Frobenius norm (the filter first by its largest entry), tracked in log scale, so
    nothing overflows or underflows.

    ``subsets="all"`` uses all ``2^d`` matricizations of ``K_t``; ``"ends"`` only the
    first and last (cheap: their Gram matrices are ``c x c``).
    """
    check_finite_weight(weight, "weight")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    kg = _gram_oriented(grouped_weight(weight.to(torch.float64), groups))
    d = weight.ndim - 2
    if d < 1:
        raise ValueError("gram_kernel_bound needs a convolution filter (d >= 1)")
    # log of the factor dividing the current kernel's symbol (per group).
    # max-abs first: a Frobenius norm of the raw filter can itself overflow or underflow.
    scale = kg.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    kt = kg / scale.view(-1, *([1] * (kg.ndim - 1)))
    log_scale = scale.log()
    for _ in range(n_steps):
        kt = _self_correlation(kt)
        log_scale = 2 * log_scale
        f = kt.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        kt = kt / f.view(-1, *([1] * (kt.ndim - 1)))
        log_scale = log_scale + f.log()
    ksize = kt.shape[3:]
    taps = opnorm(taps_last(kt)).flatten(1).sum(dim=1)  # (g,)
    subs = row_subsets(d) if subsets == "all" else [row_subsets(d)[0], row_subsets(d)[-1]]
    ff = torch.stack([opnorm(matricize(kt, a, batch_dims=1)) for a in subs]).amin(dim=0)
    ff = ff * math.sqrt(math.prod(ksize))
    best = torch.minimum(taps, ff).clamp_min(torch.finfo(torch.float64).tiny)
    per_group = torch.exp((best.log() + log_scale) / (2**n_steps))
    return per_group.amax()
