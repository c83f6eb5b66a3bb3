"""Which modules a rule applies to: the user's rule registry and the check that a module
computes what the class owning the rule computes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..functional.modules import behaves_as
from .common import BUILTIN, LipschitzRule

__all__ = [
    "CurvatureRule", "builtin_class", "curvature_rule", "has_rule", "overrides_a_rule", "owner",
    "register_curvature_rule", "register_lipschitz_rule", "rule_class", "unregister_curvature_rule",
    "unregister_lipschitz_rule", "user_rule",
]

_USER_RULES: dict[type, LipschitzRule] = {}

CurvatureRule = Callable[[nn.Module, list[torch.Size]], "tuple[Tensor | float, Tensor | float]"]
"""``fn(module, input_shapes) -> (L, C)``: upper bounds on the l2 Lipschitz constant ``L`` of
the module as a map of (the concatenation of) its tensor inputs, and on the Lipschitz constant
``C`` of its Jacobian: ``||DM(u) - DM(u')||_2 <= C ||u - u'||``. ``input_shapes`` as for
:data:`LipschitzRule`."""

_CURVATURE_RULES: dict[type, CurvatureRule] = {}


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


def register_curvature_rule(module_type: type[nn.Module], rule: CurvatureRule) -> None:
    """Teach :func:`network_curvature_bound` (and :func:`network_lipschitz_bound`) a module
    type.

    ``rule(module, input_shapes)`` must return ``(L, C)``: guaranteed upper bounds on the
    module's l2 Lipschitz constant and on the Lipschitz constant of its Jacobian, w.r.t. its
    tensor inputs (jointly), in eval mode. The walk composes them with the bounds
    ``(L_u, C_u)`` of the inputs as ``(L L_u, C L_u^2 + L C_u)``. The same rule serves the
    Lipschitz bound (its ``L``), so this also registers a Lipschitz rule for the type; a later
    :func:`register_lipschitz_rule` replaces that part only. Subclasses that redefine a method
    of ``module_type`` are traced into, as for :func:`register_lipschitz_rule`.
    """
    if not callable(rule):
        raise TypeError(f"rule must be callable, got {rule!r}")
    register_lipschitz_rule(module_type, _lipschitz_part(rule))
    _CURVATURE_RULES[module_type] = rule


def unregister_curvature_rule(module_type: type[nn.Module]) -> None:
    """Remove a rule added by :func:`register_curvature_rule`, and the Lipschitz rule it
    registered unless that was replaced since (no error if absent)."""
    rule = _CURVATURE_RULES.pop(module_type, None)
    lip = _USER_RULES.get(module_type)
    if rule is not None and getattr(lip, "curvature_rule", None) is rule:
        _USER_RULES.pop(module_type)


def _lipschitz_part(rule: CurvatureRule) -> LipschitzRule:
    def lipschitz(module: nn.Module, shapes: list[torch.Size]) -> Tensor | float:
        return rule(module, shapes)[0]

    lipschitz.curvature_rule = rule  # type: ignore[attr-defined]  # for unregister
    return lipschitz


def curvature_rule(module: nn.Module) -> CurvatureRule | None:
    """The registered curvature rule that applies to ``module`` (see :func:`owner`), if any."""
    klass = owner(module, _CURVATURE_RULES)
    return _CURVATURE_RULES[klass] if klass is not None else None


def owner(module: nn.Module, table: Any) -> type | None:
    """The first class of ``type(module)``'s MRO in ``table`` if ``module`` behaves as it
    (:func:`~lightning_spectral.functional.modules.behaves_as`)."""
    for klass in type(module).__mro__:
        if klass in table:
            return klass if behaves_as(module, klass) else None
    return None


def user_rule(module: nn.Module) -> LipschitzRule | None:
    """The registered Lipschitz rule that applies to ``module`` (see :func:`owner`), if any."""
    klass = owner(module, _USER_RULES)
    return _USER_RULES[klass] if klass is not None else None


def builtin_class(module: nn.Module) -> type | None:
    """The class whose built-in rule applies to ``module``, if any."""
    return owner(module, BUILTIN)


def rule_class(module: nn.Module) -> type:
    """:func:`builtin_class` of a module the caller knows to have a built-in rule."""
    return cast(type, builtin_class(module))


def has_rule(module: nn.Module) -> bool:
    """Whether a registered or built-in rule applies to ``module`` (a leaf of the trace)."""
    return user_rule(module) is not None or builtin_class(module) is not None


def overrides_a_rule(module: nn.Module) -> bool:
    """A subclass (or instance) of a class with a rule that does not behave as that class:
    it must be traced into, even where fx would keep a ``torch.nn`` class as a leaf."""
    return any(klass in _USER_RULES or klass in BUILTIN for klass in type(module).__mro__)
