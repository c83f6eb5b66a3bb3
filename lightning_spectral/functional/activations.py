"""Curvature constants ``(g, h)`` of elementwise activations, and the smooth Softplus.

For an elementwise activation ``s``, ``g = sup |s'|`` is its Lipschitz constant and ``h`` the
Lipschitz constant of ``s'``; a network's curvature bound is built from these (see
:mod:`.curvature_radius`). :func:`activation_curvature` reads them from a table of exact suprema
rounded up, and refuses activations whose derivative jumps (:class:`NonSmoothActivationError`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import GroupSort, MaxMin
from .modules import behaves_as

__all__ = [
    "GELU_LIP",
    "HARDSWISH_LIP",
    "MISH_LIP",
    "NonSmoothActivationError",
    "SELU_LIP",
    "SILU_LIP",
    "SmoothSoftplus",
    "activation_curvature",
    "activation_curvature_slack",
    "activation_slope",
]

# ----------------------------------------------------------------------------------------
# Activation constants (g, h): g = sup |s'|, h = Lipschitz constant of s' (= sup |s''|).
# Every constant below is the exact supremum rounded UP in its 8th significant digit; the
# derivation (where the supremum is attained) is in the docstring of activation_curvature.
# ----------------------------------------------------------------------------------------
_TANH_H = 0.76980036  # 4 / (3 sqrt 3) = 0.769800358919501...
_SIGMOID_H = 0.096225045  # 1 / (6 sqrt 3) = 0.0962250448649376...
_GELU_ERF_G = 1.1289042  # Phi(sqrt 2) + sqrt(2) phi(sqrt 2) = 1.12890414518515...
_GELU_TANH_G = 1.1289931  # at x = 1.418504: 1.12899306865877...
_GELU_H = 0.79788457  # sqrt(2 / pi) = 0.797884560802865... (both GELU forms, at x = 0)
_SILU_G = 1.0998394  # at x = 2.399357: 1.09983932012886...
_SILU_H = 0.5  # exact, at x = 0
_MISH_G = 1.0884982  # at x = 1.490571: 1.08849816125172...
_MISH_H = 0.64420464  # at x = -0.0879344: 0.644204637236972...
_SOFTSIGN_H = 2.0  # exact, one-sided limit at x = 0

# Lipschitz constants (maximum of |d/dx act(x)|) the network bound uses, rounded UP (a smaller
# constant would void the guarantee); coarser than the g above, and kept so (the bounds the
# walk reports are computed with these).
# GELU: d/dx x Phi(x) = Phi(x) + x phi(x), extreme where phi(x)(2 - x^2) = 0, i.e. x = +-sqrt(2):
# Phi(sqrt 2) + sqrt(2) phi(sqrt 2) = 1.128904 (the tanh approximation peaks at 1.128993).
GELU_LIP = 1.13
# SiLU: d/dx x s(x) = s(x) (1 + x (1 - s(x))), maximal at x = 2.3994: 1.099839.
SILU_LIP = 1.1
# Mish: sup of the derivative 1.088498 (near x = 1.2).
MISH_LIP = 1.09
# SELU: the slope for x -> 0^- is scale * alpha = 1.0507009873554805 * 1.6732632423543772.
SELU_LIP = 1.7581
# Hardswish: (2x + 3) / 6 on [-3, 3] reaches 1.5 at x = 3.
HARDSWISH_LIP = 1.5


class NonSmoothActivationError(ValueError):
    """The activation's derivative is not Lipschitz (it jumps), so no curvature bound exists."""


class SmoothSoftplus(nn.Module):
    """``log(1 + exp(beta x)) / beta`` for every ``x``, with no switch to the identity.

    ``nn.Softplus`` returns ``x`` itself above ``threshold / beta``, which makes both the
    function and its derivative jump there (see :func:`activation_curvature`). This module
    evaluates the same exact formula everywhere as ``logaddexp(beta x, 0) / beta``, which
    does not overflow. Curvature constants: ``g = 1``, ``h = beta / 4``.
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"SmoothSoftplus needs a finite beta > 0, got {beta}")
        self.beta = float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return torch.logaddexp(self.beta * x, torch.zeros_like(x)) / self.beta

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


_REPLACEMENTS = (
    "a smooth activation, e.g. lightning_spectral.functional.SmoothSoftplus, nn.Tanh, "
    "nn.SiLU, nn.GELU or nn.CELU"
)


def _refuse(name: str, why: str, fix: str = _REPLACEMENTS) -> NonSmoothActivationError:
    return NonSmoothActivationError(
        f"{name}: {why}, so its derivative is not Lipschitz and no curvature bound exists. "
        f"Replace it by {fix}"
    )


def _softplus(beta: float = 1.0, threshold: float = 20.0) -> tuple[float, float]:
    if not (math.isfinite(beta) and beta != 0):
        raise ValueError(f"Softplus: curvature constants need a finite beta != 0, got {beta}")
    if math.isfinite(threshold):
        jump = 1.0 / (1.0 + math.exp(threshold))  # 1 - sigmoid(threshold)
        side = ">" if beta > 0 else "<"
        raise _refuse(
            f"Softplus(beta={beta}, threshold={threshold})",
            f"it returns x itself for x {side} threshold / beta = {threshold / beta:g}, where its "
            f"derivative jumps from sigmoid(threshold) to 1 (by {jump:.3g}) and its value by "
            "log1p(exp(-threshold)) / beta",
            f"lightning_spectral.functional.SmoothSoftplus(beta={beta}) (the same formula with "
            "no switch to the identity)",
        )
    return 1.0, abs(beta) / 4.0  # division by 4 is exact in binary floating point


def _elu(alpha: float = 1.0) -> tuple[float, float]:
    if alpha != 1.0:
        raise _refuse(
            f"ELU(alpha={alpha})",
            f"its derivative jumps from alpha = {alpha} to 1 at 0",
            f"nn.CELU(alpha={alpha}) (continuously differentiable) or {_REPLACEMENTS}",
        )
    return 1.0, 1.0


def _celu(alpha: float = 1.0) -> tuple[float, float]:
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"CELU: curvature constants need a finite alpha > 0, got {alpha}")
    return 1.0, math.nextafter(1.0 / alpha, math.inf)  # round 1/alpha up


def _gelu(approximate: str = "none") -> tuple[float, float]:
    if approximate == "none":
        return _GELU_ERF_G, _GELU_H
    if approximate == "tanh":
        return _GELU_TANH_G, _GELU_H
    raise ValueError(f"GELU: unknown approximate={approximate!r} (expected 'none' or 'tanh')")


def _constant(g: float, h: float) -> Callable[[], tuple[float, float]]:
    return lambda: (g, h)


_SMOOTH: dict[str, Callable[..., tuple[float, float]]] = {
    "tanh": _constant(1.0, _TANH_H),
    "sigmoid": _constant(0.25, _SIGMOID_H),
    "softplus": _softplus,
    "smooth_softplus": lambda beta=1.0: _softplus(beta, math.inf),
    "elu": _elu,
    "celu": _celu,
    "gelu": _gelu,
    "silu": _constant(_SILU_G, _SILU_H),
    "mish": _constant(_MISH_G, _MISH_H),
    "tanhshrink": _constant(1.0, _TANH_H),
    "softsign": _constant(1.0, _SOFTSIGN_H),
    "logsigmoid": _constant(1.0, 0.25),
}

_NONSMOOTH: dict[str, str] = {
    "relu": "its derivative jumps from 0 to 1 at 0",
    "relu6": "its derivative jumps at 0 and at 6",
    "leaky_relu": "its derivative jumps from the negative slope to 1 at 0",
    "prelu": "its derivative jumps from the learned slope to 1 at 0",
    "rrelu": "its derivative jumps at 0 (and its slope is random in training)",
    "hardtanh": "its derivative jumps at the clipping points",
    "hardswish": "its derivative jumps at -3 and at 3",
    "hardsigmoid": "its derivative jumps at -3 and at 3",
    "selu": "its derivative jumps from scale * alpha = 1.7581 to scale = 1.0507 at 0",
    "hardshrink": "it jumps at +-lambda",
    "softshrink": "its derivative jumps at +-lambda",
    "threshold": "it jumps at the threshold",
    "abs": "its derivative jumps from -1 to 1 at 0",
    "clamp": "its derivative jumps at the clipping points",
    "max_pool": "max pooling switches between window entries, so its Jacobian jumps",
    "maximum": "its derivative jumps from one argument to the other where they tie",
    "minimum": "its derivative jumps from one argument to the other where they tie",
    "group_sort": "its Jacobian jumps from one permutation matrix to another where two "
    "entries of a group tie",
    "max_min": "its Jacobian jumps from one permutation matrix to another where the two "
    "entries of a pair tie",
}

# Module types -> (table name, how to read its parameters).
_MODULES: dict[type[nn.Module], tuple[str, Callable[[Any], dict[str, Any]]]] = {
    nn.Tanh: ("tanh", lambda m: {}),
    nn.Sigmoid: ("sigmoid", lambda m: {}),
    nn.Softplus: ("softplus", lambda m: {"beta": m.beta, "threshold": m.threshold}),
    SmoothSoftplus: ("smooth_softplus", lambda m: {"beta": m.beta}),
    nn.ELU: ("elu", lambda m: {"alpha": m.alpha}),
    nn.CELU: ("celu", lambda m: {"alpha": m.alpha}),
    nn.GELU: ("gelu", lambda m: {"approximate": m.approximate}),
    nn.SiLU: ("silu", lambda m: {}),
    nn.Mish: ("mish", lambda m: {}),
    nn.Tanhshrink: ("tanhshrink", lambda m: {}),
    nn.Softsign: ("softsign", lambda m: {}),
    nn.LogSigmoid: ("logsigmoid", lambda m: {}),
    nn.ReLU: ("relu", lambda m: {}),
    nn.ReLU6: ("relu6", lambda m: {}),
    nn.LeakyReLU: ("leaky_relu", lambda m: {"negative_slope": m.negative_slope}),
    nn.PReLU: ("prelu", lambda m: {}),
    nn.RReLU: ("rrelu", lambda m: {}),
    nn.Hardtanh: ("hardtanh", lambda m: {}),
    nn.Hardswish: ("hardswish", lambda m: {}),
    nn.Hardsigmoid: ("hardsigmoid", lambda m: {}),
    nn.Identity: ("identity", lambda m: {}),
    nn.SELU: ("selu", lambda m: {}),
    nn.Hardshrink: ("hardshrink", lambda m: {}),
    nn.Softshrink: ("softshrink", lambda m: {}),
    nn.Threshold: ("threshold", lambda m: {}),
    nn.MaxPool1d: ("max_pool", lambda m: {}),
    nn.MaxPool2d: ("max_pool", lambda m: {}),
    nn.MaxPool3d: ("max_pool", lambda m: {}),
    nn.AdaptiveMaxPool1d: ("max_pool", lambda m: {}),
    nn.AdaptiveMaxPool2d: ("max_pool", lambda m: {}),
    nn.AdaptiveMaxPool3d: ("max_pool", lambda m: {}),
    GroupSort: ("group_sort", lambda m: {}),
    MaxMin: ("max_min", lambda m: {}),
}

_FUNCTIONS: dict[Any, str] = {
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.special.expit: "sigmoid", F.softplus: "softplus", F.elu: "elu", F.celu: "celu",
    torch.celu: "celu", F.gelu: "gelu", F.silu: "silu", F.mish: "mish",
    F.tanhshrink: "tanhshrink", F.softsign: "softsign", F.logsigmoid: "logsigmoid",
    torch.relu: "relu", F.relu: "relu", F.relu6: "relu6", F.leaky_relu: "leaky_relu",
    F.prelu: "prelu", torch.prelu: "prelu", F.rrelu: "rrelu", F.hardtanh: "hardtanh",
    F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.selu: "selu",
    F.selu: "selu", F.hardshrink: "hardshrink", F.softshrink: "softshrink",
    F.threshold: "threshold", torch.abs: "abs", torch.clamp: "clamp", torch.clip: "clamp",
    F.max_pool1d: "max_pool", F.max_pool2d: "max_pool", F.max_pool3d: "max_pool",
    F.adaptive_max_pool1d: "max_pool", F.adaptive_max_pool2d: "max_pool",
    F.adaptive_max_pool3d: "max_pool", torch.max_pool1d: "max_pool",
    torch.max_pool2d: "max_pool", torch.max_pool3d: "max_pool",
    torch.maximum: "maximum", torch.minimum: "minimum",
}


def _module_entry(module: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """Table name and parameters of a module, or None if its type is not in the table.

    A subclass only inherits its parent's constants when it behaves as the parent
    (:func:`~lightning_spectral.functional.modules.behaves_as`): one that overrides
    ``forward`` computes something else, which the table knows nothing of. Likewise a
    ``forward`` replaced on the instance, or forward hooks (which may replace the input or the
    output), make it unknown.
    """
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    for cls in type(module).__mro__:
        if cls in _MODULES:
            if not behaves_as(module, cls):
                return None
            name, read = _MODULES[cls]
            return name, read(module)
    return None


# Relative margin on the softplus threshold: torch compares the float32 product beta * x
# with the float32 threshold, which may pick the identity branch for an exact beta * x down to
# about t (1 - 3 * 2**-24); the slack is computed for t (1 - 1e-6) (any smaller t is covered).
_THRESHOLD_MARGIN = 1e-6
_SLACK_ROUND_UP = 1.0 + 1e-12  # far above the few-ulp error of exp, log1p and division


def softplus_switch_slack(beta: float, threshold: float) -> tuple[float, float]:
    """``(delta, e)``: how far torch's softplus is from :class:`SmoothSoftplus`.

    ``F.softplus(x, beta, threshold)`` (and ``nn.Softplus``) computes
    ``s(x) = x`` where ``beta x > threshold`` and ``log1p(exp(beta x)) / beta`` elsewhere;
    the smooth twin is ``s~(x) = log1p(exp(beta x)) / beta`` everywhere. Where they differ,
    ``beta x > t`` (``t = threshold``), and there

    * ``s~(x) = (beta x + log1p(exp(-beta x))) / beta = x + log1p(exp(-beta x)) / beta``, so
      ``|s(x) - s~(x)| = log1p(exp(-beta x)) / |beta| < log1p(exp(-t)) / |beta| = e``;
    * ``s'(x) = 1`` and ``s~'(x) = sigmoid(beta x)``, so
      ``|s'(x) - s~'(x)| = sigmoid(-beta x) < sigmoid(-t) = delta``,

    both decreasing in ``beta x``. So ``sup |s - s~| <= e`` and ``sup |s' - s~'| <= delta``
    (``s'`` the derivative of the branch torch takes, which is what autograd returns).
    ``t = 20``: ``delta = 2.06e-9``, ``e = 2.06e-9 / |beta|``. Both are computed for the
    slightly smaller ``t (1 - 1e-6)`` (``t - 1e-6`` for ``|t| < 1``), which also covers
    the branch float32 rounding of ``beta x`` and of ``threshold`` may pick, and rounded up.
    ``threshold = inf`` gives ``(0, 0)``.
    """
    if not (math.isfinite(beta) and beta != 0):
        raise ValueError(f"Softplus: curvature constants need a finite beta != 0, got {beta}")
    if math.isnan(threshold):
        raise ValueError("Softplus: threshold must not be NaN")
    if threshold == math.inf:
        return 0.0, 0.0
    if threshold == -math.inf:  # the identity everywhere: unbounded distance to the twin
        raise ValueError("Softplus(threshold=-inf) is the identity, not a softplus")
    t = threshold - _THRESHOLD_MARGIN * max(1.0, abs(threshold))
    # sigmoid(-t) and log1p(exp(-t)) = max(-t, 0) + log1p(exp(-|t|)), neither overflowing.
    z = math.exp(-abs(t))
    delta = z / (1.0 + z) if t >= 0 else 1.0 / (1.0 + z)
    gap = max(-t, 0.0) + math.log1p(z)
    up = [math.nextafter(v * _SLACK_ROUND_UP, math.inf) for v in (delta, gap / abs(beta))]
    return min(up[0], 1.0), up[1]


def _resolve(
    activation: nn.Module | Callable[..., Tensor] | str, kwargs: dict[str, Any]
) -> tuple[str, str, dict[str, Any]] | None:
    """``(table name, label, parameters)`` of an activation, or None if not in the table."""
    if isinstance(activation, nn.Module):
        if kwargs:
            raise ValueError("pass the parameters of a module through the module itself, "
                             f"not as keyword arguments {sorted(kwargs)}")
        entry = _module_entry(activation)
        if entry is None:
            return None
        name, kwargs = entry
        return name, type(activation).__name__, kwargs
    if isinstance(activation, str):
        return activation, activation, kwargs
    try:
        found = _FUNCTIONS.get(activation)
    except TypeError:  # unhashable callable
        found = None
    label = getattr(activation, "__name__", repr(activation))
    return None if found is None else (found, label, kwargs)


def activation_curvature_slack(
    activation: nn.Module | Callable[..., Tensor] | str, **kwargs: Any
) -> tuple[float, float, float, float] | None:
    """``(g, h, delta, e)``: :func:`activation_curvature` of the activation's smooth twin, and
    the twin's distance to it: ``sup |s' - s~'| <= delta``, ``sup |s - s~| <= e``.

    For ``nn.Softplus`` / ``F.softplus`` with a finite ``threshold`` the twin is
    :class:`SmoothSoftplus` (``(g, h) = (1, |beta| / 4)``) and ``(delta, e)`` come from
    :func:`softplus_switch_slack`. Every other activation is its own twin: ``delta = e = 0``,
    and ``(g, h)`` (or None, or the refusal) is exactly :func:`activation_curvature`'s.
    """
    resolved = _resolve(activation, dict(kwargs))
    if resolved is not None and resolved[0] == "softplus":
        params = {k: v for k, v in resolved[2].items() if k != "inplace"}
        beta, threshold = params.pop("beta", 1.0), params.pop("threshold", 20.0)
        if params:
            raise ValueError(f"{resolved[1]}: unexpected parameters {sorted(params)}")
        delta, e = softplus_switch_slack(float(beta), float(threshold))
        return (*_softplus(float(beta), math.inf), delta, e)
    constants = activation_curvature(activation, **kwargs)
    return None if constants is None else (*constants, 0.0, 0.0)


def activation_curvature(
    activation: nn.Module | Callable[..., Tensor] | str, **kwargs: Any
) -> tuple[float, float] | None:
    """Curvature constants ``(g, h)`` of an elementwise activation ``s``.

    ``g = sup |s'|`` (its Lipschitz constant) and ``h`` = the Lipschitz constant of ``s'``
    (``= sup |s''|`` where ``s''`` exists and ``s'`` is continuous). Each value is the exact
    supremum rounded up (a smaller constant would void the certificate).

    Args:
        activation: a module instance (its parameters are read from it), a function such as
            ``torch.tanh`` or ``F.softplus`` (pass its parameters as keyword arguments), or a
            name from the table below (as ``call_method`` nodes of a ``torch.fx`` graph carry).
        **kwargs: parameters of a function or name: ``beta``, ``threshold`` (softplus),
            ``alpha`` (elu, celu), ``approximate`` (gelu). Not allowed with a module.

    Returns:
        ``(g, h)`` as Python floats, or ``None`` when the activation is not in the table
        (including a subclass that overrides ``forward``): the caller must then find another
        rule or refuse; ``None`` is never a license to assume anything.

    Raises:
        NonSmoothActivationError: (a ``ValueError``) for activations whose derivative jumps
            (ReLU, ReLU6, LeakyReLU, PReLU, RReLU, Hardtanh, Hardswish, Hardsigmoid, SELU,
            Hardshrink, Softshrink, Threshold, abs, clamp, ELU with ``alpha != 1``, max
            pooling, ``torch.maximum`` / ``torch.minimum``, the sorting activations
            :class:`~lightning_spectral.GroupSort` and :class:`~lightning_spectral.MaxMin`,
            and ``nn.Softplus`` with a finite ``threshold``, i.e. the default one).
        ValueError: for invalid parameters.

    Derivations (``s^{(k)}`` the k-th derivative; extremes of ``s''`` are roots of ``s'''``):

    * tanh: ``s' = 1 - t^2 <= 1``, ``s'' = -2t(1 - t^2)``, ``s''' = -2(1 - t^2)(1 - 3t^2)``
      with ``t = tanh x``: ``|s''|`` peaks at ``t = 1/sqrt 3`` (``x = 0.658479``):
      ``h = 4 / (3 sqrt 3) = 0.7698004``. Tanhshrink ``x - tanh x`` has ``s' = t^2 < 1`` and
      the same ``|s''|``.
    * sigmoid ``p``: ``s' = p(1 - p) <= 1/4`` (at 0), ``s'' = p(1 - p)(1 - 2p)``,
      ``s''' = p(1 - p)(1 - 6p + 6p^2)``, zero at ``p = (3 +- sqrt 3)/6``
      (``x = ln(2 +- sqrt 3) = +-1.316958``): ``h = 1 / (6 sqrt 3) = 0.0962250``.
    * softplus ``log(1 + exp(beta x)) / beta``: ``s' = p(beta x) in (0, 1)``,
      ``s'' = beta p(1 - p)``, ``|s''| <= |beta| / 4`` (at 0): ``(1, |beta| / 4)``, for either
      sign of ``beta`` (for ``beta < 0`` it is the concave mirror image
      ``-softplus_{|beta|}(-x)``). ``nn.Softplus`` and
      ``F.softplus`` however return ``x`` itself for ``beta x > threshold``. At
      ``x0 = threshold / beta`` the derivative jumps from ``p(threshold)`` to 1, by
      ``1 - p(threshold) = 2.06e-9`` for the default 20, and the value drops by
      ``log1p(exp(-threshold)) / beta`` (visible in float64). A jump in ``s'`` admits no
      finite Lipschitz constant at all, however small the jump: ``|s'(x0 + e) - s'(x0 - e)|
      / 2e -> inf``. Neglecting it would make the (L, C) composition and the radius formula
      claim something false; carrying it would need an extra additive slack term through the
      whole composition (and the value jump breaks even the integral form of Taylor's theorem
      the certificate rests on). So a finite threshold is refused here;
      :func:`activation_curvature_slack` gives the constants of the smooth twin and the
      slack, which the network walk carries (``network_curvature_bounds``); ``threshold=math.inf``
      (the exact formula) or :class:`SmoothSoftplus` (the same, computed without overflow)
      get ``(1, beta / 4)``; note that ``threshold=math.inf`` overflows to ``inf`` for
      ``beta x > 88`` in float32 (709 in float64), which the certificates then refuse as
      non-finite logits, while :class:`SmoothSoftplus` does not. LogSigmoid
      ``-softplus(-x)`` (computed by torch without a switch) has ``s' = p(-x) in (0, 1)`` and
      ``|s''| = p(1 - p) <= 1/4``: ``(1, 1/4)``.
    * ELU: ``s' = 1`` for ``x > 0`` and ``alpha e^x`` for ``x < 0``: continuous only if
      ``alpha = 1`` (otherwise refused); then ``s''`` is 0 or ``e^x < 1`` on each side, and a
      continuous piecewise-``C^1`` ``s'`` is Lipschitz with the sup of ``|s''|`` over the
      pieces: ``(1, 1)``.
    * CELU: ``s' = exp(x / alpha)`` for ``x < 0``, 1 for ``x > 0``: continuous for every
      ``alpha > 0``, ``s'' = exp(x / alpha) / alpha``, sup approached at ``0^-``:
      ``(1, 1 / alpha)``.
    * GELU ``x Phi(x)``: ``s' = Phi + x phi``, ``s'' = phi (2 - x^2)``,
      ``s''' = x phi (x^2 - 4)``: ``|s''|`` is ``2 phi(0) = sqrt(2/pi) = 0.7978846`` at 0 and
      ``2 phi(2) = 0.108`` at ``+-2``; ``s'`` peaks where ``s'' = 0``, at ``x = sqrt 2``:
      ``g = 1.1289041``. The tanh form ``x/2 (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))``:
      ``s''`` is even with roots of ``s'''`` at 0 (``s''(0) = sqrt(2/pi)``) and ``+-2.013481``
      (``s'' = -0.1079``); ``s'`` peaks at ``x = 1.418504`` with 1.1289931.
    * SiLU ``x p(x)``: ``s' = p (1 + x(1 - p))``, ``s'' = p(1 - p)(2 + x(1 - 2p))``; roots of
      ``s'''`` at 0 (``s'' = 1/2``) and ``+-3.435841`` (``s'' = -0.0369``); ``s'`` peaks at
      ``x = 2.399357`` (``2 + x(1 - 2p) = 0``) with 1.0998393.
    * Mish ``x tanh(softplus x)``: roots of ``s'''`` at -3.267338 (``s'' = -0.0417``),
      -0.0879344 (``s'' = 0.6442046``) and 2.114843 (``s'' = -0.0590``), computed at 40
      digits; ``s'`` peaks at ``x = 1.490571`` with 1.0884982.
    * Softsign ``x / (1 + |x|)``: ``s' = (1 + |x|)^-2 <= 1`` is continuous,
      ``|s''| = 2 (1 + |x|)^-3 <= 2`` on each side: ``(1, 2)``.

    In-place variants (``inplace=True``) compute the same function; what an in-place op does
    to *other* consumers of its input is the graph walk's concern, not this table's.
    """
    resolved = _resolve(activation, kwargs)
    if resolved is None:
        return None
    name, label, kwargs = resolved
    if name in _NONSMOOTH:
        raise _refuse(label, _NONSMOOTH[name])
    if name not in _SMOOTH:
        return None
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}  # same function either way
    try:
        return _SMOOTH[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"{label}: unexpected parameters {sorted(kwargs)} ({err})") from None


# ----------------------------------------------------------------------------------------
# Slope bounds [alpha, beta]: alpha <= (s(a) - s(b)) / (a - b) <= beta for all a != b.
# ----------------------------------------------------------------------------------------
_HARDSIGMOID_SLOPE = math.nextafter(1.0 / 6.0, math.inf)  # 1/6 rounded up


def _leaky_slope(negative_slope: float = 0.01) -> tuple[float, float] | None:
    a = float(negative_slope)
    if not (math.isfinite(a) and a >= 0):
        return None  # a negative slope makes alpha < 0, which the chain bound does not take
    return min(a, 1.0), max(a, 1.0)


def _elu_slope(alpha: float = 1.0) -> tuple[float, float] | None:
    a = float(alpha)
    return (0.0, max(1.0, a)) if math.isfinite(a) and a >= 0 else None


def _celu_slope(alpha: float = 1.0) -> tuple[float, float] | None:
    return (0.0, 1.0) if math.isfinite(alpha) and alpha > 0 else None


def _softplus_slope(beta: float = 1.0, threshold: float = math.inf) -> tuple[float, float] | None:
    if not (math.isfinite(beta) and beta != 0) or math.isfinite(threshold):
        return None  # a finite threshold switches to the identity with a jump in value
    return 0.0, 1.0


_SLOPES: dict[str, Callable[..., tuple[float, float] | None]] = {
    "identity": lambda: (1.0, 1.0),
    "relu": lambda: (0.0, 1.0),
    "relu6": lambda: (0.0, 1.0),
    "hardtanh": lambda: (0.0, 1.0),
    "tanh": lambda: (0.0, 1.0),
    "sigmoid": lambda: (0.0, 0.25),
    "hardsigmoid": lambda: (0.0, _HARDSIGMOID_SLOPE),
    "softsign": lambda: (0.0, 1.0),
    "tanhshrink": lambda: (0.0, 1.0),
    "logsigmoid": lambda: (0.0, 1.0),
    "leaky_relu": _leaky_slope,
    "elu": _elu_slope,
    "celu": _celu_slope,
    "softplus": _softplus_slope,
    "smooth_softplus": lambda beta=1.0: _softplus_slope(beta, math.inf),
}


def activation_slope(module: nn.Module) -> tuple[float, float] | None:
    """Slope bounds ``(alpha, beta)``, ``0 <= alpha <= beta``, of an elementwise activation
    module: ``alpha <= (s(a) - s(b)) / (a - b) <= beta`` for all reals ``a != b``.

    For an absolutely continuous ``s`` the difference quotient is the mean of ``s'`` over
    ``[b, a]``, so bounds on ``s'`` (where it exists) are slope bounds:

    * ReLU, ReLU6, Hardtanh (clipping): ``s'`` is 0 or 1: ``(0, 1)``; Hardsigmoid: 0 or
      ``1/6``: ``(0, 1/6)`` (rounded up); ``nn.Identity``: ``(1, 1)``;
    * tanh ``1 - t^2``, Softsign ``(1 + |x|)^-2``, Tanhshrink ``t^2``, LogSigmoid
      ``sigmoid(-x)``, CELU (``alpha > 0``) ``exp(x / alpha)`` or 1: all in ``[0, 1]``;
      sigmoid ``p(1 - p) <= 1/4``: ``(0, 1/4)``;
    * Softplus ``sigmoid(beta x) in (0, 1)``: ``(0, 1)`` only without the switch to the
      identity (:class:`SmoothSoftplus`, or ``threshold=inf``): ``nn.Softplus`` with a finite
      threshold jumps in value there, so no slope bound holds;
    * LeakyReLU with slope ``a >= 0``: ``(min(a, 1), max(a, 1))``; ELU (``alpha >= 0``):
      ``alpha e^x`` or 1: ``(0, max(1, alpha))``.

    Returns None for anything else (SiLU, GELU, Mish, Hardswish have ``alpha < 0``; a
    negative LeakyReLU slope too), and, as :func:`activation_curvature`, for a subclass that
    overrides ``forward``, an instance whose ``forward`` was replaced, or one with hooks.
    """
    entry = _module_entry(module)
    if entry is None or entry[0] not in _SLOPES:
        return None
    name, kwargs = entry
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    return _SLOPES[name](**kwargs)
