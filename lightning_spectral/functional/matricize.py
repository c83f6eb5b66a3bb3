"""Matricizations of a convolution filter.

A filter ``L`` of shape ``(c_out, c_in, k_1, ..., k_d)`` has ``2^d`` natural
matricizations: for a subset ``A`` of the spatial axes, ``M_A`` has rows indexed by
``(c_out, k_i for i in A)`` and columns by ``(c_in, k_j for j not in A)``.
Singla & Feizi (ICLR 2021, Theorem 1) bound the convolution's spectral norm by
``sqrt(prod k) * ||M_A||_2`` for every ``A``; for ``d = 2`` the four subsets
``(), (0,), (1,), (0, 1)`` give the matrices ``T, R, S, U`` of the paper.

A linear layer is the case ``d = 0``: its only matricization is the weight itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["row_subsets", "matricize", "grouped_weight", "spatial_dims"]


def spatial_dims(weight: Tensor, batch_dims: int = 0) -> int:
    """Number of spatial axes ``d`` of a filter with ``batch_dims`` leading batch axes."""
    d = weight.ndim - 2 - batch_dims
    if d < 0:
        raise ValueError(
            f"a filter needs at least 2 axes (c_out, c_in) after {batch_dims} batch axes, "
            f"got shape {tuple(weight.shape)}"
        )
    return d


def row_subsets(d: int) -> list[tuple[int, ...]]:
    """All ``2^d`` subsets of the spatial axes ``0..d-1``, in a fixed order.

    Subset number ``m`` holds the axes whose bit is set in ``m``, so index 0 is the
    empty set (the ``c_out x (c_in * prod k)`` matrix ``T``) and index ``2^d - 1``
    holds every axis (the ``(c_out * prod k) x c_in`` matrix ``U``).
    """
    if d < 0:
        raise ValueError(f"the number of spatial axes must be >= 0, got {d}")
    return [tuple(i for i in range(d) if (m >> i) & 1) for m in range(1 << d)]


def matricize(weight: Tensor, row_axes: Sequence[int], batch_dims: int = 0) -> Tensor:
    """The matrix ``M_A`` of a filter, ``A = row_axes`` (spatial axes, 0-based).

    ``weight`` has shape ``(*batch, c_out, c_in, k_1, ..., k_d)``; the result has shape
    ``(*batch, c_out * prod_{i in A} k_i, c_in * prod_{j not in A} k_j)``. Row and
    column order inside the matrix do not change its singular values. This makes a
    permuted copy; the training-time estimator contracts the filter in place instead.
    """
    d = spatial_dims(weight, batch_dims)
    rows = sorted(set(int(a) for a in row_axes))
    if any(a < 0 or a >= d for a in rows):
        raise ValueError(f"row axes {tuple(row_axes)} out of range for {d} spatial axes")
    cols = [j for j in range(d) if j not in rows]
    b = list(range(batch_dims))
    sp = batch_dims + 2
    perm = b + [batch_dims] + [sp + i for i in rows] + [batch_dims + 1] + [sp + j for j in cols]
    batch_shape = weight.shape[:batch_dims]
    n_rows = weight.shape[batch_dims]
    for i in rows:
        n_rows *= weight.shape[sp + i]
    return weight.permute(perm).reshape(*batch_shape, n_rows, -1)


def grouped_weight(weight: Tensor, groups: int) -> Tensor:
    """View a grouped filter as ``(groups, c_out / groups, c_in_per_group, *k)``.

    ``nn.ConvNd`` stores ``(c_out, c_in / groups, *k)`` with output channels ordered
    group by group, so group ``g`` maps input channels ``g*c_in/groups ...`` with the
    slice ``weight[g*c_out/groups : (g+1)*c_out/groups]``. ``nn.ConvTransposeNd`` stores
    ``(c_in, c_out / groups, *k)``, the filter of the convolution it is the adjoint of,
    laid out the same way; the same view serves both. The operator is block diagonal
    over groups, so its norm is the maximum over these slices.
    """
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(
            f"groups={groups} does not divide the filter's first axis ({weight.shape[0]})"
        )
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
