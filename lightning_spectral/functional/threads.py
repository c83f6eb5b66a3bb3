"""Intra-op thread limit for the float64 bound code on CPU, for small layers.

The bounds are many small float64 eigenvalue problems and batched products (a 3x3 filter gives
hundreds of matrices of the channel count's size). With more than one intra-op thread each of
them is an OpenMP parallel region that ends only when all its threads have run; when the cores
are busy with other work (data-loader workers, another process, a shared machine) a thread
waits a scheduler time slice for its core, region after region. Measured on a 2-core machine
(``benchmarks/results/bound_threads_cpu.md``): for layers of at most 64 channels one thread was
never slower than two, and 3-20x faster with one core busy; for 128-512 channels two threads
were 1.2-1.4x faster while a core was idle and 10-20x slower while it was busy. So the bound
functions run problems whose Gram matrices are at most :data:`SMALL_SIDE` wide with at most
:data:`BOUND_THREADS` threads, restoring torch's setting afterwards, and leave larger ones to
torch's setting (lower it yourself, e.g. with :func:`limit_threads`, on a busy machine).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["BOUND_THREADS", "SMALL_SIDE", "limit_threads", "with_bound_threads"]

#: Most intra-op threads for small problems (``None``: torch's setting, unchanged).
BOUND_THREADS: int | None = 1
#: Largest Gram-matrix side (the smaller channel count per group) counted as a small problem.
SMALL_SIDE = 64

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def limit_threads(n: int | None) -> Iterator[None]:
    """Run the block with at most ``n`` intra-op threads, then restore the previous count.

    ``None`` or a limit at or above the current count changes nothing. Process-wide, like
    ``torch.set_num_threads``: other Python threads computing at the same time are limited too.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(
            f"the thread limit (limit_threads, threads.BOUND_THREADS) must be a positive integer "
            f"or None, got {n!r}"
        )
    previous = torch.get_num_threads()
    if n is None or n >= previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def filter_side(weight: Any, *args: Any, groups: int = 1, **kwargs: Any) -> int | None:
    """Gram side of a filter ``(c_out, c_in / g, *k)``: ``min(c_out / g, c_in / g)``."""
    if not isinstance(weight, Tensor) or weight.ndim < 2 or not isinstance(groups, int):
        return None  # the decorated function reports the bad argument
    return min(weight.shape[0] // max(groups, 1), weight.shape[1])


def grouped_side(wg: Any, *args: Any, **kwargs: Any) -> int | None:
    """Gram side of a grouped filter ``(g, c_out, c_in, *k)``: ``min(c_out, c_in)``."""
    return min(wg.shape[1:3]) if isinstance(wg, Tensor) and wg.ndim >= 3 else None


def module_side(module: Any, *args: Any, **kwargs: Any) -> int | None:
    """Gram side of a layer's filter (``nn.Linear``: the smaller of its two sizes)."""
    return filter_side(getattr(module, "weight", None), groups=getattr(module, "groups", 1))


def matrix_side(matrix: Any, *args: Any, **kwargs: Any) -> int | None:
    """Gram side of a batch of matrices ``(..., m, n)``: ``min(m, n)``."""
    return min(matrix.shape[-2:]) if isinstance(matrix, Tensor) and matrix.ndim >= 2 else None


def with_bound_threads(side: Callable[..., int | None]) -> Callable[[F], F]:
    """Decorate a bound function to run under ``limit_threads(BOUND_THREADS)`` when
    ``side(*args, **kwargs) <= SMALL_SIDE`` (both settings read at each call)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            n = side(*args, **kwargs)
            small = n is not None and n <= SMALL_SIDE
            with limit_threads(BOUND_THREADS if small else None):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
