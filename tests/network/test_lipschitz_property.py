"""Property test: on random small architectures the network bound is never below a local
Jacobian norm (or the architecture is refused, where refusing is right)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_spectral.network import UnsupportedOperationError, network_lipschitz_bound

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_AVG = {1: nn.AvgPool1d, 2: nn.AvgPool2d}
_MAX = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_ADAPTIVE = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveMaxPool2d}
_MODES = ["zeros", "reflect", "replicate", "circular"]
# Patterns that must be refused: an in-place update of a tensor read afterwards, an integer cast.
_REFUSED = {"shared_inplace", "int_cast"}


class DoubleReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * F.relu(x)


def _gain_conv(klass: type) -> type:
    class GainConv(klass):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 3 * self._conv_forward(x, self.weight, self.bias)

    return GainConv


def _std_conv(klass: type) -> type:
    class StdConv(klass):
        """Weight standardized per output channel, then the parent's padded convolution."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight
            dims = tuple(range(1, 2 + len(self.kernel_size)))
            var = w.var(dims, keepdim=True, correction=0)
            w = (w - w.mean(dims, keepdim=True)) / torch.sqrt(var + 1e-3)
            return self._conv_forward(x, w, self.bias)

    return StdConv


class MaskedLinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.register_buffer("mask", (torch.rand(n_out, n_in) > 0.3).double() * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class LoRALinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.lora_a = nn.Parameter(torch.randn(2, n_in))
        self.lora_b = nn.Parameter(torch.randn(n_out, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + x @ self.lora_a.T @ self.lora_b.T


_ACTS = [nn.ReLU, lambda: nn.LeakyReLU(-1.5), nn.Tanh, nn.GELU, lambda: nn.ELU(1.7),
         nn.Sigmoid, nn.SiLU, nn.Hardswish, lambda: nn.PReLU(init=-2.0), nn.Softplus,
         DoubleReLU, nn.Identity, lambda: nn.Dropout(0.5)]
_HEADS = [nn.Linear, MaskedLinear, LoRALinear]


def _step(kind: str, m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if kind == "residual":
        return h + m(h)
    if kind == "cat":
        return torch.cat([h, 0.5 * m(h)], dim=1)
    if kind == "conv_inplace_relu":
        return F.relu(m(h), inplace=True)
    if kind == "inplace_mul":
        return m(h).mul_(1.5)
    if kind == "shared_inplace":
        g = m(h)
        g.mul_(3.0)
        return g + h
    if kind == "int_cast":
        return m(h).to(torch.int32).to(h.dtype)
    if kind == "float_cast":
        return m(h).float().double()
    return m(h)


class Net(nn.Module):
    def __init__(self, kinds: list[str], mods: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.kinds = kinds
        self.mods = nn.ModuleList(mods)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, m in zip(self.kinds, self.mods, strict=True):
            x = _step(kind, m, x)
        return self.head(x.flatten(1))


def _randomize_bn(bn: nn.Module) -> None:
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(bn.num_features) * 2 + 0.05)
        bn.running_mean.copy_(torch.randn(bn.num_features))
        bn.weight.copy_(torch.randn(bn.num_features) * 2)


def _conv(draw, d: int, c: int, same: bool = False, klass: type | None = None) -> nn.Module:
    k = draw(st.sampled_from([1, 3] if same else [1, 2, 3]))
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
    co = c if same else groups * draw(st.integers(1, 2))
    kwargs = dict(padding=k // 2, padding_mode=draw(st.sampled_from(_MODES)), groups=groups)
    if not same:
        kwargs.update(stride=draw(st.integers(1, 2)), dilation=draw(st.integers(1, 2)),
                      padding=draw(st.integers(0, 1)))
    return (klass or _CONV[d])(c, co, k, **kwargs)


def _module(draw, kind: str, d: int, c: int) -> nn.Module:  # noqa: C901 - one table
    if kind in ("conv", "conv_inplace_relu", "inplace_mul", "shared_inplace", "int_cast",
                "float_cast"):
        return _conv(draw, d, c)
    if kind == "residual":
        return _conv(draw, d, c, same=True)
    if kind == "gain_conv":
        return _conv(draw, d, c, klass=_gain_conv(_CONV[d]))
    if kind == "std_conv":
        return _conv(draw, d, c, klass=_std_conv(_CONV[d]))
    if kind == "cat":
        return _CONV[d](c, 1, 1)
    if kind == "conv_t":
        stride, dil = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        groups = draw(st.sampled_from([g for g in (1, 2) if c % g == 0]))
        return _CONV_T[d](c, groups * draw(st.integers(1, 2)), draw(st.integers(1, 3)),
                          stride=stride, padding=draw(st.integers(0, 1)), groups=groups,
                          output_padding=draw(st.integers(0, max(stride, dil) - 1)),
                          dilation=dil)
    if kind == "bn":
        bn = _BN[d](c)
        _randomize_bn(bn)
        return bn
    if kind in ("avg", "max"):
        k = draw(st.integers(2, 3))
        return (_AVG if kind == "avg" else _MAX)[d](
            k, stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, k // 2)),
            ceil_mode=draw(st.booleans()))
    if kind == "adaptive":
        return _ADAPTIVE[d](2)
    return draw(st.sampled_from(_ACTS))()


_KINDS = ["conv", "conv_t", "bn", "avg", "max", "adaptive", "residual", "cat", "act", "act",
          "gain_conv", "std_conv", "conv_inplace_relu", "inplace_mul", "float_cast",
          "shared_inplace", "int_cast"]


@st.composite
def architectures(draw) -> tuple[nn.Module, tuple[int, ...], bool]:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    d = draw(st.sampled_from([1, 2]))
    c, n = draw(st.integers(1, 3)), draw(st.integers(4, 7))
    shape = (c, n) if d == 1 else (c, n, n)
    h = torch.zeros(2, *shape, dtype=torch.float64)
    kinds, mods = [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(_KINDS))
        m = _module(draw, kind, d, h.shape[1]).double().eval()
        try:
            out = _step(kind, m, h.clone())
        except RuntimeError:  # sizes this layer cannot take: leave it out
            continue
        if out.numel() == 0 or out.shape[1] > 8 or out[0].numel() > 300:
            continue
        kinds.append(kind)
        mods.append(m)
        h = out
    head = draw(st.sampled_from(_HEADS))(h[0].numel(), 3)
    net = Net(kinds, mods, head).double().eval()
    return net, shape, bool(_REFUSED & set(kinds))


def _local_norms(net: nn.Module, shape: tuple[int, ...], points: torch.Tensor) -> list[float]:
    norms = []
    for x in points:
        jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x)
        norms.append(float(torch.linalg.matrix_norm(jac.reshape(3, -1), ord=2)))
    return norms


def _ascend(net: nn.Module, x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """A few steps of gradient ascent on ||J(x) u||^2 for the top right singular vector u
    of J at the current point (the gradient of the Jacobian norm there)."""
    x = x.clone()
    for _ in range(steps):
        jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x).reshape(3, -1)
        u = torch.linalg.svd(jac)[2][0].reshape(x.shape)
        x = x.requires_grad_(True)
        _, jvp = torch.autograd.functional.jvp(lambda v: net(v[None])[0], x, u, create_graph=True)
        (grad,) = torch.autograd.grad(jvp.square().sum(), x, allow_unused=True)
        if grad is None or not bool(grad.norm() > 0):
            break  # affine around x: the norm is flat
        x = (x + 0.3 * grad / grad.norm().clamp_min(1e-12)).detach()
    return x


@settings(max_examples=60)
@given(arch=architectures())
def test_bound_dominates_local_jacobians(arch) -> None:
    net, shape, must_refuse = arch
    if must_refuse:
        try:
            network_lipschitz_bound(net, shape)
        except UnsupportedOperationError:
            return
        # Accepted only where the refused pattern acts on a constant (e.g. a standardized
        # 1x1 convolution with one input channel has weight 0): then the model is constant.
        x = torch.randn(2, *shape, dtype=torch.float64)
        with torch.no_grad():
            out = net(x)
        assert torch.equal(out[0], out[1]), net
        return
    bound = float(network_lipschitz_bound(net, shape))
    g = torch.Generator().manual_seed(0)
    points = torch.randn(6, *shape, generator=g, dtype=torch.float64)
    points = points * torch.tensor([0.1, 0.5, 1, 1, 2, 4], dtype=torch.float64).view(
        -1, *[1] * len(shape))
    points = torch.cat([points, _ascend(net, points[3])[None]])
    worst = max(_local_norms(net, shape, points))
    # Autograd casts the gradient through .float() to float32: such Jacobians are only
    # accurate to float32 rounding.
    rel = 1e-6 if "float_cast" in net.kinds else 1e-12
    assert worst <= bound * (1 + rel), (worst, bound, net)


@pytest.mark.parametrize("head", _HEADS)
@pytest.mark.parametrize("kind", ["gain_conv", "std_conv", "act"])
def test_forward_overriding_patterns_are_bounded_not_refused(kind: str, head: type) -> None:
    torch.manual_seed(5)
    layer = {"gain_conv": _gain_conv(nn.Conv2d)(2, 3, 3, padding=1, padding_mode="reflect"),
             "std_conv": _std_conv(nn.Conv2d)(2, 3, 3, padding=1, padding_mode="circular"),
             "act": DoubleReLU()}[kind]
    net = Net([kind], [layer], head(3 * 4 * 4 if kind != "act" else 2 * 4 * 4, 3))
    net = net.double().eval()
    bound = float(network_lipschitz_bound(net, (2, 4, 4)))
    points = torch.rand(4, 2, 4, 4, dtype=torch.float64) + 0.1  # positive: ReLU active
    assert max(_local_norms(net, (2, 4, 4), points)) <= bound
