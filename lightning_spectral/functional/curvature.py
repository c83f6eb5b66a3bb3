"""Curvature (second-order) robustness certificates: activation constants and the radius.

For a twice-differentiable scalar map ``f`` the *curvature bound* is a constant ``K`` with
``||grad f(x) - grad f(x')|| <= K ||x - x'||`` for all ``x, x'`` (for ``C^2`` maps,
``K >= sup_x ||Hess f(x)||_2``). For a vector map ``z`` the Jacobian-Lipschitz constant ``C``
bounds ``||Dz(x) - Dz(x')||_2 <= C ||x - x'||``. Compositions obey
``C(phi o psi) <= C_phi L_psi^2 + L_phi C_psi`` (Entesari, Sharifi & Fazlyab, ICML 2024), so
every network made of linear maps ``(||A||, 0)`` and smooth elementwise activations
``(g, h)`` gets one; :func:`activation_curvature` gives ``(g, h)``.

The certificate (Singla & Feizi, ICML 2020; Entesari et al. 2024): for the margin
``mu(x) = z_y(x) - z_t(x)`` with gradient ``G = grad mu(x0)`` and curvature bound ``K``, Taylor's
formula with integral remainder gives
``mu(x0 + d) >= mu(x0) - ||G|| ||d|| - (K / 2) ||d||^2``, positive for
``||d|| < r = 2 mu / (||G|| + sqrt(||G||^2 + 2 K mu))``. See :func:`curvature_certified_radius`.

Floating-point rounding of the model's own evaluation is not accounted for. The activation
constants live in :mod:`.activations`, the closed-form radius in :mod:`.curvature_radius`, the
dual certificate in :mod:`.crc` (all re-exported here); this module holds the pairwise curvature
of a linear head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .activations import NonSmoothActivationError, SmoothSoftplus, activation_curvature
from .crc import crc_certified_radius
from .curvature_radius import _nonnegative_scalar, curvature_certified_radius

__all__ = [
    "NonSmoothActivationError",
    "SmoothSoftplus",
    "activation_curvature",
    "crc_certified_radius",
    "curvature_certified_radius",
    "linear_head_pairwise_curvature",
]


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
