"""Activations: their Lipschitz, curvature and slack rules, and the curvature composition.

``C_v`` bounds the Lipschitz constant of the Jacobian of input -> v. Beside every Lipschitz
rule sits a curvature rule (``NodeRule.curvature``, see :mod:`.base`). Three kinds:

* linear nodes (``NodeRule.linear``: sums, products and matmuls with constants, convolutions,
  BatchNorm, average pooling, padding, reshapes, slicing, concatenation, reductions): their
  Lipschitz rule applied to the inputs' curvature bounds (``Walker.in_curvature``);
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
maps both as it maps ``L`` (``Walker.in_slack``). For ``v = s(u)`` (``n`` entries,
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
from collections import OrderedDict
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ...functional.activations import (
    GELU_LIP,
    HARDSWISH_LIP,
    MISH_LIP,
    SELU_LIP,
    SILU_LIP,
    NonSmoothActivationError,
    activation_curvature,
    activation_curvature_slack,
)
from ..common import NonSmoothOperationError, UnsupportedOperationError, check_softplus, f64
from ..tracing import BatchDependent, describe, node_arg, refuse, shape_of, static, submodule
from .base import NodeRule, Walk, rules_for
from .elementwise import elementwise

__all__ = [
    "RELU_LIKE", "SIMPLE", "TABLE", "checked_pair", "compose", "compose_slack",
    "entries", "known_jump", "module_constants", "refusal", "switches", "why_refused",
    "without_hooks",
]

# 1-Lipschitz, up to the parameters read in _relu_like_lip.
RELU_LIKE = {
    F.relu, torch.relu, F.relu6, F.hardtanh, torch.tanh, F.tanh, F.softplus, F.elu, F.celu,
    torch.clamp, torch.clip, F.softsign, F.tanhshrink, F.leaky_relu,
    "relu", "tanh", "clamp", "clip", "clamp_min", "clamp_max",
}
# Lipschitz constants of the activations without parameters (from ..functional.activations).
SIMPLE = {torch.sigmoid: 0.25, F.sigmoid: 0.25, F.gelu: GELU_LIP, F.silu: SILU_LIP,
          F.mish: MISH_LIP, F.selu: SELU_LIP, F.hardswish: HARDSWISH_LIP,
          F.hardsigmoid: 1.0 / 6.0, "sigmoid": 0.25, torch.special.expit: 0.25,
          F.logsigmoid: 1.0}  # logsigmoid(x) = -softplus(-x): derivative sigmoid(-x) in (0, 1)

def _relu_like_lip(node: fx.Node, t: Any) -> float:
    if t is F.elu:  # slope alpha * exp(x) for x < 0
        return max(1.0, abs(float(static(node_arg(node, 1, "alpha", 1.0)))))
    if t is F.celu:  # slope exp(x / alpha) for x < 0: <= 1 iff alpha > 0
        alpha = float(static(node_arg(node, 1, "alpha", 1.0)))
        if not alpha > 0:
            raise refuse(node, f"celu with alpha={alpha} <= 0 is not Lipschitz")
    if t is F.softplus:
        try:
            check_softplus(float(static(node_arg(node, 1, "beta", 1.0))),
                            float(static(node_arg(node, 2, "threshold", 20.0))))
        except UnsupportedOperationError as exc:
            raise refuse(node, str(exc)) from exc
    if t is F.leaky_relu:
        return max(1.0, abs(float(static(node_arg(node, 1, "negative_slope", 0.01)))))
    return 1.0


def _relu_like(w: Walk, node: fx.Node, t: Any) -> Tensor:
    return elementwise(w, node, _relu_like_lip(node, t))


def _simple(w: Walk, node: fx.Node, t: Any) -> Tensor:
    return elementwise(w, node, SIMPLE[t])


# Parameters (after the input) of functional activations that change their constants.
_PARAMS: dict[Any, tuple[tuple[str, Any], ...]] = {
    F.softplus: (("beta", 1.0), ("threshold", 20.0)), F.elu: (("alpha", 1.0),),
    F.celu: (("alpha", 1.0),), F.gelu: (("approximate", "none"),),
}


def refusal(node: fx.Node, why: str) -> NonSmoothOperationError:
    """The curvature bound's error refusing ``node`` (to raise), with advice."""
    advice = "" if "Replace it by" in why else (
        ". The curvature bound needs every nonlinearity smooth (a Lipschitz derivative): use "
        "e.g. lightning_spectral.SmoothSoftplus, nn.Tanh, nn.SiLU, nn.GELU or nn.CELU instead "
        "of ReLU-like activations, and average pooling or a strided convolution instead of "
        "max pooling")
    return NonSmoothOperationError(
        f"no curvature bound for {describe(node)} at node '{node.name}': {why}{advice}")


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


def known_jump(w: Walk, node: fx.Node) -> str | None:
    """Why ``node`` has no curvature bound, when the activation table knows its derivative
    jumps (ReLU, ``abs``, max pooling, ...); None otherwise."""
    if node.op == "call_module":
        return _jump(without_hooks(submodule(w.gm, node)))
    if node.op == "call_method":
        return _jump(cast(str, node.target).rstrip("_"))
    if node.op != "call_function":
        return None
    try:  # the node's own parameters: softplus(beta=0) is invalid, not the default's jump
        params = _params(node, node.target)
    except (KeyError, BatchDependent):
        return None
    return _jump(node.target, **params)


def _params(node: fx.Node, t: Any) -> dict[str, Any]:
    return {name: static(node_arg(node, i, name, default))
            for i, (name, default) in enumerate(_PARAMS.get(t, ()), start=1)}


def _constants(node: fx.Node, t: Any) -> tuple[float, float, float, float]:
    """``(g, h, delta, e)`` of a functional activation (see ``activation_curvature_slack``)."""
    try:
        constants = activation_curvature_slack(t, **_params(node, t))
    except NonSmoothActivationError as err:
        raise refusal(node, str(err)) from err
    except ValueError as err:  # invalid parameters (beta = 0, ...)
        raise UnsupportedOperationError(
            f"no curvature bound for {describe(node)} at node '{node.name}': {err}") from err
    if constants is None:
        raise refusal(node, "no curvature constants are known for it")
    return constants


def compose(g: float | Tensor, h: float | Tensor, lip_in: Tensor, curv_in: Tensor) -> Tensor:
    """``(L_phi, C_phi) = (g, h)`` after an input with ``(L_u, C_u)``: ``h L_u^2 + g C_u``."""
    return h * lip_in.square() + g * curv_in


def _activation(w: Walk, node: fx.Node, t: Any) -> Tensor:
    """``s(u)``; an input that broadcasting repeats (``sqrt(r)``-fold) enters as ``R u`` with
    ``||R|| = sqrt(r)``: ``(sqrt(r) L_u, sqrt(r) C_u)``."""
    w.only_first_dependent(node)
    g, h, _, _ = _constants(node, t)
    x = node.args[0]
    r = w.spread(x, node)
    return compose(g, h, r * w.lipschitz(x), r * w.C(x))


def compose_slack(g: float | Tensor, h: float | Tensor, delta: float, e: float, n: int,
                   lip_in: Tensor, value_in: Tensor, jacobian_in: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """``(E_v, D_v)`` of ``v = s(u)`` (twin ``v~ = s~(u~)``, ``n`` entries per sample):
    ``(g E_u + sqrt(n) e, g D_u + (delta + h E_u) L_u)``; see the module docstring."""
    value = g * value_in + math.sqrt(n) * e
    jacobian = g * jacobian_in + (delta + h * value_in) * lip_in
    return f64(value), f64(jacobian)


def entries(node: fx.Node) -> int:
    """The number of entries of one sample of ``node``'s output."""
    shape = shape_of(node)
    if shape is None or len(shape) < 1:
        raise refusal(node, "its output shape is unknown")
    return math.prod(shape[1:])


def switches(w: Walk, node: fx.Node) -> bool:
    """Whether ``node`` may be a softplus that switches to the identity (its twin differs)."""
    if node.op == "call_module":
        return isinstance(submodule(w.gm, node), nn.Softplus)
    return node.op == "call_function" and node.target is F.softplus


def _activation_slack(w: Walk, node: fx.Node, t: Any) -> tuple[Tensor, Tensor]:
    """``(E, D)`` of an activation node (after its curvature rule): see the module docstring."""
    g, h, delta, e = _constants(node, t)
    x = node.args[0]
    r = w.spread(x, node)
    return compose_slack(g, h, delta, e, entries(node), r * w.lipschitz(x),
                          r * w.E(x), r * w.D(x))


def without_hooks(module: nn.Module) -> nn.Module:
    """A shallow copy without forward hooks: the trace has checked that hooks leave the
    output alone, and the activation table refuses any hooked module."""
    bare = copy.copy(module)
    bare._forward_hooks = OrderedDict()
    bare._forward_pre_hooks = OrderedDict()
    return bare


def module_constants(node: fx.Node, module: nn.Module) -> tuple[float, float, float, float]:
    """``(g, h, delta, e)`` of a smooth activation module (see ``activation_curvature_slack``)."""
    try:
        constants = activation_curvature_slack(without_hooks(module))
    except NonSmoothActivationError as err:
        raise refusal(node, str(err)) from err
    except ValueError as err:  # invalid parameters
        raise UnsupportedOperationError(
            f"no curvature bound for {describe(node)} at node '{node.name}': {err}") from err
    if constants is None:
        raise refusal(node, f"no curvature constants for {type(module).__name__}")
    return constants


def checked_pair(node: fx.Node, value: Any) -> tuple[Tensor, Tensor]:
    """A registered curvature rule's ``(L, C)``, checked to be two finite numbers >= 0."""
    try:
        lip, curv = (f64(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the curvature rule of node '{node.name}' must return a pair "
                         f"(L, C) of numbers, got {value!r}") from exc
    if not (bool(torch.isfinite(lip)) and bool(torch.isfinite(curv))
            and bool(lip >= 0) and bool(curv >= 0)):
        raise ValueError(f"the curvature rule of node '{node.name}' returned {value!r}: both "
                         "bounds must be finite and >= 0")
    return lip, curv


_ACTIVATION = NodeRule(_relu_like, _activation, _activation_slack)
TABLE: dict[Any, NodeRule] = {
    **rules_for(RELU_LIKE, _ACTIVATION),
    **rules_for(SIMPLE, NodeRule(_simple, _activation, _activation_slack)),
}
"""The activation targets and their rules (the ReLU-like ones are refused by
:func:`_constants`, which says why)."""
