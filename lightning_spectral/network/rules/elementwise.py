"""Rules for elementwise nodes: sums, negation, products with constants, dropout (linear:
their curvature and slack rules are their Lipschitz rule on the other tables), and the
entrywise maximum / minimum of two tensors (no curvature rule: it has kinks). The
activations are in :mod:`.smooth`.

Each rule is ``fn(walk, node, target) -> L_node`` (see :mod:`.base`). Broadcasting that
repeats an entry of an input-dependent operand ``r`` times multiplies its contribution by
``sqrt(r)``: the entry's change appears ``r`` times in the output.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from ..common import f64
from ..tracing import known_shape, node_arg, refuse, static
from .base import NodeRule, Walk, linear, rules_for

__all__ = ["ADDS", "DROPOUTS", "MAX_MIN", "MULS", "NEGS", "TABLE", "elementwise"]

ADDS = {operator.add, torch.add, operator.sub, torch.sub, "add", "sub"}
NEGS = {operator.neg, torch.neg, operator.pos, "neg"}
MULS = {operator.mul, torch.mul, operator.truediv, torch.div, "mul", "div"}
MAX_MIN = {torch.maximum, torch.minimum, "maximum", "minimum"}
DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}


def _add(w: Walk, node: fx.Node, t: Any) -> Tensor:
    """``a + alpha b``: triangle inequality."""
    alpha = abs(float(static(node.kwargs.get("alpha", 1))))
    a, b = node.args[0], node.args[1]
    return w.L(a) * w.spread(a, node) + alpha * w.L(b) * w.spread(b, node)


def _neg(w: Walk, node: fx.Node, t: Any) -> Tensor:
    return w.L(node.args[0])


def elementwise(w: Walk, node: fx.Node, k: float) -> Tensor:
    """``k`` times the first argument's bound, which only may depend on the input."""
    w.only_first_dependent(node)
    x = node.args[0]
    return k * w.L(x) * w.spread(x, node)


def _max_min(w: Walk, node: fx.Node, t: Any) -> Tensor:
    """Entrywise ``max(a, b)`` / ``min(a, b)``, both operands possibly input-dependent:
    ``|max(a, b) - max(a', b')| <= max(|a - a'|, |b - b'|)``, whose square is at most
    ``(a - a')^2 + (b - b')^2``; summed over the output, an entry that broadcasting repeats
    ``r`` times counts ``r`` times: ``sqrt(r_a L_a^2 + r_b L_b^2)``."""
    a, b = node_arg(node, 0, "input"), node_arg(node, 1, "other")
    parts = [w.L(a) * w.spread(a, node), w.L(b) * w.spread(b, node)]
    return torch.stack(parts).square().sum().sqrt()


def _dropout(w: Walk, node: fx.Node, t: Any) -> Tensor:
    if bool(static(node_arg(node, 2, "training", True))):
        raise refuse(node, "dropout with training=True is random")
    return elementwise(w, node, 1.0)


def _mul(w: Walk, node: fx.Node, t: Any) -> Tensor:
    a, b = node.args[0], node.args[1]
    divide = t in (operator.truediv, torch.div, "div")
    if w.dependent(a) and w.dependent(b):
        raise refuse(node, "a product of two input-dependent tensors has no global bound")
    if divide and w.dependent(b):
        raise refuse(node, "dividing by an input-dependent value")
    if node.kwargs.get("rounding_mode") is not None:
        raise refuse(node, "rounding division is not Lipschitz")
    x, c = (b, a) if w.dependent(b) else (a, b)
    mags = w.constant(node, c).abs()
    out, xs = known_shape(node), known_shape(x)
    if mags.numel() == 0 or math.prod(out) == 0:
        return f64(0.0)
    if divide:
        if bool((mags == 0).any()):
            raise refuse(node, "division by zero")
        mags = 1.0 / mags
    if len(xs) != len(out):
        raise refuse(node, "broadcasting moves the batch axis")
    # A product with a (broadcast) constant is diagonal when nothing is repeated; an entry
    # of x that broadcasting copies to positions with factors c_i moves the output by
    # sqrt(sum_i c_i^2) times its own change.
    full = mags.broadcast_to(out)
    repeated = [i for i in range(len(out)) if xs[i] == 1 and out[i] != 1]
    k = full.square().sum(repeated).sqrt().max() if repeated else full.max()
    return k.reshape(()) * w.L(x)


TABLE: dict[Any, NodeRule] = {
    **rules_for(ADDS, linear(_add)), **rules_for(NEGS, linear(_neg)),
    **rules_for(MULS, linear(_mul)), **rules_for(DROPOUTS, linear(_dropout)),
    **rules_for(MAX_MIN, NodeRule(_max_min)),
}
"""The elementwise targets and their rules."""
