"""Pooling: the Lipschitz constants of pooling layers at a given input size, and the rules of
functional pooling (``F.avg_pool2d``, ...: the module it is the forward of).

An average pool is the Kronecker product of 1-D averaging matrices (PyTorch's divisor is a
product of per-axis window lengths), so its norm is the product of theirs, computed exactly. A
max pool is ``sqrt(c)``-Lipschitz, ``c`` the largest number of windows one input position
falls into: ``|max_W x - max_W x'| <= max_{i in W} |x_i - x'_i|``, and summing the squares
over windows counts each position at most ``c`` times. Average pooling is linear (its
curvature rule is its Lipschitz rule on the curvature bounds); max pooling has kinks and no
curvature rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..common import (
    ADAPTIVE_AVG,
    ADAPTIVE_MAX,
    AVG_POOLS,
    MAX_POOLS,
    UnsupportedOperationError,
    f64,
)
from ..ownership import rule_class
from ..tracing import known_shape, static
from .base import NodeRule, Walk
from .smooth import refusal, why_refused

__all__ = ["POOL_FUNCS", "TABLE", "adaptive_lip", "avg_pool_lip", "max_pool_lip"]

# function -> (module class it is the forward of, names of its arguments after the input)
POOL_FUNCS: dict[Any, tuple[type, tuple[str, ...]]] = {}
for _d, (_avg, _max, _aavg, _amax) in enumerate(
    zip(AVG_POOLS, MAX_POOLS, ADAPTIVE_AVG, ADAPTIVE_MAX, strict=True), start=1
):
    POOL_FUNCS[getattr(F, f"avg_pool{_d}d")] = (_avg, (
        "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
        *(("divisor_override",) if _d > 1 else ())))
    POOL_FUNCS[getattr(F, f"max_pool{_d}d")] = (_max, (
        "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"))
    POOL_FUNCS[getattr(F, f"adaptive_avg_pool{_d}d")] = (_aavg, ("output_size",))
    POOL_FUNCS[getattr(F, f"adaptive_max_pool{_d}d")] = (_amax, ("output_size", "return_indices"))


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


def avg_pool_lip(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> Tensor:
    """The norm of an average pooling module at batched ``in_shape`` -> ``out_shape``."""
    d = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[rule_class(module)]
    k = _tuple(module.kernel_size, d)
    s = _tuple(module.stride if module.stride else module.kernel_size, d)
    p = _tuple(module.padding, d)
    n, out = in_shape[-d:], out_shape[-d:]
    pool = cast(nn.AvgPool2d, module)  # one of AVG_POOLS (AvgPool1d: no divisor_override)
    if getattr(module, "divisor_override", None):
        # Every window sum is divided by the same constant: (1/D) * kron(indicators).
        norms = [_spectral(_window_indicator(n[i], out[i], k[i], s[i], p[i], 1)) for i in range(d)]
        return f64(math.prod(norms) / abs(cast(int, pool.divisor_override)))
    # PyTorch's divisor is a product of per-axis window lengths (with or without padding), so
    # the operator is the Kronecker product of the 1-D pools; its norm is the product of theirs.
    # The 1-D matrices are read off PyTorch itself by pooling the identity basis.
    norms = []
    for i in range(d):
        eye = torch.eye(n[i], dtype=torch.float64)[:, None, :]
        cols = F.avg_pool1d(eye, k[i], s[i], p[i], pool.ceil_mode, pool.count_include_pad)
        if cols.shape[-1] != out[i]:
            raise UnsupportedOperationError(
                f"{type(module).__name__}: could not reproduce its output size along axis {i}"
            )
        norms.append(_spectral(cols[:, 0, :]))
    return f64(math.prod(norms))


def max_pool_lip(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> Tensor:
    """``sqrt(c)`` of a max pooling module, ``c`` the most windows one position falls into."""
    dims: dict[type, int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
    d = dims[rule_class(module)]
    if module.return_indices:
        raise UnsupportedOperationError(f"{type(module).__name__} with return_indices=True")
    k = _tuple(module.kernel_size, d)
    s = _tuple(module.stride if module.stride else module.kernel_size, d)
    p, dil = _tuple(module.padding, d), _tuple(module.dilation, d)
    n, out = in_shape[-d:], out_shape[-d:]
    inds = [_window_indicator(n[i], out[i], k[i], s[i], p[i], dil[i]) for i in range(d)]
    return f64(math.sqrt(_max_count(inds)))


def adaptive_lip(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> Tensor:
    """The constant of an adaptive average (norm) or max (``sqrt(c)``) pooling module."""
    is_avg = isinstance(module, ADAPTIVE_AVG)
    d = int(rule_class(module).__name__[-2])
    if not is_avg and module.return_indices:
        raise UnsupportedOperationError(f"{type(module).__name__} with return_indices=True")
    n, out = in_shape[-d:], out_shape[-d:]
    inds = [_adaptive_indicator(n[i], out[i]) for i in range(d)]
    if not is_avg:
        return f64(math.sqrt(_max_count(inds)))
    # Each window is averaged: rows of the indicator divided by their lengths (Kronecker again).
    return f64(math.prod(_spectral(ind / ind.sum(1, keepdim=True)) for ind in inds))


def _pool(w: Walk, node: fx.Node, t: Any) -> Tensor:
    """Functional pooling: the module it is the forward of, with the same arguments."""
    w.only_first_dependent(node)
    x = node.args[0]
    klass, names = POOL_FUNCS[t]
    params = {n: static(v) for n, v in zip(names, node.args[1:], strict=False)}
    params.update({k: static(v) for k, v in node.kwargs.items()})
    return w.module_lip(klass(**params), [known_shape(x)], known_shape(node)) * w.L(x)


def _pool_curvature(w: Walk, node: fx.Node, t: Any) -> Tensor:
    klass = POOL_FUNCS[t][0]
    if klass in MAX_POOLS or klass in ADAPTIVE_MAX:
        raise refusal(node, why_refused(F.max_pool2d))
    return w.in_curvature(_pool, w, node, t)


def _pool_slack(w: Walk, node: fx.Node, t: Any) -> tuple[Tensor, Tensor]:
    """Average pooling is linear (max pooling was refused by its curvature rule)."""
    return w.in_slack(_pool, w, node, t)


TABLE: dict[Any, NodeRule] = dict.fromkeys(
    POOL_FUNCS, NodeRule(_pool, _pool_curvature, _pool_slack))
"""The functional pooling targets and their rules."""
