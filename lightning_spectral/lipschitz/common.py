"""Shared pieces of the network bound: the error type, rule signatures, constants."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..activations import GroupSort, MaxMin
from ..functional.activations import NonSmoothActivationError, SmoothSoftplus

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
# Softplus is the identity where beta * x > threshold: the switch jumps by
# log1p(exp(-threshold)) / |beta|. Up to this size (below float32 resolution of O(1) outputs;
# 2e-9 for the defaults) the jump is accepted like rounding; larger ones are refused.
_SOFTPLUS_MAX_JUMP = 1e-6

_CONV_T_TYPES: tuple[type, ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONV_T_TYPES)
_LAYER_TYPES: tuple[type, ...] = (*_CONV_TYPES, nn.Linear)
_BN_TYPES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVG_POOLS: tuple[type, ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAX_POOLS: tuple[type, ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_ADAPTIVE_AVG: tuple[type, ...] = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ADAPTIVE_MAX: tuple[type, ...] = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
# Tanhshrink x - tanh(x) has derivative tanh(x)^2 <= 1; Softsign 1 / (1 + |x|)^2 <= 1;
# LogSigmoid log(sigmoid(x)) = -softplus(-x) has derivative sigmoid(-x) in (0, 1).
_ONE_LIP: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Softplus, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Hardtanh,
    nn.CELU, nn.Softsign, nn.Tanhshrink, SmoothSoftplus, nn.LogSigmoid,
)
_CONST_LIP: dict[type, float] = {
    nn.Sigmoid: 0.25, nn.Hardsigmoid: 1.0 / 6.0, nn.GELU: _GELU_LIP, nn.SiLU: _SILU_LIP,
    nn.Mish: _MISH_LIP, nn.SELU: _SELU_LIP, nn.Hardswish: _HARDSWISH_LIP,
}
_ACTIVATIONS: tuple[type, ...] = (*_ONE_LIP, *_CONST_LIP, nn.LeakyReLU, nn.PReLU, nn.ELU)
# Sorting within groups of channels: 1-Lipschitz, not elementwise (proof in ..activations).
_SORTS: tuple[type, ...] = (GroupSort, MaxMin)
# Padding modules: their forward is ``F.pad(x, self.padding, mode)`` with this mode.
_PAD_MODES: dict[type, str] = {
    **{getattr(nn, f"{kind}Pad{d}d"): mode for d in (1, 2, 3) for kind, mode in (
        ("Zero", "constant"), ("Constant", "constant"), ("Reflection", "reflect"),
        ("Replication", "replicate"), ("Circular", "circular"))},
}
_BUILTIN: frozenset[type] = frozenset(
    (*_LAYER_TYPES, *_BN_TYPES, *_AVG_POOLS, *_MAX_POOLS, *_ADAPTIVE_AVG, *_ADAPTIVE_MAX,
     *_ACTIVATIONS, *_SORTS, *_PAD_MODES)
)
# Modules that may return their input itself or a view of it (in eval mode).
_ALIASING_MODULES: tuple[type, ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
)

# Dummy batch of 2 for shape propagation: a batch of 1 could not reveal a reshape that mixes
# samples (the bound is per sample).
_BATCH = 2
# Relative safety margin on exactly computed matrix norms, as in the bound engine.
_NORM_MARGIN = 1e-13


class UnsupportedOperationError(TypeError):
    """A module or function the network bound has no rule for."""


class NonSmoothOperationError(UnsupportedOperationError, NonSmoothActivationError):
    """A node the curvature bound refuses: its derivative jumps (ReLU, max pooling, ``abs``,
    the default ``nn.Softplus``, ...) or it has no curvature rule. Both an
    :class:`UnsupportedOperationError` and a
    :class:`~lightning_spectral.functional.NonSmoothActivationError`."""


def _f64(value: float | Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(())


def _opnorm(matrices: Tensor) -> Tensor:
    """Largest spectral norm of a batch of float64 matrices, raised by a relative margin so
    rounding in the decomposition cannot put it below the exact value."""
    from ..functional.norms import spectral_norm_exact

    if matrices.numel() == 0:
        return _f64(0.0)
    return spectral_norm_exact(matrices).max() * (1 + _NORM_MARGIN)


def _check_softplus(beta: float, threshold: float) -> None:
    """Softplus' derivative sigmoid(beta x) is in (0, 1); only its switch to the identity can
    break the Lipschitz property (a jump, see ``_SOFTPLUS_MAX_JUMP``)."""
    gap = math.log1p(math.exp(-threshold)) if threshold > -700 else -threshold  # no overflow
    jump = gap / abs(beta) if beta else math.inf
    if not jump <= _SOFTPLUS_MAX_JUMP:
        raise UnsupportedOperationError(
            f"softplus(beta={beta}, threshold={threshold}) jumps by {jump:.3g} where it "
            f"switches to the identity: not Lipschitz (accepted up to {_SOFTPLUS_MAX_JUMP:g}; "
            "raise threshold)"
        )
