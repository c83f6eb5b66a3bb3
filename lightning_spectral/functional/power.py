"""Training-time estimate of the Fantastic Four bound by power iteration.

Singla & Feizi (ICLR 2021) bound a convolution by ``sqrt(prod k) * min_A ||M_A||_2``
over the ``2^d`` matricizations ``M_A`` of its filter (see :mod:`.matricize`). During
training the paper estimates every ``||M_A||_2`` with power iteration on persistent
vectors, one iteration per step, as Miyato et al. (ICLR 2018) do for spectral
normalization. Power iteration approaches ``||M_A||_2`` from below, so the value here is
an ESTIMATE of the bound, never a certificate; :mod:`.bounds` computes guaranteed values.

State. For a stack of ``L`` layers whose grouped filters share one shape
``(g, c_out, c_in, k_1, ..., k_d)`` the state is two lists indexed like
``row_subsets(d)``: ``us[m]`` of shape ``(L, g, c_out, *k_A)`` and ``vs[m]`` of shape
``(L, g, c_in, *k_notA)``, each unit-norm per ``(layer, group)``.

Cost. No permuted copy of the filter is ever made. With ``W`` viewed (for free) as the
``c_out x (c_in * prod k)`` matrix ``T`` in its stored layout, every product is one GEMM
against ``T``:

* ``M_A v = T @ V_A`` where ``V_A[(c, k), k'_A] = v[c, k_notA] * [k_A == k'_A]`` is a
  small structured matrix (``c_in * prod k`` by ``prod_{i in A} k_i``);
* ``M_A^T u = sum_{k_A} Y[k_A, c, k_A, k_notA]`` with ``Y = U_A^T @ T``, ``U_A`` the
  ``c_out x prod k_A`` matrix of ``u``: a diagonal read of a small result.

Because every ``A`` multiplies the same ``T``, the ``V_A`` (resp. ``U_A``) of all ``2^d``
subsets are concatenated and handled by ONE batched GEMM. One full iteration over all
``2^d`` matricizations of all ``L`` layers therefore reads the filters twice (two passes
over their memory; the per-subset bound asked of it is two passes per matricization) at
the price of ``prod (1 + k_i)`` times the FLOPs of a matrix-vector product, which stays
memory-bound for 2-d kernels. The differentiable value needs no further pass: after
``u <- normalize(M v)`` the value ``u^T M v`` equals ``||M v||``, and it is read off the
product ``X = T V`` the last half-step computed anyway (that one GEMM is recorded by autograd,
so the backward pass is the single GEMM ``u v^T``).

The index bookkeeping, the constant tensors (built once per shape, device and dtype), the
check of the state against the plan and the copy back into the state live in :mod:`.power_plan`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_int
from .matricize import row_subsets
from .power_plan import Plan, PlanConstants, cached_arange, check_state, plan_for_shape, store_state

__all__ = [
    "compute_dtype",
    "init_singular_vectors",
    "power_iteration_",
    "fantastic_four_estimate",
    "fantastic_four_estimate_cat",
    "concatenated_state",
    "state_views",
]


def _check_shape(grouped_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in grouped_shape)
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise ValueError(
            "grouped_shape must be (groups, c_out, c_in, *kernel) with positive sizes, "
            f"got {tuple(grouped_shape)}"
        )
    return shape


def init_singular_vectors(
    grouped_shape: Sequence[int],
    *,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Random unit starting vectors for the power iteration of every matricization.

    ``grouped_shape = (g, c_out, c_in, k_1, ..., k_d)`` (``d = 0`` for ``nn.Linear``).
    Returns ``us, vs`` indexed like ``row_subsets(d)``: ``us[m]`` has shape
    ``(g, c_out, *k_A)`` and ``vs[m]`` shape ``(g, c_in, *k_notA)``, each of unit norm
    per group. They are drawn on the CPU from a ``torch.Generator`` seeded with ``seed``
    (in float64, then cast), so every process and device gets the same vectors -- DDP
    ranks agree without communicating. Stack them along a new first axis to batch layers.
    """
    shape = _check_shape(grouped_shape)
    g, c_out, c_in, *k = shape
    dtype = torch.get_default_dtype() if dtype is None else dtype
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    us: list[Tensor] = []
    vs: list[Tensor] = []
    for subset in row_subsets(len(k)):
        u_shape = (g, c_out, *(k[i] for i in subset))
        v_shape = (g, c_in, *(k[j] for j in range(len(k)) if j not in subset))
        for shp, out in ((u_shape, us), (v_shape, vs)):
            x = torch.randn(shp, generator=gen, dtype=torch.float64)
            x = x / x.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1))
            out.append(x.to(device=device, dtype=dtype))
    return us, vs


def _normalize(x: Tensor, old: Tensor, block: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Normalize each subset's block of columns of ``x (z, rows, cols)``.

    Returns the normalized tensor and each column's block norm ``(z, cols)`` (``block``:
    see :class:`PlanConstants`), so all blocks are handled by a few whole-tensor kernels. Where
    a norm is ``<= eps`` the ``old`` vector is kept: a zero product (an all-zero filter)
    must not turn the persistent vector into zeros or NaNs, from which it could never
    recover. ``torch.where`` keeps this free of host sync (the quotient it discards may be
    NaN; none of it is kept).
    """
    per_col = (x * x).sum(dim=1).mm(block).sqrt()  # (z, cols)
    norms = per_col.unsqueeze(1)
    return torch.where(norms > eps, x / norms, old), per_col


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (half, bfloat16 weights) runs in float32.

    Power iteration in 8-bit-mantissa arithmetic would stall far below the norm.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast would run the GEMMs in half precision: switch it off where it is on (entering
    the context manager costs more than the check, and this runs once per training step)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _iterate_cat(
    plan: Plan, t: Tensor, u_cat: Tensor, v_cat: Tensor, n_iter: int
) -> tuple[Tensor, Tensor, Tensor, PlanConstants]:
    """``n_iter`` iterations but the last ``u`` half-step: returns ``(u_cat, v_cat, V, const)``.

    ``t`` is the ``(z, c_out, c_in * prod k)`` view ``T`` of the filters, in the compute
    dtype; ``u_cat``/``v_cat`` the concatenated vectors (:class:`Plan`), not modified;
    ``V`` is the expanded ``v`` of :meth:`Plan.expand_v`, so that ``bmm(t, V)``, the last
    half-step's product, is every ``M_A v_A``. With ``n_iter = 0``: the given vectors. A
    dozen kernels per iteration whatever ``d`` (dense selector).
    """
    const = plan.constants(t)
    eps = const.eps
    for it in range(n_iter):
        if it > 0:
            x = torch.bmm(t, plan.expand_v(v_cat, const))
            u_cat, _ = _normalize(x, u_cat, const.block_p, eps)
        v_cat, _ = _normalize(plan.mt_u(t, u_cat, const), v_cat, const.block_q, eps)
    return u_cat, v_cat, plan.expand_v(v_cat, const), const


def _matrix(plan: Plan, weights: Tensor) -> Tensor:
    """``T``: a view of the filters, unless half-precision weights must be upcast."""
    t = weights.reshape(plan.z, plan.c_out, plan.c_in * plan.numel_k)
    dtype = compute_dtype(weights.dtype)
    return t if t.dtype == dtype else t.to(dtype)


def _check_n_iter(n_iter: int) -> int:
    return check_int("n_iter", n_iter, low=0)


def power_iteration_(weights: Tensor, us: list[Tensor], vs: list[Tensor], n_iter: int = 1) -> None:
    """``n_iter`` power iterations on every matricization of every layer, in place.

    ``weights``: ``(L, g, c_out, c_in, *k)``, ``L`` stacked layers of equal grouped shape
    (``L = 1`` for one layer; ``d = 0``, ``(L, 1, out, in)``, for ``nn.Linear``).
    For each subset ``A``: ``v_A <- normalize(M_A^T u_A)``, then
    ``u_A <- normalize(M_A v_A)``. The tensors in ``us``/``vs`` are overwritten with
    ``copy_`` (so state-dict buffers holding them are updated); a zero product keeps the
    previous vector. Runs under ``no_grad``; costs two passes over ``weights`` per
    iteration for all ``2^d`` matricizations together (see the module docstring).
    """
    n_iter = _check_n_iter(n_iter)
    plan = check_state(weights, us, vs)
    if n_iter == 0:
        return
    with torch.no_grad(), _no_autocast(weights.device.type):
        t = _matrix(plan, weights)
        u_cat = plan.cat([u.to(t.dtype) for u in us], plan.c_out, plan.p)
        v_cat = plan.cat([v.to(t.dtype) for v in vs], plan.c_in, plan.q)
        u_cat, v_cat, v_big, const = _iterate_cat(plan, t, u_cat, v_cat, n_iter)
        u_cat, _ = _normalize(torch.bmm(t, v_big), u_cat, const.block_p, const.eps)
        store_state(plan, us, vs, u_cat, v_cat)


def fantastic_four_estimate(
    weights: Tensor, us: list[Tensor], vs: list[Tensor], n_iter: int = 1
) -> Tensor:
    """Power-iteration estimate of the Fantastic Four bound of each stacked layer, ``(L,)``.

    Runs ``n_iter`` in-place iterations (:func:`power_iteration_`), then returns
    ``sqrt(prod k) * max_g min_A sigma_A`` with ``sigma_A = u_A^T M_A v_A = ||M_A v_A||``
    (Singla & Feizi, ICLR 2021, with Miyato et al.'s persistent vectors). Each
    ``sigma_A <= ||M_A||_2``, so the result is at most the exact bound: an ESTIMATE
    from below, never a certificate.

    Differentiable w.r.t. ``weights``: the gradient is ``sqrt(prod k) * u_A v_A^T`` of
    the selected group and subset of each layer (zero elsewhere), the gradient of the
    exact bound once the vectors have converged. The value costs no pass beyond the
    iteration's own; with ``n_iter = 0`` one ``M_A v_A`` pass computes it and the stored
    vectors are left unchanged. Selection uses device-side ``min``/``max`` only (no
    host synchronization), so it is fit for every training step. The result has the
    weights' dtype; half-precision weights are iterated in float32, and autocast is
    switched off inside (it would run the products in half precision).
    """
    n_iter = _check_n_iter(n_iter)
    plan = check_state(weights, us, vs)
    dtype = compute_dtype(weights.dtype)
    u_cat = plan.cat([u.to(dtype) for u in us], plan.c_out, plan.p)
    v_cat = plan.cat([v.to(dtype) for v in vs], plan.c_in, plan.q)
    value, u_new, v_new = _estimate(plan, weights, u_cat, v_cat, n_iter)
    if n_iter > 0:
        with torch.no_grad():
            store_state(plan, us, vs, u_new, v_new)
    return value


def concatenated_state(
    grouped_shape: Sequence[int], us: Sequence[Tensor], vs: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """The vectors of :func:`init_singular_vectors` (stacked over ``L`` layers) in the
    concatenated layout the iteration works in: ``u_cat (L * g, c_out, sum_A p_A)`` and
    ``v_cat (L * g, c_in, sum_A q_A)``, ``grouped_shape = (L, g, c_out, c_in, *k)``.

    A state kept in this layout (see :func:`fantastic_four_estimate_cat`) saves the
    concatenation and the ``2^(d+1)`` copies back of every call; :func:`state_views` gives
    the per-matricization views of it.
    """
    plan = plan_for_shape(tuple(int(s) for s in grouped_shape))
    return (plan.cat(list(us), plan.c_out, plan.p).clone(),
            plan.cat(list(vs), plan.c_in, plan.q).clone())


def state_views(
    grouped_shape: Sequence[int], u_cat: Tensor, v_cat: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Views of a concatenated state in the shapes of :func:`init_singular_vectors` stacked
    over ``L`` layers (``us[m]``: ``(L, g, c_out, *k_A)``): writing into them writes the
    state."""
    plan = plan_for_shape(tuple(int(s) for s in grouped_shape))
    us = [part.view(*shape) for part, shape in
          zip(u_cat.split_with_sizes(plan.p, -1), plan.u_shapes, strict=True)]
    vs = [part.view(*shape) for part, shape in
          zip(v_cat.split_with_sizes(plan.q, -1), plan.v_shapes, strict=True)]
    return us, vs


def fantastic_four_estimate_cat(
    weights: Tensor, u_cat: Tensor, v_cat: Tensor, n_iter: int = 1
) -> Tensor:
    """:func:`fantastic_four_estimate` on a state in the layout of :func:`concatenated_state`
    (the same value, bit for bit), updated in place: two copies instead of the concatenation
    and the per-matricization copies, for the callback's every training step.

    The state must have the compute dtype (float64 for float64 weights, else float32) and
    the weights' device; checked by shape only, once per call.
    """
    plan = plan_for_shape(tuple(weights.shape))
    z, p_all, q_all = plan.z, plan.off_p[-1], plan.off_q[-1]
    if u_cat.shape != (z, plan.c_out, p_all) or v_cat.shape != (z, plan.c_in, q_all):
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} need u_cat {(z, plan.c_out, p_all)} and "
            f"v_cat {(z, plan.c_in, q_all)}, got {tuple(u_cat.shape)} and {tuple(v_cat.shape)}"
        )
    value, u_new, v_new = _estimate(plan, weights, u_cat, v_cat, n_iter)
    if n_iter > 0:
        with torch.no_grad():
            u_cat.copy_(u_new)
            v_cat.copy_(v_new)
    return value


def _estimate(
    plan: Plan, weights: Tensor, u_cat: Tensor, v_cat: Tensor, n_iter: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The estimate of every stacked layer and the iterated ``(u_cat, v_cat)`` (not stored)."""
    with _no_autocast(weights.device.type):
        t = _matrix(plan, weights)  # differentiable: a view of the weights
        with torch.no_grad():
            u_cat, v_cat, v_big, const = _iterate_cat(plan, t, u_cat, v_cat, n_iter)
        # The last half-step's product X = T V, every M_A v_A, is the iteration's own pass
        # over the weights; recording it for autograd is what makes the value differentiable.
        x = torch.bmm(t, v_big)
        with torch.no_grad():
            u_cat, per_col = _normalize(x, u_cat, const.block_p, const.eps)
            u_sel = u_cat * _selection(plan, const, per_col).unsqueeze(1)
        # u_sel^T X = sqrt(prod k) u_A^T M_A v_A = sqrt(prod k) sigma_A of the selected
        # (group, subset) of each layer, with u held fixed: linear in the weights, its
        # gradient is sqrt(prod k) u_A v_A^T, in the filter's layout through the view, one
        # GEMM in the backward pass.
        value = (x * u_sel).sum(dim=(1, 2))
        if plan.g > 1:
            value = value.view(plan.n_layers, plan.g).sum(dim=-1)
    value = value if value.dtype == weights.dtype else value.to(weights.dtype)
    return value, u_cat, v_cat


def _selection(plan: Plan, const: PlanConstants, per_col: Tensor) -> Tensor:
    """``(z, sum p)``: ``sqrt(prod k)`` on the columns of ``u_cat`` of each layer's selected
    pair, 0 elsewhere.

    ``per_col`` holds each column's ``sigma_A``, so a minimum over the columns is the
    minimum over subsets, the first minimal column lying in the first minimal subset (as
    ``argmin``); row ``i`` of ``block_p`` is the mask of the subset of column ``i``. Then
    the group of the largest minimum. Device-side only: no host sync, no index tensor
    copied to the device.
    """
    mins, col = per_col.view(plan.n_layers, plan.g, -1).min(dim=-1)  # (L, g)
    mask = const.select.index_select(0, col.view(-1))  # (z, sum p)
    if plan.g > 1:
        best_group = mins.argmax(dim=-1, keepdim=True)  # (L, 1)
        group_hit = cached_arange(plan.g, per_col.device) == best_group  # (L, g)
        mask = mask * group_hit.view(plan.z, 1)
    return mask
