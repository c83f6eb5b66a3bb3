"""Shared pieces of the network bound: the error types, rule signatures, the module classes
with a built-in rule, and the default layer bound."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..activations import GroupSort, MaxMin
from ..functional.activations import (
    GELU_LIP,
    HARDSWISH_LIP,
    MISH_LIP,
    SELU_LIP,
    SILU_LIP,
    NonSmoothActivationError,
    SmoothSoftplus,
)
from ..functional.bounds import layer_spectral_bound

__all__ = [
    "ACTIVATIONS", "ADAPTIVE_AVG", "ADAPTIVE_MAX", "ALIASING_MODULES", "AVG_POOLS", "BATCH",
    "BN_TYPES", "BUILTIN", "CONST_LIP", "CONV_TYPES", "CONV_T_TYPES", "LAYER_TYPES",
    "LayerBound", "LipschitzRule", "MAX_POOLS", "NonSmoothOperationError", "ONE_LIP",
    "PAD_MODES", "SOFTPLUS_MAX_JUMP", "SORTS", "UnsupportedOperationError", "check_softplus",
    "f64", "resolve_layer_bound",
]

LipschitzRule = Callable[[nn.Module, list[torch.Size]], "Tensor | float"]
"""``fn(module, input_shapes) -> K``: an upper bound on the l2 Lipschitz constant of the
module as a map of (the concatenation of) its tensor inputs. ``input_shapes`` are the
per-sample shapes (no batch axis) of those inputs, as the trace found them."""

LayerBound = Callable[[nn.Module, "tuple[int, ...] | None"], Tensor]
"""``fn(module, input_size) -> bound``: a guaranteed bound on a convolution's / linear layer's
operator norm at the spatial ``input_size`` (None for linear layers)."""

# Softplus is the identity where beta * x > threshold: the switch jumps by
# log1p(exp(-threshold)) / |beta|. Up to this size (below float32 resolution of O(1) outputs;
# 2e-9 for the defaults) the jump is accepted like rounding; larger ones are refused.
SOFTPLUS_MAX_JUMP = 1e-6

CONV_T_TYPES: tuple[type, ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *CONV_T_TYPES)
LAYER_TYPES: tuple[type, ...] = (*CONV_TYPES, nn.Linear)
BN_TYPES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
AVG_POOLS: tuple[type, ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
MAX_POOLS: tuple[type, ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
ADAPTIVE_AVG: tuple[type, ...] = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
ADAPTIVE_MAX: tuple[type, ...] = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
# Tanhshrink x - tanh(x) has derivative tanh(x)^2 <= 1; Softsign 1 / (1 + |x|)^2 <= 1;
# LogSigmoid log(sigmoid(x)) = -softplus(-x) has derivative sigmoid(-x) in (0, 1).
ONE_LIP: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Softplus, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Hardtanh,
    nn.CELU, nn.Softsign, nn.Tanhshrink, SmoothSoftplus, nn.LogSigmoid,
)
CONST_LIP: dict[type, float] = {
    nn.Sigmoid: 0.25, nn.Hardsigmoid: 1.0 / 6.0, nn.GELU: GELU_LIP, nn.SiLU: SILU_LIP,
    nn.Mish: MISH_LIP, nn.SELU: SELU_LIP, nn.Hardswish: HARDSWISH_LIP,
}
ACTIVATIONS: tuple[type, ...] = (*ONE_LIP, *CONST_LIP, nn.LeakyReLU, nn.PReLU, nn.ELU)
# Sorting within groups of channels: 1-Lipschitz, not elementwise (proof in ..activations).
SORTS: tuple[type, ...] = (GroupSort, MaxMin)
# Padding modules: their forward is ``F.pad(x, self.padding, mode)`` with this mode.
PAD_MODES: dict[type, str] = {
    **{getattr(nn, f"{kind}Pad{d}d"): mode for d in (1, 2, 3) for kind, mode in (
        ("Zero", "constant"), ("Constant", "constant"), ("Reflection", "reflect"),
        ("Replication", "replicate"), ("Circular", "circular"))},
}
BUILTIN: frozenset[type] = frozenset(
    (*LAYER_TYPES, *BN_TYPES, *AVG_POOLS, *MAX_POOLS, *ADAPTIVE_AVG, *ADAPTIVE_MAX,
     *ACTIVATIONS, *SORTS, *PAD_MODES)
)
# Modules that may return their input itself or a view of it (in eval mode).
ALIASING_MODULES: tuple[type, ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
)

# Dummy batch of 2 for shape propagation: a batch of 1 could not reveal a reshape that mixes
# samples (the bound is per sample).
BATCH = 2


class UnsupportedOperationError(TypeError):
    """A module or function the network bound has no rule for."""


class NonSmoothOperationError(UnsupportedOperationError, NonSmoothActivationError):
    """A node the curvature bound refuses: its derivative jumps (ReLU, max pooling, ``abs``,
    the default ``nn.Softplus``, ...) or it has no curvature rule. Both an
    :class:`UnsupportedOperationError` and a
    :class:`~lightning_spectral.functional.NonSmoothActivationError`."""


def f64(value: float | Tensor) -> Tensor:
    """``value`` as a 0-dim float64 CPU tensor without grad: the type of every bound."""
    return torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(())


def check_softplus(beta: float, threshold: float) -> None:
    """Softplus' derivative sigmoid(beta x) is in (0, 1); only its switch to the identity can
    break the Lipschitz property (a jump, see ``SOFTPLUS_MAX_JUMP``)."""
    gap = math.log1p(math.exp(-threshold)) if threshold > -700 else -threshold  # no overflow
    jump = gap / abs(beta) if beta else math.inf
    if not jump <= SOFTPLUS_MAX_JUMP:
        raise UnsupportedOperationError(
            f"softplus(beta={beta}, threshold={threshold}) jumps by {jump:.3g} where it "
            f"switches to the identity: not Lipschitz (accepted up to {SOFTPLUS_MAX_JUMP:g}; "
            "raise threshold)"
        )


def resolve_layer_bound(layer_bound: LayerBound | None) -> LayerBound:
    """``layer_bound``, or the bound engine's
    :func:`~lightning_spectral.functional.layer_spectral_bound` when None."""
    return layer_spectral_bound if layer_bound is None else layer_bound
