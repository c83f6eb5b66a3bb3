"""``network_curvature_bound``: the Lipschitz constant of a network's Jacobian, by the same
graph walk (and the same soundness checks) as ``network_lipschitz_bound``; and the pairwise
bounds of the logit margins that ``curvature_certified_radius`` takes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..functional.curvature import linear_head_pairwise_curvature
from .api import _not_nan, _walk_model
from .common import LayerBound
from .ownership import _builtin_class, _curvature_rule, _user_rule
from .tracing import _arg, _shape
from .walk import _Walker


def _curvature_walk(model: nn.Module, input_shape: Sequence[int],
                    layer_bound: LayerBound | None,
                    walker_class: type[_Walker] = _Walker) -> _Walker:
    return _walk_model(model, input_shape, layer_bound, curvature=True,
                       walker_class=walker_class)


def network_curvature_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    layer_bound: LayerBound | None = None,
) -> Tensor:
    """A guaranteed upper bound ``C`` on the Lipschitz constant of the model's Jacobian.

    ``||Dz(x) - Dz(x')||_2 <= C ||x - x'||`` for all inputs ``x, x'`` of one sample, ``z`` the
    model in eval mode. So every output ``z_i`` has Hessian eigenvalues in ``[-C, C]``, and
    the gradient of every margin ``z_y - z_t`` is ``sqrt(2) C``-Lipschitz: pass ``C`` as the
    ``curvature`` of :func:`~lightning_spectral.functional.curvature_certified_radius`.

    Every node ``v`` of the traced graph carries ``(L_v, C_v)``: the input ``(1, 0)``,
    constants ``(0, 0)``; a linear map ``A`` (linear layers, convolutions, eval BatchNorm,
    average pooling, reshapes, slicing, padding, means, sums, products and matmuls with
    constants) ``(||A|| L_u, ||A|| C_u)``; a smooth elementwise activation with constants
    ``(g, h)`` (:func:`~lightning_spectral.functional.activation_curvature`)
    ``(g L_u, h L_u^2 + g C_u)``; a sum adds both bounds; a concatenation takes the root sum
    of squares of both. A node with no such rule is refused.

    Args:
        model: as for :func:`network_lipschitz_bound` (an untraceable model is refused; a
            ``torch.compile``d one is bounded as its ``_orig_mod``).
        input_shape: the shape of ONE sample, without the batch axis.
        layer_bound: as for :func:`network_lipschitz_bound`.

    Returns:
        0-dim float64 tensor (CPU, no grad). The model's train/eval flags are restored.

    Raises:
        NonSmoothOperationError: a node whose derivative jumps (ReLU, LeakyReLU, Hardtanh, max
            pooling, ``abs``, ``clamp``, ``nn.Softplus`` with its default finite threshold,
            ...) or without a curvature rule; the message names it and suggests a smooth
            replacement. It is an :class:`UnsupportedOperationError` and a
            :class:`~lightning_spectral.functional.NonSmoothActivationError`.
        UnsupportedOperationError: what :func:`network_lipschitz_bound` refuses (products of
            two input-dependent tensors, in-place updates of shared tensors, casts, ...).
        ValueError: ``input_shape`` invalid or the model fails on it.
    """
    walker = _curvature_walk(model, input_shape, layer_bound)
    return _not_nan(walker.curv[walker.output], "curvature")


def network_pairwise_curvature(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    layer_bound: LayerBound | None = None,
) -> Tensor:
    """Bounds ``K_yt`` on the Lipschitz constant of ``grad (z_y - z_t)`` for every pair.

    ``sqrt(2) C`` with ``C`` from :func:`network_curvature_bound`, since
    ``||e_y - e_t|| = sqrt 2``. When the output is a linear head ``z = W phi + b`` (an
    ``nn.Linear`` or ``F.linear`` with a constant weight), also ``||W_y - W_t|| C_phi``, ``C_phi``
    the curvature bound of the features (see
    :func:`~lightning_spectral.functional.linear_head_pairwise_curvature`); the smaller counts.

    Returns:
        float64 ``(C, C)`` matrix with zero diagonal, for the ``curvature`` argument of
        :func:`~lightning_spectral.functional.curvature_certified_radius`.

    Raises:
        ValueError: the model does not output logits ``(N, C)`` with ``C >= 2``; otherwise as
            :func:`network_curvature_bound`.
    """
    return _pairwise(_curvature_walk(model, input_shape, layer_bound))


def curvature_and_pairwise(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    layer_bound: LayerBound | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`network_curvature_bound` and :func:`network_pairwise_curvature` from one walk."""
    walker = _curvature_walk(model, input_shape, layer_bound)
    return _not_nan(walker.curv[walker.output], "curvature"), _pairwise(walker)


def _pairwise(walker: _Walker, first_order: bool = False) -> Tensor:
    """The ``(C, C)`` pairwise bounds of a walked graph's logits: of the margins' gradients
    (curvature), or of the margins themselves (``first_order``: the Lipschitz bounds)."""
    table = walker.lip if first_order else walker.curv
    name = "Lipschitz" if first_order else "curvature"
    out = walker.output
    shape = _shape(out)
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"pairwise {name} bounds need logits of shape (N, C) with C >= 2, "
                         f"the model outputs {tuple(shape)}")
    total = _not_nan(table[out], name)
    off_diagonal = 1.0 - torch.eye(shape[1], dtype=torch.float64)
    pairwise = math.sqrt(2.0) * total * off_diagonal
    head = _linear_head(walker, out)
    if head is not None:
        weight, features = head
        # ||W_y - W_t|| times the bound of the features: the same formula for the margins
        # (Lipschitz) and for their gradients (curvature).
        folded = linear_head_pairwise_curvature(weight, table[features])
        pairwise = torch.minimum(pairwise, folded)
    return pairwise


def _linear_head(walker: _Walker, out: fx.Node) -> tuple[Tensor, fx.Node] | None:
    """``(W, phi)`` when the output node computes ``W phi + b`` with a constant ``W``."""
    if len(out.args) < 1 or not isinstance(out.args[0], fx.Node):
        return None
    features = out.args[0]
    if out.op == "call_module":
        module = walker.gm.get_submodule(out.target)
        plain = _user_rule(module) is None and _curvature_rule(module) is None
        if plain and _builtin_class(module) is nn.Linear and len(out.args) == 1:
            return module.weight.detach().to("cpu", torch.float64), features
        return None
    if out.op == "call_function" and out.target is F.linear:
        weight = _arg(out, 1, "weight")
        if walker.dependent(weight):
            return None
        w = walker.constant(out, weight)
        return (w, features) if w.ndim == 2 else None
    return None
