"""Curvature (second-order) robustness certificates: the closed-form radius, the pairwise
curvature of a linear head, and the checks and Jacobians the radius shares with CRC.

For a twice-differentiable scalar map ``f`` the *curvature bound* is a constant ``K`` with
``||grad f(x) - grad f(x')|| <= K ||x - x'||`` for all ``x, x'`` (for ``C^2`` maps,
``K >= sup_x ||Hess f(x)||_2``). For a vector map ``z`` the Jacobian-Lipschitz constant ``C``
bounds ``||Dz(x) - Dz(x')||_2 <= C ||x - x'||``. Compositions obey
``C(phi o psi) <= C_phi L_psi^2 + L_phi C_psi`` (Entesari, Sharifi & Fazlyab, ICML 2024), so
every network made of linear maps ``(||A||, 0)`` and smooth elementwise activations
``(g, h)`` gets one; :func:`~lightning_spectral.functional.activations.activation_curvature`
gives ``(g, h)``.

The certificate (Singla & Feizi, ICML 2020; Entesari et al. 2024): for the margin
``mu = z_y - z_t`` with gradient ``G`` at ``x0`` and a bound ``K`` on the Lipschitz constant
of ``grad mu``, Taylor's formula with integral remainder gives
``mu(x0 + d) >= mu(x0) - ||G|| ||d|| - (K / 2) ||d||^2``, positive for
``||d|| < r = 2 mu / (||G|| + sqrt(||G||^2 + 2 K mu))``: :func:`curvature_certified_radius`.
The dual certificate built on the same margins is in :mod:`.crc`. Floating-point rounding of
the model's own evaluation is not accounted for.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "MarginPairs",
    "check_classes",
    "check_target",
    "curvature_certified_radius",
    "curvature_tensor",
    "expand_pairwise_curvature",
    "linear_head_pairwise_curvature",
    "margin_pairs",
    "prepare_model",
    "taylor_radius",
]


def _nonnegative_scalar(value: Tensor | float, name: str, device: torch.device) -> Tensor:
    c = torch.as_tensor(value, dtype=torch.float64, device=device).detach()
    if c.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(c.shape)}")
    if not bool(torch.isfinite(c)) or bool(c < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {c.item()}")
    return c


def curvature_tensor(curvature: Tensor | float) -> Tensor:
    """The curvature argument as float64: a finite scalar >= 0, or a square matrix of pairwise
    bounds, finite and >= 0 off the diagonal (the diagonal is never used and set to 0)."""
    k = torch.as_tensor(curvature, dtype=torch.float64).detach()
    if k.ndim == 0:
        return _nonnegative_scalar(k, "curvature", k.device)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError("curvature must be a scalar or a (C, C) matrix of pairwise bounds, "
                         f"got shape {tuple(k.shape)}")
    off_diagonal = ~torch.eye(k.shape[0], dtype=torch.bool, device=k.device)
    k = torch.where(off_diagonal, k, torch.zeros_like(k))
    if not bool(torch.isfinite(k).all()) or bool((k < 0).any()):
        raise ValueError("curvature entries must be finite and >= 0 off the diagonal")
    return k


def expand_pairwise_curvature(k: Tensor, num_classes: int, device: torch.device) -> Tensor:
    """``(C, C)`` bounds ``K_yt`` on the Lipschitz constant of ``grad(z_y - z_t)``.

    A scalar ``C`` bounds ``||Dz(x) - Dz(x')||``; then
    ``||(Dz(x) - Dz(x'))^T (e_y - e_t)|| <= sqrt(2) C ||x - x'||``.
    """
    if k.ndim == 0:
        return (math.sqrt(2.0) * k).to(device).expand(num_classes, num_classes)
    if k.shape != (num_classes, num_classes):
        raise ValueError(
            f"curvature must be a scalar or a ({num_classes}, {num_classes}) matrix of pairwise "
            f"bounds for this {num_classes}-class model, got shape {tuple(k.shape)}"
        )
    return k.to(device)


def prepare_model(
    model: Callable[[Tensor], Tensor], dtype: torch.dtype | None
) -> Callable[[Tensor], Tensor]:
    """The model in the requested precision, never modifying the caller's module."""
    if not isinstance(model, nn.Module):
        return model
    if any(m.training for m in model.modules()):
        raise ValueError(
            "the model (or a submodule) is in training mode; certificates hold for the "
            "deterministic eval-mode map (dropout and batch statistics change the function): "
            "call model.eval() first"
        )
    if dtype is None:
        return model
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        return model
    return copy.deepcopy(model).to(dtype)


def _logits_and_jacobian(
    model: Callable[[Tensor], Tensor], x: Tensor, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    """Logits ``(N, C)`` and input Jacobians ``(N, C, D)``, each sample run on its own.

    ``vmap`` over one-sample calls makes cross-sample interaction impossible, so the Jacobian
    is that of the per-sample map even for callables that mix a batch.
    """

    def one(xi: Tensor) -> tuple[Tensor, Tensor]:
        z = model(xi.unsqueeze(0))
        if z.ndim != 2 or z.shape[0] != 1:
            raise ValueError(f"the model must map (N, ...) to logits (N, C), got {tuple(z.shape)}"
                             " for one sample")
        return z[0], z[0]

    jac, logits = torch.func.vmap(
        torch.func.jacrev(one, has_aux=True), chunk_size=chunk_size
    )(x)
    return logits.detach(), jac.detach().flatten(2)


def check_target(target: Tensor, n: int) -> None:
    """Refuse ``target`` unless it is ``(n,)`` integer class labels."""
    if target.ndim != 1 or target.shape[0] != n:
        raise ValueError(f"target must have shape ({n},), got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")


def check_classes(target: Tensor, n: int, num_classes: int) -> None:
    """Refuse fewer than 2 classes, or labels outside ``[0, num_classes)``."""
    if num_classes < 2:
        raise ValueError(f"the model must output at least 2 logits, got {num_classes}")
    if n and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target values must lie in [0, {num_classes}), got range "
                         f"[{int(target.min())}, {int(target.max())}]")


def taylor_radius(margin: Tensor, grad_norm: Tensor, k: Tensor) -> Tensor:
    """``2 mu / (||G|| + sqrt(||G||^2 + 2 K mu))`` for ``mu > 0`` (no cancellation), else 0.

    Equals ``(sqrt(||G||^2 + 2 K mu) - ||G||) / K``, the root of
    ``mu - ||G|| r - K r^2 / 2``, and ``mu / ||G||`` at ``K = 0``; ``+inf`` if ``G = 0 = K``.
    """
    positive = margin > 0
    mu = torch.where(positive, margin, torch.zeros_like(margin))
    den = grad_norm + torch.sqrt(grad_norm.square() + 2.0 * k * mu)
    r = torch.where(den > 0, 2.0 * mu / torch.where(den > 0, den, torch.ones_like(den)),
                    torch.full_like(mu, math.inf))
    return torch.where(positive, r, torch.zeros_like(r))


def curvature_certified_radius(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor,
    curvature: Tensor | float,
    *,
    dtype: torch.dtype | None = torch.float64,
    chunk_size: int | None = None,
    jacobian_slack: Tensor | float = 0.0,
    value_slack: Tensor | float = 0.0,
) -> Tensor:
    """Per-sample l2 radius within which the prediction provably stays ``target``.

    For every class ``t != y`` (``y = target``) with margin ``mu_t = z_y(x) - z_t(x)``, gradient
    ``G_t = grad_x mu_t`` and a bound ``K_yt`` on the Lipschitz constant of ``grad mu_t``,
    Taylor's formula with integral remainder gives, for every ``d``,
    ``mu_t(x + d) >= mu_t - ||G_t|| ||d|| - (K_yt / 2) ||d||^2``, which is positive for
    ``||d|| < r_t = 2 mu_t / (||G_t|| + sqrt(||G_t||^2 + 2 K_yt mu_t))``. The radius is
    ``min_{t != y} r_t`` over *all* other classes (certifying only against the runner-up class
    would be a targeted certificate: a lower logit with a steeper gradient can cross first).
    ``K = 0`` gives the hyperplane distance ``mu / ||G||``.

    Args:
        model: maps a batch ``(N, ...)`` to logits ``(N, C)``, each sample independently; an
            ``nn.Module`` must be in eval mode. The bounds must hold for this very map.
        x: ``(N, ...)`` inputs.
        target: ``(N,)`` integer labels.
        curvature: either a scalar ``C`` bounding the Lipschitz constant of the Jacobian of
            the whole logit map (then ``K_yt = sqrt(2) C``, as ``||e_y - e_t|| = sqrt 2``), or a
            ``(C, C)`` tensor of pairwise bounds ``K_yt`` (row = true class; diagonal ignored),
            e.g. from :func:`linear_head_pairwise_curvature`.
        dtype: precision of the computation (default float64): a module is copied and cast
            (the caller's module is left alone), ``x`` is cast; ``None`` keeps both as given.
        chunk_size: samples per vectorized Jacobian call (memory ``~ chunk * C * D``).
        jacobian_slack: for a model whose gradient jumps (torch's softplus with its finite
            threshold), a bound ``D_yt`` with, together with ``value_slack``'s ``E_yt``,
            ``|mu_t(x + d) - mu_t(x) - G_t . d| <= K_yt ||d||^2 / 2 + D_yt ||d|| + 2 E_yt``
            for all ``x, d`` (from :func:`~lightning_spectral.network_curvature_bounds`; a
            scalar or a ``(C, C)`` matrix, read as ``curvature`` is: a scalar bounds the whole
            logit map and is multiplied by ``sqrt 2``). Then ``mu_t(x + d) > 0`` for
            ``||d|| < r_t``, the root of ``(mu_t - 2 E_yt) - (||G_t|| + D_yt) r - K_yt r^2 / 2``
            (0 where ``mu_t <= 2 E_yt``). At 0 (the default) the radius is bit for bit the one
            without.
        value_slack: the value slack ``E_yt`` of the inequality above (same forms, default 0).

    Returns:
        float64 ``(N,)`` radii; 0 for misclassified samples (ties count as misclassified),
        ``+inf`` where every margin is positive with zero gradient and zero curvature.
    """
    if x.ndim < 1:
        raise ValueError(f"x must have a batch axis, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        check_target(target, 0)
        for value in (curvature, jacobian_slack, value_slack):
            curvature_tensor(value)
        return torch.zeros(0, dtype=torch.float64, device=x.device)
    slacks = [curvature_tensor(value) for value in (jacobian_slack, value_slack)]
    p = margin_pairs(model, x, target, curvature, dtype, chunk_size)
    num_classes = p.margin.shape[1]
    d_slack, e_slack = (expand_pairwise_curvature(s, num_classes, p.margin.device)[p.y]
                        for s in slacks)
    # The Taylor bound with slack (see jacobian_slack): exact when both are 0 (x - 0 = x).
    radii = taylor_radius(p.margin - 2.0 * e_slack, p.grad_norm + d_slack, p.k)
    radii = radii.scatter(1, p.y[:, None], math.inf)  # t = y is no competitor
    return radii.min(dim=1).values


class MarginPairs(NamedTuple):
    """Per (sample, class) margins, their gradient norms and curvature bounds
    (:func:`margin_pairs`)."""

    fn: Callable[[Tensor], Tensor]  # the model in the working precision
    x: Tensor  # inputs in the working precision
    y: Tensor  # (N,) labels, long
    margin: Tensor  # (N, C) float64 z_y - z_t
    grad_norm: Tensor  # (N, C) float64 ||grad (z_y - z_t)||
    k: Tensor  # (N, C) float64 K_{y t}


def margin_pairs(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor,
    curvature: Tensor | float,
    dtype: torch.dtype | None,
    chunk_size: int | None,
) -> MarginPairs:
    """Validated margins, margin-gradient norms and curvature bounds for every (sample, t).

    Everything that can be checked without the model is checked before it runs.
    """
    check_target(target, x.shape[0])
    k = curvature_tensor(curvature)
    fn = prepare_model(model, dtype)
    xs = x.detach() if dtype is None else x.detach().to(dtype)
    logits, jac = _logits_and_jacobian(fn, xs, chunk_size)
    n, num_classes = logits.shape
    check_classes(target, n, num_classes)
    if not bool(torch.isfinite(logits).all()) or not bool(torch.isfinite(jac).all()):
        raise ValueError("the model produced non-finite logits or input gradients")
    k = expand_pairwise_curvature(k, num_classes, logits.device)
    y = target.to(logits.device).long()
    z = logits.to(torch.float64)
    jac = jac.to(torch.float64)
    grad = jac[torch.arange(n, device=jac.device), y][:, None, :] - jac  # (N, C, D)
    return MarginPairs(fn, xs, y, z.gather(1, y[:, None]) - z,
                  torch.linalg.vector_norm(grad, dim=2), k[y])


def linear_head_pairwise_curvature(weight: Tensor, feature_curvature: Tensor | float) -> Tensor:
    """Pairwise curvature bounds ``K_yt`` for a linear head ``z = W phi(x) + b``.

    The margin ``z_y - z_t = (W_y - W_t)^T phi(x) + const`` has gradient
    ``Dphi(x)^T (W_y - W_t)``, so ``||grad(x) - grad(x')|| <= ||Dphi(x) - Dphi(x')|| ||W_y - W_t||
    <= C_phi ||W_y - W_t|| ||x - x'||``: ``K_yt = ||W_y - W_t||_2 C_phi`` (exact Euclidean norms
    of the row differences; never worse than ``sqrt(2) ||W|| C_phi``).

    Args:
        weight: ``(C, D)`` weight ``W`` of the final linear layer.
        feature_curvature: ``C_phi``, a bound on the Lipschitz constant of the Jacobian of the
            features ``phi`` feeding that layer.

    Returns:
        float64 ``(C, C)`` symmetric matrix with zero diagonal.
    """
    w = weight.detach().to(torch.float64)
    if w.ndim != 2 or w.shape[0] < 2:
        raise ValueError(f"weight must have shape (C, D) with C >= 2, got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has non-finite entries")
    c_phi = _nonnegative_scalar(feature_curvature, "feature_curvature", w.device)
    # The mm-based cdist loses accuracy to cancellation; the direct one does not.
    return torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist") * c_phi
