"""Gradient-norm-preserving activations: :class:`GroupSort` and :class:`MaxMin`.

Networks trained for a Lipschitz certificate (Anil, Lucas & Grosse, ICML 2019; Leino, Wang &
Fredrikson, ICML 2021) lose capacity with ReLU: where it is 0 the gradient norm shrinks, so a
network whose every layer has norm <= 1 ends up far below its bound. Sorting within groups of
channels keeps every gradient norm: its Jacobian is a permutation matrix almost everywhere.

Why sorting is 1-Lipschitz in l2. ``sort`` restricted to the closed cone where one fixed
permutation ``P`` orders the entries is the linear map ``P`` (norm 1); there are finitely many
such cones, they cover the space, and on their common boundaries the definitions agree, so
``sort`` is continuous and piecewise linear. Along the segment from ``x`` to ``x'`` it is
linear with norm 1 on each of finitely many pieces ``[t_k, t_{k+1}]``, so
``||sort(x) - sort(x')|| <= sum_k ||P_k|| ||x_{t_{k+1}} - x_{t_k}|| = ||x - x'||``. Sorting
disjoint groups acts on orthogonal coordinate blocks, so the squared differences add and the
whole map is 1-Lipschitz too. It is not differentiable where two entries tie (its Jacobian
jumps from one permutation to another), so it has no curvature bound.
"""

from __future__ import annotations

from types import EllipsisType

import torch
from torch import Tensor, nn

__all__ = ["GroupSort", "MaxMin"]


def _check_dim(dim: object) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int, got {dim!r}")
    return dim


def _channels(x: Tensor, dim: int, name: str) -> int:
    """The size of ``dim`` (a proxy under torch.fx tracing), with a clear out-of-range error."""
    try:
        return x.shape[dim]
    except IndexError:
        raise IndexError(f"{name}: dim={dim} is out of range for a {x.ndim}-d input") from None


class GroupSort(nn.Module):
    """Sort consecutive groups of ``group_size`` entries along ``dim`` (ascending).

    ``GroupSort(2)`` is :class:`MaxMin` up to the order inside each pair; ``GroupSort(n)`` with
    ``n`` the number of channels is FullSort. 1-Lipschitz in l2 and gradient-norm preserving
    (see the module docstring for the proof). The size of ``dim`` must be a multiple of
    ``group_size``.

    Args:
        group_size: entries per group (>= 1; 1 is the identity).
        dim: the axis holding the channels (default 1, as in ``(N, C, ...)``).
    """

    def __init__(self, group_size: int = 2, dim: int = 1) -> None:
        super().__init__()
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        self.group_size = group_size
        self.dim = _check_dim(dim)

    def forward(self, x: Tensor) -> Tensor:
        size = _channels(x, self.dim, "GroupSort")
        # Under torch.fx tracing (a subclass traced into) ``size`` is a proxy: no Python test.
        if isinstance(size, int) and size % self.group_size:
            raise ValueError(
                f"GroupSort({self.group_size}): dimension {self.dim} has size {size}, not a "
                "multiple of the group size"
            )
        # After unflattening, the entries of a group lie along ``inner``.
        inner = self.dim + 1 if self.dim >= 0 else self.dim
        grouped = x.unflatten(self.dim, (size // self.group_size, self.group_size))
        return grouped.sort(dim=inner).values.flatten(inner - 1, inner)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


class MaxMin(nn.Module):
    """``(max(a, b), min(a, b))`` for the two halves ``a, b`` of ``dim`` (Anil et al. 2019).

    The channels are split into a first and a second half, as in GloRo's MaxMin; each pair
    ``(a_i, b_i)`` becomes ``(max, min)``. A permutation of coordinates followed by
    ``GroupSort(2)`` and another permutation, so 1-Lipschitz in l2 and gradient-norm
    preserving (see the module docstring). The size of ``dim`` must be even.

    Args:
        dim: the axis holding the channels (default 1, as in ``(N, C, ...)``).
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = _check_dim(dim)

    def forward(self, x: Tensor) -> Tensor:
        size = _channels(x, self.dim, "MaxMin")
        if isinstance(size, int) and size % 2:  # not checked under torch.fx tracing
            raise ValueError(f"MaxMin: dimension {self.dim} has odd size {size}")
        half = size // 2
        # Plain slicing (not split/chunk): traced into (a subclass), the graph walk bounds it.
        # The indices are built apart: mypy reads ``x[(*t, s)]`` as 3.11-only star syntax.
        lo: tuple[slice | EllipsisType, ...]
        hi: tuple[slice | EllipsisType, ...]
        if self.dim >= 0:
            lead = (slice(None),) * self.dim
            lo, hi = (*lead, slice(None, half)), (*lead, slice(half, None))
        else:
            tail = (slice(None),) * (-1 - self.dim)
            lo, hi = (..., slice(None, half), *tail), (..., slice(half, None), *tail)
        a, b = x[lo], x[hi]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
