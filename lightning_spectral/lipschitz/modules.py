"""Rules for leaf modules (built-in types), BatchNorm folding, and plain float64 layers
rebuilt from a weight for the bound engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .common import (
    _ACTIVATIONS,
    _ADAPTIVE_AVG,
    _ADAPTIVE_MAX,
    _ALIASING_MODULES,
    _AVG_POOLS,
    _BN_TYPES,
    _CONST_LIP,
    _CONV_T_TYPES,
    _LAYER_TYPES,
    _MAX_POOLS,
    _ONE_LIP,
    _PAD_MODES,
    _SORTS,
    LayerBound,
    UnsupportedOperationError,
    _check_softplus,
    _f64,
)
from .ownership import _builtin_class, _owner, _user_rule
from .pooling import _adaptive_lip, _avg_pool_lip, _max_pool_lip, _pad_lip


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
    if isinstance(module, nn.Softplus):
        _check_softplus(module.beta, module.threshold)
    if isinstance(module, _ONE_LIP):
        return 1.0
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.PReLU):
        return max(1.0, float(module.weight.detach().abs().max()))
    if isinstance(module, nn.ELU):  # slope alpha * exp(x) for x < 0
        return max(1.0, abs(module.alpha))
    return _CONST_LIP[_owner(module, _CONST_LIP)]


def _sort_lip(module: nn.Module, in_shape: torch.Size) -> Tensor:
    """GroupSort / MaxMin: 1 (a permutation on each of finitely many cones covering the
    space, continuous across them; see :mod:`lightning_spectral.activations`), provided the
    channel axis is not the batch axis (sorting across samples is not a per-sample map)."""
    if module.dim % len(in_shape) == 0:
        raise UnsupportedOperationError(
            f"{type(module).__name__}(dim={module.dim}) sorts along the batch axis: it mixes "
            "the samples"
        )
    return _f64(1.0)


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


@dataclass(frozen=True)
class ModuleRule:
    """``lipschitz(module, in_shape, out_shape, layer_bound)``: ``K`` for one call of a leaf
    module of the class (batched shapes, as propagated). ``curvature``, how the curvature
    bound treats the class: ``"linear"`` (a linear map: ``C = K C_u``), ``"smooth"`` (an
    elementwise activation, constants from ``activation_curvature``, which refuses the
    non-smooth ones) or None (refused)."""

    lipschitz: Callable[[nn.Module, torch.Size, torch.Size, LayerBound], Tensor]
    curvature: Literal["linear", "smooth"] | None = None


def _sizes_only(pool: Callable[[nn.Module, torch.Size, torch.Size], Tensor],
                curvature: Literal["linear", "smooth"] | None) -> ModuleRule:
    return ModuleRule(lambda module, in_shape, out_shape, layer_bound: pool(
        module, in_shape, out_shape), curvature)


def _pad_module_lip(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> Tensor:
    """A padding module is ``F.pad(x, module.padding, mode)`` (``mode`` from its class): the
    rule of ``F.pad``."""
    pad = [int(p) for p in module.padding]
    if len(pad) // 2 >= len(in_shape):
        raise UnsupportedOperationError(f"{type(module).__name__} pads the batch axis")
    return _f64(_pad_lip(in_shape, pad, _PAD_MODES[_builtin_class(module)]))


_ACTIVATION_RULE = ModuleRule(
    lambda module, in_shape, out_shape, layer_bound: _f64(_activation_lip(module)), "smooth")

MODULE_RULES: dict[type, ModuleRule] = {
    **dict.fromkeys(_LAYER_TYPES, ModuleRule(
        lambda module, in_shape, out_shape, layer_bound: _layer_bound_of(
            module, in_shape, layer_bound), "linear")),
    **dict.fromkeys(_BN_TYPES, ModuleRule(
        lambda module, in_shape, out_shape, layer_bound: _f64(_bn_scale(module).abs().max()),
        "linear")),
    **dict.fromkeys(_AVG_POOLS, _sizes_only(_avg_pool_lip, "linear")),
    **dict.fromkeys(_MAX_POOLS, _sizes_only(_max_pool_lip, None)),
    **dict.fromkeys(_ADAPTIVE_AVG, _sizes_only(_adaptive_lip, "linear")),
    **dict.fromkeys(_ADAPTIVE_MAX, _sizes_only(_adaptive_lip, None)),
    **dict.fromkeys(_ACTIVATIONS, _ACTIVATION_RULE),
    # Not differentiable where entries tie: refused by the curvature bound.
    **dict.fromkeys(_SORTS, ModuleRule(
        lambda module, in_shape, out_shape, layer_bound: _sort_lip(module, in_shape))),
    **dict.fromkeys(_PAD_MODES, _sizes_only(_pad_module_lip, "linear")),
    # Identity, flattening and (eval) dropout are linear: they only move entries.
    **dict.fromkeys(_ALIASING_MODULES, ModuleRule(_ACTIVATION_RULE.lipschitz, "linear")),
}


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
    return MODULE_RULES[_builtin_class(module)].lipschitz(
        module, in_shapes[0], out_shape, layer_bound)


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
