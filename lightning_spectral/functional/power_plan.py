"""Plans, cached constants and state bookkeeping of the power iteration (:mod:`.power`).

Launches. This runs once per training step on many small stacks, where the cost is the
number of kernel launches rather than FLOPs. For kernels up to 7x7 / 3x3x3 a cached 0/1
tensor ``D`` does the structured expansion and the diagonal read for all subsets in one
matrix product each, and the per-subset norms go through a cached block indicator matrix:
about a dozen kernels per iteration per stack of layers, independent of ``d``, and about
30 per call in all (the concatenation of the state, the selection, and the ``2^(d+1)``
copies back into the state included). The index bookkeeping (:class:`Plan`) and the
constant tensors are built once per shape, device and dtype, never per call. Larger
kernels use one einsum per subset instead.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .matricize import row_subsets

__all__ = ["Plan", "PlanConstants", "cached_arange", "check_state", "plan_for_shape", "store_state"]

_LETTERS = "abcdefghijklmnopqrstuvwxy"  # 'z' is reserved for the flattened (layer, group) axis

#: Largest dense selector ``D`` (entries) before falling back to one einsum per subset:
#: 64 x 49 x 64 for 7x7 kernels and 64 x 27 x 64 for 3x3x3 fit, 5x5x5 does not.
_DENSE_SELECTOR_MAX = 1 << 18


def _ravel(index: Sequence[int], sizes: Sequence[int]) -> int:
    """Row-major flat position of ``index`` in an array of shape ``sizes``."""
    flat = 0
    for i, n in zip(index, sizes, strict=True):
        flat = flat * n + i
    return flat


class PlanConstants:
    """0/1 tensors that only depend on the kernel shape, built once per device and dtype.

    ``D[(A, k'_A), k, (A, k'_notA)] = [k_A == k'_A and k_notA == k'_notA]`` turns both
    structured products into one plain matrix product each, on views of the operands:
    ``expand`` is ``D`` laid out as ``(sum q, prod k * sum p)`` (``V = v D``) and ``diag``
    as ``(prod k * sum p, sum q)`` (``M^T u = diag-read(Y) = Y D``); both are ``None``
    unless the selector is small enough (or ``d = 0``, where there is nothing to expand).
    ``block_p[i, j] = [columns i and j of u_cat belong to the same subset]`` (``block_q``
    likewise for ``v_cat``): a row vector of squared column norms times it gives every
    column its subset's squared norm in one matrix product, and its row ``i`` is the 0/1
    mask of the subset of column ``i``; ``select`` is ``sqrt(prod k)`` times it, the scaled
    mask the estimate's selection reads. ``eps``: see :func:`_normalize`.
    """

    def __init__(
        self, k: tuple[int, ...], device: torch.device, dtype: torch.dtype, dense: bool
    ) -> None:
        subsets = row_subsets(len(k))
        p = [math.prod(k[i] for i in a) for a in subsets]
        q = [math.prod(k) // n for n in p]
        self.expand: Tensor | None = None
        self.diag: Tensor | None = None
        if dense and math.prod(k) > 1:  # with one kernel tap D is the identity
            selector = torch.zeros(sum(p), math.prod(k), sum(q), dtype=dtype)
            for m, a in enumerate(subsets):
                not_a = [j for j in range(len(k)) if j not in a]
                for flat, idx in enumerate(itertools.product(*(range(n) for n in k))):
                    row = _ravel([idx[i] for i in a], [k[i] for i in a])
                    col = _ravel([idx[j] for j in not_a], [k[j] for j in not_a])
                    selector[sum(p[:m]) + row, flat, sum(q[:m]) + col] = 1
            # (p, k, q) -> (q, k, p) and (k, p, q): the layouts in which V = v D and the
            # diagonal read of Y^T are single matrix products on free views.
            self.expand = selector.permute(2, 1, 0).reshape(sum(q), -1).contiguous().to(device)
            self.diag = selector.transpose(0, 1).reshape(-1, sum(q)).contiguous().to(device)
        self.block_p = torch.block_diag(*(torch.ones(n, n, dtype=dtype) for n in p)).to(device)
        self.block_q = torch.block_diag(*(torch.ones(n, n, dtype=dtype) for n in q)).to(device)
        self.select = self.block_p * math.sqrt(math.prod(k))
        # A tensor, not a Python float: wrapping a scalar for every comparison costs more
        # than the comparison of these small tensors.
        self.eps = torch.tensor(_eps(dtype), dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _constants(
    k: tuple[int, ...], device: torch.device, dtype: torch.dtype, dense: bool
) -> PlanConstants:
    return PlanConstants(k, device, dtype, dense)


@functools.lru_cache(maxsize=64)
def cached_arange(n: int, device: torch.device) -> Tensor:
    """``torch.arange(n)`` on ``device``, built once."""
    # Cached so that no step builds (and, on a GPU, copies to the device) an index tensor.
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=8)
def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).tiny) ** 0.5


class Plan:
    """Index bookkeeping for one filter shape (einsum equations built from each subset).

    Concatenated layouts: ``u_cat`` is ``(z, c_out, sum_A p_A)`` (``u_A`` flattened to
    ``p_A = prod_{i in A} k_i`` columns), ``v_cat`` is ``(z, c_in, sum_A q_A)``
    (``q_A = prod k / p_A``), ``z = L * g``. Built once per shape (:func:`plan_for_shape`).
    """

    def __init__(self, weights: Tensor | Sequence[int]) -> None:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else tuple(weights)
        if len(shape) < 4:
            raise ValueError(
                f"weights must be (L, groups, c_out, c_in, *kernel), got shape {shape}"
            )
        n_layers, g, c_out, c_in, *k = shape
        self.d = d = len(k)
        self.k = k
        self.k_tuple = tuple(k)
        self.n_layers, self.g = n_layers, g
        self.z = n_layers * g
        self.c_out, self.c_in = c_out, c_in
        self.numel_k = math.prod(k)
        self.scale = math.sqrt(self.numel_k)
        self.subsets = row_subsets(d)
        self.p = [math.prod(k[i] for i in a) for a in self.subsets]  # rows of M_A per c_out
        self.q = [self.numel_k // p for p in self.p]  # columns of M_A per c_in
        self.off_p = [sum(self.p[:m]) for m in range(len(self.p) + 1)]
        self.off_q = [sum(self.q[:m]) for m in range(len(self.q) + 1)]
        self.dense = self.off_p[-1] * self.numel_k * self.off_q[-1] <= _DENSE_SELECTOR_MAX
        self.u_shapes = [(n_layers, g, c_out, *(k[i] for i in a)) for a in self.subsets]
        self.v_shapes = [
            (n_layers, g, c_in, *(k[j] for j in range(d) if j not in a)) for a in self.subsets
        ]
        kl = _LETTERS[:d]  # kernel axes k_1..k_d
        kp = _LETTERS[d : 2 * d]  # primed copies k'_A (the column index of V_A)
        self.v_eq: list[str] = []  # v (z, c, k_notA) and identities -> V_A (z, c, k, k'_A)
        self.diag_eq: list[str] = []  # Y (z, k'_A, c, k) -> (z, c, k_notA), k'_A == k_A
        for a in self.subsets:
            not_a = "".join(kl[j] for j in range(d) if j not in a)
            eyes = "".join(f",{kl[i]}{kp[i]}" for i in a)
            self.v_eq.append(f"zX{not_a}{eyes}->zX{kl}{''.join(kp[i] for i in a)}")
            rows = "".join(kl[i] for i in a)
            self.diag_eq.append(f"z{rows}X{kl}->zX{not_a}")

    def constants(self, ref: Tensor) -> PlanConstants:
        """The cached constants for ``ref``'s device and dtype."""
        return _constants(self.k_tuple, ref.device, ref.dtype, self.dense)

    def cat(self, parts: Sequence[Tensor], rows: int, widths: Sequence[int]) -> Tensor:
        flat = [t.reshape(self.z, rows, w) for t, w in zip(parts, widths, strict=True)]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)

    def expand_v(self, v_cat: Tensor, const: PlanConstants) -> Tensor:
        """``V = cat_A V_A``, ``(z, c_in * prod k, sum_A p_A)``: ``T @ V`` is every ``M_A v_A``.

        ``V_A[(c, k), k'_A] = v_A[c, k_notA] * [k_A == k'_A]``.
        """
        if self.numel_k == 1:  # d = 0 or 1x1 kernels: every V_A is v_A itself
            return v_cat
        if const.expand is not None:
            big = v_cat.reshape(self.z * self.c_in, self.off_q[-1]).mm(const.expand)
            return big.view(self.z, self.c_in * self.numel_k, self.off_p[-1])
        parts = []
        for m, a in enumerate(self.subsets):
            v = v_cat[..., self.off_q[m] : self.off_q[m + 1]]
            v = v.reshape(self.z, self.c_in, *(self.k[j] for j in range(self.d) if j not in a))
            eyes = [torch.eye(self.k[i], dtype=v.dtype, device=v.device) for i in a]
            big = torch.einsum(self.v_eq[m], v, *eyes) if a else v
            parts.append(big.reshape(self.z, self.c_in * self.numel_k, self.p[m]))
        return torch.cat(parts, dim=-1)

    def mt_u(self, t: Tensor, u_cat: Tensor, const: PlanConstants) -> Tensor:
        """Every ``M_A^T u_A``, as ``v_cat`` ``(z, c_in, sum_A q_A)``, from one GEMM on ``T``."""
        if self.numel_k == 1:  # d = 0 or 1x1 kernels: every M_A is T
            return torch.bmm(t.transpose(1, 2), u_cat)  # (z, c_in, 2^d)
        if const.diag is not None:
            # Y^T = T^T U (a transposed operand, not a copy) comes out as (z, c, k, p): its
            # diagonal read against D is then one product on a free view.
            y_t = torch.bmm(t.transpose(1, 2), u_cat)  # (z, c_in * prod k, sum p)
            v = y_t.view(self.z * self.c_in, self.numel_k * self.off_p[-1]).mm(const.diag)
            return v.view(self.z, self.c_in, self.off_q[-1])
        y = torch.bmm(u_cat.transpose(1, 2), t)  # (z, sum p, c_in * prod k): reads T once
        parts = []
        for m, a in enumerate(self.subsets):
            y_a = y[:, self.off_p[m] : self.off_p[m + 1]]
            if a:
                y_a = y_a.reshape(self.z, *(self.k[i] for i in a), self.c_in, *self.k)
                y_a = torch.einsum(self.diag_eq[m], y_a)
            parts.append(y_a.reshape(self.z, self.c_in, self.q[m]))
        return torch.cat(parts, dim=-1)


@functools.lru_cache(maxsize=256)
def plan_for_shape(shape: tuple[int, ...]) -> Plan:
    """The :class:`Plan` of one stacked filter shape, built once per shape."""
    return Plan(shape)


def check_state(weights: Tensor, us: Sequence[Tensor], vs: Sequence[Tensor]) -> Plan:
    """The plan of ``weights``, after refusing vectors of the wrong number, shape or device."""
    if weights.ndim < 4:
        raise ValueError(
            f"weights must be (L, groups, c_out, c_in, *kernel), got shape {tuple(weights.shape)}"
        )
    plan = plan_for_shape(tuple(weights.shape))
    n = len(plan.subsets)
    if len(us) != n or len(vs) != n:
        raise ValueError(
            f"a filter with {plan.d} spatial axes has {n} matricizations; "
            f"got {len(us)} u and {len(vs)} v vectors"
        )
    device = weights.device
    for m, (u, v) in enumerate(zip(us, vs, strict=True)):
        if u.device != device or v.device != device:
            raise ValueError(f"the vectors must be on the weights' device ({device})")
        if u.shape != plan.u_shapes[m] or v.shape != plan.v_shapes[m]:
            raise ValueError(
                f"matricization {m} (row axes {plan.subsets[m]}) needs u of shape "
                f"{plan.u_shapes[m]} and v of shape {plan.v_shapes[m]}, "
                f"got {tuple(u.shape)} and {tuple(v.shape)}"
            )
    return plan


def store_state(
    plan: Plan, us: Sequence[Tensor], vs: Sequence[Tensor], u_cat: Tensor, v_cat: Tensor
) -> None:
    """Copy the concatenated vectors back into the state tensors ``us`` and ``vs``."""
    # One split into views, shapes as plain ints: on these small tensors the Python-side
    # cost of slicing or of parsing a torch.Size argument is more than that of the copy.
    u_parts = u_cat.split_with_sizes(plan.p, -1)
    for dst, src, shape in zip(us, u_parts, plan.u_shapes, strict=True):
        dst.copy_(src.view(*shape))
    v_parts = v_cat.split_with_sizes(plan.q, -1)
    for dst, src, shape in zip(vs, v_parts, plan.v_shapes, strict=True):
        dst.copy_(src.view(*shape))
