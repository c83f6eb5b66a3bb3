"""Rules for linear nodes with constant weights: ``F.linear`` / ``F.conv*`` (bounded by the
engine on a rebuilt layer), ``@`` with a constant matrix, ``F.batch_norm``, ``F.pad`` and
functional pooling."""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .common import _ADAPTIVE_AVG, _ADAPTIVE_MAX, _AVG_POOLS, _MAX_POOLS, _NORM_MARGIN, _opnorm
from .modules import _layer_bound_of, _module_lip, _plain_layer
from .pooling import _pad_lip
from .tracing import _arg, _refuse, _shape, _static

if TYPE_CHECKING:
    from .walk import _Walker

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


def _matmul(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    """``x @ C`` maps every row of ``x`` by ``C^T``, ``C @ x`` every column by ``C``: the
    per-sample map is block diagonal with blocks ``C`` (a batch of them, broadcast), so its
    norm is ``max ||C_j||`` times ``sqrt`` of how often broadcasting repeats ``x``."""
    a, b = node.args[0], node.args[1]
    if w.dependent(a) and w.dependent(b):
        raise _refuse(node, "a product of two input-dependent tensors has no global bound")
    right = w.dependent(a)
    x, c = (a, b) if right else (b, a)
    cm, xs, out = w.constant(node, c), _shape(x), _shape(node)
    # x's contracted axis (last / second to last) and C's batch axes must miss axis 0.
    if len(xs) < (2 if right else 3) or (cm.ndim > 2 and cm.ndim > len(xs) - 1):
        raise _refuse(node, "the product would contract or broadcast over the batch axis")
    if cm.ndim == 1:
        return cm.norm() * (1 + _NORM_MARGIN) * w.L(x)
    blocks = cm.reshape(-1, *cm.shape[-2:])
    repeat = 1.0
    if cm.ndim > 2:
        repeat = math.prod(out[:-2]) / max(1, math.prod(xs[:-2]))
    return _opnorm(blocks) * math.sqrt(repeat) * w.L(x)


def _layer(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    """``F.linear`` / ``F.conv*`` with a constant weight: the module they are the forward of,
    rebuilt from the recorded weight, bounded by the engine at the traced input size."""
    w.only_first_dependent(node)
    weight = w.constant(node, _arg(node, 1, "weight"))
    if t is F.linear:
        if weight.ndim == 1:
            return weight.norm() * (1 + _NORM_MARGIN) * w.L(node.args[0])
        layer = _plain_layer(nn.Linear, weight)
    else:
        klass, names = _CONV_FUNCS[t]
        geometry = {}
        for i, name in enumerate(names[1:], start=3):
            value = _arg(node, i, name)
            if value is not None:
                geometry[name] = _static(value)
        layer = _plain_layer(klass, weight, **geometry)
    x = node.args[0]
    return _layer_bound_of(layer, _shape(x), w.layer_bound) * w.L(x)


def _pad(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    """Every output entry is a constant or a copy of an input entry: the map's norm is
    ``sqrt`` of the largest number of copies of one entry, counted by padding indices."""
    w.only_first_dependent(node)
    x = node.args[0]
    pad = [int(p) for p in _static(_arg(node, 1, "pad"))]
    mode = _static(_arg(node, 2, "mode", "constant"))
    xs = _shape(x)
    if len(pad) // 2 >= len(xs) or not w.keeps_batch(node):
        raise _refuse(node, "pads the batch axis")
    return _pad_lip(xs, pad, mode) * w.L(x)


def _batch_norm(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    """``F.batch_norm`` with running statistics: ``x -> s x + t``, ``s = w / sqrt(var + eps)``
    per channel, a diagonal map of norm ``max |s|``."""
    w.only_first_dependent(node)
    if bool(_static(_arg(node, 5, "training", False))):
        raise _refuse(node, "batch statistics (training=True) are not a per-sample map")
    var = _arg(node, 2, "running_var")
    if var is None:
        raise _refuse(node, "no running variance")
    eps = float(_static(_arg(node, 7, "eps", 1e-5)))
    scale = 1.0 / torch.sqrt(w.constant(node, var) + eps)
    weight = _arg(node, 3, "weight")
    if weight is not None:
        scale = scale * w.constant(node, weight)
    return scale.abs().max() * w.L(node.args[0])


def _pool(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    """Functional pooling: the module it is the forward of, with the same arguments."""
    w.only_first_dependent(node)
    x = node.args[0]
    klass, names = _POOL_FUNCS[t]
    params = {n: _static(v) for n, v in zip(names, node.args[1:], strict=False)}
    params.update({k: _static(v) for k, v in node.kwargs.items()})
    return _module_lip(klass(**params), [_shape(x)], _shape(node), w.layer_bound) * w.L(x)


TABLE = {
    **dict.fromkeys(_MATMULS, _matmul), **dict.fromkeys(_CONV_FUNCS, _layer), F.linear: _layer,
    F.pad: _pad, F.batch_norm: _batch_norm, **dict.fromkeys(_POOL_FUNCS, _pool),
}
