"""A guaranteed upper bound on the l2 Lipschitz constant of a whole network.

The model is traced with ``torch.fx`` and its graph walked once in topological order. Every
node ``v`` gets a number ``L_v`` with ``||v(x) - v(x')|| <= L_v ||x - x'||`` for all inputs
``x, x'`` of *one sample*:

* the input: 1; constants (parameters, buffers, shapes): 0;
* a map ``h`` applied to ``u``: ``L_v = Lip(h) * L_u`` (composition). Convolutions and linear
  layers, as modules or as ``F.conv*`` / ``F.linear`` / ``@`` with a constant weight, get
  ``Lip(h)`` from the bound engine (:func:`~lightning_spectral.functional.layer_spectral_bound`)
  at the input size the trace reveals;
* a sum ``u + w``: ``L_u + L_w`` (triangle inequality). Since ``L_u``, ``L_w`` bound the two
  summands *as functions of the input*, a residual ``x + g(x)`` gets ``1 + L_g``. An operand
  that broadcasting repeats ``r`` times enters with ``sqrt(r) L``: each of its entries appears
  ``r`` times in the output, so squared differences are counted ``r`` times;
* a concatenation ``[u, w]``: ``sqrt(L_u^2 + L_w^2)`` (the squared norms add);
* any other node ``h(u_1, ..., u_k)`` of several inputs with a rule ``K`` (Lipschitz w.r.t. the
  concatenation of its inputs): ``K * sqrt(sum_i L_{u_i}^2)``.

BatchNorm in eval is the affine map ``x -> s * x + t`` with ``s = gamma / sqrt(var + eps)``;
when it follows a convolution (or linear layer) whose output feeds nothing else it is folded
into that layer's weight and the folded layer is bounded (tighter than ``max |s|`` times the
layer bound); otherwise it contributes ``max |s|``.

Pooling uses the input size: an average pool is the Kronecker product of 1-D averaging
matrices, whose norm is the product of their norms (computed exactly); a max pool is
``sqrt(c)``-Lipschitz where ``c`` is the largest number of windows one input position falls
into (``|max_W x - max_W x'| <= ||(x - x')_W||``, and summing the squares over windows counts
each position at most ``c`` times); it is 1 when windows do not overlap. A global average over
``N`` positions gives ``1 / sqrt(N)``. ``F.pad`` copies entries: ``sqrt`` of the largest number
of copies of one entry.

What a rule may assume. A module gets a built-in (or registered) rule only when it computes
what the rule's class computes: a subclass that redefines ``forward`` (or another method of
that class) is traced into instead, and its inside bounded operation by operation. An in-place
operation is bounded as its out-of-place counterpart only when nothing else reads the tensor
it overwrites (nor a view of it). An input-dependent integer or boolean tensor (casts,
comparisons, ``argmax``) is refused: a step function has no Lipschitz constant. Finally the
traced graph must reproduce the model's output on a random input, and forward hooks must not
change what their module returns.

Anything without a rule raises :class:`UnsupportedOperationError` naming it; register rules for
your own module types with :func:`register_lipschitz_rule`. Floating-point rounding of the
float64 products themselves is not accounted for (relative error ~1e-15 per layer).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = [
    "LipschitzRule",
    "UnsupportedOperationError",
    "network_lipschitz_bound",
    "register_lipschitz_rule",
    "unregister_lipschitz_rule",
]

LipschitzRule = Callable[[nn.Module, list[torch.Size]], "Tensor | float"]
"""``fn(module, input_shapes) -> K``: an upper bound on the l2 Lipschitz constant of the
module as a map of (the concatenation of) its tensor inputs. ``input_shapes`` are the
per-sample shapes (no batch axis) of those inputs, as the trace found them."""

LayerBound = Callable[[nn.Module, "tuple[int, ...] | None"], Tensor]

# Maximum of |d/dx act(x)|, rounded UP (a smaller constant would void the guarantee).
# GELU: d/dx x Phi(x) = Phi(x) + x phi(x), extreme where phi(x)(2 - x^2) = 0, i.e. x = +-sqrt(2):
# Phi(sqrt 2) + sqrt(2) phi(sqrt 2) = 1.128904 (the tanh approximation peaks at 1.128993).
_GELU_LIP = 1.13
# SiLU: d/dx x s(x) = s(x) (1 + x (1 - s(x))), maximal at x = 2.3994: 1.099839.
_SILU_LIP = 1.1
# Mish: sup of the derivative 1.088498 (near x = 1.2).
_MISH_LIP = 1.09
# SELU: the slope for x -> 0^- is scale * alpha = 1.0507009873554805 * 1.6732632423543772.
_SELU_LIP = 1.7581
# Hardswish: (2x + 3) / 6 on [-3, 3] reaches 1.5 at x = 3.
_HARDSWISH_LIP = 1.5

_CONV_T_TYPES: tuple[type, ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONV_T_TYPES)
_LAYER_TYPES: tuple[type, ...] = (*_CONV_TYPES, nn.Linear)
_BN_TYPES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVG_POOLS: tuple[type, ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAX_POOLS: tuple[type, ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_ADAPTIVE_AVG: tuple[type, ...] = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ADAPTIVE_MAX: tuple[type, ...] = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
# Tanhshrink x - tanh(x) has derivative tanh(x)^2 <= 1; Softsign 1 / (1 + |x|)^2 <= 1.
_ONE_LIP: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Softplus, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Hardtanh,
    nn.CELU, nn.Softsign, nn.Tanhshrink,
)
_CONST_LIP: dict[type, float] = {
    nn.Sigmoid: 0.25, nn.Hardsigmoid: 1.0 / 6.0, nn.GELU: _GELU_LIP, nn.SiLU: _SILU_LIP,
    nn.Mish: _MISH_LIP, nn.SELU: _SELU_LIP, nn.Hardswish: _HARDSWISH_LIP,
}
_ACTIVATIONS: tuple[type, ...] = (*_ONE_LIP, *_CONST_LIP, nn.LeakyReLU, nn.PReLU, nn.ELU)
_BUILTIN: frozenset[type] = frozenset(
    (*_LAYER_TYPES, *_BN_TYPES, *_AVG_POOLS, *_MAX_POOLS, *_ADAPTIVE_AVG, *_ADAPTIVE_MAX,
     *_ACTIVATIONS)
)
# Modules that may return their input itself or a view of it (in eval mode).
_ALIASING_MODULES: tuple[type, ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
)

_USER_RULES: dict[type, LipschitzRule] = {}

# Dummy batch of 2 for shape propagation: a batch of 1 could not reveal a reshape that mixes
# samples (the bound is per sample).
_BATCH = 2
# Relative safety margin on exactly computed matrix norms, as in the bound engine.
_NORM_MARGIN = 1e-13


class UnsupportedOperationError(TypeError):
    """A module or function the network bound has no rule for."""


def register_lipschitz_rule(module_type: type[nn.Module], rule: LipschitzRule) -> None:
    """Teach :func:`network_lipschitz_bound` a module type.

    ``rule(module, input_shapes)`` must return a guaranteed upper bound on the module's l2
    Lipschitz constant w.r.t. its tensor inputs (jointly), in eval mode; ``input_shapes`` are
    per-sample shapes. Modules of this type become leaves of the trace: their inside is never
    looked at. So do subclasses, unless they redefine ``forward`` (or another method of
    ``module_type``): those are not ``module_type`` and are traced into. A user rule takes
    precedence over the built-in ones.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of nn.Module, got {module_type!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable, got {rule!r}")
    _USER_RULES[module_type] = rule


def unregister_lipschitz_rule(module_type: type[nn.Module]) -> None:
    """Remove a rule added by :func:`register_lipschitz_rule` (no error if absent)."""
    _USER_RULES.pop(module_type, None)


def _f64(value: float | Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(())


# ------------------------------------------------------------------- rule ownership

# Methods a subclass may redefine without changing what the module computes.
_HARMLESS = frozenset({
    "__init__", "__repr__", "extra_repr", "reset_parameters", "_reset_parameters",
    "reset_running_stats", "__setstate__", "__getstate__", "__deepcopy__",
    "_load_from_state_dict", "__init_subclass__", "_check_input_dim",
})
_CALL_NAMES = frozenset({"__call__", "_call_impl", "_wrapped_call_impl"})


def _is_code(value: Any) -> bool:
    return callable(value) or isinstance(value, (property, staticmethod, classmethod))


def _behaves_as(module: nn.Module, klass: type) -> bool:
    """True when no class between ``type(module)`` and ``klass`` redefines a method of
    ``klass`` (or of its bases below ``nn.Module``) or the call machinery: the module then
    computes what ``klass`` computes, and a rule written for ``klass`` applies to it."""
    mro = type(module).__mro__
    defined = set(_CALL_NAMES)
    for base in klass.__mro__:
        if base in (nn.Module, object):
            break
        defined.update(name for name, value in vars(base).items() if _is_code(value))
    for sub in mro[: mro.index(klass)]:
        for name, value in vars(sub).items():
            if name in defined and name not in _HARMLESS and _is_code(value):
                return False
    return True


def _owner(module: nn.Module, table: Any) -> type | None:
    """The first class of ``type(module)``'s MRO in ``table`` if ``module`` behaves as it."""
    for klass in type(module).__mro__:
        if klass in table:
            return klass if _behaves_as(module, klass) else None
    return None


def _user_rule(module: nn.Module) -> LipschitzRule | None:
    klass = _owner(module, _USER_RULES)
    return _USER_RULES[klass] if klass is not None else None


def _builtin_class(module: nn.Module) -> type | None:
    return _owner(module, _BUILTIN)


def _has_rule(module: nn.Module) -> bool:
    return _user_rule(module) is not None or _builtin_class(module) is not None


# ----------------------------------------------------------------------------- pooling


def _tuple(value: Any, d: int) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        if len(value) != d:
            raise ValueError(f"expected {d} values, got {value!r}")
        return tuple(int(v) for v in value)
    return (int(value),) * d


def _window_indicator(n: int, out: int, k: int, s: int, p: int, dil: int) -> Tensor:
    """0/1 matrix (out, n): entry (o, i) = 1 when input i lies in window o (padding dropped)."""
    m = torch.zeros(out, n, dtype=torch.float64)
    for o in range(out):
        for j in range(k):
            i = o * s - p + j * dil
            if 0 <= i < n:
                m[o, i] = 1.0
    return m


def _adaptive_indicator(n: int, out: int) -> Tensor:
    m = torch.zeros(out, n, dtype=torch.float64)
    for o in range(out):
        start, end = (o * n) // out, -((-(o + 1) * n) // out)
        m[o, start:end] = 1.0
    return m


def _max_count(indicators: Sequence[Tensor]) -> int:
    """Most windows one position falls into: windows are products of per-axis windows."""
    return math.prod(int(ind.sum(0).max()) if ind.numel() else 0 for ind in indicators)


def _spectral(matrix: Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, ord=2)) if matrix.numel() else 0.0


def _avg_pool_lip(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> Tensor:
    d = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[_builtin_class(module)]
    k = _tuple(module.kernel_size, d)
    s = _tuple(module.stride if module.stride else module.kernel_size, d)
    p = _tuple(module.padding, d)
    n, out = in_shape[-d:], out_shape[-d:]
    if getattr(module, "divisor_override", None):
        # Every window sum is divided by the same constant: (1/D) * kron(indicators).
        norms = [_spectral(_window_indicator(n[i], out[i], k[i], s[i], p[i], 1)) for i in range(d)]
        return _f64(math.prod(norms) / abs(module.divisor_override))
    # PyTorch's divisor is a product of per-axis window lengths (with or without padding), so
    # the operator is the Kronecker product of the 1-D pools; its norm is the product of theirs.
    # The 1-D matrices are read off PyTorch itself by pooling the identity basis.
    norms = []
    for i in range(d):
        eye = torch.eye(n[i], dtype=torch.float64)[:, None, :]
        cols = F.avg_pool1d(eye, k[i], s[i], p[i], module.ceil_mode, module.count_include_pad)
        if cols.shape[-1] != out[i]:
            raise UnsupportedOperationError(
                f"{type(module).__name__}: could not reproduce its output size along axis {i}"
            )
        norms.append(_spectral(cols[:, 0, :]))
    return _f64(math.prod(norms))


def _max_pool_lip(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> Tensor:
    d = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[_builtin_class(module)]
    if module.return_indices:
        raise UnsupportedOperationError(f"{type(module).__name__} with return_indices=True")
    k = _tuple(module.kernel_size, d)
    s = _tuple(module.stride if module.stride else module.kernel_size, d)
    p, dil = _tuple(module.padding, d), _tuple(module.dilation, d)
    n, out = in_shape[-d:], out_shape[-d:]
    inds = [_window_indicator(n[i], out[i], k[i], s[i], p[i], dil[i]) for i in range(d)]
    return _f64(math.sqrt(_max_count(inds)))


def _adaptive_lip(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> Tensor:
    is_avg = isinstance(module, _ADAPTIVE_AVG)
    d = int(_builtin_class(module).__name__[-2])
    if not is_avg and module.return_indices:
        raise UnsupportedOperationError(f"{type(module).__name__} with return_indices=True")
    n, out = in_shape[-d:], out_shape[-d:]
    inds = [_adaptive_indicator(n[i], out[i]) for i in range(d)]
    if not is_avg:
        return _f64(math.sqrt(_max_count(inds)))
    # Each window is averaged: rows of the indicator divided by their lengths (Kronecker again).
    return _f64(math.prod(_spectral(ind / ind.sum(1, keepdim=True)) for ind in inds))


# ----------------------------------------------------------------------- module rules


def _bn_scale(bn: nn.Module) -> Tensor:
    if bn.running_var is None or not bn.track_running_stats:
        raise UnsupportedOperationError(
            f"{type(bn).__name__} without running statistics normalizes with batch statistics "
            "even in eval mode: not a per-sample map"
        )
    scale = 1.0 / torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    return scale.cpu()


def _activation_lip(module: nn.Module) -> float:
    """Lipschitz constant of an elementwise activation module (one of ``_ACTIVATIONS``)."""
    if isinstance(module, nn.CELU) and not module.alpha > 0:
        # x < 0: alpha (exp(x / alpha) - 1), slope exp(x / alpha), unbounded for alpha < 0.
        raise UnsupportedOperationError(f"nn.CELU with alpha={module.alpha} <= 0 is not Lipschitz")
    if isinstance(module, _ONE_LIP):
        return 1.0
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.PReLU):
        return max(1.0, float(module.weight.detach().abs().max()))
    if isinstance(module, nn.ELU):  # slope alpha * exp(x) for x < 0
        return max(1.0, abs(module.alpha))
    return _CONST_LIP[_owner(module, _CONST_LIP)]


def _layer_bound_of(module: nn.Module, in_shape: torch.Size, layer_bound: LayerBound) -> Tensor:
    if not isinstance(module, nn.Linear) and len(in_shape) != module.weight.ndim:
        raise UnsupportedOperationError(
            f"{type(module).__name__} applied to a {len(in_shape)}-d tensor: without a batch "
            "axis of its own it would treat the batch as channels (unbatched input)"
        )
    size = None if isinstance(module, nn.Linear) else tuple(int(s) for s in in_shape[2:])
    return _f64(layer_bound(module, size))


def _check_single_io(module: nn.Module, in_shapes: list[torch.Size], out: Any) -> None:
    name = type(module).__name__
    if getattr(module, "return_indices", False):
        raise UnsupportedOperationError(f"{name} with return_indices=True returns a tuple")
    if len(in_shapes) != 1 or out is None:
        raise UnsupportedOperationError(
            f"{name}: expected one tensor input and one tensor output, got {len(in_shapes)} "
            f"tensor inputs and output shape {out}"
        )
    if isinstance(module, nn.Flatten) and module.start_dim % len(in_shapes[0]) == 0:
        raise UnsupportedOperationError("nn.Flatten with start_dim=0 mixes the batch")
    if isinstance(module, nn.Unflatten) and not isinstance(module.dim, str) and (
        module.dim % len(in_shapes[0]) == 0
    ):
        raise UnsupportedOperationError("nn.Unflatten of the batch axis")


def _module_lip(
    module: nn.Module,
    in_shapes: list[torch.Size],
    out_shape: torch.Size | None,
    layer_bound: LayerBound,
) -> Tensor:
    """``K`` for one call of a leaf module; shapes are batched (as propagated)."""
    rule = _user_rule(module)
    if rule is not None:
        return _f64(rule(module, [torch.Size(s[1:]) for s in in_shapes]))
    if _builtin_class(module) is None:
        name = f"{type(module).__module__}.{type(module).__name__}"
        raise UnsupportedOperationError(
            f"no Lipschitz rule for module type {name}; register one with "
            "lightning_spectral.register_lipschitz_rule(type, fn)"
        )
    _check_single_io(module, in_shapes, out_shape)
    in_shape = in_shapes[0]
    if isinstance(module, _LAYER_TYPES):
        return _layer_bound_of(module, in_shape, layer_bound)
    if isinstance(module, _BN_TYPES):
        return _f64(_bn_scale(module).abs().max())
    if isinstance(module, _AVG_POOLS):
        return _avg_pool_lip(module, in_shape, out_shape)
    if isinstance(module, _MAX_POOLS):
        return _max_pool_lip(module, in_shape, out_shape)
    if isinstance(module, _ADAPTIVE_AVG + _ADAPTIVE_MAX):
        return _adaptive_lip(module, in_shape, out_shape)
    return _f64(_activation_lip(module))


def _foldable(layer: nn.Module, bn: nn.Module, layer_out_ndim: int) -> bool:
    if _user_rule(layer) is not None or _user_rule(bn) is not None:
        return False
    if _builtin_class(layer) not in _LAYER_TYPES or _builtin_class(bn) not in _BN_TYPES:
        return False
    if bn.running_var is None or not bn.track_running_stats:
        return False
    linear = isinstance(layer, nn.Linear)
    if bn.num_features != (layer.out_features if linear else layer.out_channels):
        return False
    # BatchNorm1d normalizes axis 1; after a Linear that is the feature axis only for 2-D inputs.
    return layer_out_ndim == (2 if linear else layer.weight.ndim)


def _plain_layer(klass: type, weight: Tensor, **geometry: Any) -> nn.Module:
    """A fresh float64 CPU ``klass`` module (no bias) holding ``weight``: what the bound
    engine reads, whatever the original module's class does to its weight attribute."""
    w = weight.detach().to("cpu", torch.float64)
    if klass is nn.Linear:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    else:
        groups = int(geometry.get("groups", 1))
        channels = (w.shape[0], w.shape[1] * groups)
        if klass not in _CONV_T_TYPES:
            channels = channels[::-1]
        layer = klass(*channels, tuple(w.shape[2:]), bias=False, device="meta", **geometry)
    layer.weight = nn.Parameter(w, requires_grad=False)
    return layer


def _conv_geometry(layer: nn.Module) -> dict[str, Any]:
    geo = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
           "groups": layer.groups, "padding_mode": layer.padding_mode}
    if isinstance(layer, _CONV_T_TYPES):
        geo["output_padding"] = layer.output_padding
    return geo


def _folded_layer(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A plain float64 copy of ``layer`` with the eval BatchNorm's scale folded into its
    weight (the shift only changes the bias, which does not affect the Lipschitz constant)."""
    scale = _bn_scale(bn)
    w = layer.weight.detach().to("cpu", torch.float64)
    klass = _builtin_class(layer)
    if klass is nn.Linear:
        return _plain_layer(nn.Linear, w * scale[:, None])
    if klass in _CONV_T_TYPES:
        # Stored (c_in, c_out/g, *k); output channel g*c_out/g + j is weight[group g rows, j].
        g = layer.groups
        ones = (1,) * (w.ndim - 2)
        grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        w = (grouped * scale.reshape(g, 1, -1, *ones)).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, *((1,) * (w.ndim - 1)))
    return _plain_layer(klass, w, **_conv_geometry(layer))


# ------------------------------------------------------------------------------ tracing


class _Tracer(fx.Tracer):
    """Stops at modules with a rule (built-in or registered); descends into the others."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _has_rule(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _has_hooks(module: nn.Module) -> bool:
    glob = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks
                or glob._global_forward_hooks or glob._global_forward_pre_hooks)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and not isinstance(a, Tensor) and a == b


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _check_hooks(module: nn.Module, name: str, args: tuple, kwargs: dict, result: Any) -> None:
    """A forward (pre-)hook may observe or recompute state (spectral norm, weight norm), but
    the rule knows only ``forward``: the hooked call must return what ``forward`` returns."""
    if not _same(result, module.forward(*args, **kwargs)):
        raise UnsupportedOperationError(
            f"a forward hook or pre-hook of module '{name}' ({type(module).__name__}) changes "
            "its input or output; the bound only knows the module's own forward"
        )


class _Propagate(ShapeProp):
    """ShapeProp that also keeps small non-tensor results (sizes) and the values of
    constant tensors, which products with constants need; checks hooks of leaf modules."""

    def __init__(self, gm: fx.GraphModule, depends: set[fx.Node]) -> None:
        super().__init__(gm)
        self.depends = depends

    def run_node(self, n: fx.Node) -> Any:
        hooked = n.op == "call_module" and _has_hooks(self.fetch_attr(n.target))
        if hooked:  # cloned first: an in-place module overwrites its input
            args, kwargs = _clone(self.fetch_args_kwargs_from_env(n))
        result = super().run_node(n)
        if hooked:
            _check_hooks(self.fetch_attr(n.target), n.target, args, kwargs, result)
        if not isinstance(result, Tensor):
            if isinstance(result, (int, float, bool, torch.Size)) or (
                isinstance(result, (tuple, list)) and all(isinstance(r, int) for r in result)
            ):
                n.meta["ls_value"] = result
        elif n not in self.depends:
            n.meta["ls_value"] = result.detach()
        return result


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph)


def _shape(node: Any) -> torch.Size | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return torch.Size(shape) if shape is not None else None


def _dtypes(meta: Any) -> list[torch.dtype]:
    """Dtypes of every tensor in a (nested) ShapeProp ``tensor_meta``."""
    if hasattr(meta, "dtype") and hasattr(meta, "shape"):
        return [meta.dtype]
    if isinstance(meta, (tuple, list)):
        return [d for m in meta for d in _dtypes(m)]
    if isinstance(meta, dict):
        return [d for m in meta.values() for d in _dtypes(m)]
    return []


def _metadata_only(node: fx.Node) -> bool:
    """Reads only sizes (``x.size(0)``, ``x.shape``), never the values."""
    return node.op == "call_method" and node.target in _CONST_METHODS or (
        node.target is getattr and node.args[1] in ("shape", "dtype", "ndim", "device"))


def _describe(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"tensor method .{target}()"
    if node.op == "call_module":
        return f"module '{target}'"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or target
    mod = getattr(target, "__module__", None)
    return f"function {mod + '.' if mod else ''}{name}"


def _refuse(node: fx.Node, why: str = "") -> UnsupportedOperationError:
    extra = f" ({why})" if why else ""
    return UnsupportedOperationError(
        f"no Lipschitz rule for {_describe(node)} at node '{node.name}'{extra}"
    )


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _static(value: Any) -> Any:
    """The value of a non-input-dependent argument (literal or recorded node value)."""
    if isinstance(value, fx.Node):
        if "ls_value" not in value.meta:
            raise KeyError(value.name)
        return value.meta["ls_value"]
    if isinstance(value, (tuple, list)):
        return type(value)(_static(v) for v in value)
    return value


def _opnorm(matrices: Tensor) -> Tensor:
    """Largest spectral norm of a batch of float64 matrices, raised by a relative margin so
    rounding in the decomposition cannot put it below the exact value."""
    from .functional.norms import spectral_norm_exact

    if matrices.numel() == 0:
        return _f64(0.0)
    return spectral_norm_exact(matrices).max() * (1 + _NORM_MARGIN)


# ------------------------------------------------------------------------------- tables

_RELU_LIKE = {
    F.relu, torch.relu, F.relu6, F.hardtanh, torch.tanh, F.tanh, F.softplus, F.elu, F.celu,
    torch.clamp, torch.clip, F.softsign, F.tanhshrink, F.leaky_relu,
}
_RELU_LIKE_METHODS = {"relu", "tanh", "clamp", "clip", "clamp_min", "clamp_max"}
_SIMPLE = {torch.sigmoid: 0.25, F.sigmoid: 0.25, F.gelu: _GELU_LIP, F.silu: _SILU_LIP,
           F.mish: _MISH_LIP, F.selu: _SELU_LIP, F.hardswish: _HARDSWISH_LIP,
           F.hardsigmoid: 1.0 / 6.0, "sigmoid": 0.25}
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
# Moves entries around (or only changes dtype/device/memory): never repeats one.
_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze",
                  "permute", "transpose", "view_as", "reshape_as", "clone", "float", "double",
                  "to"}
_CONST_METHODS = {"size", "dim", "numel"}
_ADDS = {operator.add, torch.add, operator.sub, torch.sub}
_MULS = {operator.mul, torch.mul, operator.truediv, torch.div}
_MATMULS = {operator.matmul, torch.matmul, torch.mm, "matmul", "mm"}
# function -> (module class it is the forward of, names of its arguments after the weight)
_CONV_FUNCS: dict[Any, tuple[type, tuple[str, ...]]] = {}
for _d in (1, 2, 3):
    _CONV_FUNCS[getattr(F, f"conv{_d}d")] = (
        getattr(nn, f"Conv{_d}d"), ("bias", "stride", "padding", "dilation", "groups"))
    _CONV_FUNCS[getattr(F, f"conv_transpose{_d}d")] = (
        getattr(nn, f"ConvTranspose{_d}d"),
        ("bias", "stride", "padding", "output_padding", "groups", "dilation"))
_POOL_FUNCS: dict[Any, tuple[type, tuple[str, ...]]] = {}
for _d, (_avg, _max, _aavg, _amax) in enumerate(
    zip(_AVG_POOLS, _MAX_POOLS, _ADAPTIVE_AVG, _ADAPTIVE_MAX, strict=True), start=1
):
    _POOL_FUNCS[getattr(F, f"avg_pool{_d}d")] = (_avg, (
        "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
        *(("divisor_override",) if _d > 1 else ())))
    _POOL_FUNCS[getattr(F, f"max_pool{_d}d")] = (_max, (
        "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"))
    _POOL_FUNCS[getattr(F, f"adaptive_avg_pool{_d}d")] = (_aavg, ("output_size",))
    _POOL_FUNCS[getattr(F, f"adaptive_max_pool{_d}d")] = (_amax, ("output_size", "return_indices"))

# In-place functions and their out-of-place counterparts; functions taking ``inplace=`` (with
# its position).
_INPLACE_FUNCS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu,
    F.elu_: F.elu, F.celu_: F.celu, F.leaky_relu_: F.leaky_relu, F.hardtanh_: F.hardtanh,
    torch.clamp_: torch.clamp, torch.clip_: torch.clip,
}
_INPLACE_ARG = {
    F.relu: 1, F.relu6: 1, F.selu: 1, F.silu: 1, F.mish: 1, F.hardswish: 1, F.hardsigmoid: 1,
    F.elu: 2, F.celu: 2, F.leaky_relu: 2, F.hardtanh: 3, F.dropout: 3, F.dropout1d: 3,
    F.dropout2d: 3, F.dropout3d: 3, F.alpha_dropout: 3,
}
# Out-of-place operations that always return a new tensor (never their input or a view).
_FRESH = (
    _ADDS | _MULS | _MATMULS | _RELU_LIKE | _RELU_LIKE_METHODS | set(_SIMPLE)
    | set(_CONV_FUNCS) | set(_POOL_FUNCS)
    | {operator.neg, torch.neg, "neg", "add", "sub", "mul", "div", "clone", "mean", "sum",
       torch.mean, torch.sum, torch.cat, torch.concat, torch.stack, F.linear, F.batch_norm}
)
# Random values differ between the trace and every later call.
_RANDOM = {
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.randperm, torch.bernoulli, torch.normal, torch.poisson,
    torch.multinomial, "bernoulli", "multinomial", "bernoulli_", "uniform_", "normal_",
    "random_", "exponential_", "geometric_", "cauchy_", "log_normal_",
}


# --------------------------------------------------------------------------------- walk


class _GraphBound:
    def __init__(self, gm: fx.GraphModule, layer_bound: LayerBound, depends: set[fx.Node],
                 other_batch: dict[fx.Node, torch.Size]) -> None:
        self.gm = gm
        self.layer_bound = layer_bound
        self.depends = depends
        self.other_batch = other_batch
        self.lip: dict[fx.Node, Tensor] = {}

    # -- helpers
    def L(self, value: Any) -> Tensor:
        """Lipschitz bound of an argument (nested args allowed: root-sum-square)."""
        if isinstance(value, fx.Node):
            return self.lip[value]
        if isinstance(value, (tuple, list)):
            parts = [self.L(v) for v in value]
            return torch.stack(parts).square().sum().sqrt() if parts else _f64(0.0)
        if isinstance(value, dict):
            return self.L(list(value.values()))
        return _f64(0.0)

    def dependent(self, value: Any) -> bool:
        if isinstance(value, dict):
            return self.dependent(list(value.values()))
        return isinstance(value, fx.Node) and bool(self.lip[value] > 0) or (
            isinstance(value, (tuple, list)) and any(self.dependent(v) for v in value)
        )

    def only_first_dependent(self, node: fx.Node) -> None:
        others = list(node.args[1:]) + list(node.kwargs.values())
        if any(self.dependent(a) for a in others):
            raise _refuse(node, "only its first argument may depend on the input")

    def keeps_batch(self, node: fx.Node) -> bool:
        shapes = [_shape(node), _shape(node.args[0])]
        return all(s is not None and len(s) >= 1 and s[0] == _BATCH for s in shapes)

    def spread(self, arg: Any, node: fx.Node) -> float:
        """``sqrt(r)``, ``r`` the number of output entries broadcasting makes from each entry
        of the input-dependent ``arg`` (1 without broadcasting)."""
        if not self.dependent(arg):
            return 1.0
        a, out = _shape(arg), _shape(node)
        if a is None or out is None or len(a) != len(out):
            raise _refuse(node, "broadcasting an input-dependent operand against more "
                                "dimensions moves its batch axis")
        return math.sqrt(math.prod(out) / max(1, math.prod(a)))

    def constant(self, node: fx.Node, value: Any) -> Tensor:
        try:
            return torch.as_tensor(_static(value)).detach().to("cpu", torch.float64)
        except KeyError as exc:
            raise _refuse(node, f"cannot evaluate the constant {exc}") from exc

    # -- the walk
    def run(self) -> Tensor:
        nodes = list(self.gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOperationError(
                f"the model's forward must take exactly one tensor input, got "
                f"{[n.target for n in placeholders]}"
            )
        fold = self.find_folds(nodes)
        for node in nodes:
            if node in fold.values():
                continue  # its only user, the BatchNorm, accounts for it
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node) or _shape(out) is None:
                    raise UnsupportedOperationError(
                        "the model must return a single tensor (the logits)"
                    )
                return self.lip[out]
            self.lip[node] = self.visit(node, fold)
            self.check_batch(node)
        raise RuntimeError("graph without output")  # pragma: no cover

    def find_folds(self, nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
        """BatchNorm node -> the conv/linear node folded into it."""
        fold = {}
        for node in nodes:
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            prev = node.args[0]
            if not (isinstance(prev, fx.Node) and prev.op == "call_module"
                    and len(prev.users) == 1 and len(prev.args) == 1 and not prev.kwargs):
                continue
            layer = self.gm.get_submodule(prev.target)
            bn = self.gm.get_submodule(node.target)
            out = _shape(prev)
            if out is not None and _foldable(layer, bn, len(out)) and self.keeps_batch(prev):
                fold[node] = prev
        return fold

    def inplace_target(self, node: fx.Node) -> tuple[bool, Any]:
        """(whether ``node`` overwrites its first argument, the out-of-place target)."""
        t = node.target
        if node.op == "call_method":
            return (t.endswith("_") and not t.endswith("__")), (t[:-1] if t.endswith("_") else t)
        if node.op == "call_module":
            return getattr(self.gm.get_submodule(t), "inplace", False) is True, t
        if node.op != "call_function":
            return False, t
        if t in _INPLACE_FUNCS:
            return True, _INPLACE_FUNCS[t]
        if t in _INPLACE_ARG:
            return bool(_static(_arg(node, _INPLACE_ARG[t], "inplace", False))), t
        return False, t

    def fresh(self, node: fx.Node) -> bool:
        """Whether ``node`` certainly returns a new tensor (not its input or a view of it)."""
        inplace, t = self.inplace_target(node)
        if inplace:
            return False
        if node.op == "call_module":
            klass = _builtin_class(self.gm.get_submodule(t))
            return klass is not None and klass not in _ALIASING_MODULES
        return node.op in ("call_function", "call_method") and t in _FRESH

    def check_inplace(self, node: fx.Node) -> None:
        """An in-place op equals its out-of-place counterpart if nothing else reads the tensor
        it overwrites: no other user of it, nor of any tensor it may be a view of."""
        todo = [(node.args[0], node)] if node.args else []
        while todo:
            cur, via = todo.pop()
            if not isinstance(cur, fx.Node) or _metadata_only(cur):
                continue
            others = [u.name for u in cur.users if u is not via and not _metadata_only(u)]
            if others:
                raise _refuse(node, f"in-place update of '{cur.name}', which is also read by "
                                    f"{others}: write it out of place")
            if cur.op == "get_attr":
                raise _refuse(node, f"in-place update of the parameter or buffer '{cur.target}'")
            if cur.op == "placeholder" or self.fresh(cur):
                continue
            todo += [(a, cur) for a in cur.all_input_nodes]

    def check_batch(self, node: fx.Node) -> None:
        """An input-dependent tensor must have the batch axis first, at every batch size."""
        shape = _shape(node)
        if shape is None or not bool(self.lip[node] > 0):
            return
        other = self.other_batch.get(node)
        if shape[0] != _BATCH or other is None or tuple(other) != (_BATCH + 1, *shape[1:]):
            raise _refuse(node, f"its shape {tuple(shape)} at a batch of {_BATCH} becomes "
                                f"{None if other is None else tuple(other)} at a batch of "
                                f"{_BATCH + 1}: it mixes the samples")

    def check_dtypes(self, node: fx.Node) -> None:
        for dtype in _dtypes(node.meta.get("tensor_meta")):
            if not dtype.is_floating_point:
                raise _refuse(node, f"its output dtype {dtype} is not floating point: a step "
                                    "function of the input has no Lipschitz constant")

    def visit(self, node: fx.Node, fold: dict[fx.Node, fx.Node]) -> Tensor:
        if node.op == "placeholder":
            return _f64(1.0)
        if node.op == "get_attr":
            return _f64(0.0)
        if node.op not in ("call_module", "call_function", "call_method"):
            raise _refuse(node)
        if node in fold:
            return self.visit_fold(node, fold[node])
        if node.op != "call_module" and node.target in _RANDOM:
            raise _refuse(node, "random: its value differs from call to call")
        inplace, target = self.inplace_target(node)
        if inplace:
            self.check_inplace(node)
        if not self.dependent(list(node.args) + list(node.kwargs.values())):
            return _f64(0.0)  # a function of constants only (e.g. x.size(0) * 2)
        try:
            if node.op == "call_module":
                lip = self.visit_module(node)
                self.check_dtypes(node)
                return lip
            self.check_dtypes(node)
            return self.visit_call(node, target)
        except KeyError as exc:  # _static of an input-dependent argument
            raise _refuse(node, f"argument {exc} must not depend on the input") from exc

    def visit_fold(self, bn_node: fx.Node, layer_node: fx.Node) -> Tensor:
        layer = self.gm.get_submodule(layer_node.target)
        folded = _folded_layer(layer, self.gm.get_submodule(bn_node.target))
        inner = _layer_bound_of(folded, _shape(layer_node.args[0]), self.layer_bound)
        return inner * self.L(layer_node.args[0])

    def visit_module(self, node: fx.Node) -> Tensor:
        module = self.gm.get_submodule(node.target)
        tensor_args = [a for a in node.args if _shape(a) is not None]
        tensor_args += [a for a in node.kwargs.values() if _shape(a) is not None]
        k = _module_lip(module, [_shape(a) for a in tensor_args], _shape(node), self.layer_bound)
        if _shape(node) is not None and not self.keeps_batch(node):
            raise _refuse(node, "changes the batch axis")
        return k * self.L(tensor_args)

    def visit_call(self, node: fx.Node, t: Any) -> Tensor:  # noqa: C901 - one dispatch table
        method = node.op == "call_method"
        args = node.args
        x = args[0] if args else None
        if _metadata_only(node):
            return _f64(0.0)
        if t is operator.getitem:
            return self.visit_getitem(node)
        if t in _ADDS or (method and t in ("add", "sub")):
            alpha = abs(float(_static(node.kwargs.get("alpha", 1))))
            a, b = args[0], args[1]
            return (self.L(a) * self.spread(a, node)
                    + alpha * self.L(b) * self.spread(b, node))
        if t in (operator.neg, torch.neg, operator.pos) or (method and t == "neg"):
            return self.L(x)
        if t in _MULS or (method and t in ("mul", "div")):
            return self.visit_mul(node, t)
        if t in _MATMULS:
            return self.visit_matmul(node)
        if t in _RELU_LIKE or (method and t in _RELU_LIKE_METHODS):
            return self.elementwise(node, self.relu_like_lip(node, t))
        if t in _SIMPLE and (method or not isinstance(t, str)):
            return self.elementwise(node, _SIMPLE[t])
        if t in _DROPOUTS:
            if bool(_static(_arg(node, 2, "training", True))):
                raise _refuse(node, "dropout with training=True is random")
            return self.elementwise(node, 1.0)
        if t is torch.flatten or (method and t in _SHAPE_METHODS):
            return self.visit_shape(node, t)
        if t in (torch.cat, torch.concat, torch.stack):
            tensors = _arg(node, 0, "tensors")
            dim = int(_static(_arg(node, 1, "dim", 0)))
            if dim % len(_shape(node)) == 0:
                raise _refuse(node, "concatenating along the batch axis")
            return self.L(list(tensors))
        if t in (torch.mean, torch.sum) or (method and t in ("mean", "sum")):
            return self.visit_reduce(node, t)
        if t in _POOL_FUNCS:
            self.only_first_dependent(node)
            klass, names = _POOL_FUNCS[t]
            params = {n: _static(v) for n, v in zip(names, args[1:], strict=False)}
            params.update({k: _static(v) for k, v in node.kwargs.items()})
            module = klass(**params)
            return _module_lip(module, [_shape(x)], _shape(node), self.layer_bound) * self.L(x)
        if t in _CONV_FUNCS or t is F.linear:
            return self.visit_layer(node, t)
        if t is F.pad:
            return self.visit_pad(node)
        if t is F.batch_norm:
            return self.visit_batch_norm(node)
        raise _refuse(node)

    def elementwise(self, node: fx.Node, k: float) -> Tensor:
        """``k`` times the first argument's bound, which only may depend on the input."""
        self.only_first_dependent(node)
        x = node.args[0]
        return k * self.L(x) * self.spread(x, node)

    def relu_like_lip(self, node: fx.Node, t: Any) -> float:
        if t is F.elu:  # slope alpha * exp(x) for x < 0
            return max(1.0, abs(float(_static(_arg(node, 1, "alpha", 1.0)))))
        if t is F.celu:  # slope exp(x / alpha) for x < 0: <= 1 iff alpha > 0
            alpha = float(_static(_arg(node, 1, "alpha", 1.0)))
            if not alpha > 0:
                raise _refuse(node, f"celu with alpha={alpha} <= 0 is not Lipschitz")
        if t is F.leaky_relu:
            return max(1.0, abs(float(_static(_arg(node, 1, "negative_slope", 0.01)))))
        return 1.0

    def visit_getitem(self, node: fx.Node) -> Tensor:
        x = node.args[0]
        if _shape(x) is None:
            return self.L(x)  # picking from a tuple of sizes etc.: constant
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(isinstance(i, (fx.Node, list, Tensor)) for i in index):
            raise _refuse(node, "advanced indexing may repeat entries")
        ok_first = index and (index[0] == slice(None) or index[0] is Ellipsis and len(
            [i for i in index if i is not None and i is not Ellipsis]) < len(_shape(x)) - 1)
        if not ok_first or not self.keeps_batch(node):
            raise _refuse(node, "indexing must keep the batch axis whole")
        return self.L(x)

    def visit_mul(self, node: fx.Node, t: Any) -> Tensor:
        a, b = node.args[0], node.args[1]
        divide = t in (operator.truediv, torch.div, "div")
        if self.dependent(a) and self.dependent(b):
            raise _refuse(node, "a product of two input-dependent tensors has no global bound")
        if divide and self.dependent(b):
            raise _refuse(node, "dividing by an input-dependent value")
        if node.kwargs.get("rounding_mode") is not None:
            raise _refuse(node, "rounding division is not Lipschitz")
        x, c = (b, a) if self.dependent(b) else (a, b)
        mags = self.constant(node, c).abs()
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
        return k.reshape(()) * self.L(x)

    def visit_matmul(self, node: fx.Node) -> Tensor:
        """``x @ C`` maps every row of ``x`` by ``C^T``, ``C @ x`` every column by ``C``: the
        per-sample map is block diagonal with blocks ``C`` (a batch of them, broadcast), so its
        norm is ``max ||C_j||`` times ``sqrt`` of how often broadcasting repeats ``x``."""
        a, b = node.args[0], node.args[1]
        if self.dependent(a) and self.dependent(b):
            raise _refuse(node, "a product of two input-dependent tensors has no global bound")
        right = self.dependent(a)
        x, c = (a, b) if right else (b, a)
        cm, xs, out = self.constant(node, c), _shape(x), _shape(node)
        # x's contracted axis (last / second to last) and C's batch axes must miss axis 0.
        if len(xs) < (2 if right else 3) or (cm.ndim > 2 and cm.ndim > len(xs) - 1):
            raise _refuse(node, "the product would contract or broadcast over the batch axis")
        if cm.ndim == 1:
            return cm.norm() * (1 + _NORM_MARGIN) * self.L(x)
        blocks = cm.reshape(-1, *cm.shape[-2:])
        repeat = 1.0
        if cm.ndim > 2:
            repeat = math.prod(out[:-2]) / max(1, math.prod(xs[:-2]))
        return _opnorm(blocks) * math.sqrt(repeat) * self.L(x)

    def visit_layer(self, node: fx.Node, t: Any) -> Tensor:
        """``F.linear`` / ``F.conv*`` with a constant weight: the module they are the forward of,
        rebuilt from the recorded weight, bounded by the engine at the traced input size."""
        self.only_first_dependent(node)
        weight = self.constant(node, _arg(node, 1, "weight"))
        if t is F.linear:
            if weight.ndim == 1:
                return weight.norm() * (1 + _NORM_MARGIN) * self.L(node.args[0])
            layer = _plain_layer(nn.Linear, weight)
        else:
            klass, names = _CONV_FUNCS[t]
            geometry = {}
            for i, name in enumerate(names[1:], start=3):
                value = _arg(node, i, name)
                if value is not None:
                    geometry[name] = _static(value)
            layer = _plain_layer(klass, weight, **geometry)
        return _layer_bound_of(layer, _shape(node.args[0]), self.layer_bound) * self.L(
            node.args[0])

    def visit_pad(self, node: fx.Node) -> Tensor:
        """Every output entry is a constant or a copy of an input entry: the map's norm is
        ``sqrt`` of the largest number of copies of one entry, counted by padding indices."""
        self.only_first_dependent(node)
        x = node.args[0]
        pad = [int(p) for p in _static(_arg(node, 1, "pad"))]
        mode = _static(_arg(node, 2, "mode", "constant"))
        xs = _shape(x)
        if len(pad) // 2 >= len(xs) or not self.keeps_batch(node):
            raise _refuse(node, "pads the batch axis")
        sample = xs[1:]
        index = torch.arange(1, math.prod(sample) + 1, dtype=torch.float64).reshape(1, *sample)
        padded = F.pad(index, pad) if mode == "constant" else F.pad(index, pad, mode=mode)
        counts = torch.bincount(padded.flatten().round().long())[1:]  # 0: the pad value
        most = int(counts.max()) if counts.numel() else 0
        return math.sqrt(most) * self.L(x)

    def visit_batch_norm(self, node: fx.Node) -> Tensor:
        """``F.batch_norm`` with running statistics: ``x -> s x + t``, ``s = w / sqrt(var + eps)``
        per channel, a diagonal map of norm ``max |s|``."""
        self.only_first_dependent(node)
        if bool(_static(_arg(node, 5, "training", False))):
            raise _refuse(node, "batch statistics (training=True) are not a per-sample map")
        var = _static(_arg(node, 2, "running_var"))
        if var is None:
            raise _refuse(node, "no running variance")
        eps = float(_static(_arg(node, 7, "eps", 1e-5)))
        scale = 1.0 / torch.sqrt(self.constant(node, _arg(node, 2, "running_var")) + eps)
        weight = _arg(node, 3, "weight")
        if weight is not None:
            scale = scale * self.constant(node, weight)
        return scale.abs().max() * self.L(node.args[0])

    def visit_shape(self, node: fx.Node, t: Any) -> Tensor:
        x = node.args[0]
        if t in ("view_as", "reshape_as") and self.dependent(node.args[1]):
            raise _refuse(node, "its shape argument depends on the input")
        if t not in ("view_as", "reshape_as", "to"):
            self.only_first_dependent(node)
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
        if not self.keeps_batch(node):
            raise _refuse(node, "changes the batch axis")
        # A reshape of a batch-first tensor that keeps the leading size keeps each sample's
        # entries together (row-major order); entries are only moved, never repeated.
        return self.L(x)

    def visit_reduce(self, node: fx.Node, t: Any) -> Tensor:
        self.only_first_dependent(node)
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
        return k * self.L(x)


# ---------------------------------------------------------------------------- entry point


def _dependents(gm: fx.GraphModule) -> set[fx.Node]:
    dep: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"input_shape must be a sequence of ints, got {input_shape!r}") from exc
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {shape}")
    return shape


def _dummy(model: nn.Module, shape: tuple[int, ...], batch: int = _BATCH) -> Tensor:
    """A random batch (own generator: the caller's random state is left alone)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    param = tensors[0] if tensors else None
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=gen, dtype=dtype).to(device)


def _check_faithful(model: nn.Module, x: Tensor, traced: Any) -> None:
    """The bound is of the traced graph; it must compute what the model computes. Tracing
    loses in-place updates written as ``a += b`` (traced as ``a + b``, so an alias of ``a``
    would miss the update) and forward hooks of modules it traces through."""
    expected = model(x)
    if not (isinstance(expected, Tensor) and isinstance(traced, Tensor)):
        return  # the walk has already refused any other output
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    if expected.shape != traced.shape or not torch.allclose(
        traced, expected, rtol=1e-4, atol=1e-6 * max(1.0, scale), equal_nan=True
    ):
        raise UnsupportedOperationError(
            f"the torch.fx trace of {type(model).__name__} does not reproduce its output on a "
            "random input: an in-place update of a tensor that is read elsewhere (e.g. "
            "`h += ...` on an alias of h), a forward hook on a module the trace goes through, "
            "or randomness. Write the update out of place / remove the hook."
        )


class _RecordShapes(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, torch.Size] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.shapes[n] = result.shape
        return result


def _other_batch_shapes(gm: fx.GraphModule, shape: tuple[int, ...]) -> dict[fx.Node, torch.Size]:
    """Shapes at a batch of ``_BATCH + 1``: an input-dependent tensor whose shape does not
    follow the batch size mixes samples with other axes (``x.view(2, -1)``, a Linear applied
    across the batch after the features were reduced away, ...)."""
    recorder = _RecordShapes(gm)
    try:
        recorder.run(_dummy(gm, shape, _BATCH + 1))
    except Exception as exc:  # the model's own error, whatever its type
        raise UnsupportedOperationError(
            f"the model runs on a batch of {_BATCH} but not on a batch of {_BATCH + 1} "
            f"({exc!r}): it does not treat the samples independently"
        ) from exc
    return recorder.shapes


def _graph_bound(model: nn.Module, gm: fx.GraphModule, shape: tuple[int, ...],
                 layer_bound: LayerBound) -> Tensor:
    dummy = _dummy(gm, shape)
    depends = _dependents(gm)
    try:
        traced = _Propagate(gm, depends).propagate(dummy.clone())  # the model may write to it
    except UnsupportedOperationError:
        raise
    except Exception as exc:  # the model's own error, whatever its type
        raise ValueError(
            f"running the model on a dummy input of per-sample shape {shape} (batch {_BATCH}) "
            f"failed: {exc!r}. input_shape excludes the batch axis, e.g. (C, H, W)."
        ) from exc
    walker = _GraphBound(gm, layer_bound, depends, _other_batch_shapes(gm, shape))
    bound = walker.run()
    _check_faithful(model, dummy, traced)
    return bound


def _sequential_bound(model: nn.Sequential, shape: tuple[int, ...], layer_bound: LayerBound
                      ) -> Tensor:
    """Fallback for an untraceable nn.Sequential: product over children, each child bounded
    by its rule or, if it has none, by its own network bound (traced on its own)."""
    x = _dummy(model, shape)
    children = list(model)
    total = _f64(1.0)
    i = 0
    while i < len(children):
        child = children[i]
        y = _call_checked(child, str(i), x)
        nxt = children[i + 1] if i + 1 < len(children) else None
        if nxt is not None and isinstance(y, Tensor) and _foldable(child, nxt, y.ndim):
            k = _layer_bound_of(_folded_layer(child, nxt), x.shape, layer_bound)
            y = _call_checked(nxt, str(i + 1), y)
            i += 1
        elif _has_rule(child):
            k = _module_lip(child, [x.shape], getattr(y, "shape", None), layer_bound)
        else:
            k = network_lipschitz_bound(child, tuple(x.shape[1:]), layer_bound=layer_bound)
        if not isinstance(y, Tensor) or y.shape[0] != _BATCH:
            raise UnsupportedOperationError(f"{type(child).__name__} changes the batch axis")
        if not y.dtype.is_floating_point:
            raise UnsupportedOperationError(
                f"{type(child).__name__} returns {y.dtype}: a step function has no Lipschitz "
                "constant"
            )
        total = total * k
        x = y
        i += 1
    return total


def _call_checked(module: nn.Module, name: str, x: Tensor) -> Any:
    if not _has_hooks(module):
        return module(x)
    clone = x.clone()
    y = module(x)
    _check_hooks(module, name, (clone,), {}, y)
    return y


def network_lipschitz_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    layer_bound: LayerBound | None = None,
) -> Tensor:
    """A guaranteed upper bound on the l2 Lipschitz constant of ``model`` in eval mode.

    Args:
        model: any module ``torch.fx`` can trace whose forward takes one tensor and returns
            one tensor (e.g. torchvision's ResNets, a LightningModule whose forward calls its
            network); an untraceable plain ``nn.Sequential`` is handled child by child.
        input_shape: the shape of ONE sample, without the batch axis, e.g. ``(1, 8, 8)`` for
            ``(C, H, W)`` images. The bound is for the per-sample map and depends on the input
            size (pooling, and the layer bounds when they use it).
        layer_bound: ``fn(module, input_size) -> Tensor``, a guaranteed bound on a
            convolution's / linear layer's operator norm for the spatial ``input_size`` (None
            for linear layers). Defaults to
            :func:`lightning_spectral.functional.layer_spectral_bound`.

    Returns:
        0-dim float64 tensor (CPU, no grad) ``L`` with ``||f(x) - f(x')|| <= L ||x - x'||``
        for all inputs of that shape. The model's train/eval flags are restored afterwards.

    Raises:
        UnsupportedOperationError: a module or function without a rule (named in the message).
        ValueError: ``input_shape`` invalid or the model fails on it.
    """
    shape = _check_input_shape(input_shape)
    if layer_bound is None:
        from .functional.bounds import layer_spectral_bound as layer_bound
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            try:
                gm = _trace(model)
            except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError...
                if isinstance(model, nn.Sequential) and _behaves_as(model, nn.Sequential):
                    return _sequential_bound(model, shape, layer_bound)
                raise UnsupportedOperationError(
                    f"torch.fx could not trace {type(model).__name__}: {exc!r}. Make forward "
                    "traceable (no data-dependent control flow), or register a rule for the "
                    "offending module type with register_lipschitz_rule."
                ) from exc
            return _graph_bound(model, gm, shape, layer_bound)
    finally:
        for m, mode in modes.items():
            m.train(mode)
