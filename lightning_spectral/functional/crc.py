"""CRC: the Lagrangian dual of the distance to the decision boundary (tighter, iterative).

The certificate of Singla & Feizi (ICML 2020) for margins whose gradients are ``K``-Lipschitz;
see :func:`crc_certified_radius`. It never returns less than the closed-form radius of
:func:`~lightning_spectral.functional.curvature_certified_radius`, whose checks and Jacobians
it shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .curvature_radius import curvature_certified_radius, margin_pairs, taylor_radius

__all__ = ["crc_certified_radius"]


def crc_certified_radius(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor,
    curvature: Tensor | float,
    *,
    outer_steps: int = 30,
    inner_steps: int = 50,
    dtype: torch.dtype | None = torch.float64,
    chunk_size: int | None = None,
) -> Tensor:
    """Curvature-based robustness certificate (CRC, Singla & Feizi 2020): the dual bound.

    For a pair ``(y, t)`` with margin ``f = z_y - z_t``, ``f(x0) > 0`` and ``grad f``
    ``K``-Lipschitz, the squared distance from ``x0`` to ``{f <= 0}`` is at least
    ``2 d(eta)`` for every ``eta >= 0``, where ``d(eta) = min_x 1/2 ||x - x0||^2 + eta f(x)``
    (weak duality: at any ``x'`` with ``f(x') <= 0`` the objective is ``<= 1/2||x' - x0||^2``).
    For ``eta < 1/K`` the objective ``F`` is ``m = (1 - eta K)``-strongly convex, so for *any*
    ``x``, ``d(eta) >= F(x) - ||grad F(x)||^2 / (2 m)``: the inexact inner solve is paid for
    with its residual, never assumed converged. ``eta`` is chosen by bisection on
    ``[0, (1 - 1e-3)/K]`` (``d'(eta) = f(x*(eta))``: raise ``eta`` while ``f(x*) > 0``), the
    inner problem by Nesterov's method started from the previous solution; the best lower
    bound over all ``eta`` tried counts. Each pair's radius is the larger of this and the
    closed-form radius of :func:`curvature_certified_radius` (both are valid), so
    ``CRC >= r_K``; the result is the minimum over all ``t != y``. When the minimizer
    ``x*(eta)`` lands on the boundary the bound equals the exact distance.

    Args:
        model: as for :func:`curvature_certified_radius`.
        x: as for :func:`curvature_certified_radius`.
        target: as for :func:`curvature_certified_radius`.
        curvature: as for :func:`curvature_certified_radius`.
        dtype: as for :func:`curvature_certified_radius`.
        chunk_size: as for :func:`curvature_certified_radius`.
        outer_steps: bisection steps on ``eta``.
        inner_steps: Nesterov steps per ``eta`` (one model gradient each). The cost is
            ``outer_steps * (inner_steps + 1)`` batched gradient evaluations over the
            ``N (C - 1)`` (sample, class) pairs, against one Jacobian for the closed form.

    Returns:
        float64 ``(N,)`` radii, 0 for misclassified samples (ties included).
    """
    if outer_steps < 1 or inner_steps < 1:
        raise ValueError(f"outer_steps and inner_steps must be >= 1, got {outer_steps}, "
                         f"{inner_steps}")
    if x.ndim < 1 or x.shape[0] == 0:
        return curvature_certified_radius(model, x, target, curvature, dtype=dtype)
    p = margin_pairs(model, x, target, curvature, dtype, chunk_size)
    radii = taylor_radius(p.margin, p.grad_norm, p.k)
    # Only pairs with a positive margin and curvature gain anything (K = 0: r_K is exact).
    refine = (p.margin > 0) & (p.k > 0)
    refine = refine.scatter(1, p.y[:, None], False)
    rows, cols = torch.nonzero(refine, as_tuple=True)
    if len(rows):
        num_classes = p.margin.shape[1]
        direction = F.one_hot(p.y[rows], num_classes) - F.one_hot(cols, num_classes)
        dual = _crc_pairs(p.fn, p.x[rows], direction.to(p.x.dtype), p.k[rows, cols],
                          outer_steps, inner_steps, chunk_size)
        radii[rows, cols] = torch.maximum(radii[rows, cols], dual)
    radii = radii.scatter(1, p.y[:, None], math.inf)
    return radii.min(dim=1).values


def _margin_value_and_grad(
    fn: Callable[[Tensor], Tensor], chunk_size: int | None
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(x, v) -> (v^T z(x), grad_x v^T z(x))`` per row, each row run on its own."""

    def one(xi: Tensor, vi: Tensor) -> Tensor:
        return (fn(xi.unsqueeze(0))[0] * vi).sum()

    batched = torch.func.vmap(torch.func.grad_and_value(one), chunk_size=chunk_size)

    def call(x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        grad, value = batched(x, v)
        return value.detach().to(torch.float64), grad.detach()

    return call


def _crc_pairs(
    fn: Callable[[Tensor], Tensor],
    x0: Tensor,
    direction: Tensor,
    k: Tensor,
    outer_steps: int,
    inner_steps: int,
    chunk_size: int | None,
) -> Tensor:
    """Certified lower bound ``sqrt(2 max_eta d(eta))`` per pair (float64 ``(P,)``)."""
    margin = _margin_value_and_grad(fn, chunk_size)
    lo = torch.zeros_like(k)
    hi = (1.0 - 1e-3) / k
    best = torch.zeros_like(k)
    x = x0.clone()
    for _ in range(outer_steps):
        eta = 0.5 * (lo + hi)
        x = _inner_solve(margin, x0, x, direction, eta, k, inner_steps)
        f, grad = margin(x, direction)
        step = (x - x0).flatten(1).to(torch.float64)
        residual = step + eta[:, None] * grad.flatten(1).to(torch.float64)  # grad F(x)
        objective = 0.5 * step.square().sum(1) + eta * f
        # Strong convexity: d(eta) = min F >= F(x) - ||grad F(x)||^2 / (2 m), valid at any x.
        lower = objective - residual.square().sum(1) / (2.0 * (1.0 - eta * k))
        best = torch.maximum(best, lower)
        lo = torch.where(f > 0, eta, lo)
        hi = torch.where(f > 0, hi, eta)
    return torch.sqrt(2.0 * best)


def _inner_solve(
    margin: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    x0: Tensor,
    start: Tensor,
    direction: Tensor,
    eta: Tensor,
    k: Tensor,
    steps: int,
) -> Tensor:
    """Nesterov's method on ``F(x) = 1/2||x - x0||^2 + eta f(x)``, which is
    ``(1 - eta K)``-strongly convex and ``(1 + eta K)``-smooth."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    smooth = (1.0 + eta * k).to(x0.dtype).view(shape)
    strong = (1.0 - eta * k).to(x0.dtype).view(shape)
    momentum = (smooth.sqrt() - strong.sqrt()) / (smooth.sqrt() + strong.sqrt())
    eta_x = eta.to(x0.dtype).view(shape)
    x, previous = start, start
    for _ in range(steps):
        look = x + momentum * (x - previous)
        _, grad = margin(look, direction)
        previous, x = x, look - (look - x0 + eta_x * grad) / smooth
    return x
