"""Property test: on random small smooth architectures the network curvature bound is never
below an exact Hessian norm, a Jacobian difference ratio or what an ascent finds; random
architectures with a non-smooth layer are refused as such."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from helpers.curvature import ascend_curvature, curvature_seen, jacobian_ratio, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_spectral.functional import SmoothSoftplus
from lightning_spectral.network import (
    NonSmoothOperationError,
    network_curvature_bound,
    network_pairwise_curvature,
)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_AVG = {1: nn.AvgPool1d, 2: nn.AvgPool2d}
_ADAPTIVE = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}
_MODES = ["zeros", "reflect", "replicate", "circular"]
_SMOOTH = [nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, lambda: nn.CELU(0.7),
           lambda: SmoothSoftplus(1.5), lambda: nn.Softplus(2.0, threshold=math.inf)]
_FUNCTIONAL = [torch.tanh, F.silu, lambda h: F.gelu(h, approximate="tanh"), torch.sigmoid]
_NON_SMOOTH = [nn.ReLU, nn.LeakyReLU, nn.Softplus, nn.Hardswish, lambda: nn.MaxPool1d(1)]


class Step(nn.Module):
    """One layer applied as ``kind`` says (plain, residual, concatenation, functional)."""

    def __init__(self, kind: str, m: nn.Module, fn=None) -> None:
        super().__init__()
        self.kind, self.m, self.fn = kind, m, fn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "residual":
            return h + self.m(h)
        if self.kind == "cat":
            return torch.cat([h, 0.5 * self.m(h)], dim=1)
        if self.kind == "fn":
            return self.fn(self.m(h))
        return self.m(h)


def _conv(draw, d: int, c: int, same: bool) -> nn.Module:
    k = draw(st.sampled_from([1, 3]))
    groups = draw(st.sampled_from([g for g in (1, 2) if c % g == 0]))
    co = c if same else groups * draw(st.integers(1, 2))
    stride = 1 if same else draw(st.integers(1, 2))
    return _CONV[d](c, co, k, stride=stride, padding=k // 2, groups=groups,
                    padding_mode=draw(st.sampled_from(_MODES)))


def _layer(draw, kind: str, d: int, c: int) -> nn.Module:
    if kind in ("conv", "fn"):
        return _conv(draw, d, c, same=False)
    if kind == "residual":
        return nn.Sequential(_conv(draw, d, c, same=True), draw(st.sampled_from(_SMOOTH))())
    if kind == "cat":
        return nn.Sequential(_CONV[d](c, 1, 1), draw(st.sampled_from(_SMOOTH))())
    if kind == "conv_t":
        return _CONV_T[d](c, draw(st.integers(1, 2)), 2, stride=draw(st.integers(1, 2)))
    if kind == "bn":
        bn = _BN[d](c)
        randomize_bn(bn, draw(st.integers(0, 99)))
        return bn
    if kind == "avg":
        return _AVG[d](2, stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 1)))
    if kind == "adaptive":
        return _ADAPTIVE[d](2)
    if kind == "rough":
        return draw(st.sampled_from(_NON_SMOOTH))()
    return draw(st.sampled_from(_SMOOTH))()


_KINDS = ["conv", "conv", "conv_t", "bn", "avg", "adaptive", "residual", "cat", "act", "act",
          "fn", "rough"]


@st.composite
def architectures(draw) -> tuple[nn.Module, tuple[int, ...], bool]:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    d = draw(st.sampled_from([1, 2]))
    c, n = draw(st.integers(1, 2)), draw(st.integers(3, 5))
    shape = (c, n) if d == 1 else (c, n, n)
    h = torch.zeros(2, *shape, dtype=torch.float64)
    steps: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(_KINDS))
        fn = draw(st.sampled_from(_FUNCTIONAL)) if kind == "fn" else None
        step = Step(kind, _layer(draw, kind, d, h.shape[1]), fn).double().eval()
        try:
            out = step(h.clone())
        except RuntimeError:  # sizes this layer cannot take: leave it out
            continue
        if out.numel() == 0 or out[0].numel() > 40:
            continue
        steps.append(step)
        h = out
    net = nn.Sequential(*steps, nn.Flatten(), nn.Linear(h[0].numel(), 3)).double().eval()
    return net, shape, any(s.kind == "rough" for s in steps)


@settings(max_examples=25)
@given(arch=architectures())
def test_bound_dominates_exact_hessians(arch) -> None:
    net, shape, rough = arch
    if rough:
        try:
            network_curvature_bound(net, shape)
        except NonSmoothOperationError:
            return
        raise AssertionError(f"a non-smooth layer was accepted: {net}")
    c = float(network_curvature_bound(net, shape))
    k = network_pairwise_curvature(net, shape)
    gen = torch.Generator().manual_seed(0)
    for scale in (0.5, 1.0, 3.0):
        x = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        seen = curvature_seen(net, shape, x)
        assert seen["logit"] <= c * (1 + 1e-9), net
        assert bool((seen["pair"] <= k * (1 + 1e-9) + 1e-12).all()), net
        x2 = x + 0.2 * torch.randn(shape, generator=gen, dtype=torch.float64)
        assert jacobian_ratio(net, shape, x, x2) <= c * (1 + 1e-9), net
    assert ascend_curvature(net, shape, 3, starts=1, steps=20) <= c * (1 + 1e-9), net
