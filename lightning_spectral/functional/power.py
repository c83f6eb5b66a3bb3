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
``u <- normalize(M v)`` the value ``u^T M v`` equals ``||M v||``, already computed.

Launches. For kernels up to 7x7 / 3x3x3 a cached 0/1 tensor ``D`` does the structured
expansion and the diagonal read for all subsets in one contraction each, and the per-subset
norms go through a cached indicator matrix: about 23 kernels per iteration per stack of
layers, independent of ``d``. Larger kernels use one einsum per subset instead.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .matricize import row_subsets

__all__ = ["init_singular_vectors", "power_iteration_", "fantastic_four_estimate"]

_LETTERS = "abcdefghijklmnopqrstuvwxy"  # 'z' is reserved for the flattened (layer, group) axis


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


#: Largest dense selector ``D`` (entries) before falling back to one einsum per subset:
#: 64 x 49 x 64 for 7x7 kernels and 64 x 27 x 64 for 3x3x3 fit, 5x5x5 does not.
_DENSE_SELECTOR_MAX = 1 << 18


def _ravel(index: Sequence[int], sizes: Sequence[int]) -> int:
    """Row-major flat position of ``index`` in an array of shape ``sizes``."""
    flat = 0
    for i, n in zip(index, sizes, strict=True):
        flat = flat * n + i
    return flat


@functools.lru_cache(maxsize=64)
def _constants(
    k: tuple[int, ...], device: torch.device, dtype: torch.dtype, dense: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """0/1 tensors that only depend on the kernel shape, built once per device and dtype.

    ``D[(A, k'_A), k, (A, k'_notA)] = [k_A == k'_A and k_notA == k'_notA]`` (``None`` unless
    ``dense``) turns both structured products into single contractions: ``V = v D`` and
    ``M^T u = diag-read(Y) = Y D``. ``S_p``, ``S_q`` map each concatenated column of
    ``u`` resp. ``v`` to its subset, for per-subset norms in one matrix product.
    """
    subsets = row_subsets(len(k))
    p = [math.prod(k[i] for i in a) for a in subsets]
    q = [math.prod(k) // n for n in p]
    seg_p = torch.zeros(sum(p), len(subsets), dtype=dtype)
    seg_q = torch.zeros(sum(q), len(subsets), dtype=dtype)
    for m in range(len(subsets)):
        seg_p[sum(p[:m]) : sum(p[: m + 1]), m] = 1
        seg_q[sum(q[:m]) : sum(q[: m + 1]), m] = 1
    selector = None
    if dense:
        selector = torch.zeros(sum(p), math.prod(k), sum(q), dtype=dtype)
        for m, a in enumerate(subsets):
            not_a = [j for j in range(len(k)) if j not in a]
            for flat, idx in enumerate(itertools.product(*(range(n) for n in k))):
                row = _ravel([idx[i] for i in a], [k[i] for i in a])
                col = _ravel([idx[j] for j in not_a], [k[j] for j in not_a])
                selector[sum(p[:m]) + row, flat, sum(q[:m]) + col] = 1
        selector = selector.to(device)
    return selector, seg_p.to(device), seg_q.to(device)


class _Plan:
    """Index bookkeeping for one filter shape (einsum equations built from each subset).

    Concatenated layouts: ``u_cat`` is ``(z, c_out, sum_A p_A)`` (``u_A`` flattened to
    ``p_A = prod_{i in A} k_i`` columns), ``v_cat`` is ``(z, c_in, sum_A q_A)``
    (``q_A = prod k / p_A``), ``z = L * g``.
    """

    def __init__(self, weights: Tensor) -> None:
        if weights.ndim < 4:
            raise ValueError(
                "weights must be (L, groups, c_out, c_in, *kernel), "
                f"got shape {tuple(weights.shape)}"
            )
        n_layers, g, c_out, c_in, *k = weights.shape
        self.d = d = len(k)
        self.k = k
        self.z = n_layers * g
        self.c_out, self.c_in = c_out, c_in
        self.numel_k = math.prod(k)
        self.subsets = row_subsets(d)
        self.p = [math.prod(k[i] for i in a) for a in self.subsets]  # rows of M_A per c_out
        self.q = [self.numel_k // p for p in self.p]  # columns of M_A per c_in
        self.off_p = [sum(self.p[:m]) for m in range(len(self.p) + 1)]
        self.off_q = [sum(self.q[:m]) for m in range(len(self.q) + 1)]
        self.dense = self.off_p[-1] * self.numel_k * self.off_q[-1] <= _DENSE_SELECTOR_MAX
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

    def constants(self, ref: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        return _constants(tuple(self.k), ref.device, ref.dtype, self.dense)

    def cat(self, parts: Sequence[Tensor], rows: int, widths: Sequence[int]) -> Tensor:
        flat = [t.reshape(self.z, rows, w) for t, w in zip(parts, widths, strict=True)]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)

    def expand_v(self, v_cat: Tensor, selector: Tensor | None) -> Tensor:
        """``V = cat_A V_A``, ``(z, c_in * prod k, sum_A p_A)``: ``T @ V`` is every ``M_A v_A``.

        ``V_A[(c, k), k'_A] = v_A[c, k_notA] * [k_A == k'_A]``.
        """
        if self.d == 0:
            return v_cat
        if selector is not None:
            big = torch.einsum("zcq,pkq->zckp", v_cat, selector)
            return big.reshape(self.z, self.c_in * self.numel_k, self.off_p[-1])
        parts = []
        for m, a in enumerate(self.subsets):
            v = v_cat[..., self.off_q[m] : self.off_q[m + 1]]
            v = v.reshape(self.z, self.c_in, *(self.k[j] for j in range(self.d) if j not in a))
            eyes = [torch.eye(self.k[i], dtype=v.dtype, device=v.device) for i in a]
            big = torch.einsum(self.v_eq[m], v, *eyes) if a else v
            parts.append(big.reshape(self.z, self.c_in * self.numel_k, self.p[m]))
        return torch.cat(parts, dim=-1)

    def mt_u(self, t: Tensor, u_cat: Tensor, selector: Tensor | None) -> Tensor:
        """Every ``M_A^T u_A``, as ``v_cat`` ``(z, c_in, sum_A q_A)``, from one GEMM ``U^T T``."""
        y = torch.bmm(u_cat.transpose(1, 2), t)  # (z, sum p, c_in * prod k): reads T once
        if self.d == 0:
            return y.reshape(self.z, self.c_in, 1)
        if selector is not None:
            y = y.reshape(self.z, self.off_p[-1], self.c_in, self.numel_k)
            return torch.einsum("zpck,pkq->zcq", y, selector)
        parts = []
        for m, a in enumerate(self.subsets):
            y_a = y[:, self.off_p[m] : self.off_p[m + 1]]
            if a:
                y_a = y_a.reshape(self.z, *(self.k[i] for i in a), self.c_in, *self.k)
                y_a = torch.einsum(self.diag_eq[m], y_a)
            parts.append(y_a.reshape(self.z, self.c_in, self.q[m]))
        return torch.cat(parts, dim=-1)


def _normalize(x: Tensor, old: Tensor, seg: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Normalize each subset's block of columns of ``x (z, rows, cols)``; norms ``(z, 2^d)``.

    ``seg (cols, 2^d)`` says which subset a column belongs to, so all blocks are handled by
    a few whole-tensor kernels. Where a norm is ``<= eps`` the ``old`` vector is kept: a
    zero product (an all-zero filter) must not turn the persistent vector into zeros or
    NaNs, from which it could never recover. ``torch.where`` keeps this free of host sync.
    """
    norms = (x * x).sum(dim=1).matmul(seg).sqrt()  # (z, 2^d)
    per_col = norms.matmul(seg.T).unsqueeze(1)  # each column's block norm, (z, 1, cols)
    return torch.where(per_col > eps, x / per_col.clamp_min(eps), old), norms


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).tiny) ** 0.5


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (half, bfloat16 weights) runs in float32.

    Power iteration in 8-bit-mantissa arithmetic would stall far below the norm.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run(
    plan: _Plan, weights: Tensor, us: Sequence[Tensor], vs: Sequence[Tensor], n_iter: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n_iter`` iterations; returns ``(u_cat, V, sigma, v_cat)`` with ``sigma (z, 2^d)``.

    The returned vectors satisfy ``u_A = M_A v_A / sigma_A`` (the last half-step), so
    ``sigma_A = u_A^T M_A v_A``; ``V`` is the expanded ``v`` of :meth:`_Plan.expand_v`.
    With ``n_iter = 0`` only that half-step is taken. About 20 kernels per iteration
    whatever ``d`` (dense selector), two of them GEMMs that read the weights.
    """
    dtype = _compute_dtype(weights.dtype)
    eps = _eps(dtype)
    # A view (T of each filter) unless the weights are half precision and must be upcast.
    t = weights.reshape(plan.z, plan.c_out, plan.c_in * plan.numel_k).to(dtype)
    selector, seg_p, seg_q = plan.constants(t)
    u_cat = plan.cat([u.to(dtype) for u in us], plan.c_out, plan.p)
    v_cat = plan.cat([v.to(dtype) for v in vs], plan.c_in, plan.q)
    for it in range(max(n_iter, 1)):
        if it < n_iter:
            v_cat, _ = _normalize(plan.mt_u(t, u_cat, selector), v_cat, seg_q, eps)
        v_big = plan.expand_v(v_cat, selector)
        x = torch.bmm(t, v_big)  # (z, c_out, sum p): every M_A v_A, reading T once
        u_cat, sigma = _normalize(x, u_cat, seg_p, eps)
    return u_cat, v_big, sigma, v_cat


def _store(
    plan: _Plan, us: Sequence[Tensor], vs: Sequence[Tensor], u_cat: Tensor, v_cat: Tensor
) -> None:
    for m, (u, v) in enumerate(zip(us, vs, strict=True)):
        u.copy_(u_cat[..., plan.off_p[m] : plan.off_p[m + 1]].reshape(u.shape))
        v.copy_(v_cat[..., plan.off_q[m] : plan.off_q[m + 1]].reshape(v.shape))


def _check_state(weights: Tensor, us: Sequence[Tensor], vs: Sequence[Tensor]) -> _Plan:
    plan = _Plan(weights)
    n = len(plan.subsets)
    if len(us) != n or len(vs) != n:
        raise ValueError(
            f"a filter with {plan.d} spatial axes has {n} matricizations; "
            f"got {len(us)} u and {len(vs)} v vectors"
        )
    lead = tuple(weights.shape[:2])
    if any(t.device != weights.device for t in (*us, *vs)):
        raise ValueError(f"the vectors must be on the weights' device ({weights.device})")
    for m, a in enumerate(plan.subsets):
        u_shape = (*lead, plan.c_out, *(plan.k[i] for i in a))
        v_shape = (*lead, plan.c_in, *(plan.k[j] for j in range(plan.d) if j not in a))
        if tuple(us[m].shape) != u_shape or tuple(vs[m].shape) != v_shape:
            raise ValueError(
                f"matricization {m} (row axes {a}) needs u of shape {u_shape} and v of shape "
                f"{v_shape}, got {tuple(us[m].shape)} and {tuple(vs[m].shape)}"
            )
    return plan


def _check_n_iter(n_iter: int) -> int:
    if int(n_iter) != n_iter or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    return int(n_iter)


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
    plan = _check_state(weights, us, vs)
    if n_iter == 0:
        return
    with torch.no_grad(), torch.autocast(weights.device.type, enabled=False):
        u_cat, _, _, v_cat = _run(plan, weights.detach(), us, vs, n_iter)
        _store(plan, us, vs, u_cat, v_cat)


class _SelectedRankOne(torch.autograd.Function):
    """``scale * max_g min_A sigma_A`` whose gradient is ``scale * u_A* v_A*^T``.

    ``sigma_A = u_A^T M_A v_A`` is linear in the filter with ``u, v`` held fixed, so its
    gradient is the outer product ``u_A[o, k_A] * v_A[c, k_notA]`` in the filter's layout:
    that is ``U_A @ V_A^T`` with the structured ``V_A`` of :class:`_Plan`. Only the selected
    (group, subset) of each layer gets it: the others are multiplied by a zero mask, so
    one batched GEMM writes the whole gradient and nothing leaves the device.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        weights: Tensor,
        sigma: Tensor,
        u_cat: Tensor,
        v_cat: Tensor,
        offsets: list[int],
        n_layers: int,
        scale: float,
    ) -> Tensor:
        z, n_sub = sigma.shape
        per_layer = sigma.view(n_layers, z // n_layers, n_sub)
        best_sub = per_layer.argmin(dim=-1)  # (L, g)
        per_group = per_layer.gather(-1, best_sub.unsqueeze(-1)).squeeze(-1)
        value, best_group = per_group.max(dim=-1)  # (L,)
        g = z // n_layers
        group_hit = torch.arange(g, device=sigma.device) == best_group.unsqueeze(-1)  # (L, g)
        sub_hit = torch.arange(n_sub, device=sigma.device) == best_sub.unsqueeze(-1)
        mask = (group_hit.unsqueeze(-1) & sub_hit).reshape(z, n_sub).to(u_cat.dtype)
        # Expand the (z, subset) mask to the concatenated columns of u_cat (built from
        # views, not from a host list, so nothing is copied to the device).
        col_mask = torch.cat(
            [mask[:, m : m + 1].expand(z, offsets[m + 1] - offsets[m]) for m in range(n_sub)],
            dim=1,
        )
        ctx.save_for_backward(u_cat * col_mask.unsqueeze(1), v_cat)
        ctx.weight_shape = weights.shape
        ctx.weight_dtype = weights.dtype
        ctx.n_layers = n_layers
        ctx.scale = scale
        return (value * scale).to(weights.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        u_sel, v_cat = ctx.saved_tensors
        # Scale the small u factor, not the weight-sized product: one pass fewer.
        coeff = (grad_out.to(u_sel.dtype) * ctx.scale).view(ctx.n_layers, 1)
        coeff = coeff.expand(ctx.n_layers, u_sel.shape[0] // ctx.n_layers).reshape(-1, 1, 1)
        with torch.autocast(u_sel.device.type, enabled=False):
            grad = torch.bmm(u_sel * coeff, v_cat.transpose(1, 2))  # (z, c_out, c_in * prod k)
        return grad.view(ctx.weight_shape).to(ctx.weight_dtype), None, None, None, None, None, None


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
    vectors are left unchanged. Selection uses device-side ``argmin``/``max`` only (no
    host synchronization), so it is fit for every training step. The result has the
    weights' dtype; half-precision weights are iterated in float32, and autocast is
    switched off inside (it would run the products in half precision).
    """
    n_iter = _check_n_iter(n_iter)
    plan = _check_state(weights, us, vs)
    # Autocast would run the GEMMs in half precision: the estimate needs float32 at least.
    with torch.no_grad(), torch.autocast(weights.device.type, enabled=False):
        u_cat, v_big, sigma, v_cat = _run(plan, weights.detach(), us, vs, n_iter)
        if n_iter > 0:
            _store(plan, us, vs, u_cat, v_cat)
    return _SelectedRankOne.apply(
        weights, sigma, u_cat, v_big, plan.off_p, weights.shape[0], math.sqrt(plan.numel_k)
    )
