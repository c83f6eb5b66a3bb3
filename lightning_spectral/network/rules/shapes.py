"""Rules for nodes that move entries without repeating them (reshapes, slicing,
concatenation) and for sums / means over non-batch axes."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor, fx

from ..tracing import known_shape, node_arg, refuse, shape_of, static
from .base import NodeRule, Walk, linear, rules_for

__all__ = ["REDUCTIONS", "SHAPE_FUNCS", "SHAPE_METHODS", "TABLE"]

# Moves entries around (or only changes dtype/device/memory): never repeats one. A cast to a
# coarser float (half, bfloat16) is the identity in exact arithmetic; the walk warns that
# the rounding it brings is not accounted for (``Walker.check_dtypes``).
SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze",
                  "permute", "transpose", "view_as", "reshape_as", "clone", "float", "double",
                  "to", "half", "bfloat16"}


def _getitem(w: Walk, node: fx.Node, t: Any) -> Tensor:
    x = node.args[0]
    if shape_of(x) is None:
        return w.L(x)  # picking from a tuple of sizes etc.: constant
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(isinstance(i, (fx.Node, list, Tensor)) for i in index):
        raise refuse(node, "advanced indexing may repeat entries")
    ok_first = index and (index[0] == slice(None) or index[0] is Ellipsis and len(
        [i for i in index if i is not None and i is not Ellipsis]) < len(known_shape(x)) - 1)
    if not ok_first or not w.keeps_batch(node):
        raise refuse(node, "indexing must keep the batch axis whole")
    return w.L(x)


def _cat(w: Walk, node: fx.Node, t: Any) -> Tensor:
    """``[u, w]``: the squared norms of the parts add, ``sqrt(sum L_i^2)``."""
    dim = int(static(node_arg(node, 1, "dim", 0)))
    if dim % len(known_shape(node)) == 0:
        raise refuse(node, "concatenating along the batch axis")
    return w.L(list(node_arg(node, 0, "tensors")))


def _reshape(w: Walk, node: fx.Node, t: Any) -> Tensor:
    x = node.args[0]
    if t in ("view_as", "reshape_as") and w.dependent(node.args[1]):
        raise refuse(node, "its shape argument depends on the input")
    if t not in ("view_as", "reshape_as", "to"):
        w.only_first_dependent(node)
    in_shape = known_shape(x)
    if t is torch.flatten or t == "flatten":
        start = int(static(node_arg(node, 1, "start_dim", 0)))
        if start % len(in_shape) == 0:
            raise refuse(node, "flattening the batch axis into the features")
    if t == "permute":
        if "dims" in node.kwargs:
            dims = static(node.kwargs["dims"])
        elif len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            dims = static(node.args[1])  # x.permute((0, 2, 1))
        else:
            dims = static(node.args[1:])  # x.permute(0, 2, 1)
        if int(dims[0]) % len(in_shape) != 0:
            raise refuse(node, "moves the batch axis")
    if t == "transpose":
        d0, d1 = int(static(node_arg(node, 1, "dim0"))), int(static(node_arg(node, 2, "dim1")))
        if 0 in (d0 % len(in_shape), d1 % len(in_shape)):
            raise refuse(node, "moves the batch axis")
    if t in ("squeeze", "unsqueeze"):
        dim = static(node_arg(node, 1, "dim"))
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        nd = len(known_shape(node)) if t == "unsqueeze" else len(in_shape)
        if dim is None or any(int(d) % nd == 0 for d in dims):
            raise refuse(node, "squeeze/unsqueeze must name a non-batch axis")
    if not w.keeps_batch(node):
        raise refuse(node, "changes the batch axis")
    # A reshape of a batch-first tensor that keeps the leading size keeps each sample's
    # entries together (row-major order); entries are only moved, never repeated.
    return w.L(x)


def _reduce(w: Walk, node: fx.Node, t: Any) -> Tensor:
    w.only_first_dependent(node)
    x = node.args[0]
    in_shape = known_shape(x)
    dim = static(node_arg(node, 1, "dim"))
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        raise refuse(node, "reducing over every axis mixes the batch")
    dims = {int(d) % len(in_shape) for d in (dim if isinstance(dim, (tuple, list)) else [dim])}
    if 0 in dims:
        raise refuse(node, "reducing over the batch axis")
    count = math.prod(in_shape[d] for d in dims)
    mean = t is torch.mean or t == "mean"
    # Mean over N entries: each output averages its own N inputs, norm 1/sqrt(N); sum: sqrt(N).
    k = 1.0 / math.sqrt(count) if mean else math.sqrt(count)
    return k * w.L(x)


# torch functions with the same arguments as the method of that name.
SHAPE_FUNCS = {torch.transpose: "transpose", torch.permute: "permute",
                torch.reshape: "reshape", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze"}


def _reshape_function(w: Walk, node: fx.Node, t: Any) -> Tensor:
    return _reshape(w, node, SHAPE_FUNCS[t])


REDUCTIONS = {torch.mean, torch.sum, "mean", "sum"}

TABLE: dict[Any, NodeRule] = {
    operator.getitem: linear(_getitem), torch.flatten: linear(_reshape),
    **rules_for(SHAPE_METHODS, linear(_reshape)),
    **rules_for(SHAPE_FUNCS, linear(_reshape_function)),
    **rules_for((torch.cat, torch.concat, torch.stack), linear(_cat)),
    **rules_for(REDUCTIONS, linear(_reduce)),
}
"""The shape targets (all linear: they move, sum or average entries) and their rules."""
