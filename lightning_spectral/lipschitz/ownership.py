"""Which modules a rule applies to: the user's rule registry and the check that a module
computes what the class owning the rule computes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .common import _BUILTIN, LipschitzRule

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


def _curvature_rule(module: nn.Module) -> CurvatureRule | None:
    klass = _owner(module, _CURVATURE_RULES)
    return _CURVATURE_RULES[klass] if klass is not None else None


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
    """True when neither a class between ``type(module)`` and ``klass`` nor the instance
    redefines a method of ``klass`` (or of its bases below ``nn.Module``) or the call
    machinery: the module then computes what ``klass`` computes, and a rule written for
    ``klass`` applies to it."""
    mro = type(module).__mro__
    defined = set(_CALL_NAMES)
    for base in klass.__mro__:
        if base in (nn.Module, object):
            break
        defined.update(name for name, value in vars(base).items() if _is_code(value))
    # An instance attribute (``module.forward = ...``) shadows the class' method too.
    for namespace in (*(vars(sub) for sub in mro[: mro.index(klass)]), vars(module)):
        for name, value in namespace.items():
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


def _overrides_a_rule(module: nn.Module) -> bool:
    """A subclass (or instance) of a class with a rule that does not behave as that class:
    it must be traced into, even where fx would keep a ``torch.nn`` class as a leaf."""
    return any(klass in _USER_RULES or klass in _BUILTIN for klass in type(module).__mro__)
