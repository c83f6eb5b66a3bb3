"""The rule table of the graph walk, keyed by what an fx node calls.

A ``call_function`` node is looked up by its function (``operator.add``, ``F.conv2d``, ...),
a ``call_method`` node by the method's name (``"view"``, ``"relu"``, ...; function keys are
never strings, so the two never collide); an in-place form is looked up under its
out-of-place counterpart. Leaf modules have their own table, keyed by the class that owns
the rule (:data:`.modules.MODULE_RULES`, entries :class:`.modules.ModuleRule`).

Each entry is a :class:`NodeRule`: the Lipschitz rule and, beside it, the curvature rule
(``C``, the Lipschitz constant of the Jacobian, see :mod:`.smooth`); one walker computes both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, fx

from . import elementwise, layers, shapes, smooth
from .common import UnsupportedOperationError, _f64
from .inplace import inplace_target
from .tracing import _metadata_only, _refuse

if TYPE_CHECKING:
    from .walk import _Walker


@dataclass(frozen=True)
class NodeRule:
    """``lipschitz(walker, node, target)``: a bound on the Lipschitz constant of
    input -> node, from ``walker.L(arg)`` of the node's arguments (with the node's recorded
    shapes and constant arguments). ``curvature(walker, node, target)``: a bound on the
    Lipschitz constant of its Jacobian, from ``walker.lipschitz(arg)`` and ``walker.C(arg)``;
    None where there is none (the curvature bound refuses the node)."""

    lipschitz: Callable[..., Tensor]
    curvature: Callable[..., Tensor] | None = None


def _linear(lipschitz: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def curvature(w: _Walker, node: fx.Node, t: Any) -> Tensor:
        return w.in_curvature(lipschitz, w, node, t)

    return curvature


def _curvature(target: Any, lipschitz: Callable[..., Tensor]) -> Callable[..., Tensor] | None:
    if target in smooth.LINEAR:
        return _linear(lipschitz)
    return smooth.TABLE.get(target)


RULES: dict[Any, NodeRule] = {
    target: NodeRule(fn, _curvature(target, fn))
    for table in (elementwise.TABLE, layers.TABLE, shapes.TABLE)
    for target, fn in table.items()
}


def node_bounds(w: _Walker, node: fx.Node, fold: dict[fx.Node, fx.Node]
                ) -> tuple[Tensor, Tensor]:
    """``(L, C)`` of one node. A node the Lipschitz walk refuses is refused as non-smooth
    when the activation table knows it to be (``abs``: the more useful message)."""
    try:
        lip = w.visit(node, fold)
    except UnsupportedOperationError as exc:
        why = smooth.known_jump(w, node)
        if why is not None:
            raise smooth.refusal(node, why) from exc
        raise
    return lip, node_curvature(w, node, fold)


def node_curvature(w: _Walker, node: fx.Node, fold: dict[fx.Node, fx.Node]) -> Tensor:
    """``C`` of one node (after its Lipschitz visit, which has made the walk's checks)."""
    if node.op in ("placeholder", "get_attr"):
        return _f64(0.0)  # the input x -> x has a constant Jacobian
    if node in fold:  # a linear layer with the BatchNorm folded in
        return w.in_curvature(w.visit_fold, node, fold[node])
    if not w.dependent(list(node.args) + list(node.kwargs.values())):
        return _f64(0.0)
    if node.op == "call_module":
        return smooth.module_curvature(w, node)
    if node.op not in ("call_function", "call_method"):
        raise _refuse(node)
    if _metadata_only(node):
        return _f64(0.0)
    _, target = inplace_target(w.gm, node)
    rule = RULES.get(target)
    if rule is None or rule.curvature is None:
        raise smooth.refusal(node, smooth.why_refused(target))
    return rule.curvature(w, node, target)


def node_slack(w: _Walker, node: fx.Node, fold: dict[fx.Node, fx.Node]
               ) -> tuple[Tensor, Tensor]:
    """``(E, D)`` of one node against its smooth twin (after :func:`node_bounds`, which has
    made the walk's checks and refused what has no curvature rule): see :mod:`.smooth`."""
    zero = (_f64(0.0), _f64(0.0))
    if node.op in ("placeholder", "get_attr"):
        return zero  # the same input and constants in both networks
    inputs = fold[node] if node in fold else node
    args = list(inputs.args) + list(inputs.kwargs.values())
    if not w.dependent(args) or not (w.has_slack(args) or smooth.switches(w, node)):
        return zero  # the node and its inputs are the same in both networks
    slack = _slack(w, node, fold, zero)
    if not w.tracks_slack and (bool(slack[0] > 0) or bool(slack[1] > 0)):
        raise smooth.refusal(node, "this walk carries no slack for the switch of a softplus "
                                   "to the identity; Replace it by "
                                   "lightning_spectral.SmoothSoftplus")
    return slack


def _slack(w: _Walker, node: fx.Node, fold: dict[fx.Node, fx.Node],
           zero: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    if node in fold:
        return w.in_slack(w.visit_fold, node, fold[node])
    if node.op == "call_module":
        return smooth.module_slack(w, node)
    if _metadata_only(node):
        return zero
    _, target = inplace_target(w.gm, node)
    if target in smooth.LINEAR:
        return w.in_slack(RULES[target].lipschitz, w, node, target)
    return smooth.call_slack(w, node, target)
