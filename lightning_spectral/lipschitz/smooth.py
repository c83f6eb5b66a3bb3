"""Curvature rules: ``C_v``, a bound on the Lipschitz constant of the Jacobian of input -> v.

Beside every Lipschitz rule sits a curvature rule (``NodeRule.curvature``, built in
:mod:`.rules` from the tables here). Three kinds:

* linear nodes (:data:`LINEAR`: sums, products and matmuls with constants, convolutions,
  BatchNorm, average pooling, padding, reshapes, slicing, concatenation, reductions): their
  Lipschitz rule applied to the inputs' curvature bounds (:meth:`_Walker.in_curvature`);
* smooth elementwise activations ``s`` with ``(g, h)`` = (sup ``|s'|``, Lipschitz constant of
  ``s'``): ``C_v = h L_u^2 + g C_u`` (the composition rule, below);
* everything else is refused (:class:`NonSmoothOperationError`).

Composition. For ``v = phi(u(x))``,
``Dv(x) - Dv(x') = [Dphi(u(x)) - Dphi(u(x'))] Du(x) + Dphi(u(x')) [Du(x) - Du(x')]``, whose
norm is at most ``C_phi L_u^2 ||x - x'|| + L_phi C_u ||x - x'||``. An elementwise ``s`` has
``Ds(u) = diag(s'(u))``, so ``L_phi = g`` and ``C_phi = h``.

Slack. torch's softplus with a finite threshold has no ``h`` (its derivative jumps). Its
*smooth twin* ``s~`` (:class:`~lightning_spectral.SmoothSoftplus`) has ``(g, h) = (1,
|beta| / 4)``, and ``|s - s~| <= e``, ``|s' - s~'| <= delta`` (``softplus_switch_slack``).
``C`` is computed for the twin network ``v~``; every node also carries ``E_v >= sup ||v - v~||``
and ``D_v >= sup ||Dv - Dv~||``, 0 wherever no switching softplus comes before. A linear node
maps both as it maps ``L`` (:meth:`_Walker.in_slack`). For ``v = s(u)`` (``n`` entries,
``v~ = s~(u~)``; a smooth ``s`` is its own twin, ``delta = e = 0``):
``||s(u) - s~(u~)|| <= ||s(u) - s~(u)|| + ||s~(u) - s~(u~)|| <= sqrt(n) e + g E_u``, and
``Dv - Dv~ = diag(s'(u)) (Du - Du~) + diag(s'(u) - s~'(u)) Du~ + diag(s~'(u) - s~'(u~)) Du~``,
with norm at most ``g D_u + delta L_u + h E_u L_u`` (``L_u`` bounds the twin's ``||Du~||``; a
diagonal matrix has the norm of its largest entry, and ``|s~'(a) - s~'(b)| <= h |a - b|``).
A registered ``(L, C)`` rule is the same map in both networks: ``delta = e = 0``.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..functional.activations import (
    NonSmoothActivationError,
    activation_curvature,
    activation_curvature_slack,
)
from .common import (
    _ADAPTIVE_MAX,
    _MAX_POOLS,
    NonSmoothOperationError,
    UnsupportedOperationError,
    _f64,
)
from .elementwise import _ADDS, _DROPOUTS, _MULS, _NEGS, _RELU_LIKE, _SIMPLE
from .layers import _CONV_FUNCS, _MATMULS, _POOL_FUNCS, _pool
from .modules import MODULE_RULES
from .ownership import _builtin_class, _curvature_rule, _user_rule
from .shapes import _SHAPE_FUNCS, _SHAPE_METHODS
from .tracing import _arg, _BatchDependent, _describe, _shape, _static

if TYPE_CHECKING:
    from .walk import _Walker

LINEAR = frozenset({
    *_ADDS, *_NEGS, *_MULS, *_DROPOUTS, *_MATMULS, *_CONV_FUNCS, F.linear, F.pad, F.batch_norm,
    operator.getitem, torch.flatten, *_SHAPE_METHODS, *_SHAPE_FUNCS, torch.cat, torch.concat,
    torch.stack, torch.mean, torch.sum, "mean", "sum",
})
"""Targets whose node is a linear map of its input-dependent arguments (the Lipschitz rule
refuses the non-linear uses: products of two dependent tensors, division by one, ...)."""

# Parameters (after the input) of functional activations that change their constants.
_PARAMS: dict[Any, tuple[tuple[str, Any], ...]] = {
    F.softplus: (("beta", 1.0), ("threshold", 20.0)), F.elu: (("alpha", 1.0),),
    F.celu: (("alpha", 1.0),), F.gelu: (("approximate", "none"),),
}


def refusal(node: fx.Node, why: str) -> NonSmoothOperationError:
    advice = "" if "Replace it by" in why else (
        ". The curvature bound needs every nonlinearity smooth (a Lipschitz derivative): use "
        "e.g. lightning_spectral.SmoothSoftplus, nn.Tanh, nn.SiLU, nn.GELU or nn.CELU instead "
        "of ReLU-like activations, and average pooling or a strided convolution instead of "
        "max pooling")
    return NonSmoothOperationError(
        f"no curvature bound for {_describe(node)} at node '{node.name}': {why}{advice}")


def why_refused(target: Any) -> str:
    """What the activation table says about ``target``, else that no rule exists."""
    return _jump(target) or "no curvature rule for it"


def _jump(target: Any, **params: Any) -> str | None:
    """The activation table's refusal of a target whose derivative jumps, else None."""
    try:
        activation_curvature(target, **params)
    except NonSmoothActivationError as err:
        return str(err)
    except (ValueError, TypeError):
        pass
    return None


def known_jump(w: _Walker, node: fx.Node) -> str | None:
    """Why ``node`` has no curvature bound, when the activation table knows its derivative
    jumps (ReLU, ``abs``, max pooling, ...); None otherwise."""
    if node.op == "call_module":
        return _jump(_without_hooks(w.gm.get_submodule(node.target)))
    if node.op == "call_method":
        return _jump(node.target.rstrip("_"))
    if node.op != "call_function":
        return None
    try:  # the node's own parameters: softplus(beta=0) is invalid, not the default's jump
        params = _params(node, node.target)
    except (KeyError, _BatchDependent):
        return None
    return _jump(node.target, **params)


def _params(node: fx.Node, t: Any) -> dict[str, Any]:
    return {name: _static(_arg(node, i, name, default))
            for i, (name, default) in enumerate(_PARAMS.get(t, ()), start=1)}


def _constants(node: fx.Node, t: Any) -> tuple[float, float, float, float]:
    """``(g, h, delta, e)`` of a functional activation (see ``activation_curvature_slack``)."""
    try:
        constants = activation_curvature_slack(t, **_params(node, t))
    except NonSmoothActivationError as err:
        raise refusal(node, str(err)) from err
    except ValueError as err:  # invalid parameters (beta = 0, ...)
        raise UnsupportedOperationError(
            f"no curvature bound for {_describe(node)} at node '{node.name}': {err}") from err
    if constants is None:
        raise refusal(node, "no curvature constants are known for it")
    return constants


def _compose(g: float | Tensor, h: float | Tensor, lip_in: Tensor, curv_in: Tensor) -> Tensor:
    """``(L_phi, C_phi) = (g, h)`` after an input with ``(L_u, C_u)``: ``h L_u^2 + g C_u``."""
    return h * lip_in.square() + g * curv_in


def _activation(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    """``s(u)``; an input that broadcasting repeats (``sqrt(r)``-fold) enters as ``R u`` with
    ``||R|| = sqrt(r)``: ``(sqrt(r) L_u, sqrt(r) C_u)``."""
    w.only_first_dependent(node)
    g, h, _, _ = _constants(node, t)
    x = node.args[0]
    r = w.spread(x, node)
    return _compose(g, h, r * w.lipschitz(x), r * w.C(x))


def _compose_slack(g: float | Tensor, h: float | Tensor, delta: float, e: float, n: int,
                   lip_in: Tensor, value_in: Tensor, jacobian_in: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """``(E_v, D_v)`` of ``v = s(u)`` (twin ``v~ = s~(u~)``, ``n`` entries per sample):
    ``(g E_u + sqrt(n) e, g D_u + (delta + h E_u) L_u)``; see the module docstring."""
    value = g * value_in + math.sqrt(n) * e
    jacobian = g * jacobian_in + (delta + h * value_in) * lip_in
    return _f64(value), _f64(jacobian)


def _entries(node: fx.Node) -> int:
    shape = _shape(node)
    if shape is None or len(shape) < 1:
        raise refusal(node, "its output shape is unknown")
    return math.prod(shape[1:])


def switches(w: _Walker, node: fx.Node) -> bool:
    """Whether ``node`` may be a softplus that switches to the identity (its twin differs)."""
    if node.op == "call_module":
        return isinstance(w.gm.get_submodule(node.target), nn.Softplus)
    return node.op == "call_function" and node.target is F.softplus


def call_slack(w: _Walker, node: fx.Node, t: Any) -> tuple[Tensor, Tensor]:
    """``(E, D)`` of a non-linear function / method node (after its curvature rule)."""
    if t in _POOL_FUNCS:  # average pooling: linear (max pooling was refused)
        return w.in_slack(_pool, w, node, t)
    if TABLE.get(t) is not _activation:
        raise refusal(node, "no slack rule for it")  # pragma: no cover (the tables agree)
    g, h, delta, e = _constants(node, t)
    x = node.args[0]
    r = w.spread(x, node)
    return _compose_slack(g, h, delta, e, _entries(node), r * w.lipschitz(x),
                          r * w.E(x), r * w.D(x))


def module_slack(w: _Walker, node: fx.Node) -> tuple[Tensor, Tensor]:
    """``(E, D)`` of a leaf module's node (after :func:`module_curvature` accepted it)."""
    module = w.gm.get_submodule(node.target)
    args = [a for a in (*node.args, *node.kwargs.values()) if _shape(a) is not None]
    lip_in = w.lipschitz(args)
    value_in, jacobian_in = w.E(args), w.D(args)
    rule = _curvature_rule(module)
    if rule is not None:  # the same module in both networks, with (L, C) as registered
        lip, curv = _checked_pair(node, rule(module, [torch.Size(_shape(a)[1:]) for a in args]))
        return _compose_slack(lip, curv, 0.0, 0.0, 1, lip_in, value_in, jacobian_in)
    if MODULE_RULES[_builtin_class(module)].curvature == "linear":
        return w.in_slack(w.visit_module, node)
    g, h, delta, e = _module_constants(node, module)
    return _compose_slack(g, h, delta, e, _entries(node), lip_in, value_in, jacobian_in)


def _pool_curvature(w: _Walker, node: fx.Node, t: Any) -> Tensor:
    klass = _POOL_FUNCS[t][0]
    if klass in _MAX_POOLS or klass in _ADAPTIVE_MAX:
        raise refusal(node, why_refused(F.max_pool2d))
    return w.in_curvature(_pool, w, node, t)


TABLE = {
    **dict.fromkeys(_RELU_LIKE | set(_SIMPLE), _activation),
    **dict.fromkeys(_POOL_FUNCS, _pool_curvature),
}
"""Curvature rules of the non-linear function / method targets (all others: :data:`LINEAR`)."""


def module_curvature(w: _Walker, node: fx.Node) -> Tensor:
    """``C`` of a leaf module's node: a registered curvature rule, a linear built-in (its
    Lipschitz rule on the curvature bounds) or a smooth activation; else refused."""
    module = w.gm.get_submodule(node.target)
    args = [a for a in (*node.args, *node.kwargs.values()) if _shape(a) is not None]
    rule = _curvature_rule(module)
    if rule is not None:
        lip, curv = _checked_pair(node, rule(module, [torch.Size(_shape(a)[1:]) for a in args]))
        return _compose(lip, curv, w.lipschitz(args), w.C(args))
    if _user_rule(module) is not None:
        raise refusal(node, f"{type(module).__name__} has a registered Lipschitz rule but no "
                            "curvature rule; add one with register_curvature_rule")
    klass = _builtin_class(module)
    if klass is None:
        raise refusal(node, f"no rule for module type {type(module).__name__}; register one "
                            "with lightning_spectral.register_curvature_rule")
    kind = MODULE_RULES[klass].curvature
    if kind == "linear":
        return w.in_curvature(w.visit_module, node)
    if kind is None:  # max pooling, GroupSort, MaxMin: the activation table says why
        raise refusal(node, why_refused(_without_hooks(module)))
    g, h, _, _ = _module_constants(node, module)
    return _compose(g, h, w.lipschitz(args), w.C(args))


def _without_hooks(module: nn.Module) -> nn.Module:
    """A shallow copy without forward hooks: the trace has checked that hooks leave the
    output alone, and the activation table refuses any hooked module."""
    bare = copy.copy(module)
    bare._forward_hooks = OrderedDict()
    bare._forward_pre_hooks = OrderedDict()
    return bare


def _module_constants(node: fx.Node, module: nn.Module) -> tuple[float, float, float, float]:
    try:
        constants = activation_curvature_slack(_without_hooks(module))
    except NonSmoothActivationError as err:
        raise refusal(node, str(err)) from err
    except ValueError as err:  # invalid parameters
        raise UnsupportedOperationError(
            f"no curvature bound for {_describe(node)} at node '{node.name}': {err}") from err
    if constants is None:
        raise refusal(node, f"no curvature constants for {type(module).__name__}")
    return constants


def _checked_pair(node: fx.Node, value: Any) -> tuple[Tensor, Tensor]:
    try:
        lip, curv = (_f64(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the curvature rule of node '{node.name}' must return a pair "
                         f"(L, C) of numbers, got {value!r}") from exc
    if not (bool(torch.isfinite(lip)) and bool(torch.isfinite(curv))
            and bool(lip >= 0) and bool(curv >= 0)):
        raise ValueError(f"the curvature rule of node '{node.name}' returned {value!r}: both "
                         "bounds must be finite and >= 0")
    return lip, curv
