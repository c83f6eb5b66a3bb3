"""Guaranteed upper bounds on the spectral norm of convolution and linear layers.

Notation. A filter ``W`` of shape ``(c_out, c_in, k_1, ..., k_d)`` has taps ``W_t`` (the
``c_out x c_in`` matrices ``W[:, :, t]``) and symbol

    P(theta) = sum_t W_t exp(-i theta . t),      theta in the torus [0, 2 pi)^d.

Write ``S = sup_theta ||P(theta)||_2``. Every layer this module supports factors as

    J = Sel o C_N o E

with ``C_N`` the circular convolution by the *dilated* filter on an ``N``-grid, ``E`` an
embedding (zero padding), the identity (circular padding), or an embedding after a pixel
copying matrix (reflect/replicate), and ``Sel`` a row selection (stride, cropping):

* zero padding, any stride/dilation: the zero-padded operator is a sub-matrix of the
  circular convolution on a grid big enough that nothing wraps around (``N >= n + pl +
  pr``); a sub-matrix has a smaller norm.
* transposed convolutions: ``nn.ConvTransposeNd`` is the adjoint of the convolution with
  the same stored tensor (output cropped by ``padding``, extended by ``output_padding``),
  again a sub-matrix of the adjoint of a circular convolution: same norm bound.
* circular / reflect / replicate: see :mod:`lightning_spectral.functional.padding`; the
  norm of ``Sel`` / ``E`` is ``padding_factor`` (1 for zeros and for same-size circular).

``C_N`` is block-diagonalized by the DFT (Sedghi et al., ICLR 2019): its norm is the
maximum of ``||P(dil * theta)||`` over the ``N``-grid frequencies, hence ``<= S``
(dilation maps the torus into itself). So

    ||J||_2 <= padding_factor * ||C_N|| <= padding_factor * S,

and every bound on ``S`` below ("symbol bounds") gives a layer bound. Groups make ``J``
block diagonal: bounds are computed per group and maximized. Everything is float64 and
differentiable with respect to the weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .matricize import grouped_weight, matricize, row_subsets
from .norms import spectral_norm_exact
from .padding import PADDING_MODES, padding_factor
from .threads import filter_side, module_side, with_bound_threads

__all__ = [
    "SUPPORTED_LAYERS",
    "fantastic_four",
    "tap_sum_bound",
    "gram_kernel_bound",
    "sampled_symbol_bound",
    "circular_grid_norm",
    "layer_bounds",
    "layer_spectral_bound",
    "polyphase_filter",
]

SUPPORTED_LAYERS: tuple[type, ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)

# Relative safety margin on every computed matrix norm (see ``_opnorm``).
_ROUNDING_MARGIN = 1e-13
# Norm inflation the sampled-frequency bound aims for, and the largest one worth computing.
_SAMPLED_TARGET = 1.05
_SAMPLED_MAX = 1.5
# Self-correlation steps of the Gram-kernel bound by d (its kernel grows as 2^t (k - 1) + 1
# per axis, and in practice the sampled bound is as tight at a fraction of the time).
_GRAM_MAX_STEPS = {1: 3, 2: 2, 3: 1}
# Inflation of the sampled bound above which the Gram-kernel bound is tried as well.
_GRAM_IF_RHO = 1.2
# Default cost budget of each optional bound: this many times the Fantastic-Four cost, at
# least _MIN_BUDGET (multiply-add units of ``_opnorm_cost``). 4x keeps the sampled bound's
# inflation near 1.2 on large 3x3 layers (about 30% below FF on random filters) at a few
# times FF's run time; small layers get the 1.05 target from the floor.
_BUDGET_FACTOR = 4
_MIN_BUDGET = 2e8


def _check_finite(weight: Tensor, what: str) -> None:
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(
            f"{what} contains non-finite values (NaN or Inf); no finite spectral bound exists"
        )


def _opnorm(matrix: Tensor) -> Tensor:
    """Exact batched spectral norm (largest singular value), differentiable.

    The top eigenvalue of the smaller Gram matrix (:func:`.norms.spectral_norm_exact`): the
    same value as an SVD to float64 rounding, and 10x or more faster on CPU. Raised by
    ``_ROUNDING_MARGIN`` so that float64 rounding cannot put a bound below the exact value:
    the top singular value computed through the Gram matrix has a relative error of about
    ``n * 2^-53 / 2`` at worst (``n`` the Gram side), under 1e-13 for ``n`` up to ~1800 and
    typically ``sqrt(n) * 2^-53``, far smaller.
    """
    return spectral_norm_exact(matrix) * (1 + _ROUNDING_MARGIN)


def _opnorm_cost(m: int, n: int) -> float:
    return float(min(m, n)) ** 2 * max(m, n)


def _taps_last(wg: Tensor) -> Tensor:
    """(g, co, ci, *k) -> (g, *k, co, ci)."""
    return wg.movedim((1, 2), (-2, -1))


# ----------------------------------------------------------------------------- symbol bounds


@with_bound_threads(filter_side)
def fantastic_four(weight: Tensor, *, groups: int = 1, reduction: str = "min") -> Tensor:
    """The bound of Singla & Feizi (ICLR 2021): ``sqrt(prod k) * ||M_A||_2`` per subset ``A``.

    Proof: ``P(theta) = (a_A^T kron I) M_A (b_A kron I)`` up to row/column order, with
    ``a_A`` the phase vector over the axes in ``A`` (norm ``sqrt(prod_{i in A} k_i)``) and
    ``b_A`` the one over the other axes; so ``||P(theta)|| <= sqrt(prod k) ||M_A||`` for
    every ``A`` and ``theta``, which bounds ``S`` and therefore every zero/circular
    operator with any stride and dilation, and its adjoint (transposed convolution).

    ``weight``: ``(c_out, c_in / groups, *k)`` (``d = 0``: a linear weight). Norms are exact
    (SVD in float64). ``reduction="min"`` returns ``max_g min_A`` (valid because the
    operator is block diagonal over groups, and tighter than ``min_A max_g``);
    ``reduction="none"`` returns a ``(2^d,)`` tensor whose entry ``m`` is
    ``max_g`` of the bound with subset ``row_subsets(d)[m]``.
    """
    if reduction not in ("min", "none"):
        raise ValueError(f"reduction must be 'min' or 'none', got {reduction!r}")
    _check_finite(weight, "weight")
    w = grouped_weight(weight.to(torch.float64), groups)
    d = weight.ndim - 2
    scale = math.sqrt(math.prod(weight.shape[2:]))
    per = torch.stack([_opnorm(matricize(w, a, batch_dims=1)) for a in row_subsets(d)])  # (2^d, g)
    per = per * scale
    if reduction == "none":
        return per.amax(dim=1)
    return per.amin(dim=0).amax()


@with_bound_threads(filter_side)
def tap_sum_bound(weight: Tensor, *, groups: int = 1) -> Tensor:
    """``max_g sum_t ||W_t||_2``.

    Proof: ``P(theta) = sum_t W_t e^{-i theta.t}`` and each phase has modulus 1, so
    ``||P(theta)|| <= sum_t ||W_t||`` (triangle inequality); equivalently the operator is a
    sum over taps of a shift (norm <= 1) tensored with ``W_t``.
    """
    w = grouped_weight(weight.to(torch.float64), groups)
    norms = _opnorm(_taps_last(w))  # (g, *k)
    return norms.flatten(1).sum(dim=1).amax()


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


def _gram_step_cost(g: int, c_small: int, c_big: int, taps: int, taps_out: int) -> float:
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
    _check_finite(weight, "weight")
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
    taps = _opnorm(_taps_last(kt)).flatten(1).sum(dim=1)  # (g,)
    subs = row_subsets(d) if subsets == "all" else [row_subsets(d)[0], row_subsets(d)[-1]]
    ff = torch.stack([_opnorm(matricize(kt, a, batch_dims=1)) for a in subs]).amin(dim=0)
    ff = ff * math.sqrt(math.prod(ksize))
    best = torch.minimum(taps, ff).clamp_min(torch.finfo(torch.float64).tiny)
    per_group = torch.exp((best.log() + log_scale) / (2**n_steps))
    return per_group.amax()


def _symbol_on_grid(
    wg: Tensor,
    grid: Sequence[int],
    dilation: Sequence[int] | None = None,
    first: tuple[int, int] | None = None,
) -> Tensor:
    """``P(dil * theta)`` at ``theta_j = 2 pi f_j / M_j``, half spectrum.

    Returns ``(g, nodes, co, ci)`` complex. Real filters satisfy ``P(-theta) =
    conj(P(theta))`` (same norm), so the last axis keeps ``f in [0, M // 2]``. Explicit
    DFT matrices (not ``fftn``) so any ``M`` (also smaller than the kernel: the taps then
    wrap around, as in a circular convolution on a small grid) and any dilation work.
    ``first = (start, stop)`` restricts the first axis's frequencies (memory chunking).
    """
    d = wg.ndim - 3
    dil = [1] * d if dilation is None else list(dilation)
    x = wg.to(torch.complex128)
    for j in range(d):
        m = int(grid[j])
        nf = m // 2 + 1 if j == d - 1 else m
        lo, hi = first if (j == 0 and first is not None) else (0, nf)
        f = torch.arange(lo, hi, dtype=torch.float64, device=wg.device)
        t = torch.arange(wg.shape[3 + j], dtype=torch.float64, device=wg.device)
        # integer phases reduced mod m first (exact in float64) so large grids lose nothing
        phase = torch.outer(f, t * dil[j]).remainder_(m) * (-2 * math.pi / m)
        e = torch.polar(torch.ones_like(phase), phase)  # (nf, k_j)
        x = torch.movedim(torch.tensordot(x, e, dims=([3 + j], [1])), -1, 3 + j)
    g, co, ci = wg.shape[:3]
    return _taps_last(x).reshape(g, -1, co, ci)


def _max_symbol_norm(
    wg: Tensor, grid: Sequence[int], dilation: Sequence[int] | None = None
) -> Tensor:
    """``max_nodes ||P(dil * node)||_2`` over the half grid, in chunks of about 64 MiB."""
    d = wg.ndim - 3
    nf0 = grid[0] // 2 + 1 if d == 1 else int(grid[0])
    per_row = _grid_nodes(grid) // nf0 * wg.shape[0] * wg.shape[1] * wg.shape[2] * 16
    step = max(1, (64 << 20) // max(per_row, 1))
    maxima = [
        _opnorm(_symbol_on_grid(wg, grid, dilation, (lo, min(lo + step, nf0)))).amax()
        for lo in range(0, nf0, step)
    ]
    return torch.stack(maxima).amax()


def _grid_nodes(grid: Sequence[int]) -> int:
    return math.prod(grid[:-1]) * (grid[-1] // 2 + 1)


@with_bound_threads(filter_side)
def circular_grid_norm(
    weight: Tensor, grid: Sequence[int], *, groups: int = 1, dilation: Sequence[int] | None = None
) -> Tensor:
    """Exact norm of the circular convolution by the dilated filter on an ``N``-grid.

    Sedghi, Gupta & Long (ICLR 2019): the DFT block-diagonalizes the operator, so its norm
    is the max over the ``prod N`` frequencies of ``||P(dil * theta)||``. Cost: that many
    ``c_out x c_in`` SVDs (half of them, by conjugate symmetry).
    """
    wg = grouped_weight(weight.to(torch.float64), groups)
    return _max_symbol_norm(wg, grid, dilation)


def sampled_inflation(kernel: Sequence[int], grid: Sequence[int]) -> float | None:
    """``prod_j (1 - (pi D_j / M_j)^2 / 2)^(-1/2)``, ``D_j = k_j - 1``; None if a factor is <= 0."""
    denom = 1.0
    for k, m in zip(kernel, grid, strict=True):
        factor = 1 - (math.pi * (k - 1) / m) ** 2 / 2
        if factor <= 0:
            return None
        denom *= factor
    return denom ** (-0.5)


def _sampled_grid(kernel: Sequence[int], nodes_cap: float) -> tuple[list[int], float] | None:
    """Grid sizes ``M_j`` for the sampled bound and its norm inflation ``rho``.

    Rule: every axis with ``D_j = k_j - 1 > 0`` gets the same ``delta = pi D_j / M_j``, i.e.
    ``M_j = ceil(pi D_j / delta)`` (``M_j = 1`` where ``D_j = 0``: the symbol is constant
    along that axis). ``delta`` starts where ``rho = sampled_inflation`` is
    ``_SAMPLED_TARGET`` (1.05; a 21 x 21 grid for 3 x 3) and grows by 10% steps until the
    half grid fits ``nodes_cap``; ``None`` if then ``rho > _SAMPLED_MAX`` (1.5).
    """
    dd = [k - 1 for k in kernel]
    active = sum(1 for x in dd if x > 0)
    if active == 0:
        return ([1] * len(dd), 1.0) if nodes_cap >= 1 else None
    delta = math.sqrt(2 * (1 - _SAMPLED_TARGET ** (-2 / active)))
    while True:
        grid = [max(1, math.ceil(math.pi * x / delta)) if x > 0 else 1 for x in dd]
        if _grid_nodes(grid) <= nodes_cap or delta >= math.sqrt(2):
            break
        delta *= 1.1
    rho = sampled_inflation(kernel, grid)
    if rho is None or rho > _SAMPLED_MAX or _grid_nodes(grid) > nodes_cap:
        return None
    return grid, rho


@with_bound_threads(filter_side)
def sampled_symbol_bound(weight: Tensor, grid: Sequence[int], *, groups: int = 1) -> Tensor:
    """``S^2 <= max_nodes ||P(node)||^2 / prod_j (1 - (pi D_j / M_j)^2 / 2)``, ``D_j = k_j - 1``.

    Nodes: the ``M_1 x ... x M_d`` grid ``2 pi f / M``; every factor must be positive.

    Lemma (one axis). Let ``h >= 0`` be a real trigonometric polynomial of degree ``D``
    with maximum ``H`` at ``x*``. Then ``h(x) >= H (1 - (D (x - x*))^2 / 2)``. Proof:
    ``h'(x*) = 0``; ``h`` is of exponential type ``D`` and ``|h| <= H``, so Bernstein's
    inequality (twice) gives ``|h''| <= D^2 H``; Taylor's theorem concludes. At the nearest
    of ``M`` equispaced nodes ``|x - x*| <= pi / M``.

    Proof of the bound. Let ``(theta*, u*)`` maximize ``u^H Q(theta) u`` over the torus and
    unit ``u`` (``Q = P^H P``; the maximum is ``F = S^2``). ``f = u*^H Q u*`` is real,
    non-negative, of degree ``D_j`` in ``theta_j`` (the taps of ``Q`` are differences
    ``t' - t``), with maximum ``F``. Apply the lemma along axis 1 with the other
    coordinates at ``theta*``: some node ``a_1`` has ``f(a_1, theta*_2, ...) >= F c_1``,
    ``c_j = 1 - (pi D_j / M_j)^2 / 2``. Then along axis 2 at the maximum of
    ``f(a_1, ., theta*_3, ...)`` (at least ``F c_1``): a node ``a_2`` with
    ``f(a_1, a_2, theta*_3, ...) >= F c_1 c_2``; and so on over all axes. Finally
    ``f(node) <= ||P(node)||^2``. Real filters need half of the nodes
    (``P(-theta) = conj P(theta)``). Raises ValueError if a factor is not positive.
    """
    kernel = weight.shape[2:]
    rho = sampled_inflation(kernel, grid) if len(kernel) else None
    if rho is None:
        raise ValueError(f"grid {tuple(grid)} too coarse for kernel {tuple(kernel)}")
    wg = grouped_weight(weight.to(torch.float64), groups)
    return _max_symbol_norm(wg, grid) * rho


# ----------------------------------------------------------------------------- layers


class _Geometry:
    """What a layer does to the grid, read from the module."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, SUPPORTED_LAYERS):
            names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            raise TypeError(
                f"no spectral bound for {type(module).__name__}; supported layers: {names}"
            )
        weight = module.weight
        _check_finite(weight, f"{type(module).__name__} weight")
        self.weight: Tensor = weight
        self.linear = isinstance(module, nn.Linear)
        if self.linear:
            return
        self.transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        self.groups = int(module.groups)
        self.kernel = [int(k) for k in weight.shape[2:]]
        d = len(self.kernel)
        self.stride = [int(s) for s in module.stride]
        self.dilation = [int(x) for x in module.dilation]
        self.mode = str(module.padding_mode)
        if self.mode not in PADDING_MODES:
            raise ValueError(f"unknown padding_mode {self.mode!r}; expected one of {PADDING_MODES}")
        if self.transposed:
            if self.mode != "zeros":
                # torch's forward refuses this too; say so before computing anything.
                raise ValueError(
                    f"{type(module).__name__} only supports padding_mode='zeros', got {self.mode!r}"
                )
            self.pads = [(int(p), int(p)) for p in module.padding]
            self.output_padding = [int(p) for p in module.output_padding]
        else:
            # F.pad order (last axis first) also holds the left/right split of 'same'.
            rev = [int(p) for p in module._reversed_padding_repeated_twice]
            self.pads = [(rev[2 * (d - 1 - j)], rev[2 * (d - 1 - j) + 1]) for j in range(d)]

    def ext(self, j: int) -> int:
        return self.dilation[j] * (self.kernel[j] - 1) + 1

    def grid(self, input_size: Sequence[int]) -> list[int]:
        """The ``N`` of ``J = Sel o C_N o E`` for this input size (see the module docstring)."""
        out = []
        for j, n in enumerate(input_size):
            s, ext, (pl, pr) = self.stride[j], self.ext(j), self.pads[j]
            if self.transposed:
                n_out = (n - 1) * s - pl - pr + ext + self.output_padding[j]
                if n_out < 1:
                    raise ValueError(f"input size {tuple(input_size)} gives an empty output")
                # adjoint of the conv reading j = i*s + dil*t - p, rows i < n, on n_out.
                out.append(pl + max(n_out, (n - 1) * s + ext - pl))
                continue
            o = (n + pl + pr - ext) // s + 1
            if n + pl + pr < ext:
                raise ValueError(f"input size {tuple(input_size)} is smaller than the kernel")
            if self.mode == "circular":
                out.append(n)
            elif self.mode == "zeros":
                out.append(pl + max(n, (o - 1) * s + ext - pl))
            else:  # valid conv on the padded input, restricted to the positions it reads
                out.append((o - 1) * s + ext)
        return out


def _default_budget(wg_shape: Sequence[int], d: int) -> float:
    g, co, ci, *k = wg_shape
    ff_cost = 0.0
    for a in row_subsets(d):
        rows = co * math.prod(k[i] for i in a)
        ff_cost += g * _opnorm_cost(rows, co * ci * math.prod(k) // rows)
    return max(_MIN_BUDGET, _BUDGET_FACTOR * ff_cost)


def polyphase_filter(weight: Tensor, stride: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """The stride-1 filter of a strided convolution's polyphase form.

    Along an axis with stride ``s``, write the (dilated) tap offset ``dil * t = s q + r``,
    ``0 <= r < s``. Output ``y[i] = sum_t W_t xp[s i + dil t]`` of the padded input ``xp``
    becomes ``sum_r sum_q W'_{r, q} xp_r[i + q]`` with ``xp_r[m] = xp[s m + r]``: a
    stride-1, undilated convolution of the ``s``-fold channel stack ``(xp_r)_r`` by the
    filter ``W'`` of shape ``(c_out, c_in * prod s, *ceil(ext / s))``. The map
    ``xp -> (xp_r)_r`` only re-indexes pixels (an isometry), so every symbol bound of
    ``W'`` bounds the strided valid convolution, hence (times the padding factor of the
    zeros/reflect/replicate decomposition) the layer; and the adjoint for transposed
    convolutions. Channel order keeps each group's input channels together, so grouped
    filters stay block diagonal over groups. Axes with stride 1 are left as they are.
    """
    w = weight
    d = w.ndim - 2
    c_out = w.shape[0]
    for j in range(d):
        s, dil = int(stride[j]), int(dilation[j])
        if s == 1:
            continue
        ax = 2 + j
        k = w.shape[ax]
        ext = dil * (k - 1) + 1
        kq = -(-ext // s)
        shape = list(w.shape)
        shape[ax] = kq * s
        dense = w.new_zeros(shape)
        dense.narrow(ax, 0, ext)[(slice(None),) * ax + (slice(None, None, dil),)] = w
        # (.., kq * s, ..) -> (.., kq, s, ..): tap q * s + r; then r joins the channels.
        dense = dense.reshape(*shape[:ax], kq, s, *shape[ax + 1 :])
        dense = dense.movedim(ax + 1, 2)  # (c_out, c_in', s, ..., kq, ...)
        w = dense.reshape(c_out, -1, *dense.shape[3:])
    return w


def _symbol_bounds(w: Tensor, g: int, budget: float) -> dict[str, Tensor]:
    """Every bound on ``sup ||P(theta)||`` of the filter ``w`` that fits ``budget``."""
    co, ci = w.shape[0] // g, w.shape[1]
    kernel = [int(k) for k in w.shape[2:]]
    d = len(kernel)
    out: dict[str, Tensor] = {
        "fantastic_four": fantastic_four(w, groups=g),
        "tap_sum": tap_sum_bound(w, groups=g),
    }
    c_small, c_big = min(co, ci), max(co, ci)
    taps = math.prod(kernel)
    node_cost = 4 * g * _opnorm_cost(co, ci) + g * co * ci * taps
    sampled = _sampled_grid(kernel, budget / node_cost)
    if sampled is not None:
        out["sampled_frequency"] = sampled_symbol_bound(w, sampled[0], groups=g)
    if taps > 1 and (sampled is None or sampled[1] > _GRAM_IF_RHO):
        # Gram kernel, only where the sampled bound is absent or loose (elsewhere it is
        # never tighter in practice): as many self-correlation steps as the budget allows.
        cost, ksize, steps = 0.0, list(kernel), 0
        c_in_step = c_big
        while steps < _GRAM_MAX_STEPS[d]:
            new = [2 * x - 1 for x in ksize]
            step = _gram_step_cost(g, c_small, c_in_step, math.prod(ksize), math.prod(new))
            evaluate = g * math.prod(new) * c_small**3 * 3
            if cost + step + evaluate > budget:
                break
            cost += step
            ksize, c_in_step, steps = new, c_small, steps + 1
        if steps:
            subsets = "all" if g * (c_small * max(ksize)) ** 3 * 2**d <= budget else "ends"
            out["gram_kernel"] = gram_kernel_bound(w, groups=g, n_steps=steps, subsets=subsets)
    return out


@with_bound_threads(module_side)
def layer_bounds(
    module: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    max_cost: float | None = None,
) -> dict[str, Tensor]:
    """Every provable upper bound on ``module``'s spectral norm (bias excluded), by name.

    ``nn.Linear``: ``{"matrix_norm": ||W||_2}`` (exact). Convolutions (and transposed
    ones): each symbol bound times the padding factor (module docstring), namely
    ``fantastic_four``, ``tap_sum``, and, when their cost fits, ``sampled_frequency`` and
    (if that one is absent or inflated by more than 1.2) ``gram_kernel``; for strided
    layers (not circular mode) the same bounds of the polyphase filter, named
    ``polyphase_<name>`` (see :func:`polyphase_filter`). With
    ``input_size`` (the spatial size of the layer's input) the padding factor is exact for
    that size and ``fft`` (the exact norm of ``C_N``, equal to the layer's norm for
    circular same-size stride-1 layers) joins when it fits.

    Cost cap: each optional bound is computed only if its multiply-add count (an ``m x n``
    SVD counts ``min(m,n)^2 max(m,n)``, a complex one 4 times that) is at most
    ``max_cost``; the default is ``max(2e8, 4 x the Fantastic-Four cost)``, so the extras
    cost a small multiple of the four bounds themselves.
    """
    geo = _Geometry(module)
    w = geo.weight
    if geo.linear:
        return {"matrix_norm": _opnorm(w.to(torch.float64))}
    d = len(geo.kernel)
    if input_size is not None:
        input_size = tuple(int(n) for n in input_size)
        if len(input_size) != d or min(input_size) < 1:
            raise ValueError(
                f"input_size must be {d} positive spatial sizes, got {tuple(input_size)}"
            )
    wg_shape = (geo.groups, w.shape[0] // geo.groups, *w.shape[1:])
    g, co, ci = wg_shape[:3]
    budget = _default_budget(wg_shape, d) if max_cost is None else float(max_cost)
    if geo.transposed:
        factor = 1.0
    else:
        factor = padding_factor(
            geo.mode, geo.kernel, geo.stride, geo.dilation, geo.pads, input_size
        )
    grid = geo.grid(input_size) if input_size is not None else None

    out = _symbol_bounds(w, g, budget)
    if any(st > 1 for st in geo.stride) and (geo.transposed or geo.mode != "circular"):
        # Not for circular mode: its factor counts rows of C_n, a decomposition in which
        # the stride lives in the row selection, not in the convolution.
        poly = polyphase_filter(w, geo.stride, geo.dilation)
        out.update({f"polyphase_{k}": v for k, v in _symbol_bounds(poly, g, budget).items()})
    taps = math.prod(geo.kernel)
    node_cost = 4 * g * _opnorm_cost(co, ci) + g * co * ci * taps
    if grid is not None and _grid_nodes(grid) * node_cost <= budget:
        out["fft"] = circular_grid_norm(w, grid, groups=g, dilation=geo.dilation)
    if factor != 1.0:
        out = {name: value * factor for name, value in out.items()}
    return out


@with_bound_threads(module_side)
def layer_spectral_bound(
    module: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    max_cost: float | None = None,
) -> Tensor:
    """The tightest provable bound: ``min(layer_bounds(module, input_size).values())``.

    0-dim float64, differentiable with respect to ``module.weight``. Without
    ``input_size`` it holds for every input size torch accepts; with it, for that size.
    """
    return torch.stack(list(layer_bounds(module, input_size, max_cost=max_cost).values())).min()
