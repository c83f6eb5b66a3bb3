"""Lipschitz constants of pooling layers at a given input size.

An average pool is the Kronecker product of 1-D averaging matrices (PyTorch's divisor is a
product of per-axis window lengths), so its norm is the product of theirs, computed exactly. A
max pool is ``sqrt(c)``-Lipschitz, ``c`` the largest number of windows one input position
falls into: ``|max_W x - max_W x'| <= max_{i in W} |x_i - x'_i|``, and summing the squares
over windows counts each position at most ``c`` times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import _ADAPTIVE_AVG, UnsupportedOperationError, _f64
from .ownership import _builtin_class


def _tuple(value: Any, d: int) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        if len(value) != d:
            raise ValueError(f"expected {d} values, got {value!r}")
        return tuple(int(v) for v in value)
    return (int(value),) * d


def _window_indicator(n: int, out: int, k: int, s: int, p: int, dil: int) -> Tensor:
    """0/1 matrix (out, n): entry (o, i) = 1 when input i lies in window o (padding dropped)."""
    m = torch.zeros(out, n, dtype=torch.float64)
    for o in range(out):
        for j in range(k):
            i = o * s - p + j * dil
            if 0 <= i < n:
                m[o, i] = 1.0
    return m


def _adaptive_indicator(n: int, out: int) -> Tensor:
    m = torch.zeros(out, n, dtype=torch.float64)
    for o in range(out):
        start, end = (o * n) // out, -((-(o + 1) * n) // out)
        m[o, start:end] = 1.0
    return m


def _max_count(indicators: Sequence[Tensor]) -> int:
    """Most windows one position falls into: windows are products of per-axis windows."""
    return math.prod(int(ind.sum(0).max()) if ind.numel() else 0 for ind in indicators)


def _spectral(matrix: Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, ord=2)) if matrix.numel() else 0.0


def _avg_pool_lip(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> Tensor:
    d = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[_builtin_class(module)]
    k = _tuple(module.kernel_size, d)
    s = _tuple(module.stride if module.stride else module.kernel_size, d)
    p = _tuple(module.padding, d)
    n, out = in_shape[-d:], out_shape[-d:]
    if getattr(module, "divisor_override", None):
        # Every window sum is divided by the same constant: (1/D) * kron(indicators).
        norms = [_spectral(_window_indicator(n[i], out[i], k[i], s[i], p[i], 1)) for i in range(d)]
        return _f64(math.prod(norms) / abs(module.divisor_override))
    # PyTorch's divisor is a product of per-axis window lengths (with or without padding), so
    # the operator is the Kronecker product of the 1-D pools; its norm is the product of theirs.
    # The 1-D matrices are read off PyTorch itself by pooling the identity basis.
    norms = []
    for i in range(d):
        eye = torch.eye(n[i], dtype=torch.float64)[:, None, :]
        cols = F.avg_pool1d(eye, k[i], s[i], p[i], module.ceil_mode, module.count_include_pad)
        if cols.shape[-1] != out[i]:
            raise UnsupportedOperationError(
                f"{type(module).__name__}: could not reproduce its output size along axis {i}"
            )
        norms.append(_spectral(cols[:, 0, :]))
    return _f64(math.prod(norms))


def _max_pool_lip(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> Tensor:
    d = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[_builtin_class(module)]
    if module.return_indices:
        raise UnsupportedOperationError(f"{type(module).__name__} with return_indices=True")
    k = _tuple(module.kernel_size, d)
    s = _tuple(module.stride if module.stride else module.kernel_size, d)
    p, dil = _tuple(module.padding, d), _tuple(module.dilation, d)
    n, out = in_shape[-d:], out_shape[-d:]
    inds = [_window_indicator(n[i], out[i], k[i], s[i], p[i], dil[i]) for i in range(d)]
    return _f64(math.sqrt(_max_count(inds)))


def _adaptive_lip(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> Tensor:
    is_avg = isinstance(module, _ADAPTIVE_AVG)
    d = int(_builtin_class(module).__name__[-2])
    if not is_avg and module.return_indices:
        raise UnsupportedOperationError(f"{type(module).__name__} with return_indices=True")
    n, out = in_shape[-d:], out_shape[-d:]
    inds = [_adaptive_indicator(n[i], out[i]) for i in range(d)]
    if not is_avg:
        return _f64(math.sqrt(_max_count(inds)))
    # Each window is averaged: rows of the indicator divided by their lengths (Kronecker again).
    return _f64(math.prod(_spectral(ind / ind.sum(1, keepdim=True)) for ind in inds))


def _pad_lip(in_shape: torch.Size, pad: Sequence[int], mode: str) -> float:
    """``F.pad(x, pad, mode)`` of a batched ``in_shape``: every output entry is a constant or
    a copy of an input entry, so the per-sample map's norm is ``sqrt`` of the largest number
    of copies of one entry, counted by padding a tensor of distinct indices. The caller
    checks that ``pad`` misses the batch axis."""
    sample = in_shape[1:]
    index = torch.arange(1, math.prod(sample) + 1, dtype=torch.float64).reshape(1, *sample)
    padded = F.pad(index, list(pad)) if mode == "constant" else F.pad(index, list(pad), mode=mode)
    counts = torch.bincount(padded.flatten().round().long())[1:]  # 0: the pad value
    return math.sqrt(int(counts.max()) if counts.numel() else 0)
