"""Rules for nodes that move entries without repeating them (reshapes, slicing,
concatenation) and for sums / means over non-batch axes."""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx

from .tracing import _arg, _refuse, _shape, _static

if TYPE_CHECKING:
    from .walk import _Walker

# Moves entries around (or only changes dtype/device/memory): never repeats one. A cast to a
# coarser float (half, bfloat16) is the identity in exact arithmetic; the walk warns that
# the rounding it brings is not accounted for (``_Walker.check_dtypes``).
_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze",
                  "permute", "transpose", "view_as", "reshape_as", "clone", "float", "double",
                  "to", "half", "bfloat16"}


def _getitem(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    x = node.args[0]
    if _shape(x) is None:
        return w.L(x)  # picking from a tuple of sizes etc.: constant
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(isinstance(i, (fx.Node, list, Tensor)) for i in index):
        raise _refuse(node, "advanced indexing may repeat entries")
    ok_first = index and (index[0] == slice(None) or index[0] is Ellipsis and len(
        [i for i in index if i is not None and i is not Ellipsis]) < len(_shape(x)) - 1)
    if not ok_first or not w.keeps_batch(node):
        raise _refuse(node, "indexing must keep the batch axis whole")
    return w.L(x)


def _cat(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    """``[u, w]``: the squared norms of the parts add, ``sqrt(sum L_i^2)``."""
    dim = int(_static(_arg(node, 1, "dim", 0)))
    if dim % len(_shape(node)) == 0:
        raise _refuse(node, "concatenating along the batch axis")
    return w.L(list(_arg(node, 0, "tensors")))


def _reshape(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    x = node.args[0]
    if t in ("view_as", "reshape_as") and w.dependent(node.args[1]):
        raise _refuse(node, "its shape argument depends on the input")
    if t not in ("view_as", "reshape_as", "to"):
        w.only_first_dependent(node)
    in_shape = _shape(x)
    if t is torch.flatten or t == "flatten":
        start = int(_static(_arg(node, 1, "start_dim", 0)))
        if start % len(in_shape) == 0:
            raise _refuse(node, "flattening the batch axis into the features")
    if t == "permute":
        if "dims" in node.kwargs:
            dims = _static(node.kwargs["dims"])
        elif len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            dims = _static(node.args[1])  # x.permute((0, 2, 1))
        else:
            dims = _static(node.args[1:])  # x.permute(0, 2, 1)
        if int(dims[0]) % len(in_shape) != 0:
            raise _refuse(node, "moves the batch axis")
    if t == "transpose":
        d0, d1 = int(_static(_arg(node, 1, "dim0"))), int(_static(_arg(node, 2, "dim1")))
        if 0 in (d0 % len(in_shape), d1 % len(in_shape)):
            raise _refuse(node, "moves the batch axis")
    if t in ("squeeze", "unsqueeze"):
        dim = _static(_arg(node, 1, "dim"))
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        nd = len(_shape(node)) if t == "unsqueeze" else len(in_shape)
        if dim is None or any(int(d) % nd == 0 for d in dims):
            raise _refuse(node, "squeeze/unsqueeze must name a non-batch axis")
    if not w.keeps_batch(node):
        raise _refuse(node, "changes the batch axis")
    # A reshape of a batch-first tensor that keeps the leading size keeps each sample's
    # entries together (row-major order); entries are only moved, never repeated.
    return w.L(x)


def _reduce(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    w.only_first_dependent(node)
    x = node.args[0]
    in_shape = _shape(x)
    dim = _static(_arg(node, 1, "dim"))
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        raise _refuse(node, "reducing over every axis mixes the batch")
    dims = {int(d) % len(in_shape) for d in (dim if isinstance(dim, (tuple, list)) else [dim])}
    if 0 in dims:
        raise _refuse(node, "reducing over the batch axis")
    count = math.prod(in_shape[d] for d in dims)
    mean = t is torch.mean or t == "mean"
    # Mean over N entries: each output averages its own N inputs, norm 1/sqrt(N); sum: sqrt(N).
    k = 1.0 / math.sqrt(count) if mean else math.sqrt(count)
    return k * w.L(x)


# torch functions with the same arguments as the method of that name.
_SHAPE_FUNCS = {torch.transpose: "transpose", torch.permute: "permute",
                torch.reshape: "reshape", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze"}


def _reshape_function(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    return _reshape(w, node, _SHAPE_FUNCS[t])


TABLE = {
    operator.getitem: _getitem, torch.flatten: _reshape, **dict.fromkeys(_SHAPE_METHODS, _reshape),
    **dict.fromkeys(_SHAPE_FUNCS, _reshape_function),
    torch.cat: _cat, torch.concat: _cat, torch.stack: _cat,
    **dict.fromkeys((torch.mean, torch.sum, "mean", "sum"), _reduce),
}
