"""Test-side references, independent of the code under test.

Each reference is built from torch's own layers and linear algebra, in float64, and imports
nothing from ``lightning_spectral``: a test that compares the library with one of these
compares it with something it does not share code with.

* :func:`operator_matrix`: the explicit matrix of a layer's linear map, the layer (a float64
  copy, bias removed) applied to the identity basis;
* :func:`svd_norm`: the spectral norm of a batch of matrices from a full SVD;
* :func:`operator_norm`: both together, the exact norm of a layer on inputs of a given size.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def operator_matrix(module: nn.Module, input_size: Sequence[int] | None = None) -> Tensor:
    """The layer's float64 matrix, ``(out_dim, in_dim)``: column ``j`` is the layer (bias
    removed) applied to the ``j``-th basis vector of its flattened input ``(c_in, *input_size)``.

    ``nn.Linear`` is its weight (``input_size`` is ignored). The module is not modified.
    """
    layer = copy.deepcopy(module).to(torch.float64)
    layer.requires_grad_(False)
    if getattr(layer, "bias", None) is not None:
        layer.bias = None
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().clone()
    sizes = tuple(int(n) for n in input_size)  # type: ignore[union-attr]
    dim = layer.in_channels * math.prod(sizes)
    basis = torch.eye(dim, dtype=torch.float64).reshape(dim, layer.in_channels, *sizes)
    with torch.no_grad():
        out = layer(basis)
    return out.reshape(dim, -1).T


def svd_norm(matrix: Tensor) -> Tensor:
    """Largest singular value of each matrix of a batch ``(..., m, n)``, from a full SVD in
    float64 (complex128 for complex input); differentiable where the top value is simple."""
    wide = torch.complex128 if matrix.is_complex() else torch.float64
    return torch.linalg.svdvals(matrix.to(wide))[..., 0]


def operator_norm(module: nn.Module, input_size: Sequence[int] | None = None) -> Tensor:
    """Exact spectral norm (0-dim float64) of the layer on inputs of spatial size
    ``input_size``: :func:`svd_norm` of :func:`operator_matrix`."""
    return svd_norm(operator_matrix(module, input_size))


def matricize(weight: Tensor, row_axes: Sequence[int], batch_dims: int = 0) -> Tensor:
    """The matrix of a filter ``(*batch, c_out, c_in, k_1, ..., k_d)`` whose rows are indexed
    by ``(c_out, k_i for i in row_axes)`` and columns by ``(c_in, k_j for the other j)``, each
    index row-major; ``row_axes`` counts spatial axes from 0."""
    b = batch_dims
    d = weight.ndim - b - 2
    rows = [b + 2 + i for i in sorted(row_axes)]
    cols = [b + 2 + j for j in range(d) if j not in row_axes]
    order = [*range(b), b, *rows, b + 1, *cols]
    n_rows = weight.shape[b] * math.prod(weight.shape[i] for i in rows)
    return weight.permute(order).reshape(*weight.shape[:b], n_rows, -1)


def fantastic_four_per_subset(weight: Tensor, groups: int = 1) -> Tensor:
    """``max_g sqrt(prod k) ||M_A||_2`` for each subset ``A`` of the spatial axes, ``(2^d,)``,
    subset ``m`` holding the axes whose bit is set in ``m``; ``weight`` is
    ``(c_out, c_in / groups, *k)`` with output channels ordered group by group."""
    w = weight.detach().to(torch.float64)
    d = w.ndim - 2
    per_group = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
    subsets = [[i for i in range(d) if (m >> i) & 1] for m in range(1 << d)]
    scale = math.sqrt(math.prod(w.shape[2:]))
    norms = [svd_norm(matricize(per_group, a, batch_dims=1)).amax() for a in subsets]
    return torch.stack(norms) * scale


def eclipse_fast_reference(weights: Sequence[Tensor], alpha: float = 0.0, beta: float = 1.0
                           ) -> float:
    """ECLipsE-Fast (Xu & Sivaranjani, NeurIPS 2024) as the paper states it, in plain float64
    with exact inverses and eigenvalues and no certification: ``X_0 = I``; for ``i < l``:
    ``A = X_{i-1} + l_i p W_i^T W_i``, ``l_i = 1 / (2 m^2 lambda_max(W_i X_{i-1}^{-1}
    W_i^T))``, ``X_i = l_i I - l_i^2 m^2 W_i A^{-1} W_i^T``; ``L^2 = lambda_max(W_l X_{l-1}^{-1}
    W_l^T)``. The same slope bounds ``[alpha, beta]`` for every activation."""
    m, p = (alpha + beta) / 2, alpha * beta
    mats = [w.detach().double() for w in weights]
    x = torch.eye(mats[0].shape[1], dtype=torch.float64)
    for w in mats[:-1]:
        inv = torch.linalg.inv(x)
        lam = 1.0 / (2 * m * m * float(torch.linalg.eigvalsh(w @ inv @ w.T)[-1]))
        a_inv = torch.linalg.inv(x + lam * p * w.T @ w)
        x = lam * torch.eye(w.shape[0], dtype=torch.float64) - lam * lam * m * m * w @ a_inv @ w.T
        x = (x + x.T) / 2
    w = mats[-1]
    return math.sqrt(float(torch.linalg.eigvalsh(w @ torch.linalg.inv(x) @ w.T)[-1]))
