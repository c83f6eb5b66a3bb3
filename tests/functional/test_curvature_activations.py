"""Curvature constants (g, h) of activations: dense-grid checks, tight cases, refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_spectral.functional import (
    NonSmoothActivationError,
    SmoothSoftplus,
    activation_curvature,
)

SMOOTH_MODULES = [
    nn.Tanh(),
    nn.Sigmoid(),
    SmoothSoftplus(),
    SmoothSoftplus(beta=0.5),
    SmoothSoftplus(beta=3.0),
    nn.Softplus(beta=2.0, threshold=math.inf),
    nn.Softplus(beta=-1.5, threshold=math.inf),  # -softplus(-1.5 x) / 1.5: (1, 1.5 / 4)
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.SiLU(),
    nn.Mish(),
    nn.ELU(alpha=1.0),
    nn.CELU(alpha=0.5),
    nn.CELU(alpha=2.0),
    nn.Tanhshrink(),
    nn.Softsign(),
    nn.LogSigmoid(),
]


def _grid() -> torch.Tensor:
    """1e6 points on [-40, 40] plus points just beside 0, where one-sided sups are reached."""
    dense = torch.linspace(-40.0, 40.0, 1_000_001, dtype=torch.float64)
    near_zero = torch.tensor([-1e-12, 1e-12], dtype=torch.float64)
    return torch.cat([dense, near_zero]).sort().values


def _derivatives(fn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second derivatives of the real torch implementation, by autograd."""
    x = x.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    return d1.detach(), d2


@pytest.mark.parametrize("act", SMOOTH_MODULES, ids=repr)
def test_constants_bound_the_grid_and_are_nearly_attained(act: nn.Module) -> None:
    g, h = activation_curvature(act)
    x = _grid()
    d1, d2 = _derivatives(act, x)
    assert d1.abs().max() <= g
    assert d1.abs().max() >= g * (1 - 1e-6)
    assert d2.abs().max() <= h
    assert d2.abs().max() >= h * (1 - 1e-6)
    # h bounds the Lipschitz constant of s' itself (this also sees a jump of s'). Only the
    # evenly spaced points: across the 2e-12 gap at 0 rounding of s' would dominate.
    dense = x.diff() > 1e-6
    quotients = (d1.diff()[dense] / x.diff()[dense]).abs()
    assert quotients.max() <= h * (1 + 1e-6)


def test_functions_and_names_match_modules() -> None:
    assert activation_curvature(torch.tanh) == activation_curvature(nn.Tanh())
    assert activation_curvature("sigmoid") == activation_curvature(nn.Sigmoid())
    assert activation_curvature(F.gelu, approximate="tanh") == activation_curvature(
        nn.GELU(approximate="tanh")
    )
    assert activation_curvature(F.celu, alpha=2.0) == activation_curvature(nn.CELU(2.0))
    assert activation_curvature(F.elu, inplace=True) == (1.0, 1.0)
    assert activation_curvature(F.softplus, beta=3.0, threshold=math.inf) == (1.0, 0.75)


def test_exact_values_are_rounded_up() -> None:
    sqrt3 = math.sqrt(3.0)
    exact = {
        nn.Tanh(): (1.0, 4 / (3 * sqrt3)),
        nn.Sigmoid(): (0.25, 1 / (6 * sqrt3)),
        nn.GELU(): (0.5 * math.erfc(-1.0) + math.sqrt(2) * math.exp(-1) / math.sqrt(2 * math.pi),
                    math.sqrt(2 / math.pi)),
        nn.CELU(alpha=3.0): (1.0, 1 / 3),
    }
    for act, (g, h) in exact.items():
        got_g, got_h = activation_curvature(act)
        assert g <= got_g <= g * (1 + 1e-7)
        assert h <= got_h <= h * (1 + 1e-7)


# (activation, which derivative, where the docstring says it peaks)
PEAKS = [
    (nn.Tanh(), 2, 0.6584789484624084),
    (nn.Sigmoid(), 2, -1.3169578969248166),
    (nn.GELU(), 1, math.sqrt(2.0)),
    (nn.GELU(approximate="tanh"), 1, 1.418504008790828),
    (nn.SiLU(), 1, 2.399357280515467),
    (nn.Mish(), 1, 1.490571179485428),
    (nn.Mish(), 2, -0.08793443131491421),
]


@pytest.mark.parametrize(("act", "order", "peak"), PEAKS, ids=repr)
def test_constants_dominate_the_peaks_resolved_finely(act: nn.Module, order: int,
                                                      peak: float) -> None:
    """Spacing 1e-7 around the stated argmax resolves the sup to ~1e-14 (the dense grid only
    to ~1e-9, which is below the rounding-up margin of some constants)."""
    x = peak + torch.linspace(-1e-3, 1e-3, 20_001, dtype=torch.float64)
    derivative = _derivatives(act, x)[order - 1].abs()
    constant = activation_curvature(act)[order - 1]
    assert derivative.max() <= constant
    assert derivative.max() >= constant * (1 - 1e-7)
    assert abs(float(x[derivative.argmax()]) - peak) < 1e-5  # the stated argmax is right


# Argmax of |s''| (from the docstring's roots of s'''), where the one-neuron bound is tight.
ARGMAX = [
    (nn.Tanh(), 0.6584789484624084),
    (nn.Sigmoid(), math.log(2 + math.sqrt(3))),
    (SmoothSoftplus(beta=2.0), 0.0),
    (nn.GELU(), 0.0),
    (nn.GELU(approximate="tanh"), 0.0),
    (nn.SiLU(), 0.0),
    (nn.Mish(), -0.08793443131491421),
]


@pytest.mark.parametrize(("act", "peak"), ARGMAX, ids=lambda a: repr(a))
def test_one_neuron_bound_is_tight(act: nn.Module, peak: float) -> None:
    """f = v s(w^T x + b) has Hess f = v s''(w^T x + b) w w^T, so sup ||Hess|| = |v| h ||w||^2."""
    w = torch.tensor([0.6, -1.2, 0.3], dtype=torch.float64)
    v = -1.7
    _, h = activation_curvature(act)
    bound = abs(v) * h * float(w @ w)

    def f(x: torch.Tensor, b: float) -> torch.Tensor:
        return v * act(w @ x + b)

    def hess_norm(x: torch.Tensor, b: float) -> float:
        hess = torch.autograd.functional.hessian(lambda u: f(u, b), x)
        return float(torch.linalg.matrix_norm(hess, ord=2))

    for x in torch.randn(50, 3, dtype=torch.float64) * 3:
        assert hess_norm(x, 0.1) <= bound
    x_peak = torch.zeros(3, dtype=torch.float64)
    assert hess_norm(x_peak, peak) == pytest.approx(bound, rel=1e-6)
    assert hess_norm(x_peak, peak) <= bound


NON_SMOOTH = [
    nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(), nn.PReLU(), nn.RReLU(), nn.Hardtanh(), nn.Hardswish(),
    nn.Hardsigmoid(), nn.SELU(), nn.Hardshrink(), nn.Softshrink(), nn.Threshold(0.1, 0.0),
    nn.MaxPool2d(2), nn.AdaptiveMaxPool1d(3), nn.ELU(alpha=2.0), nn.Softplus(),
    nn.Softplus(beta=2.0, threshold=40.0), torch.relu, F.relu, F.leaky_relu, F.hardswish,
    F.selu, F.max_pool2d, F.softplus, "relu", "max_pool",
]


@pytest.mark.parametrize("act", NON_SMOOTH, ids=repr)
def test_non_smooth_activations_are_refused(act: object) -> None:
    with pytest.raises(NonSmoothActivationError, match="no curvature bound") as err:
        activation_curvature(act)
    message = str(err.value)
    assert "SmoothSoftplus" in message
    name = type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", act)
    assert str(name).lower() in message.lower()


def test_default_softplus_derivative_jumps_at_the_threshold() -> None:
    """The premise of the refusal, on torch itself: s' jumps by 1 - sigmoid(20) at x = 20."""
    softplus = nn.Softplus()
    x = torch.tensor([20.0 - 1e-12, 20.0 + 1e-12], dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(softplus(x).sum(), x)
    jump = float(d1[1] - d1[0])
    assert jump == pytest.approx(1 / (1 + math.exp(20.0)), rel=1e-3)
    assert jump / 2e-12 > 1e3  # no Lipschitz constant of s' near beta / 4 = 0.25
    with pytest.raises(NonSmoothActivationError, match=r"SmoothSoftplus\(beta=1.0\)"):
        activation_curvature(softplus)


def test_smooth_softplus_is_softplus_without_the_switch() -> None:
    x = torch.linspace(-30, 30, 10_001, dtype=torch.float64)
    ref = torch.log1p(torch.exp(2.0 * x)) / 2.0
    torch.testing.assert_close(SmoothSoftplus(beta=2.0)(x), ref, rtol=1e-15, atol=1e-15)
    big = torch.tensor([1000.0])  # log1p(exp(.)) would overflow in float32
    assert torch.isfinite(SmoothSoftplus()(big)).all()
    with pytest.raises(ValueError, match="beta > 0"):
        SmoothSoftplus(beta=0.0)


def test_elu_with_alpha_one_is_accepted_and_celu_needs_positive_alpha() -> None:
    assert activation_curvature(nn.ELU()) == (1.0, 1.0)
    with pytest.raises(NonSmoothActivationError, match="CELU"):
        activation_curvature(nn.ELU(alpha=0.5))
    with pytest.raises(ValueError, match="alpha > 0"):
        activation_curvature(F.celu, alpha=-1.0)


def test_subclass_overriding_forward_is_unknown() -> None:
    class ScaledTanh(nn.Tanh):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(3 * x)

    class PlainTanh(nn.Tanh):
        pass

    class SmoothRelu(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.softplus(x, threshold=math.inf)

    hooked = nn.Tanh()
    hooked.register_forward_hook(lambda module, args, out: 3 * out)
    patched = nn.Tanh()
    patched.forward = lambda x: torch.tanh(3 * x)
    pre_hooked = nn.Sigmoid()
    pre_hooked.register_forward_pre_hook(lambda module, args: (5 * args[0],))
    assert activation_curvature(hooked) is None
    assert activation_curvature(patched) is None
    assert activation_curvature(pre_hooked) is None
    assert activation_curvature(ScaledTanh()) is None
    assert activation_curvature(SmoothRelu()) is None
    assert activation_curvature(PlainTanh()) == activation_curvature(nn.Tanh())


def test_unknown_and_bad_arguments() -> None:
    assert activation_curvature(nn.Linear(2, 2)) is None
    assert activation_curvature(torch.exp) is None
    assert activation_curvature("no_such_activation") is None
    with pytest.raises(ValueError, match="through the module itself"):
        activation_curvature(nn.ELU(), alpha=1.0)
    with pytest.raises(ValueError, match="unexpected parameters"):
        activation_curvature(torch.tanh, beta=2.0)
    with pytest.raises(ValueError, match="approximate"):
        activation_curvature(F.gelu, approximate="erf")
