"""``network_curvature_bound``: the Lipschitz constant of a network's Jacobian, by the same
graph walk (and the same soundness checks) as ``network_lipschitz_bound``; and the pairwise
bounds of the logit margins that ``curvature_certified_radius`` takes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..functional.curvature_radius import linear_head_pairwise_curvature
from .api import not_nan, walk_model
from .common import LayerBound, NonSmoothOperationError
from .ownership import builtin_class, curvature_rule, user_rule
from .tracing import known_shape, node_arg, submodule
from .walk import Walker

__all__ = [
    "CurvatureBounds", "curvature_and_pairwise", "curvature_walk", "network_curvature_bound",
    "network_curvature_bounds", "network_pairwise_curvature", "pairwise_bounds",
]


def curvature_walk(model: nn.Module, input_shape: Sequence[int],
                    layer_bound: LayerBound | None,
                    walker_class: type[Walker] = Walker) -> Walker:
    """The walk of ``model`` with the curvature bounds (and slacks) of every node."""
    return walk_model(model, input_shape, layer_bound, curvature=True,
                       walker_class=walker_class)


def _without_slack(walker: Walker) -> Walker:
    """The walk, refused if the network differs from its smooth twin: then ``C`` alone is no
    bound of the Lipschitz constant of its Jacobian (there is none: the Jacobian jumps)."""
    out = walker.out
    if bool(walker.value_slack[out] > 0) or bool(walker.jacobian_slack[out] > 0):
        first = next(n for n, e in walker.value_slack.items()  # topological order
                     if bool(e > 0) or bool(walker.jacobian_slack[n] > 0))
        raise NonSmoothOperationError(
            f"no curvature bound at node '{first.name}': the network uses torch's softplus "
            "with a finite threshold (nn.Softplus, F.softplus): its Jacobian jumps where a "
            "unit switches to the identity, so it "
            "has no Lipschitz constant. network_curvature_bounds bounds it with the slack "
            "terms that curvature_certified_radius takes (jacobian_slack, value_slack); or "
            "use lightning_spectral.SmoothSoftplus")
    return walker


class CurvatureBounds(NamedTuple):
    """The bounds of :func:`network_curvature_bounds` (all float64, CPU)."""

    curvature: Tensor  # C: Lipschitz constant of the smooth twin's Jacobian (0-dim)
    pairwise: Tensor  # (C, C) K_yt: of the gradient of the twin's margin z_y - z_t
    jacobian_slack: Tensor  # (C, C) D_yt >= sup ||grad mu_yt - grad mu~_yt||
    value_slack: Tensor  # (C, C) E_yt >= sup |mu_yt - mu~_yt|


def network_curvature_bounds(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    layer_bound: LayerBound | None = None,
) -> CurvatureBounds:
    """Curvature bounds that also cover torch's softplus with its finite threshold.

    ``nn.Softplus`` and ``F.softplus`` return ``x`` itself where ``beta x > threshold``, so the
    network's Jacobian jumps there and has no Lipschitz constant. Its *smooth twin* ``z~``,
    the same network with each of them replaced by
    :class:`~lightning_spectral.SmoothSoftplus` (no switch), has one, and stays close:
    for every pair ``(y, t)`` with margins ``mu = z_y - z_t`` and ``mu~ = z~_y - z~_t``, and
    every input ``x``, ``|mu(x) - mu~(x)| <= E_yt`` and
    ``||grad mu(x) - grad mu~(x)|| <= D_yt`` (``grad mu`` the gradient autograd computes:
    each unit differentiated on the branch it takes). With ``K_yt`` the twin's pairwise
    curvature bound, for all ``x, d``::

        |mu(x + d) - mu(x) - grad mu(x) . d| <= K_yt ||d||^2 / 2 + D_yt ||d|| + 2 E_yt

    (proof: the same expression for ``mu~`` is at most ``K_yt ||d||^2 / 2`` by Taylor's
    formula with integral remainder, ``mu~`` having a ``K_yt``-Lipschitz gradient; replacing
    ``mu~`` by ``mu`` at ``x + d`` and at ``x`` costs ``E_yt`` each, and
    ``|(grad mu(x) - grad mu~(x)) . d| <= D_yt ||d||``). So pass ``pairwise``,
    ``jacobian_slack`` and ``value_slack`` to
    :func:`~lightning_spectral.functional.curvature_certified_radius`. For a network without a
    switching softplus both slacks are 0 and ``curvature``, ``pairwise`` are those of
    :func:`curvature_and_pairwise`.

    The slacks come from the same graph walk: every node ``v`` also carries
    ``E_v >= sup ||v - v~||`` and ``D_v >= sup ||Dv - Dv~||`` (see
    :mod:`lightning_spectral.network.rules.smooth`); the pairs are formed as ``pairwise`` is (a
    linear head ``W phi + b``: ``||W_y - W_t||`` times the features' slack, else ``sqrt 2``
    times the logits'). They describe the exact real function torch's formula defines, as
    every bound here does (see :func:`~lightning_spectral.functional.softplus_switch_slack`
    for the float32 comparison at the switch).

    Raises:
        ValueError: as :func:`network_curvature_bound`, which still refuses what has no
            bound at all (ReLU, max pooling and the like).
    """
    walker = curvature_walk(model, input_shape, layer_bound)
    return CurvatureBounds(
        not_nan(walker.curv[walker.out], "curvature"), pairwise_bounds(walker),
        pairwise_bounds(walker, table=walker.jacobian_slack, name="Jacobian slack"),
        pairwise_bounds(walker, table=walker.value_slack, name="value slack"))


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
    walker = _without_slack(curvature_walk(model, input_shape, layer_bound))
    return not_nan(walker.curv[walker.out], "curvature")


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
    return pairwise_bounds(_without_slack(curvature_walk(model, input_shape, layer_bound)))


def curvature_and_pairwise(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    layer_bound: LayerBound | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`network_curvature_bound` and :func:`network_pairwise_curvature` from one walk."""
    walker = _without_slack(curvature_walk(model, input_shape, layer_bound))
    return not_nan(walker.curv[walker.out], "curvature"), pairwise_bounds(walker)


def pairwise_bounds(walker: Walker, first_order: bool = False,
              table: dict[fx.Node, Tensor] | None = None, name: str = "curvature") -> Tensor:
    """The ``(C, C)`` pairwise bounds of a walked graph's logits: of the margins' gradients
    (curvature), or of the margins themselves (``first_order``: the Lipschitz bounds), or
    from another table of the walk (the slacks: ``v - v~`` and ``Dv - Dv~`` go through a
    linear head as values and Jacobians do)."""
    if table is None:
        table = walker.lip if first_order else walker.curv
        name = "Lipschitz" if first_order else "curvature"
    out = walker.out
    shape = known_shape(out)  # run() refuses an output that is not a tensor
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"pairwise {name} bounds need logits of shape (N, C) with C >= 2, "
                         f"the model outputs {tuple(shape)}")
    total = not_nan(table[out], name)
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


def _linear_head(walker: Walker, out: fx.Node) -> tuple[Tensor, fx.Node] | None:
    """``(W, phi)`` when the output node computes ``W phi + b`` with a constant ``W``."""
    if len(out.args) < 1 or not isinstance(out.args[0], fx.Node):
        return None
    features = out.args[0]
    if out.op == "call_module":
        module = submodule(walker.gm, out)
        plain = user_rule(module) is None and curvature_rule(module) is None
        if plain and builtin_class(module) is nn.Linear and len(out.args) == 1:
            return cast(nn.Linear, module).weight.detach().to("cpu", torch.float64), features
        return None
    if out.op == "call_function" and out.target is F.linear:
        weight = node_arg(out, 1, "weight")
        if walker.dependent(weight):
            return None
        w = walker.constant(out, weight)
        return (w, features) if w.ndim == 2 else None
    return None
