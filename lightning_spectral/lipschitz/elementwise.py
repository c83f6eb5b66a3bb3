"""Rules for elementwise nodes: sums, products with constants, activations, dropout.

Each rule is ``fn(walker, node, target) -> L_node`` (see :mod:`.rules`). Broadcasting that
repeats an entry of an input-dependent operand ``r`` times multiplies its contribution by
``sqrt(r)``: the entry's change appears ``r`` times in the output.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from .common import (
    _GELU_LIP,
    _HARDSWISH_LIP,
    _MISH_LIP,
    _SELU_LIP,
    _SILU_LIP,
    UnsupportedOperationError,
    _check_softplus,
    _f64,
)
from .tracing import _arg, _refuse, _shape, _static

if TYPE_CHECKING:
    from .walk import _Walker

_ADDS = {operator.add, torch.add, operator.sub, torch.sub, "add", "sub"}
_NEGS = {operator.neg, torch.neg, operator.pos, "neg"}
_MULS = {operator.mul, torch.mul, operator.truediv, torch.div, "mul", "div"}
# 1-Lipschitz, up to the parameters read in relu_like_lip.
_RELU_LIKE = {
    F.relu, torch.relu, F.relu6, F.hardtanh, torch.tanh, F.tanh, F.softplus, F.elu, F.celu,
    torch.clamp, torch.clip, F.softsign, F.tanhshrink, F.leaky_relu,
    "relu", "tanh", "clamp", "clip", "clamp_min", "clamp_max",
}
_SIMPLE = {torch.sigmoid: 0.25, F.sigmoid: 0.25, F.gelu: _GELU_LIP, F.silu: _SILU_LIP,
           F.mish: _MISH_LIP, F.selu: _SELU_LIP, F.hardswish: _HARDSWISH_LIP,
           F.hardsigmoid: 1.0 / 6.0, "sigmoid": 0.25, torch.special.expit: 0.25,
           F.logsigmoid: 1.0}  # logsigmoid(x) = -softplus(-x): derivative sigmoid(-x) in (0, 1)
_MAX_MIN = {torch.maximum, torch.minimum, "maximum", "minimum"}
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}


def _add(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    """``a + alpha b``: triangle inequality."""
    alpha = abs(float(_static(node.kwargs.get("alpha", 1))))
    a, b = node.args[0], node.args[1]
    return w.L(a) * w.spread(a, node) + alpha * w.L(b) * w.spread(b, node)


def _neg(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    return w.L(node.args[0])


def _elementwise(w: _Walker, node: fx.Node, k: float) -> Tensor:
    """``k`` times the first argument's bound, which only may depend on the input."""
    w.only_first_dependent(node)
    x = node.args[0]
    return k * w.L(x) * w.spread(x, node)


def _relu_like_lip(node: fx.Node, t: Any) -> float:
    if t is F.elu:  # slope alpha * exp(x) for x < 0
        return max(1.0, abs(float(_static(_arg(node, 1, "alpha", 1.0)))))
    if t is F.celu:  # slope exp(x / alpha) for x < 0: <= 1 iff alpha > 0
        alpha = float(_static(_arg(node, 1, "alpha", 1.0)))
        if not alpha > 0:
            raise _refuse(node, f"celu with alpha={alpha} <= 0 is not Lipschitz")
    if t is F.softplus:
        try:
            _check_softplus(float(_static(_arg(node, 1, "beta", 1.0))),
                            float(_static(_arg(node, 2, "threshold", 20.0))))
        except UnsupportedOperationError as exc:
            raise _refuse(node, str(exc)) from exc
    if t is F.leaky_relu:
        return max(1.0, abs(float(_static(_arg(node, 1, "negative_slope", 0.01)))))
    return 1.0


def _relu_like(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    return _elementwise(w, node, _relu_like_lip(node, t))


def _simple(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    return _elementwise(w, node, _SIMPLE[t])


def _max_min(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    """Entrywise ``max(a, b)`` / ``min(a, b)``, both operands possibly input-dependent:
    ``|max(a, b) - max(a', b')| <= max(|a - a'|, |b - b'|)``, whose square is at most
    ``(a - a')^2 + (b - b')^2``; summed over the output, an entry that broadcasting repeats
    ``r`` times counts ``r`` times: ``sqrt(r_a L_a^2 + r_b L_b^2)``."""
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    parts = [w.L(a) * w.spread(a, node), w.L(b) * w.spread(b, node)]
    return torch.stack(parts).square().sum().sqrt()


def _dropout(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    if bool(_static(_arg(node, 2, "training", True))):
        raise _refuse(node, "dropout with training=True is random")
    return _elementwise(w, node, 1.0)


def _mul(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    a, b = node.args[0], node.args[1]
    divide = t in (operator.truediv, torch.div, "div")
    if w.dependent(a) and w.dependent(b):
        raise _refuse(node, "a product of two input-dependent tensors has no global bound")
    if divide and w.dependent(b):
        raise _refuse(node, "dividing by an input-dependent value")
    if node.kwargs.get("rounding_mode") is not None:
        raise _refuse(node, "rounding division is not Lipschitz")
    x, c = (b, a) if w.dependent(b) else (a, b)
    mags = w.constant(node, c).abs()
    out, xs = _shape(node), _shape(x)
    if mags.numel() == 0 or math.prod(out) == 0:
        return _f64(0.0)
    if divide:
        if bool((mags == 0).any()):
            raise _refuse(node, "division by zero")
        mags = 1.0 / mags
    if len(xs) != len(out):
        raise _refuse(node, "broadcasting moves the batch axis")
    # A product with a (broadcast) constant is diagonal when nothing is repeated; an entry
    # of x that broadcasting copies to positions with factors c_i moves the output by
    # sqrt(sum_i c_i^2) times its own change.
    full = mags.broadcast_to(out)
    repeated = [i for i in range(len(out)) if xs[i] == 1 and out[i] != 1]
    k = full.square().sum(repeated).sqrt().max() if repeated else full.max()
    return k.reshape(()) * w.L(x)


TABLE = {
    **dict.fromkeys(_ADDS, _add), **dict.fromkeys(_NEGS, _neg), **dict.fromkeys(_MULS, _mul),
    **dict.fromkeys(_RELU_LIKE, _relu_like), **dict.fromkeys(_SIMPLE, _simple),
    **dict.fromkeys(_DROPOUTS, _dropout), **dict.fromkeys(_MAX_MIN, _max_min),
}
