"""Linear maps with constant weights: the rules of ``F.linear`` / ``F.conv*`` (bounded by the
engine on a rebuilt layer), ``@`` with a constant matrix, ``F.batch_norm`` and ``F.pad``; the
layers themselves (a layer's bound at its input size, BatchNorm folded into the layer before
it, plain float64 layers rebuilt from a weight for the bound engine). All are linear: their
curvature and slack rules are their Lipschitz rule on the other tables."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ...functional.opnorm import opnorm, with_margin
from ..common import (
    BN_TYPES,
    CONV_T_TYPES,
    LAYER_TYPES,
    LayerBound,
    UnsupportedOperationError,
    f64,
)
from ..ownership import builtin_class, rule_class, user_rule
from ..tracing import known_shape, node_arg, refuse, static
from .base import NodeRule, Walk, linear, rules_for

__all__ = [
    "CONV_FUNCS", "MATMULS", "TABLE", "bn_scale", "foldable", "folded_layer", "layer_bound_of",
    "pad_lip", "plain_layer",
]

MATMULS = {operator.matmul, torch.matmul, torch.mm, "matmul", "mm"}
# function -> (module class it is the forward of, names of its arguments after the weight)
CONV_FUNCS: dict[Any, tuple[type, tuple[str, ...]]] = {}
for _d in (1, 2, 3):
    CONV_FUNCS[getattr(F, f"conv{_d}d")] = (
        getattr(nn, f"Conv{_d}d"), ("bias", "stride", "padding", "dilation", "groups"))
    CONV_FUNCS[getattr(F, f"conv_transpose{_d}d")] = (
        getattr(nn, f"ConvTranspose{_d}d"),
        ("bias", "stride", "padding", "output_padding", "groups", "dilation"))
def _matmul(w: Walk, node: fx.Node, t: Any) -> Tensor:
    """``x @ C`` maps every row of ``x`` by ``C^T``, ``C @ x`` every column by ``C``: the
    per-sample map is block diagonal with blocks ``C`` (a batch of them, broadcast), so its
    norm is ``max ||C_j||`` times ``sqrt`` of how often broadcasting repeats ``x``."""
    a, b = node.args[0], node.args[1]
    if w.dependent(a) and w.dependent(b):
        raise refuse(node, "a product of two input-dependent tensors has no global bound")
    right = w.dependent(a)
    x, c = (a, b) if right else (b, a)
    cm, xs, out = w.constant(node, c), known_shape(x), known_shape(node)
    # x's contracted axis (last / second to last) and C's batch axes must miss axis 0.
    if len(xs) < (2 if right else 3) or (cm.ndim > 2 and cm.ndim > len(xs) - 1):
        raise refuse(node, "the product would contract or broadcast over the batch axis")
    if cm.ndim == 1:
        return with_margin(cm.norm()) * w.L(x)
    blocks = cm.reshape(-1, *cm.shape[-2:])
    repeat = 1.0
    if cm.ndim > 2:
        repeat = math.prod(out[:-2]) / max(1, math.prod(xs[:-2]))
    # The largest block norm (opnorm is batched); no block at all: the zero map.
    norm = opnorm(blocks).max() if blocks.numel() else f64(0.0)
    return norm * math.sqrt(repeat) * w.L(x)


def _layer(w: Walk, node: fx.Node, t: Any) -> Tensor:
    """``F.linear`` / ``F.conv*`` with a constant weight: the module they are the forward of,
    rebuilt from the recorded weight, bounded by the engine at the traced input size."""
    w.only_first_dependent(node)
    weight = w.constant(node, node_arg(node, 1, "weight"))
    if t is F.linear:
        if weight.ndim == 1:
            return with_margin(weight.norm()) * w.L(node.args[0])
        layer = plain_layer(nn.Linear, weight)
    else:
        klass, names = CONV_FUNCS[t]
        geometry = {}
        for i, name in enumerate(names[1:], start=3):
            value = node_arg(node, i, name)
            if value is not None:
                geometry[name] = static(value)
        layer = plain_layer(klass, weight, **geometry)
    x = node.args[0]
    return layer_bound_of(layer, known_shape(x), w.layer_bound) * w.L(x)


def pad_lip(in_shape: torch.Size, pad: Sequence[int], mode: str) -> float:
    """``F.pad(x, pad, mode)`` of a batched ``in_shape``: every output entry is a constant or
    a copy of an input entry, so the per-sample map's norm is ``sqrt`` of the largest number
    of copies of one entry, counted by padding a tensor of distinct indices. The caller
    checks that ``pad`` misses the batch axis."""
    sample = in_shape[1:]
    index = torch.arange(1, math.prod(sample) + 1, dtype=torch.float64).reshape(1, *sample)
    padded = F.pad(index, list(pad)) if mode == "constant" else F.pad(index, list(pad), mode=mode)
    counts = torch.bincount(padded.flatten().round().long())[1:]  # 0: the pad value
    return math.sqrt(int(counts.max()) if counts.numel() else 0)


def _pad(w: Walk, node: fx.Node, t: Any) -> Tensor:
    """Every output entry is a constant or a copy of an input entry: the map's norm is
    ``sqrt`` of the largest number of copies of one entry, counted by padding indices."""
    w.only_first_dependent(node)
    x = node.args[0]
    pad = [int(p) for p in static(node_arg(node, 1, "pad"))]
    mode = static(node_arg(node, 2, "mode", "constant"))
    xs = known_shape(x)
    if len(pad) // 2 >= len(xs) or not w.keeps_batch(node):
        raise refuse(node, "pads the batch axis")
    return pad_lip(xs, pad, mode) * w.L(x)


def _batch_norm(w: Walk, node: fx.Node, t: Any) -> Tensor:
    """``F.batch_norm`` with running statistics: ``x -> s x + t``, ``s = w / sqrt(var + eps)``
    per channel, a diagonal map of norm ``max |s|``."""
    w.only_first_dependent(node)
    if bool(static(node_arg(node, 5, "training", False))):
        raise refuse(node, "batch statistics (training=True) are not a per-sample map")
    var = node_arg(node, 2, "running_var")
    if var is None:
        raise refuse(node, "no running variance")
    eps = float(static(node_arg(node, 7, "eps", 1e-5)))
    scale = 1.0 / torch.sqrt(w.constant(node, var) + eps)
    weight = node_arg(node, 3, "weight")
    if weight is not None:
        scale = scale * w.constant(node, weight)
    return scale.abs().max() * w.L(node.args[0])


def bn_scale(bn: nn.Module) -> Tensor:
    """The per-channel scale ``gamma / sqrt(var + eps)`` of an eval BatchNorm (float64, CPU)."""
    if bn.running_var is None or not bn.track_running_stats:
        raise UnsupportedOperationError(
            f"{type(bn).__name__} without running statistics normalizes with batch statistics "
            "even in eval mode: not a per-sample map"
        )
    norm = cast(nn.BatchNorm2d, bn)  # one of BN_TYPES: the attributes of their common base
    running_var = cast(Tensor, norm.running_var)
    scale = 1.0 / torch.sqrt(running_var.detach().to(torch.float64) + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().to(torch.float64)
    return scale.cpu()


def layer_bound_of(module: nn.Module, in_shape: torch.Size, layer_bound: LayerBound) -> Tensor:
    """``layer_bound`` of a convolution / linear layer at the spatial size of its batched
    ``in_shape`` (None for a linear layer)."""
    if not isinstance(module, nn.Linear) and len(in_shape) != module.weight.ndim:
        raise UnsupportedOperationError(
            f"{type(module).__name__} applied to a {len(in_shape)}-d tensor: without a batch "
            "axis of its own it would treat the batch as channels (unbatched input)"
        )
    size = None if isinstance(module, nn.Linear) else tuple(int(s) for s in in_shape[2:])
    return f64(layer_bound(module, size))


def foldable(layer: nn.Module, bn: nn.Module, layer_out_ndim: int) -> bool:
    """Whether the eval BatchNorm ``bn`` right after ``layer`` (its output of
    ``layer_out_ndim`` dimensions) can be folded into it (:func:`folded_layer`)."""
    if user_rule(layer) is not None or user_rule(bn) is not None:
        return False
    if builtin_class(layer) not in LAYER_TYPES or builtin_class(bn) not in BN_TYPES:
        return False
    if bn.running_var is None or not bn.track_running_stats:
        return False
    linear = isinstance(layer, nn.Linear)
    if bn.num_features != (layer.out_features if linear else layer.out_channels):
        return False
    # BatchNorm1d normalizes axis 1; after a Linear that is the feature axis only for 2-D inputs.
    return layer_out_ndim == (2 if linear else layer.weight.ndim)


def plain_layer(klass: type, weight: Tensor, **geometry: Any) -> nn.Module:
    """A fresh float64 CPU ``klass`` module (no bias) holding ``weight``: what the bound
    engine reads, whatever the original module's class does to its weight attribute."""
    w = weight.detach().to("cpu", torch.float64)
    if klass is nn.Linear:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    else:
        groups = int(geometry.get("groups", 1))
        channels = (w.shape[0], w.shape[1] * groups)
        if klass not in CONV_T_TYPES:
            channels = channels[::-1]
        layer = klass(*channels, tuple(w.shape[2:]), bias=False, device="meta", **geometry)
    layer.weight = nn.Parameter(w, requires_grad=False)
    return layer


def _conv_geometry(layer: nn.Module) -> dict[str, Any]:
    geo = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
           "groups": layer.groups, "padding_mode": layer.padding_mode}
    if isinstance(layer, CONV_T_TYPES):
        geo["output_padding"] = layer.output_padding
    return geo


def folded_layer(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A plain float64 copy of ``layer`` with the eval BatchNorm's scale folded into its
    weight (the shift only changes the bias, which does not affect the Lipschitz constant)."""
    scale = bn_scale(bn)
    w = cast(Tensor, layer.weight).detach().to("cpu", torch.float64)
    klass = rule_class(layer)
    if klass is nn.Linear:
        return plain_layer(nn.Linear, w * scale[:, None])
    if klass in CONV_T_TYPES:
        # Stored (c_in, c_out/g, *k); output channel g*c_out/g + j is weight[group g rows, j].
        g = cast(nn.ConvTranspose2d, layer).groups
        ones = (1,) * (w.ndim - 2)
        grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        w = (grouped * scale.reshape(g, 1, -1, *ones)).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, *((1,) * (w.ndim - 1)))
    return plain_layer(klass, w, **_conv_geometry(layer))


TABLE: dict[Any, NodeRule] = {
    **rules_for(MATMULS, linear(_matmul)), **rules_for(CONV_FUNCS, linear(_layer)),
    F.linear: linear(_layer), F.pad: linear(_pad), F.batch_norm: linear(_batch_norm),
}
"""The linear-map targets and their rules."""
