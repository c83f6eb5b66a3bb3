"""A guaranteed upper bound on the l2 Lipschitz constant of a whole network.

The model is traced with ``torch.fx`` and its graph walked once in topological order. Every
node ``v`` gets a number ``L_v`` with ``||v(x) - v(x')|| <= L_v ||x - x'||`` for all inputs
``x, x'`` of *one sample* (paper.md section 8):

* the input: 1; constants (parameters, shapes): 0;
* a layer ``h`` applied to ``u``: ``L_v = Lip(h) * L_u``; convolutions and linear layers get
  ``Lip(h)`` from the bound engine (:func:`~lightning_spectral.functional.layer_spectral_bound`)
  at the input size the trace reveals;
* a sum ``u + w``: ``L_u + L_w`` (triangle inequality). Since ``L_u``, ``L_w`` bound the two
  summands *as functions of the input*, a residual ``x + g(x)`` gets ``1 + L_g``;
* a concatenation ``[u, w]``: ``sqrt(L_u^2 + L_w^2)`` (the squared norms add);
* any other node ``h(u_1, ..., u_k)`` of several inputs with a rule ``K`` (Lipschitz w.r.t. the
  concatenation of its inputs): ``K * sqrt(sum_i L_{u_i}^2)``.

BatchNorm in eval is the affine map ``x -> s * x + t`` with ``s = gamma / sqrt(var + eps)``;
when it follows a convolution (or linear layer) whose output feeds nothing else it is folded
into that layer's weight and the folded layer is bounded (tighter than ``max |s|`` times the
layer bound); otherwise it contributes ``max |s|``.

Pooling uses the input size (exact per-axis operators, paper.md section 8): an average pool is
the Kronecker product of 1-D averaging matrices, whose norm is the product of their norms
(computed exactly); a max pool is ``sqrt(c)``-Lipschitz where ``c`` is the largest number of
windows one input position falls into (``|max_W x - max_W x'| <= ||(x - x')_W||``, and summing
the squares over windows counts each position at most ``c`` times); it is 1 when windows do
not overlap. A global average over ``N`` positions gives ``1 / sqrt(N)``.

Anything without a rule raises :class:`UnsupportedOperationError` naming it; register rules for
your own module types with :func:`register_lipschitz_rule`. Floating-point rounding of the
float64 products themselves is not accounted for (relative error ~1e-15 per layer).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

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

_CONV_TYPES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
_LAYER_TYPES: tuple[type, ...] = (*_CONV_TYPES, nn.Linear)
_BN_TYPES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVG_POOLS: tuple[type, ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAX_POOLS: tuple[type, ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_ADAPTIVE_AVG: tuple[type, ...] = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ADAPTIVE_MAX: tuple[type, ...] = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)

_USER_RULES: dict[type, LipschitzRule] = {}

# Dummy batch of 2 for shape propagation: a batch of 1 could not reveal a reshape that mixes
# samples (the bound is per sample).
_BATCH = 2


class UnsupportedOperationError(TypeError):
    """A module or function the network bound has no rule for."""


def register_lipschitz_rule(module_type: type[nn.Module], rule: LipschitzRule) -> None:
    """Teach :func:`network_lipschitz_bound` a module type.

    ``rule(module, input_shapes)`` must return a guaranteed upper bound on the module's l2
    Lipschitz constant w.r.t. its tensor inputs (jointly), in eval mode; ``input_shapes`` are
    per-sample shapes. Modules of this type (and subclasses) become leaves of the trace: their
    inside is never looked at. A user rule takes precedence over the built-in ones.
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


def _user_rule(module: nn.Module) -> LipschitzRule | None:
    for klass in type(module).__mro__:
        if klass in _USER_RULES:
            return _USER_RULES[klass]
    return None


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
    d = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(module)]
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
    d = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(module)]
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
    d = int(type(module).__name__[-2])
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


def _activation_lip(module: nn.Module) -> float | None:
    """Lipschitz constant of an elementwise activation module, None if not one."""
    one = (
        nn.ReLU, nn.ReLU6, nn.Tanh, nn.Softplus, nn.Identity, nn.Flatten, nn.Unflatten,
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Hardtanh,
        nn.CELU, nn.Softsign, nn.Tanhshrink,
    )
    # Tanhshrink x - tanh(x) has derivative tanh(x)^2 <= 1; Softsign 1 / (1 + |x|)^2 <= 1.
    if isinstance(module, one):
        return 1.0
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.PReLU):
        return max(1.0, float(module.weight.detach().abs().max()))
    if isinstance(module, nn.ELU):
        return max(1.0, abs(module.alpha))
    if isinstance(module, nn.Sigmoid):
        return 0.25
    if isinstance(module, nn.Hardsigmoid):
        return 1.0 / 6.0
    if isinstance(module, nn.GELU):
        return _GELU_LIP
    if isinstance(module, nn.SiLU):
        return _SILU_LIP
    if isinstance(module, nn.Mish):
        return _MISH_LIP
    if isinstance(module, nn.SELU):
        return _SELU_LIP
    if isinstance(module, nn.Hardswish):
        return _HARDSWISH_LIP
    return None


def _has_builtin_rule(module: nn.Module) -> bool:
    return (
        isinstance(module, _LAYER_TYPES + _BN_TYPES + _AVG_POOLS + _MAX_POOLS)
        or isinstance(module, _ADAPTIVE_AVG + _ADAPTIVE_MAX)
        or _activation_lip(module) is not None
    )


def _layer_bound_of(module: nn.Module, in_shape: torch.Size, layer_bound: LayerBound) -> Tensor:
    size = None if isinstance(module, nn.Linear) else tuple(int(s) for s in in_shape[2:])
    return _f64(layer_bound(module, size))


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
    name = type(module).__name__
    if not _has_builtin_rule(module):
        raise UnsupportedOperationError(
            f"no Lipschitz rule for module type {type(module).__module__}.{name}; register one "
            "with lightning_spectral.register_lipschitz_rule(type, fn)"
        )
    if getattr(module, "return_indices", False):
        raise UnsupportedOperationError(f"{name} with return_indices=True returns a tuple")
    if len(in_shapes) != 1 or out_shape is None:
        raise UnsupportedOperationError(
            f"{name}: expected one tensor input and one tensor output, got {len(in_shapes)} "
            f"tensor inputs and output shape {out_shape}"
        )
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
    if isinstance(module, nn.Flatten) and module.start_dim % len(in_shape) == 0:
        raise UnsupportedOperationError("nn.Flatten with start_dim=0 mixes the batch")
    if isinstance(module, nn.Unflatten) and not isinstance(module.dim, str) and (
        module.dim % len(in_shape) == 0
    ):
        raise UnsupportedOperationError("nn.Unflatten of the batch axis")
    lip = _activation_lip(module)
    assert lip is not None
    return _f64(lip)


def _foldable(layer: nn.Module, bn: nn.Module, layer_out_ndim: int) -> bool:
    if not isinstance(layer, _LAYER_TYPES) or not isinstance(bn, _BN_TYPES):
        return False
    if _user_rule(layer) is not None or _user_rule(bn) is not None:
        return False
    if parametrize.is_parametrized(layer) or bn.running_var is None:
        return False
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != out_channels:
        return False
    # BatchNorm1d normalizes axis 1; after a Linear that is the feature axis only for 2-D inputs.
    return not isinstance(layer, nn.Linear) or layer_out_ndim == 2


def _folded_layer(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A float64 copy of ``layer`` with the eval BatchNorm's scale folded into its weight
    (the shift only changes the bias, which does not affect the Lipschitz constant)."""
    scale = _bn_scale(bn)
    folded = copy.deepcopy(layer).to(torch.float64)
    w = layer.weight.detach().to(torch.float64).cpu()
    if isinstance(layer, nn.Linear):
        w = w * scale[:, None]
    elif isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # Stored (c_in, c_out/g, *k); output channel g*c_out/g + j is weight[group g rows, j].
        g = layer.groups
        ones = (1,) * (w.ndim - 2)
        grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        w = (grouped * scale.reshape(g, 1, -1, *ones)).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, *((1,) * (w.ndim - 1)))
    with torch.no_grad():
        folded.weight.copy_(w.to(folded.weight.device))
    return folded


# ------------------------------------------------------------------------------ tracing


class _Tracer(fx.Tracer):
    """Stops at modules with a rule (built-in or registered); descends into the others."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _user_rule(m) is not None or _has_builtin_rule(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _Propagate(ShapeProp):
    """ShapeProp that also keeps small non-tensor results (sizes) and the values of
    constant tensors, which scalar multiplications need."""

    def __init__(self, gm: fx.GraphModule, depends: set[fx.Node]) -> None:
        super().__init__(gm)
        self.depends = depends

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if not isinstance(result, Tensor):
            if isinstance(result, (int, float, bool, torch.Size)) or (
                isinstance(result, (tuple, list)) and all(isinstance(r, int) for r in result)
            ):
                n.meta["ls_value"] = result
        elif n not in self.depends and result.numel() <= 1 << 20:
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


def _describe(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"tensor method .{target}()"
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


_RELU_LIKE = {
    F.relu, torch.relu, F.relu6, F.hardtanh, torch.tanh, F.tanh, F.softplus, F.elu, F.celu,
    torch.clamp, torch.clip, F.softsign, F.tanhshrink,
}
_RELU_LIKE_METHODS = {"relu", "tanh", "clamp", "clip", "clamp_min", "clamp_max"}
# Moves entries around (or only changes dtype/device/memory): never repeats one.
_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze",
                  "permute", "transpose", "view_as", "reshape_as", "clone", "float", "double",
                  "to"}
_CONST_METHODS = {"size", "dim", "numel"}
_ADDS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_MULS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
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


class _GraphBound:
    def __init__(self, gm: fx.GraphModule, layer_bound: LayerBound) -> None:
        self.gm = gm
        self.layer_bound = layer_bound
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
        raise RuntimeError("graph without output")  # pragma: no cover

    def find_folds(self, nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
        """BatchNorm node -> the conv/linear node folded into it."""
        fold = {}
        for node in nodes:
            if node.op != "call_module" or not node.args:
                continue
            prev = node.args[0]
            if not (isinstance(prev, fx.Node) and prev.op == "call_module"
                    and len(prev.users) == 1 and len(node.args) == 1):
                continue
            layer = self.gm.get_submodule(prev.target)
            bn = self.gm.get_submodule(node.target)
            out = _shape(prev)
            if out is not None and _foldable(layer, bn, len(out)):
                fold[node] = prev
        return fold

    def visit(self, node: fx.Node, fold: dict[fx.Node, fx.Node]) -> Tensor:
        if node.op == "placeholder":
            return _f64(1.0)
        if node.op == "get_attr":
            return _f64(0.0)
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if node in fold:
                layer_node = fold[node]
                layer = self.gm.get_submodule(layer_node.target)
                inner = _layer_bound_of(
                    _folded_layer(layer, module), _shape(layer_node.args[0]), self.layer_bound
                )
                return inner * self.L(layer_node.args[0])
            tensor_args = [a for a in node.args if _shape(a) is not None]
            tensor_args += [a for a in node.kwargs.values() if _shape(a) is not None]
            k = _module_lip(module, [_shape(a) for a in tensor_args], _shape(node),
                            self.layer_bound)
            if _shape(node) is not None and not self.keeps_batch(node):
                raise _refuse(node, "changes the batch axis")
            return k * self.L(tensor_args)
        if node.op in ("call_function", "call_method"):
            return self.visit_call(node)
        raise _refuse(node)

    def visit_call(self, node: fx.Node) -> Tensor:  # noqa: C901 - one dispatch table
        t, method = node.target, node.op == "call_method"
        args = node.args
        if not self.dependent(list(args) + list(node.kwargs.values())):
            return _f64(0.0)  # a function of constants only (e.g. x.size(0) * 2)
        x = args[0] if args else None
        if method and t in _CONST_METHODS or (t is getattr and args[1] in ("shape", "dtype")):
            return _f64(0.0)
        if t is operator.getitem:
            if _shape(x) is None:
                return self.L(x)  # picking from a tuple of sizes etc.: constant
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, (fx.Node, list, Tensor)) for i in index):
                raise _refuse(node, "advanced indexing may repeat entries")
            ok_first = index and (index[0] == slice(None) or index[0] is Ellipsis and len(
                [i for i in index if i is not None and i is not Ellipsis]) < len(_shape(x)) - 1)
            if not ok_first or not self.keeps_batch(node):
                raise _refuse(node, "indexing must keep the batch axis whole")
            return self.L(x)
        if t in _ADDS or (method and t in ("add", "sub", "add_", "sub_")):
            alpha = abs(float(_static(node.kwargs.get("alpha", 1))))
            return self.L(args[0]) + alpha * self.L(args[1])
        if t in (operator.neg, torch.neg, operator.pos) or (method and t == "neg"):
            return self.L(x)
        if t in _MULS or (method and t in ("mul", "div", "mul_", "div_")):
            return self.visit_mul(node)
        if t in _RELU_LIKE or (method and t in _RELU_LIKE_METHODS):
            self.only_first_dependent(node)
            k = 1.0
            if t is F.elu:  # slope alpha * exp(x) for x < 0; CELU's exp(x / alpha) stays <= 1
                k = max(1.0, abs(float(_static(_arg(node, 1, "alpha", 1.0)))))
            return k * self.L(x)
        if t is F.leaky_relu:
            self.only_first_dependent(node)
            slope = abs(float(_static(_arg(node, 1, "negative_slope", 0.01))))
            return max(1.0, slope) * self.L(x)
        simple = {torch.sigmoid: 0.25, F.sigmoid: 0.25, F.gelu: _GELU_LIP, F.silu: _SILU_LIP,
                  F.mish: _MISH_LIP, F.selu: _SELU_LIP, F.hardswish: _HARDSWISH_LIP,
                  F.hardsigmoid: 1.0 / 6.0}
        if t in simple or (method and t == "sigmoid"):
            self.only_first_dependent(node)
            return (simple[t] if t in simple else 0.25) * self.L(x)
        if t in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
            self.only_first_dependent(node)
            if bool(_static(_arg(node, 2, "training", True))):
                raise _refuse(node, "dropout with training=True is random")
            return self.L(x)
        if t is torch.flatten or (method and t in _SHAPE_METHODS):
            return self.visit_shape(node)
        if t in (torch.cat, torch.concat, torch.stack):
            dim = int(_static(_arg(node, 1, "dim", 0)))
            if dim % len(_shape(node)) == 0:
                raise _refuse(node, "concatenating along the batch axis")
            return self.L(list(args[0]))
        if t in (torch.mean, torch.sum) or (method and t in ("mean", "sum")):
            return self.visit_reduce(node)
        if t in _POOL_FUNCS:
            self.only_first_dependent(node)
            klass, names = _POOL_FUNCS[t]
            params = {n: _static(v) for n, v in zip(names, args[1:], strict=False)}
            params.update({k: _static(v) for k, v in node.kwargs.items()})
            module = klass(**params)
            return _module_lip(module, [_shape(x)], _shape(node), self.layer_bound) * self.L(x)
        raise _refuse(node)

    def visit_mul(self, node: fx.Node) -> Tensor:
        a, b = node.args[0], node.args[1]
        t = node.target
        divide = t in (operator.truediv, operator.itruediv, torch.div) or t in ("div", "div_")
        if self.dependent(a) and self.dependent(b):
            raise _refuse(node, "a product of two input-dependent tensors has no global bound")
        if divide and self.dependent(b):
            raise _refuse(node, "dividing by an input-dependent value")
        if "rounding_mode" in node.kwargs and node.kwargs["rounding_mode"] is not None:
            raise _refuse(node, "rounding division is not Lipschitz")
        x, c = (b, a) if self.dependent(b) else (a, b)
        try:
            value = torch.as_tensor(_static(c), dtype=torch.float64)
        except KeyError as exc:
            raise _refuse(node, f"cannot evaluate the constant factor {exc}") from exc
        if value.numel() == 0:
            return _f64(0.0)
        mags = value.abs()
        if divide:
            if bool((mags == 0).any()):
                raise _refuse(node, "division by zero")
            mags = 1.0 / mags
        # An elementwise product with a (broadcast) constant is a diagonal map.
        return mags.max().reshape(()) * self.L(x)

    def visit_shape(self, node: fx.Node) -> Tensor:
        x = node.args[0]
        t = node.target
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
        # A reshape of a batch-first contiguous tensor that keeps the leading size keeps each
        # sample's entries together; entries are only moved, never repeated.
        return self.L(x)

    def visit_reduce(self, node: fx.Node) -> Tensor:
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
        mean = node.target is torch.mean or node.target == "mean"
        # Mean over N entries: each output averages its own N inputs, norm 1/sqrt(N); sum: sqrt(N).
        k = 1.0 / math.sqrt(count) if mean else math.sqrt(count)
        return k * self.L(x)


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


def _dummy(model: nn.Module, shape: tuple[int, ...]) -> Tensor:
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    return torch.zeros(_BATCH, *shape, dtype=dtype, device=device)


def _graph_bound(gm: fx.GraphModule, shape: tuple[int, ...], layer_bound: LayerBound) -> Tensor:
    dummy = _dummy(gm, shape)
    try:
        _Propagate(gm, _dependents(gm)).propagate(dummy)
    except Exception as exc:  # the model's own error, whatever its type
        raise ValueError(
            f"running the model on a dummy input of per-sample shape {shape} (batch {_BATCH}) "
            f"failed: {exc!r}. input_shape excludes the batch axis, e.g. (C, H, W)."
        ) from exc
    return _GraphBound(gm, layer_bound).run()


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
        y = child(x)
        nxt = children[i + 1] if i + 1 < len(children) else None
        if nxt is not None and _foldable(child, nxt, y.ndim):
            k = _layer_bound_of(_folded_layer(child, nxt), x.shape, layer_bound)
            y = nxt(y)
            i += 1
        elif _user_rule(child) is not None or _has_builtin_rule(child):
            k = _module_lip(child, [x.shape], y.shape, layer_bound)
        else:
            k = network_lipschitz_bound(child, tuple(x.shape[1:]), layer_bound=layer_bound)
        if not isinstance(y, Tensor) or y.shape[0] != _BATCH:
            raise UnsupportedOperationError(f"{type(child).__name__} changes the batch axis")
        total = total * k
        x = y
        i += 1
    return total


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
            network); an untraceable ``nn.Sequential`` is handled child by child.
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
                if isinstance(model, nn.Sequential):
                    return _sequential_bound(model, shape, layer_bound)
                raise UnsupportedOperationError(
                    f"torch.fx could not trace {type(model).__name__}: {exc!r}. Make forward "
                    "traceable (no data-dependent control flow), or register a rule for the "
                    "offending module type with register_lipschitz_rule."
                ) from exc
            return _graph_bound(gm, shape, layer_bound)
    finally:
        for m, mode in modes.items():
            m.train(mode)
