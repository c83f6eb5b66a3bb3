"""In-place operations: which nodes overwrite a tensor, which certainly return a new one,
and the condition under which an in-place op equals its out-of-place counterpart."""

from __future__ import annotations

import operator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx

from ..common import ALIASING_MODULES
from ..ownership import builtin_class
from ..tracing import metadata_only, node_arg, refuse, static, submodule
from .elementwise import ADDS, MULS
from .layers import CONV_FUNCS, MATMULS
from .pooling import POOL_FUNCS
from .smooth import RELU_LIKE, SIMPLE

__all__ = ["FRESH", "INPLACE_ARG", "INPLACE_FUNCS", "RANDOM", "check_inplace", "fresh",
           "inplace_target"]

# In-place functions and their out-of-place counterparts; functions taking ``inplace=`` (with
# its position).
INPLACE_FUNCS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu,
    F.elu_: F.elu, F.celu_: F.celu, F.leaky_relu_: F.leaky_relu, F.hardtanh_: F.hardtanh,
    torch.clamp_: torch.clamp, torch.clip_: torch.clip,
}
INPLACE_ARG = {
    F.relu: 1, F.relu6: 1, F.selu: 1, F.silu: 1, F.mish: 1, F.hardswish: 1, F.hardsigmoid: 1,
    F.elu: 2, F.celu: 2, F.leaky_relu: 2, F.hardtanh: 3, F.dropout: 3, F.dropout1d: 3,
    F.dropout2d: 3, F.dropout3d: 3, F.alpha_dropout: 3,
}
# Out-of-place operations that always return a new tensor (never their input or a view).
FRESH = (
    ADDS | MULS | MATMULS | RELU_LIKE | set(SIMPLE) | set(CONV_FUNCS) | set(POOL_FUNCS)
    | {operator.neg, torch.neg, "neg", "clone", "mean", "sum", torch.mean, torch.sum,
       torch.cat, torch.concat, torch.stack, F.linear, F.batch_norm}
)
# Random values differ between the trace and every later call.
RANDOM = {
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.randperm, torch.bernoulli, torch.normal, torch.poisson,
    torch.multinomial, "bernoulli", "multinomial", "bernoulli_", "uniform_", "normal_",
    "random_", "exponential_", "geometric_", "cauchy_", "log_normal_",
}


def inplace_target(gm: fx.GraphModule, node: fx.Node) -> tuple[bool, Any]:
    """(whether ``node`` overwrites its first argument, the out-of-place target)."""
    t = node.target
    if node.op == "call_method":
        name = cast(str, t)  # a method node's target is the method's name
        return (name.endswith("_") and not name.endswith("__")), (
            name[:-1] if name.endswith("_") else name)
    if node.op == "call_module":
        return getattr(submodule(gm, node), "inplace", False) is True, t
    if node.op != "call_function":
        return False, t
    if t in INPLACE_FUNCS:
        return True, INPLACE_FUNCS[t]
    if t in INPLACE_ARG:
        return bool(static(node_arg(node, INPLACE_ARG[t], "inplace", False))), t
    return False, t


def fresh(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` certainly returns a new tensor (not its input or a view of it)."""
    inplace, t = inplace_target(gm, node)
    if inplace:
        return False
    if node.op == "call_module":
        klass = builtin_class(submodule(gm, node))
        return klass is not None and klass not in ALIASING_MODULES
    return node.op in ("call_function", "call_method") and t in FRESH


def check_inplace(gm: fx.GraphModule, node: fx.Node) -> None:
    """An in-place op equals its out-of-place counterpart if nothing else reads the tensor
    it overwrites: no other user of it, nor of any tensor it may be a view of."""
    todo = [(node.args[0], node)] if node.args else []
    while todo:
        cur, via = todo.pop()
        if not isinstance(cur, fx.Node) or metadata_only(cur):
            continue
        others = [u.name for u in cur.users if u is not via and not metadata_only(u)]
        if others:
            raise refuse(node, f"in-place update of '{cur.name}', which is also read by "
                                f"{others}: write it out of place")
        if cur.op == "get_attr":
            raise refuse(node, f"in-place update of the parameter or buffer '{cur.target}'")
        if cur.op == "placeholder" or fresh(gm, cur):
            continue
        # A view shares the storage of its first argument (the tensor method's self); what a
        # module of unknown kind returns may alias any of its inputs.
        sources = cur.all_input_nodes if cur.op == "call_module" else cur.args[:1]
        todo += [(a, cur) for a in sources]
