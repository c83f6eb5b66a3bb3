"""Pairwise first-order bounds: the Lipschitz constant of every logit margin ``z_y - z_j``.

With a linear head ``z = W g + b`` (an ``nn.Linear``, or ``F.linear`` with a constant weight,
producing the output), ``z_y - z_j = (W_y - W_j) g + (b_y - b_j)``, so
``|m(x) - m(x')| <= ||W_y - W_j||_2 ||g(x) - g(x')|| <= ||W_y - W_j||_2 L_g ||x - x'||``,
``L_g`` the graph walk's bound at the head's input. Without a head (or where it is larger)
``||e_y - e_j|| L = sqrt(2) L`` holds for any network with Lipschitz bound ``L``. The smaller of
the two is taken per pair; the certificate ``min_{j != y} (z_y - z_j) / K_yj`` is then over all
classes (:func:`~lightning_spectral.functional.pairwise_certified_radius`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .api import network_lipschitz_bound, not_nan, walk_model
from .common import LayerBound
from .curvature import pairwise_bounds
from .tracing import trace

__all__ = ["certificate_bounds", "lipschitz_and_pairwise", "network_pairwise_lipschitz"]


def lipschitz_and_pairwise(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    layer_bound: LayerBound | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`~lightning_spectral.network_lipschitz_bound` ``L`` and
    :func:`network_pairwise_lipschitz` ``K`` from one graph walk (both float64, CPU)."""
    walker = walk_model(model, input_shape, layer_bound)
    return not_nan(walker.lip[walker.out]), pairwise_bounds(walker, first_order=True)


def network_pairwise_lipschitz(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    layer_bound: LayerBound | None = None,
) -> Tensor:
    """Guaranteed bounds ``K_yj`` on the l2 Lipschitz constant of every margin ``z_y - z_j``.

    ``min(sqrt(2) L, ||W_y - W_j|| L_g)``: see the module docstring. Same arguments, checks
    and refusals as :func:`~lightning_spectral.network_lipschitz_bound` (the model must be
    traceable and return logits ``(N, C)``, ``C >= 2``).

    Returns:
        float64 ``(C, C)`` symmetric matrix with zero diagonal (CPU, no grad).
    """
    return lipschitz_and_pairwise(model, input_shape, layer_bound=layer_bound)[1]


def certificate_bounds(
    model: nn.Module, input_shape: Sequence[int], layer_bound: LayerBound | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(L, K)`` for first-order certificates: :func:`lipschitz_and_pairwise`, or for an
    ``nn.Sequential`` that ``torch.fx`` cannot trace (bounded child by child)
    ``(network_lipschitz_bound, None)``. ``layer_bound`` as in those functions."""
    if isinstance(model, nn.Sequential) and _trace_fails(model):
        return network_lipschitz_bound(model, input_shape, layer_bound=layer_bound), None
    return lipschitz_and_pairwise(model, input_shape, layer_bound=layer_bound)


def _trace_fails(model: nn.Module) -> bool:
    try:
        trace(model)
    except Exception:  # fx raises TraceError, TypeError, NotImplementedError...
        return True
    return False
