"""Tracing: the fx tracer (leaves = modules with a rule), shape propagation that records
constant values and checks forward hooks, and helpers to read nodes."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .common import BATCH, UnsupportedOperationError
from .ownership import has_rule, overrides_a_rule

__all__ = [
    "BatchDependent", "Propagate", "Tracer", "check_hooks", "compiled_inner", "describe",
    "dtypes", "has_hooks", "known_shape", "metadata_only", "node_arg", "refuse", "shape_of",
    "static", "submodule", "trace", "uncompiled",
]

# Methods that read only sizes, never values.
_CONST_METHODS = {"size", "dim", "numel"}


class Tracer(fx.Tracer):
    """Stops at modules with a rule (built-in or registered); descends into the others,
    including rule classes whose method the module redefines."""

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        inner = compiled_inner(m)
        if inner is not None:  # a torch.compile'd submodule: trace what it wraps
            return inner(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if has_rule(m):
            return True
        if overrides_a_rule(m):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks, its own or global ones."""
    glob = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks
                or glob._global_forward_hooks or glob._global_forward_pre_hooks)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        # Not bitwise: a GPU may pick another kernel for the second call.
        atol = 1e-6 * float(b.detach().abs().max()) if b.numel() else 0.0
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=atol,
                                                          equal_nan=True))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and not isinstance(a, Tensor) and a == b


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def check_hooks(module: nn.Module, name: str, args: tuple, kwargs: dict, result: Any) -> None:
    """A forward (pre-)hook may observe or recompute state (spectral norm, weight norm), but
    the rule knows only ``forward``: the hooked call must return what ``forward`` returns."""
    if not _same(result, module.forward(*args, **kwargs)):
        raise UnsupportedOperationError(
            f"a forward hook or pre-hook of module '{name}' ({type(module).__name__}) changes "
            "its input or output; the bound only knows the module's own forward"
        )


class Propagate(ShapeProp):
    """ShapeProp that also keeps small non-tensor results (sizes) and the values of
    constant tensors, which products with constants need; checks hooks of leaf modules."""

    def __init__(self, gm: fx.GraphModule, depends: set[fx.Node]) -> None:
        super().__init__(gm)
        self.depends = depends

    def run_node(self, n: fx.Node) -> Any:
        hooked = n.op == "call_module" and has_hooks(self.fetch_attr(cast(str, n.target)))
        if hooked:  # cloned first: an in-place module overwrites its input
            args, kwargs = _clone(self.fetch_args_kwargs_from_env(n))
        result = super().run_node(n)
        if hooked:
            check_hooks(self.fetch_attr(cast(str, n.target)), cast(str, n.target), args, kwargs,
                        result)
        if not isinstance(result, Tensor):
            if isinstance(result, (int, float, bool, torch.Size)) or (
                isinstance(result, (tuple, list)) and all(isinstance(r, int) for r in result)
            ):
                n.meta["ls_value"] = result
        elif n not in self.depends:
            n.meta["ls_value"] = result.detach()
        return result


def compiled_inner(module: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds as ``_orig_mod``:
    the wrapper computes what it computes (compilation changes how, not what)."""
    inner = getattr(module, "_orig_mod", None)
    if type(module).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return None


def uncompiled(model: nn.Module) -> nn.Module:
    """``model`` without its ``torch.compile`` wrappers (nested ones included)."""
    while (inner := compiled_inner(model)) is not None:
        model = inner
    return model


def trace(model: nn.Module) -> fx.GraphModule:
    """The ``torch.fx`` graph of ``model``, leaves at the modules with a rule (:class:`Tracer`)."""
    tracer = Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph)


def shape_of(node: Any) -> torch.Size | None:
    """The propagated (batched) shape of a tensor node; None for anything else."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return torch.Size(shape) if shape is not None else None


def known_shape(node: Any) -> torch.Size:
    """:func:`shape_of` a node the walk knows to be a tensor (its checks have made sure: an
    input-dependent argument of a rule, a leaf module's tensor input)."""
    return cast(torch.Size, shape_of(node))


def submodule(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The module a ``call_module`` node calls (its target is the module's qualified name)."""
    return gm.get_submodule(cast(str, node.target))


def dtypes(meta: Any) -> list[torch.dtype]:
    """Dtypes of every tensor in a (nested) ShapeProp ``tensor_meta``."""
    if hasattr(meta, "dtype") and hasattr(meta, "shape"):
        return [meta.dtype]
    if isinstance(meta, (tuple, list)):
        return [d for m in meta for d in dtypes(m)]
    if isinstance(meta, dict):
        return [d for m in meta.values() for d in dtypes(m)]
    return []


def metadata_only(node: fx.Node) -> bool:
    """Reads only sizes (``x.size(0)``, ``x.shape``), never the values."""
    return node.op == "call_method" and node.target in _CONST_METHODS or (
        node.target is getattr and node.args[1] in ("shape", "dtype", "ndim", "device"))


def describe(node: fx.Node) -> str:
    """What ``node`` calls, for messages."""
    target = node.target
    if node.op == "call_method":
        return f"tensor method .{target}()"
    if node.op == "call_module":
        return f"module '{target}'"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or target
    mod = getattr(target, "__module__", None)
    return f"function {mod + '.' if mod else ''}{name}"


def refuse(node: fx.Node, why: str = "") -> UnsupportedOperationError:
    """The error refusing ``node`` (to raise), with the reason ``why``."""
    extra = f" ({why})" if why else ""
    return UnsupportedOperationError(
        f"no Lipschitz rule for {describe(node)} at node '{node.name}'{extra}"
    )


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of ``node``, by keyword or at position ``index``, else ``default``."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


class BatchDependent(Exception):
    """A constant whose recorded value differs between the two traced batch sizes. Not an
    :class:`UnsupportedOperationError`: the walk turns it into one naming the node that reads
    the value (:meth:`Walker.run`)."""


def _brief(value: Any) -> str:
    if isinstance(value, Tensor):
        if value.numel() == 1:
            return f"{value.item():g}"
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def static(value: Any) -> Any:
    """The value of a non-input-dependent argument (literal or recorded node value).

    A node's value is recorded at both traced batch sizes (``BATCH`` and ``BATCH + 1``,
    ``ls_value`` and ``ls_other``); a value that differs between them depends on the batch
    size (``x.shape[0]`` used as a number) and raises :class:`BatchDependent`: a bound read
    from it at the traced batch would be false at another batch size (``h * x.shape[0]`` is
    64 times ``h`` at a batch of 64)."""
    if isinstance(value, fx.Node):
        if "ls_value" not in value.meta:
            raise KeyError(value.name)
        result = value.meta["ls_value"]
        if "ls_other" in value.meta and not _same(result, value.meta["ls_other"]):
            raise BatchDependent(
                f"the constant '{value.name}' is {_brief(result)} at a batch of {BATCH} "
                f"but {_brief(value.meta['ls_other'])} at a batch of {BATCH + 1}: it "
                "depends on the batch size (e.g. x.shape[0] or x.size(0) used as a number), "
                "and the bound is for one sample at every batch size"
            )
        return result
    if isinstance(value, (tuple, list)):
        return type(value)(static(v) for v in value)
    return value


