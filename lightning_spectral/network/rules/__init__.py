"""The rule table of the graph walk, keyed by what an fx node calls.

A ``call_function`` node is looked up by its function (``operator.add``, ``F.conv2d``, ...),
a ``call_method`` node by the method's name (``"view"``, ``"relu"``, ...; function keys are
never strings, so the two never collide); an in-place form is looked up under its
out-of-place counterpart (:mod:`.inplace`). Leaf modules have their own table, keyed by the
class that owns the rule (:data:`.modules.MODULE_RULES`, entries :class:`.modules.ModuleRule`).

Each op family declares its targets once, with its Lipschitz, curvature and slack rules side
by side (:class:`.base.NodeRule`): :mod:`.elementwise` (sums, products with constants,
dropout, maximum), :mod:`.smooth` (activations, and the curvature composition),
:mod:`.layers` (linear maps with constant weights), :mod:`.pooling`, :mod:`.shapes`
(reshapes, indexing, concatenation, reductions). One walker computes all three
(:class:`..walk.Walker`); rules see it through the :class:`.base.Walk` protocol only.
"""

from __future__ import annotations

from typing import Any

from . import elementwise, layers, pooling, shapes, smooth
from .base import NodeRule

__all__ = ["LINEAR", "RULES", "NodeRule"]

RULES: dict[Any, NodeRule] = {
    target: rule
    for table in (elementwise.TABLE, smooth.TABLE, layers.TABLE, pooling.TABLE, shapes.TABLE)
    for target, rule in table.items()
}
"""Every function / method target with a rule."""

LINEAR = frozenset(target for target, rule in RULES.items() if rule.linear)
"""Targets whose node is a linear map of its input-dependent arguments (the Lipschitz rule
refuses the non-linear uses: products of two dependent tensors, division by one, ...)."""
