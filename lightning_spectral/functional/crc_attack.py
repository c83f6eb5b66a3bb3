"""The curvature-based attack of curvature-regularized training (CRT): a dual, bisected solve.

For the margin ``m(x) = z_y(x) - z_t(x)`` of a network whose margin gradient is
``K``-Lipschitz (Hessian eigenvalues in ``[-K, K]``), :func:`curvature_attack` approximately
solves ``min m(x) s.t. ||x - x0|| <= rho`` through its Lagrangian dual over ``eta >= K``,
where every inner problem is convex. See :func:`curvature_attack`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .curvature_radius import (
    check_classes,
    check_target,
    curvature_tensor,
    expand_pairwise_curvature,
    prepare_model,
)

__all__ = ["CurvatureAttack", "curvature_attack"]

_CLASSES = ("all", "runner_up")


class CurvatureAttack(NamedTuple):
    """What :func:`curvature_attack` returns, one entry per sample."""

    x: Tensor
    """``(N, ...)`` attack points, ``||x - x0|| <= rho``, in the dtype of the input ``x``."""
    margin: Tensor
    """float64 ``(N,)`` margin ``z_y - z_t`` at ``x`` (``<= 0``: the attack succeeded)."""
    target: Tensor
    """``(N,)`` long: the class ``t`` of that margin."""
    lower_bound: Tensor
    """float64 ``(N,)`` lower bound on ``min_{||x - x0|| <= rho} z_y - z_t`` (the minimum also
    over every attacked ``t``); guaranteed when ``curvature`` is a guaranteed bound."""


def curvature_attack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor,
    rho: float,
    curvature: Tensor | float,
    *,
    n_bisection: int = 20,
    n_inner: int = 20,
    classes: str | Tensor = "all",
    dtype: torch.dtype | None = None,
) -> CurvatureAttack:
    """Curvature-based l2 attack (Singla & Feizi, ICML 2020, the attack CRT trains on).

    For a label ``y``, a class ``t != y`` and the margin ``m(x) = z_y(x) - z_t(x)`` with
    ``-K I <= Hess m <= K I`` (``grad m`` is ``K``-Lipschitz), the attack approximately solves
    ``min m(x)`` subject to ``||x - x0|| <= rho`` through the dual

        max_{eta >= K}  g(eta),   g(eta) = min_x  m(x) + (eta / 2) (||x - x0||^2 - rho^2).

    For ``eta > K`` the inner objective ``F_eta`` is ``(eta - K)``-strongly convex, so its
    minimizer ``x*(eta)`` is unique and found by majorize-minimize steps: ``m`` is majorized
    at ``x_k`` by ``m(x_k) + grad m(x_k)^T (x - x_k) + (K / 2)||x - x_k||^2``, whose sum with the
    distance term is minimized by

        x_{k+1} = (eta x0 + K x_k - grad m(x_k)) / (eta + K),

    a descent step on ``F_eta`` (one input gradient each, started from the previous solution).
    By Danskin's theorem ``g'(eta) = (||x*(eta) - x0||^2 - rho^2) / 2``, so ``eta`` is bisected
    on ``[K, K + ||grad m(x0)|| / rho]``: raised while ``x*`` lies outside the ball, lowered
    while inside. The upper end is safe: strong convexity gives
    ``||x*(eta) - x0|| <= ||grad F_eta(x0)|| / (eta - K) = ||grad m(x0)|| / (eta - K)``. When
    ``||x*(eta) - x0|| = rho`` exactly, ``x*`` is the global minimizer of ``m`` over the ball
    (for any ``x`` in the ball, ``m(x) >= F_eta(x) - eta rho^2 / 2 >= m(x*)``); with a loose
    ``K`` the multiplier of the true minimizer may be below ``K`` and the attack is then only a
    heuristic.

    Every inner solution is also mapped radially onto the sphere ``||x - x0|| = rho`` (a
    projection when outside, an extension when inside); the point with the lowest margin among
    ``x0``, the inner solutions inside the ball and those sphere points is returned, so the
    result always lies in the ball (checked after the final rounding to the input dtype). The
    same iterates give, for free, the lower bound
    ``min_ball m >= F_eta(x) - eta rho^2 / 2 - ||grad F_eta(x)||^2 / (2 (eta - K))`` at any
    ``x`` (strong convexity; no convergence is assumed), together with the Taylor bound
    ``m(x0) - ||grad m(x0)|| rho - K rho^2 / 2``; the larger of all of them is reported.

    Only input gradients are taken (one backward pass of the summed margins to the input per
    step, under ``no_grad`` otherwise): the model's parameters receive no gradient and no graph
    is kept, so the attack can run inside a training step. The curvature need not be
    guaranteed for the attack to be useful (e.g. a per-step estimate during training); it must
    be for ``lower_bound`` to be a bound.

    Args:
        model: maps ``(N, ...)`` to logits ``(N, C)``, each sample independently; an
            ``nn.Module`` must be in eval mode.
        x: ``(N, ...)`` clean inputs ``x0``.
        target: ``(N,)`` integer labels ``y``.
        rho: l2 radius, finite and ``>= 0`` (0 returns ``x0``).
        curvature: a scalar ``C`` bounding the Lipschitz constant of the Jacobian of the logit
            map (then ``K_yt = sqrt(2) C``) or a ``(C, C)`` matrix of pairwise bounds ``K_yt``
            (row = label), as for
            :func:`~lightning_spectral.functional.curvature_certified_radius`.
        n_bisection: bisection steps on ``eta``.
        n_inner: majorize-minimize steps per ``eta``. The cost is about
            ``n_bisection * (n_inner + 2)`` batched input gradients over the attacked pairs.
        classes: ``"all"`` attacks every ``t != y`` (``N (C - 1)`` pairs) and keeps, per
            sample, the class whose margin went lowest; ``"runner_up"`` attacks only the class
            with the largest clean logit other than ``y`` (``N`` pairs; the choice of the CRT
            training code, cheaper but weaker); an ``(N,)`` integer tensor names the class per
            sample (each different from ``y``).
        dtype: precision of the computation; ``None`` (default) keeps the model and ``x`` as
            given, otherwise a module is copied and cast, and ``x`` is cast.

    Returns:
        :class:`CurvatureAttack` ``(x, margin, target, lower_bound)``.
    """
    if not (n_bisection >= 1 and n_inner >= 1):
        raise ValueError(f"n_bisection and n_inner must be >= 1, got {n_bisection}, {n_inner}")
    rho = float(rho)
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be finite and >= 0, got {rho}")
    if x.ndim < 1:
        raise ValueError(f"x must have a batch axis, got shape {tuple(x.shape)}")
    n = x.shape[0]
    check_target(target, n)
    k = curvature_tensor(curvature)
    if isinstance(classes, str) and classes not in _CLASSES:
        raise ValueError(f"classes must be one of {_CLASSES} or an (N,) tensor, got {classes!r}")
    fn = prepare_model(model, dtype)
    x0 = x.detach() if dtype is None else x.detach().to(dtype)
    with torch.no_grad():
        logits = fn(x0)
    if logits.ndim != 2 or logits.shape[0] != n:
        raise ValueError(f"the model must map (N, ...) to logits (N, C), got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    check_classes(target, n, num_classes)
    k = expand_pairwise_curvature(k, num_classes, logits.device)
    y = target.to(logits.device).long()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=x.device)
        return CurvatureAttack(x.detach().clone(), empty, y.clone(), empty.clone())
    rows, cols = _attacked_pairs(logits, y, classes)
    direction = (F.one_hot(y[rows], num_classes) - F.one_hot(cols, num_classes)).to(x0.dtype)
    with torch.no_grad():
        adv, margin, bound = _attack_pairs(
            _margin_value_and_grad(fn),
            x0[rows],
            direction,
            k[y[rows], cols],
            rho,
            n_bisection,
            n_inner,
        )
    per = len(rows) // n  # pairs per sample, grouped by sample
    margin, bound = margin.view(n, per), bound.view(n, per)
    pick = margin.argmin(1)
    best = torch.arange(n, device=pick.device) * per + pick
    adv, margin = adv[best], margin.gather(1, pick[:, None])[:, 0]
    if adv.dtype != x.dtype:  # rounding to the caller's dtype may leave the ball: re-check
        clean = x.detach()
        adv = _into_ball(clean, adv.to(x.dtype), rho, sphere=False)
        with torch.no_grad():
            margin = _margin_value_and_grad(fn)(adv.to(x0.dtype), direction[best])[0]
    return CurvatureAttack(adv, margin, cols[best], bound.min(1).values)


def _margin_value_and_grad(
    fn: Callable[[Tensor], Tensor],
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(x, v) -> (v^T z(x), grad_x v^T z(x))`` per row: one backward pass of the summed
    margins to the input only (samples are independent, so row ``i`` of the gradient is the
    gradient of margin ``i``; no parameter gradient is computed or kept)."""

    def call(x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            value = (fn(xg) * v).sum(1)
            (grad,) = torch.autograd.grad(value.sum(), xg)
        return value.detach().to(torch.float64), grad.detach()

    return call


def _attacked_pairs(logits: Tensor, y: Tensor, classes: str | Tensor) -> tuple[Tensor, Tensor]:
    """(sample, class) index pairs, grouped by sample with the same count for every sample."""
    n, num_classes = logits.shape
    device = logits.device
    if isinstance(classes, Tensor):
        t = classes.to(device)
        check_target(t, n)
        check_classes(t, n, num_classes)
        t = t.long()
        if bool((t == y).any()):
            raise ValueError("classes must differ from target for every sample")
        return torch.arange(n, device=device), t
    if classes == "runner_up":
        masked = logits.detach().scatter(1, y[:, None], -math.inf)
        return torch.arange(n, device=device), masked.argmax(1)
    others = ~F.one_hot(y, num_classes).bool()
    rows, cols = torch.nonzero(others, as_tuple=True)  # row-major: grouped by sample
    return rows, cols


def _attack_pairs(
    margin: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    x0: Tensor,
    direction: Tensor,
    k: Tensor,
    rho: float,
    n_bisection: int,
    n_inner: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Best point in the ball, its float64 margin and the dual lower bound, per pair."""
    f0, g0 = margin(x0, direction)
    if rho == 0:
        return x0.clone(), f0, f0.clone()
    shape = (-1,) + (1,) * (x0.ndim - 1)
    g0_norm = g0.flatten(1).to(torch.float64).norm(dim=1)
    bound = f0 - g0_norm * rho - 0.5 * k * rho * rho  # Taylor, integral remainder
    best_x, best_f = x0.clone(), f0.clone()

    def keep(candidate: Tensor, value: Tensor, ok: Tensor) -> None:
        nonlocal best_x, best_f
        better = ok & (value < best_f)
        best_f = torch.where(better, value, best_f)
        best_x = torch.where(better.view(shape), candidate, best_x)

    # eta in (K, K + ||g0|| / rho]; a floor on ||g0|| keeps eta > 0 where m is flat at x0.
    lo = k.clone()
    hi = k + g0_norm.clamp(min=1e-12) / rho
    x = x0.clone()
    for _ in range(n_bisection):
        eta = 0.5 * (lo + hi)
        # x <- (eta x0 + K x - grad) / (eta + K), weights in float64 (eta may be huge)
        w_x0, w_x, w_grad = (
            w.to(x0.dtype).view(shape) for w in (eta / (eta + k), k / (eta + k), 1 / (eta + k))
        )
        for _ in range(n_inner):
            _, grad = margin(x, direction)
            x = w_x0 * x0 + w_x * x - w_grad * grad
        f, grad = margin(x, direction)
        step = (x - x0).flatten(1).to(torch.float64)
        dist = step.norm(dim=1)
        # Dual bound at this eta from the inexact solve, paid for with its residual.
        residual = grad.flatten(1).to(torch.float64) + eta[:, None] * step  # grad F_eta(x)
        objective = f + 0.5 * eta * (dist.square() - rho * rho)
        modulus = eta - k
        lower = objective - residual.square().sum(1) / (2.0 * modulus.clamp(min=1e-300))
        bound = torch.maximum(bound, torch.where(modulus > 0, lower, bound))
        keep(x, f, dist <= rho)
        on_sphere = _into_ball(x0, x, rho, sphere=True)
        keep(on_sphere, margin(on_sphere, direction)[0], torch.ones_like(dist, dtype=torch.bool))
        outside = dist > rho
        lo = torch.where(outside, eta, lo)
        hi = torch.where(outside, hi, eta)
    return best_x, best_f, bound


def _into_ball(x0: Tensor, x: Tensor, rho: float, *, sphere: bool) -> Tensor:
    """``x0 + rho (x - x0) / ||x - x0||`` for every point (``sphere=True``; ``x0`` where
    ``x = x0``) or for the points outside the ball only, shrunk until the rounded result
    satisfies ``||result - x0|| <= rho`` as computed (``x0`` as the last resort)."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    step = x - x0
    # Distances of the points as stored, in float64: ``x - x0`` in a low precision rounds.
    dist = (x.to(torch.float64) - x0.to(torch.float64)).flatten(1).norm(dim=1)
    scale = torch.where(dist > 0, rho / dist.clamp(min=1e-300), torch.zeros_like(dist))
    if not sphere:
        scale = scale.clamp(max=1.0)
    eps = torch.finfo(x0.dtype).eps
    for attempt in range(8):
        out = torch.where((scale == 1).view(shape), x, x0 + scale.to(x0.dtype).view(shape) * step)
        ok = (out.to(torch.float64) - x0.to(torch.float64)).flatten(1).norm(dim=1) <= rho
        if bool(ok.all()):
            return out
        scale = torch.where(ok, scale, scale * (1 - 4**attempt * 4 * eps))
    return torch.where(ok.view(shape), out, x0)
