"""Rules of leaf modules (the built-in types, and the registered ones): their Lipschitz
rule, and beside it how the curvature bound treats them (:class:`ModuleRule`), with the
curvature and slack of a module's node."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, fx, nn

from ..common import (
    ACTIVATIONS,
    ADAPTIVE_AVG,
    ADAPTIVE_MAX,
    ALIASING_MODULES,
    AVG_POOLS,
    BN_TYPES,
    CONST_LIP,
    LAYER_TYPES,
    MAX_POOLS,
    ONE_LIP,
    PAD_MODES,
    SORTS,
    LayerBound,
    UnsupportedOperationError,
    check_softplus,
    f64,
)
from ..ownership import builtin_class, curvature_rule, owner, rule_class, user_rule
from ..tracing import known_shape, shape_of, submodule
from .base import Walk
from .layers import bn_scale, layer_bound_of, pad_lip
from .pooling import adaptive_lip, avg_pool_lip, max_pool_lip
from .smooth import (
    checked_pair,
    compose,
    compose_slack,
    entries,
    module_constants,
    refusal,
    why_refused,
    without_hooks,
)

__all__ = ["MODULE_RULES", "ModuleRule", "module_curvature", "module_lip", "module_slack"]


def _activation_lip(module: nn.Module) -> float:
    """Lipschitz constant of an elementwise activation module (one of ``ACTIVATIONS``)."""
    if isinstance(module, nn.CELU) and not module.alpha > 0:
        # x < 0: alpha (exp(x / alpha) - 1), slope exp(x / alpha), unbounded for alpha < 0.
        raise UnsupportedOperationError(f"nn.CELU with alpha={module.alpha} <= 0 is not Lipschitz")
    if isinstance(module, nn.Softplus):
        check_softplus(module.beta, module.threshold)
    if isinstance(module, ONE_LIP):
        return 1.0
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.PReLU):
        return max(1.0, float(module.weight.detach().abs().max()))
    if isinstance(module, nn.ELU):  # slope alpha * exp(x) for x < 0
        return max(1.0, abs(module.alpha))
    return CONST_LIP[cast(type, owner(module, CONST_LIP))]  # one of ACTIVATIONS


def _sort_lip(module: nn.Module, in_shape: torch.Size) -> Tensor:
    """GroupSort / MaxMin: 1 (a permutation on each of finitely many cones covering the
    space, continuous across them; see :mod:`lightning_spectral.activations`), provided the
    channel axis is not the batch axis (sorting across samples is not a per-sample map)."""
    if cast(int, module.dim) % len(in_shape) == 0:
        raise UnsupportedOperationError(
            f"{type(module).__name__}(dim={module.dim}) sorts along the batch axis: it mixes "
            "the samples"
        )
    return f64(1.0)


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
    pad = [int(p) for p in cast("Sequence[int]", module.padding)]
    if len(pad) // 2 >= len(in_shape):
        raise UnsupportedOperationError(f"{type(module).__name__} pads the batch axis")
    return f64(pad_lip(in_shape, pad, PAD_MODES[rule_class(module)]))


_ACTIVATION_RULE = ModuleRule(
    lambda module, in_shape, out_shape, layer_bound: f64(_activation_lip(module)), "smooth")

MODULE_RULES: dict[type, ModuleRule] = {
    **dict.fromkeys(LAYER_TYPES, ModuleRule(
        lambda module, in_shape, out_shape, layer_bound: layer_bound_of(
            module, in_shape, layer_bound), "linear")),
    **dict.fromkeys(BN_TYPES, ModuleRule(
        lambda module, in_shape, out_shape, layer_bound: f64(bn_scale(module).abs().max()),
        "linear")),
    **dict.fromkeys(AVG_POOLS, _sizes_only(avg_pool_lip, "linear")),
    **dict.fromkeys(MAX_POOLS, _sizes_only(max_pool_lip, None)),
    **dict.fromkeys(ADAPTIVE_AVG, _sizes_only(adaptive_lip, "linear")),
    **dict.fromkeys(ADAPTIVE_MAX, _sizes_only(adaptive_lip, None)),
    **dict.fromkeys(ACTIVATIONS, _ACTIVATION_RULE),
    # Not differentiable where entries tie: refused by the curvature bound.
    **dict.fromkeys(SORTS, ModuleRule(
        lambda module, in_shape, out_shape, layer_bound: _sort_lip(module, in_shape))),
    **dict.fromkeys(PAD_MODES, _sizes_only(_pad_module_lip, "linear")),
    # Identity, flattening and (eval) dropout are linear: they only move entries.
    **dict.fromkeys(ALIASING_MODULES, ModuleRule(_ACTIVATION_RULE.lipschitz, "linear")),
}


def module_lip(
    module: nn.Module,
    in_shapes: list[torch.Size],
    out_shape: torch.Size | None,
    layer_bound: LayerBound,
) -> Tensor:
    """``K`` for one call of a leaf module; shapes are batched (as propagated)."""
    rule = user_rule(module)
    if rule is not None:
        return f64(rule(module, [torch.Size(s[1:]) for s in in_shapes]))
    if builtin_class(module) is None:
        name = f"{type(module).__module__}.{type(module).__name__}"
        raise UnsupportedOperationError(
            f"no Lipschitz rule for module type {name}; register one with "
            "lightning_spectral.register_lipschitz_rule(type, fn)"
        )
    _check_single_io(module, in_shapes, out_shape)
    return MODULE_RULES[rule_class(module)].lipschitz(  # out_shape: checked above
        module, in_shapes[0], cast(torch.Size, out_shape), layer_bound)


def module_slack(w: Walk, node: fx.Node) -> tuple[Tensor, Tensor]:
    """``(E, D)`` of a leaf module's node (after :func:`module_curvature` accepted it)."""
    module = submodule(w.gm, node)
    args = [a for a in (*node.args, *node.kwargs.values()) if shape_of(a) is not None]
    lip_in = w.lipschitz(args)
    value_in, jacobian_in = w.E(args), w.D(args)
    rule = curvature_rule(module)
    if rule is not None:  # the same module in both networks, with (L, C) as registered
        lip, curv = checked_pair(node, rule(module, [torch.Size(known_shape(a)[1:]) for a in args]))
        return compose_slack(lip, curv, 0.0, 0.0, 1, lip_in, value_in, jacobian_in)
    if MODULE_RULES[rule_class(module)].curvature == "linear":
        return w.in_slack(w.visit_module, node)
    g, h, delta, e = module_constants(node, module)
    return compose_slack(g, h, delta, e, entries(node), lip_in, value_in, jacobian_in)


def module_curvature(w: Walk, node: fx.Node) -> Tensor:
    """``C`` of a leaf module's node: a registered curvature rule, a linear built-in (its
    Lipschitz rule on the curvature bounds) or a smooth activation; else refused."""
    module = submodule(w.gm, node)
    args = [a for a in (*node.args, *node.kwargs.values()) if shape_of(a) is not None]
    rule = curvature_rule(module)
    if rule is not None:
        lip, curv = checked_pair(node, rule(module, [torch.Size(known_shape(a)[1:]) for a in args]))
        return compose(lip, curv, w.lipschitz(args), w.C(args))
    if user_rule(module) is not None:
        raise refusal(node, f"{type(module).__name__} has a registered Lipschitz rule but no "
                            "curvature rule; add one with register_curvature_rule")
    klass = builtin_class(module)
    if klass is None:
        raise refusal(node, f"no rule for module type {type(module).__name__}; register one "
                            "with lightning_spectral.register_curvature_rule")
    kind = MODULE_RULES[klass].curvature
    if kind == "linear":
        return w.in_curvature(w.visit_module, node)
    if kind is None:  # max pooling, GroupSort, MaxMin: the activation table says why
        raise refusal(node, why_refused(without_hooks(module)))
    g, h, _, _ = module_constants(node, module)
    return compose(g, h, w.lipschitz(args), w.C(args))
