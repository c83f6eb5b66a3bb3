"""Lipschitz-margin certificates (Tsuzuku, Sato & Sugiyama, NeurIPS 2018).

Let ``f: R^n -> R^C`` be the logit map and ``y`` the true class.

*Global certificate.* If ``f`` is ``L``-Lipschitz in l2, every logit difference
``f_y - f_j = <e_y - e_j, f>`` is ``sqrt(2) L``-Lipschitz (``||e_y - e_j|| = sqrt(2)``), so no
perturbation with ``||delta|| < (f_y(x) - f_j(x)) / (sqrt(2) L)`` can make ``f_j`` overtake
``f_y``. Minimizing over ``j != y`` gives the radius ``margin / (sqrt(2) L)`` with
``margin = f_y - max_{j != y} f_j``.

*Refined certificate.* If ``f = W g + b`` ends in a linear layer and the features ``g`` are
``L_g``-Lipschitz, then ``f_y - f_j = <W_y - W_j, g> + const`` is exactly
``||W_y - W_j|| L_g``-Lipschitz-bounded, with no ``sqrt(2)``: the radius is
``min_{j != y} (f_y - f_j) / (||W_y - W_j|| L_g)``. Since ``||W_y - W_j|| <= sqrt(2) ||W||``
it is never worse than the global certificate computed with ``L = ||W|| L_g``.

Both radii are negative for misclassified samples (and 0 on a tie), so "certified at
``eps``" is ``radius >= eps`` together with a correct prediction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["certified_radius", "check_logits_target", "logit_margins"]


def check_logits_target(logits: Tensor, target: Tensor) -> None:
    """Shapes and dtypes first, then the values, read back to the host once."""
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {getattr(logits, 'shape', logits)}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits need at least 2 classes, got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if not isinstance(target, Tensor) or target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must have shape (N,) = ({logits.shape[0]},), got "
                         f"{getattr(target, 'shape', target)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device}, logits on {logits.device}")
    if target.numel():
        _check_values(logits, target)


def _check_values(logits: Tensor, target: Tensor) -> None:
    num_classes = logits.shape[1]
    # An infinite logit makes an infinite margin (certified at every radius) and NaN compares
    # false everywhere: either way the certificate would claim what nothing guarantees.
    bad_rows = ~torch.isfinite(logits).all(dim=1)
    out_of_range = (target < 0).any() | (target >= num_classes).any()
    bad_target, bad_logits = torch.stack([out_of_range, bad_rows.any()]).tolist()
    if bad_target:
        raise ValueError(
            f"target values must lie in [0, {num_classes}), got range "
            f"[{int(target.min())}, {int(target.max())}]"
        )
    if bad_logits:
        rows = torch.nonzero(bad_rows).flatten()[:8].tolist()
        raise ValueError(
            f"logits are not finite (inf or NaN) in row(s) {rows} of {logits.shape[0]}; "
            "no certificate exists for them (overflow in float16? diverged weights?)"
        )


def _as_constant(value: Tensor | float, n: int, name: str, device: torch.device) -> Tensor:
    """A non-negative finite constant (scalar or one per sample) as float64 of shape (N,)."""
    c = torch.as_tensor(value, dtype=torch.float64, device=device).detach()
    if c.numel() == 1:
        c = c.reshape(()).expand(n)
    elif c.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0, got {c.tolist()[:8]}")
    return c


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with ``den >= 0``; where ``den == 0`` the map is constant: +inf if the
    numerator is positive (never changes), -inf otherwise (0 / 0 is a tie: not certified)."""
    inf = torch.full_like(num, math.inf)
    at_zero = torch.where(num > 0, inf, -inf)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), at_zero)


def logit_margins(logits: Tensor, target: Tensor) -> Tensor:
    """``f_y - f_j`` for every class ``j``, float64 ``(N, C)``; the ``j = y`` entry is ``+inf``."""
    check_logits_target(logits, target)
    z = logits.detach().to(torch.float64)
    diff = z.gather(1, target[:, None].long()) - z
    return diff.scatter(1, target[:, None].long(), math.inf)


def certified_radius(
    logits: Tensor,
    target: Tensor,
    lipschitz_constant: Tensor | float | None,
    *,
    last_layer_weight: Tensor | None = None,
    feature_lipschitz: Tensor | float | None = None,
) -> Tensor:
    """Per-sample l2 radius within which the prediction provably cannot change.

    Args:
        logits: ``(N, C)`` outputs of the network at the inputs.
        target: ``(N,)`` integer labels.
        lipschitz_constant: an upper bound ``L`` on the l2 Lipschitz constant of the whole
            logit map (scalar, or one per sample), e.g. from
            :func:`lightning_spectral.network_lipschitz_bound`. Gives the global certificate
            ``margin / (sqrt(2) L)`` (Tsuzuku et al. 2018). May be ``None`` when the refined
            certificate is requested.
        last_layer_weight: ``(C, D)`` weight ``W`` of the final linear layer, ``f = W g + b``.
        feature_lipschitz: an upper bound ``L_g`` on the Lipschitz constant of the features
            ``g`` feeding that layer. With ``last_layer_weight`` it gives the refined
            certificate ``min_{j != y} (f_y - f_j) / (||W_y - W_j|| L_g)`` (no ``sqrt(2)``).

    Returns:
        float64 ``(N,)`` radii in the input's units. Where both certificates are available
        the larger is returned (each is valid on its own). Negative for misclassified samples,
        0 on ties, ``+inf`` where the relevant Lipschitz bound is 0 and the margin positive.
        A radius ``r`` certifies every perturbation with ``||delta||_2 < r``. Margins are taken
        in float64 from the given logits (exact for float16/bfloat16/float32 values);
        floating-point error in computing the logits themselves is not accounted for.

    Raises:
        ValueError: logits not ``(N, C)`` floating point, or with an inf/NaN entry (an infinite
            margin would certify every radius); target not ``(N,)`` integer class indices in
            ``[0, C)``; a constant NaN, infinite, negative or of the wrong shape; a
            ``last_layer_weight`` not ``(C, D)`` or not finite.
    """
    margins = logit_margins(logits, target)  # validates shapes
    n, num_classes = margins.shape
    device = margins.device
    refined = last_layer_weight is not None or feature_lipschitz is not None
    if lipschitz_constant is None and not refined:
        raise ValueError("lipschitz_constant is required unless last_layer_weight and "
                         "feature_lipschitz are given")
    radii = []
    if lipschitz_constant is not None:
        lip = _as_constant(lipschitz_constant, n, "lipschitz_constant", device)
        margin = margins.min(dim=1).values
        radii.append(_safe_divide(margin, math.sqrt(2.0) * lip))
    if refined:
        if last_layer_weight is None or feature_lipschitz is None:
            raise ValueError(
                "the refined certificate needs both last_layer_weight and feature_lipschitz"
            )
        w = last_layer_weight.detach().to(device=device, dtype=torch.float64)
        if w.ndim != 2 or w.shape[0] != num_classes:
            raise ValueError(
                f"last_layer_weight must have shape (C, D) with C = {num_classes}, "
                f"got {tuple(w.shape)}"
            )
        if not bool(torch.isfinite(w).all()):
            raise ValueError("last_layer_weight has non-finite entries")
        lip_g = _as_constant(feature_lipschitz, n, "feature_lipschitz", device)
        # ||W_y - W_j|| for every pair, then pick row y per sample: (N, C).
        # The mm-based cdist loses accuracy to cancellation; the direct one does not.
        pair_norms = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")[target.long()]
        pair_radii = _safe_divide(margins, pair_norms * lip_g[:, None])
        # j = y has margin +inf: never the minimum.
        pair_radii = pair_radii.scatter(1, target[:, None].long(), math.inf)
        radii.append(pair_radii.min(dim=1).values)
    return radii[0] if len(radii) == 1 else torch.maximum(radii[0], radii[1])


def pairwise_certified_radius(logits: Tensor, target: Tensor, pairwise: Tensor) -> Tensor:
    """``min_{j != y} (f_y - f_j) / K[y, j]``: the radius from pairwise margin bounds.

    ``K[y, j]`` must bound the l2 Lipschitz constant of the margin ``f_y - f_j`` as a function
    of the input (e.g. :func:`lightning_spectral.network_pairwise_lipschitz`). Then for
    ``||delta|| < r`` every margin stays positive: ``f_y - f_j`` moves by at most
    ``K[y, j] ||delta|| < f_y - f_j``. Over all classes, not only the runner-up.

    Args:
        logits: ``(N, C)`` outputs at the inputs (finite).
        target: ``(N,)`` integer labels.
        pairwise: ``(C, C)`` non-negative finite bounds (the diagonal is not read).

    Returns:
        float64 ``(N,)`` radii, with the conventions of :func:`certified_radius` (negative
        when misclassified, 0 on ties, ``+inf`` where every relevant ``K`` is 0).
    """
    margins = logit_margins(logits, target)
    n, num_classes = margins.shape
    k = torch.as_tensor(pairwise).detach().to(device=margins.device, dtype=torch.float64)
    if k.shape != (num_classes, num_classes):
        raise ValueError(f"pairwise must have shape ({num_classes}, {num_classes}), got "
                         f"{tuple(k.shape)}")
    off = ~torch.eye(num_classes, dtype=torch.bool, device=k.device)
    if not (bool(torch.isfinite(k[off]).all()) and bool((k[off] >= 0).all())):
        raise ValueError("pairwise bounds must be finite and >= 0")
    radii = _safe_divide(margins, k[target.long()])
    return radii.scatter(1, target[:, None].long(), math.inf).min(dim=1).values
