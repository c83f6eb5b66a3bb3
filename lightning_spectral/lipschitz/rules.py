"""The rule table of the graph walk, keyed by what an fx node calls.

A ``call_function`` node is looked up by its function (``operator.add``, ``F.conv2d``, ...),
a ``call_method`` node by the method's name (``"view"``, ``"relu"``, ...; function keys are
never strings, so the two never collide); an in-place form is looked up under its
out-of-place counterpart. Leaf modules have their own table, keyed by the class that owns
the rule (:data:`.modules.MODULE_RULES`, entries :class:`.modules.ModuleRule`).

Each entry is a :class:`NodeRule`. Today it holds the Lipschitz rule; a per-node quantity that
composes along the same graph can sit beside it and reuse the walker: a curvature bound (``C``,
the Lipschitz constant of the Jacobian) would add ``curvature(walker, node, target)``,
composing as ``C = C_outer * L_inner^2 + L_outer * C_inner``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from . import elementwise, layers, shapes


@dataclass(frozen=True)
class NodeRule:
    """``lipschitz(walker, node, target)``: a bound on the Lipschitz constant of
    input -> node, from ``walker.L(arg)`` of the node's arguments (with the node's recorded
    shapes and constant arguments)."""

    lipschitz: Callable[..., Tensor]


RULES: dict[Any, NodeRule] = {
    target: NodeRule(fn)
    for table in (elementwise.TABLE, layers.TABLE, shapes.TABLE)
    for target, fn in table.items()
}
