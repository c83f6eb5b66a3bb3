"""Whole-network Lipschitz bounds against explicit Jacobians, exact constants and attacks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.oracles import operator_norm
from torch import nn

from lightning_spectral.functional import certified_radius
from lightning_spectral.network import (
    UnsupportedOperationError,
    network_lipschitz_bound,
    register_lipschitz_rule,
    unregister_lipschitz_rule,
)
from lightning_spectral.network.api import sequential_bound


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """Spectral norm of the Jacobian of the per-sample map at x (float64)."""
    jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0].flatten(), x)
    return float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2))


def _randomize_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 1.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))


class ResidualBlock(nn.Module):
    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = act
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class SmallNet(nn.Module):
    """conv-BN, a residual block, a pooling, flatten, linear; activation configurable."""

    def __init__(self, act: type[nn.Module] = nn.Identity, pool: str = "avg") -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = act()
        self.block = ResidualBlock(4, act())
        self.pool = {"avg": nn.AvgPool2d(2), "max": nn.MaxPool2d(3, stride=2, padding=1),
                     "adaptive": nn.AdaptiveAvgPool2d(2)}[pool]
        self.side = nn.Conv2d(4, 2, 1)  # a concatenated branch
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.act(self.bn(self.stem(x))))
        x = self.pool(x)
        x = torch.cat([x, 0.5 * self.side(x)], dim=1)
        return self.fc(x.flatten(1))


def _affine_nets() -> list[nn.Module]:
    nets = []
    for seed, pool in enumerate(["avg", "adaptive", "avg"]):
        torch.manual_seed(seed)
        net = SmallNet(nn.Identity, pool).double()
        _randomize_bn(net, seed)
        nets.append(net.eval())
    seq = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3),
                        nn.Conv2d(3, 3, 2, dilation=2, padding=1, groups=3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).double()
    _randomize_bn(seq, 9)
    nets.append(seq.eval())
    return nets


@pytest.mark.parametrize("layer_bound", [None, operator_norm], ids=["engine", "exact"])
@pytest.mark.parametrize("index", range(4))
def test_affine_networks_bound_jacobian_and_boundary_distance(layer_bound, index) -> None:
    net = _affine_nets()[index]
    bound = network_lipschitz_bound(net, (2, 4, 4), layer_bound=layer_bound)
    assert bound.dtype == torch.float64 and bound.ndim == 0
    x0 = torch.zeros(2, 4, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x0).reshape(-1, 32)
    exact = torch.linalg.matrix_norm(jac, ord=2)
    assert bound >= exact * (1 - 1e-12)
    # Affine map f(x) = J x + b: the exact distance to the nearest decision boundary.
    x = torch.randn(64, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        logits = net(x)
    y = logits.argmax(1)
    diff = (logits.gather(1, y[:, None]) - logits)  # f_y - f_j
    row_gap = torch.linalg.vector_norm(jac[y][:, None, :] - jac[None, :, :], dim=-1)
    dist = torch.where(diff > 0, diff / row_gap, torch.full_like(diff, math.inf)).min(1).values
    radius = certified_radius(logits, y, bound)
    assert (radius <= dist * (1 + 1e-9)).all()


def test_product_bound_attained_with_aligned_layers() -> None:
    """Diagonal layers whose largest entries line up, a BatchNorm that only folding keeps
    tight, a residual with non-negative gain and a concatenation: every step of the
    composition is an equality, so the bound must equal the exact constant."""

    class Aligned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.res = nn.Conv2d(3, 3, 1)
            self.fc = nn.Linear(2 * 3 * 2 * 2, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.bn(self.conv(x))
            x = x + self.res(x)
            x = torch.cat([x, x * 0.5], dim=1)
            return self.fc(torch.flatten(x, 1))

    net = Aligned().double().eval()
    with torch.no_grad():
        net.conv.weight.copy_(torch.diag(torch.tensor([3.0, 1.0, 0.5]))[:, :, None, None])
        # Scale largest on channel 1: max|s| * max|w| = 6 > max|s w| = 3.
        net.bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        net.bn.running_var.fill_(1.0 - net.bn.eps)
        net.res.weight.copy_(torch.diag(torch.tensor([2.0, 0.3, 0.1]))[:, :, None, None])
        w = torch.zeros(4, 24, dtype=torch.float64)
        # Read (channel 0, pixel 0) and its half-size copy (channel 3, pixel 0) along the
        # concatenation's top direction (1, 0.5) / sqrt(1.25): row norm 1.5.
        w[0, 0], w[0, 12] = 1.5 / math.sqrt(1.25), 0.75 / math.sqrt(1.25)
        w[1, 5] = 0.7
        net.fc.weight.copy_(w)
    jac = torch.autograd.functional.jacobian(
        lambda v: net(v[None])[0], torch.zeros(3, 2, 2, dtype=torch.float64))
    exact = torch.linalg.matrix_norm(jac.reshape(4, -1), ord=2)
    # 3 * 1 (folded BN) * (1 + 2) * sqrt(1 + 0.25) * 1.5
    assert abs(float(exact) - 3 * 3 * math.sqrt(1.25) * 1.5) < 1e-9
    for layer_bound in (None, operator_norm):
        bound = network_lipschitz_bound(net, (3, 2, 2), layer_bound=layer_bound)
        assert abs(float(bound) - float(exact)) <= 1e-6 * float(exact)


def test_batchnorm_without_folding_uses_its_largest_scale() -> None:
    """A BatchNorm whose input conv also feeds another branch cannot be folded."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1, bias=False)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.bn(h) + h

    net = Shared().double().eval()
    with torch.no_grad():
        net.conv.weight.copy_(torch.diag(torch.tensor([2.0, 1.0]))[:, :, None, None])
        net.bn.weight.copy_(torch.tensor([1.0, 4.0]))
        net.bn.running_var.fill_(1.0 - net.bn.eps)
    bound = network_lipschitz_bound(net, (2, 1, 1), layer_bound=operator_norm)
    assert abs(float(bound) - (2 * 4 + 2)) < 1e-9  # ||W|| max|s| + ||W||


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(2), nn.AvgPool2d(3, stride=1), nn.AvgPool2d(3, stride=2, padding=1),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.AvgPool2d((2, 3), stride=(1, 2), divisor_override=4), nn.AvgPool1d(3, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d((3, 2)), nn.AdaptiveAvgPool1d(4),
    ],
    ids=repr,
)
def test_average_pools_are_exact(pool: nn.Module) -> None:
    """An average pool is linear: the bound must equal its explicit operator norm."""
    shape = (2, 7) if "1d" in type(pool).__name__ else (2, 7, 6)
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    exact = torch.linalg.matrix_norm(pool(basis).reshape(n, -1), ord=2)
    bound = network_lipschitz_bound(pool, shape, layer_bound=operator_norm)
    assert abs(float(bound) - float(exact)) < 1e-9


@pytest.mark.parametrize(
    "pool",
    [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=1), nn.MaxPool2d(3, stride=2, padding=1),
     nn.MaxPool2d(2, dilation=2), nn.MaxPool1d(4, stride=1, ceil_mode=True),
     nn.AdaptiveMaxPool2d(4)],
    ids=repr,
)
def test_max_pools_bound_and_attain(pool: nn.Module) -> None:
    """The max-pool constant sqrt(c) is attained by perturbing the position that the most
    windows select; random points give local Jacobian norms below it."""
    shape = (1, 9) if "1d" in type(pool).__name__ else (1, 7, 7)
    bound = float(network_lipschitz_bound(pool, shape, layer_bound=operator_norm))
    worst = 0.0
    for _ in range(10):
        worst = max(worst, jacobian_norm(pool, torch.randn(shape, dtype=torch.float64)))
    # Put a peak at every position in turn: the Jacobian at the peak selects it c times.
    n = math.prod(shape)
    for i in range(n):
        x = torch.zeros(n, dtype=torch.float64)
        x[i] = 10.0
        worst = max(worst, jacobian_norm(pool, x.reshape(shape) + 0.01 * torch.rand(shape)))
    assert worst <= bound * (1 + 1e-12)
    assert worst >= bound * (1 - 1e-9)


def test_global_means_and_functional_forms() -> None:
    class Heads(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = x.mean(dim=(2, 3))                            # 1/sqrt(12)
            b = F.adaptive_avg_pool2d(x, 1).flatten(1)        # 1/sqrt(12)
            c = torch.sum(F.avg_pool2d(x, 2), dim=[-1, -2])   # 1/2 (3x4 -> 1x2) * sqrt(2)
            return torch.cat((a, b - c / 3), 1)

    net = Heads()
    bound = network_lipschitz_bound(net, (2, 3, 4), layer_bound=operator_norm)
    la = 1 / math.sqrt(12)
    expected = math.sqrt(la**2 + (la + 0.5 * math.sqrt(2) / 3) ** 2)
    assert abs(float(bound) - expected) < 1e-12
    jac = torch.autograd.functional.jacobian(net, torch.zeros(1, 2, 3, 4)).reshape(4, -1)
    assert float(torch.linalg.matrix_norm(jac.double(), ord=2)) <= expected + 1e-6


def _relu_nets() -> list[tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(3)
    net1 = SmallNet(nn.ReLU, "max").double()
    _randomize_bn(net1, 3)
    net2 = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.LeakyReLU(0.2), nn.Linear(16, 16),
                         nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)).double()
    with torch.no_grad():  # bigger weights: more curvature, local norms vary more
        for m in net2:
            if isinstance(m, nn.Linear):
                m.weight.mul_(2.0)
    return [(net1.eval(), (2, 4, 4)), (net2.eval(), (3, 2, 2))]


@pytest.mark.parametrize("index", [0, 1])
def test_relu_networks_bound_local_jacobians(index: int) -> None:
    net, shape = _relu_nets()[index]
    bound = float(network_lipschitz_bound(net, shape))
    xs = torch.randn(60, *shape, dtype=torch.float64) * 2
    jac = torch.func.vmap(torch.func.jacrev(lambda v: net(v[None])[0]))(xs)
    local = torch.linalg.matrix_norm(jac.reshape(60, jac.shape[1], -1), ord=2)
    assert bool((local > 0).all())
    assert float(local.detach().max()) <= bound * (1 + 1e-12)


def _pgd_flips(net: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor,
               steps: int = 40, restarts: int = 3) -> torch.Tensor:
    """l2 PGD on the margin max_{j != y} f_j - f_y inside per-sample balls; True where some
    iterate changed the prediction."""
    flipped = torch.zeros(len(x), dtype=torch.bool)
    r = radius.view(-1, *([1] * (x.ndim - 1)))
    g = torch.Generator().manual_seed(0)
    for _ in range(restarts):
        delta = torch.randn(x.shape, generator=g, dtype=x.dtype)
        delta = delta / delta.flatten(1).norm(dim=1).view_as(r) * r * torch.rand(
            r.shape, generator=g, dtype=x.dtype)
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = net(x + delta)
            flipped |= (logits.argmax(1) != y).detach()
            other = logits.scatter(1, y[:, None], -math.inf).max(1).values
            loss = (other - logits.gather(1, y[:, None])[:, 0]).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view_as(r)
                delta = delta + 0.25 * r * step
                norm = delta.flatten(1).norm(dim=1).view_as(r)
                delta = delta * torch.clamp(r / norm.clamp_min(1e-30), max=1.0)
        with torch.no_grad():
            flipped |= net(x + delta).argmax(1) != y
    return flipped


def test_pgd_never_flips_inside_the_certified_radius() -> None:
    net, shape = _relu_nets()[1]
    bound = network_lipschitz_bound(net, shape)
    x = torch.randn(80, *shape, dtype=torch.float64)
    with torch.no_grad():
        logits = net(x)
    y = logits.argmax(1)
    radius = certified_radius(logits, y, bound)
    assert bool((radius > 0).all())
    assert not bool(_pgd_flips(net, x, y, radius).any())
    # The attack is not toothless: with the local gradient instead of a global bound, a radius
    # a few times the linearized distance does flip predictions.
    big = radius * 50
    assert bool(_pgd_flips(net, x, y, big, steps=30, restarts=1).any())


def test_torchvision_resnet18_traces_to_a_finite_bound() -> None:
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10)
    net.train()
    bn_mean = net.bn1.running_mean.clone()
    # The tracing is under test here, not the layer engine (tested above): a cheap provable
    # layer bound, sqrt(prod k) ||T||_F >= sqrt(prod k) ||T||_2 (Fantastic Four's T), per group.
    def frobenius_ff(module: nn.Module, input_size) -> torch.Tensor:
        w = module.weight.detach().double()
        groups = getattr(module, "groups", 1)
        per_group = w.reshape(groups, -1).norm(dim=1).max()
        return per_group * math.sqrt(math.prod(w.shape[2:]))

    bound = network_lipschitz_bound(net, (3, 32, 32), layer_bound=frobenius_ff)
    assert bound.ndim == 0 and math.isfinite(float(bound)) and float(bound) > 0
    assert net.training and net.layer1[0].bn1.training  # modes restored
    assert torch.equal(net.bn1.running_mean, bn_mean)  # the dummy pass did not touch stats
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x[0])
    assert float(torch.linalg.matrix_norm(jac.reshape(10, -1).double(), ord=2)) <= float(bound)


class Custom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * x


@pytest.mark.parametrize(
    ("net", "match"),
    [
        (nn.Sequential(nn.Flatten(), nn.LayerNorm(12)), "LayerNorm"),
        (nn.Sequential(nn.Flatten(), nn.Softmax(dim=1)), "Softmax"),
        (nn.Sequential(nn.Upsample(scale_factor=2), nn.Flatten()), "Upsample"),
        (nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.Flatten()),
         "batch statistics"),
        (nn.Sequential(nn.Flatten(0)), "start_dim=0"),
        (nn.Sequential(nn.MaxPool2d(2, return_indices=True)), "return_indices"),
    ],
)
def test_unknown_modules_are_refused_by_name(net: nn.Module, match: str) -> None:
    with pytest.raises(UnsupportedOperationError, match=match):
        network_lipschitz_bound(net, (3, 2, 2))


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (torch.exp, "exp"),
        (lambda x: x * x, "two input-dependent"),
        (lambda x: 1.0 / x, "input-dependent"),
        (lambda x: x.mean(), "every axis"),
        (lambda x: x.sum(dim=0), "batch axis"),
        (lambda x: F.dropout(x, 0.5), "training=True"),
        (lambda x: x.abs().flatten(1), "abs"),
        (lambda x: torch.cat([x, x], dim=0), "batch axis"),
        (lambda x: x[0], "batch axis"),
        (lambda x: x.transpose(0, 1), "batch axis"),
        (lambda x: x.reshape(-1), "batch axis"),
        (lambda x: (x, x), "single tensor"),
    ],
)
def test_unknown_functions_are_refused_by_name(fn, match: str) -> None:
    with pytest.raises(UnsupportedOperationError, match=match):
        network_lipschitz_bound(_Fn(fn), (3, 2, 2))


def test_supported_functional_forms_and_constants() -> None:
    scale = nn.Parameter(torch.tensor([[-4.0], [0.5]]), requires_grad=False)

    class Ops(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Unused below: these only have to be supported (an unknown op would raise).
            h = F.relu(x) - torch.sigmoid(x) / 2 + F.leaky_relu(x, -3.0)
            h = x.view(x.size(0), 2, -1).clone().float() * self.scale      # * 4 (max |c|)
            return torch.flatten(h, 1)[:, :3] + torch.tanh(x).reshape(x.shape[0], -1)[:, 1:4]

    bound = network_lipschitz_bound(Ops(), (2, 2), layer_bound=operator_norm)
    assert abs(float(bound) - (4.0 + 1.0)) < 1e-12
    act = nn.Sequential(nn.Flatten(), nn.SiLU(), nn.Sigmoid(), nn.GELU(), nn.Dropout(0.3),
                        nn.Hardswish())
    assert abs(float(network_lipschitz_bound(act, (4,))) - 1.1 * 0.25 * 1.13 * 1.5) < 1e-12


def test_activation_constants_are_rounded_up() -> None:
    x = torch.linspace(-12, 12, 2_000_001, dtype=torch.float64, requires_grad=True)
    for fn, module in [(F.gelu, nn.GELU()), (lambda v: F.gelu(v, approximate="tanh"),
                                             nn.GELU("tanh")),
                       (F.silu, nn.SiLU()), (F.mish, nn.Mish()), (torch.sigmoid, nn.Sigmoid()),
                       (F.selu, nn.SELU()), (F.hardswish, nn.Hardswish())]:
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
        constant = float(network_lipschitz_bound(module, (3,)))
        assert float(grad.abs().max()) <= constant


def test_registered_rule_makes_a_module_a_leaf() -> None:
    net = nn.Sequential(nn.Linear(3, 3), Custom())
    try:
        register_lipschitz_rule(Custom, lambda module, shapes: 3.5)
        with torch.no_grad():
            net[0].weight.copy_(torch.eye(3) * 2)
        bound = network_lipschitz_bound(net, (3,))
        assert abs(float(bound) - 7.0) < 1e-6
    finally:
        unregister_lipschitz_rule(Custom)
    # Without the rule it is traced through: 3 * x is a known operation.
    assert abs(float(network_lipschitz_bound(net, (3,))) - 6.0) < 1e-6
    with pytest.raises(TypeError, match="subclass of nn.Module"):
        register_lipschitz_rule(int, lambda m, s: 1.0)


def test_sequential_fallback_matches_the_traced_graph() -> None:
    torch.manual_seed(1)
    inner = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), inner,
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4)).double().eval()
    _randomize_bn(net, 1)
    with torch.no_grad():
        traced = network_lipschitz_bound(net, (2, 4, 4), layer_bound=operator_norm)
        walked = sequential_bound(net, (2, 4, 4), operator_norm)
    assert abs(float(traced) - float(walked)) < 1e-12


@pytest.mark.parametrize("shape", [(), (0, 3), (-1,), "abc"])
def test_input_shape_is_validated(shape) -> None:
    with pytest.raises((ValueError, TypeError), match="input_shape"):
        network_lipschitz_bound(nn.Linear(3, 2), shape)


def test_wrong_input_shape_says_batch_is_excluded() -> None:
    with pytest.raises(ValueError, match="excludes the batch axis"):
        network_lipschitz_bound(nn.Conv2d(3, 2, 1), (1, 3, 4, 4))


_PADS = [
    (nn.ZeroPad1d((1, 2)), "constant", (2, 5)),
    (nn.ZeroPad2d((1, 0, 2, 1)), "constant", (2, 4, 5)),
    (nn.ZeroPad3d(1), "constant", (2, 3, 3, 3)),
    (nn.ConstantPad1d(2, 3.5), "constant", (2, 5)),
    (nn.ConstantPad2d((0, 1, 1, 2), -1.0), "constant", (2, 4, 5)),
    (nn.ConstantPad3d(1, 0.5), "constant", (2, 3, 3, 3)),
    (nn.ReflectionPad1d((2, 3)), "reflect", (2, 5)),
    (nn.ReflectionPad2d((1, 2, 3, 0)), "reflect", (2, 4, 5)),
    (nn.ReflectionPad3d(2), "reflect", (2, 3, 3, 3)),
    (nn.ReplicationPad1d((3, 1)), "replicate", (2, 5)),
    (nn.ReplicationPad2d(3), "replicate", (2, 4, 5)),
    (nn.ReplicationPad3d((1, 2, 0, 1, 2, 2)), "replicate", (2, 3, 3, 3)),
    (nn.CircularPad1d((2, 4)), "circular", (2, 5)),
    (nn.CircularPad2d((1, 3, 2, 2)), "circular", (2, 4, 5)),
    (nn.CircularPad3d(1), "circular", (2, 3, 3, 3)),
]


@pytest.mark.parametrize(("pad", "mode", "shape"), _PADS,
                         ids=[type(p).__name__ for p, _, _ in _PADS])
def test_padding_modules_bound_as_functional_pad(pad: nn.Module, mode: str, shape) -> None:
    """A padding module computes ``F.pad`` with its mode: the same (exact) bound, the norm of
    its 0/1 Jacobian, ``sqrt`` of the most copies of one entry."""
    value = getattr(pad, "value", 0.0)

    def functional(x: torch.Tensor) -> torch.Tensor:
        if mode == "constant":
            return F.pad(x, pad.padding, mode, value).flatten(1)
        return F.pad(x, pad.padding, mode).flatten(1)

    bound = float(network_lipschitz_bound(nn.Sequential(pad, nn.Flatten()), shape))
    assert bound == float(network_lipschitz_bound(_Fn(functional), shape))
    x = torch.randn(shape, dtype=torch.float64)
    assert bound == pytest.approx(jacobian_norm(nn.Sequential(pad, nn.Flatten()), x), rel=1e-12)


@pytest.mark.parametrize(("act", "constant"), [
    (nn.LogSigmoid(), 1.0), (F.logsigmoid, 1.0), (torch.special.expit, 0.25),
], ids=["LogSigmoid", "logsigmoid", "expit"])
def test_logsigmoid_and_expit_have_lipschitz_rules(act, constant: float) -> None:
    x = torch.linspace(-30, 30, 600_001, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(act(x).sum(), x)
    assert float(grad.abs().max()) <= constant
    net = act if isinstance(act, nn.Module) else _Fn(act)
    assert float(network_lipschitz_bound(net, (3,))) == constant


def test_a_torch_compiled_model_is_bounded_as_the_module_it_wraps() -> None:
    """``torch.compile`` wraps a module in an ``OptimizedModule`` (``_orig_mod``): the same
    map, bounded as the module itself, at top level or nested; nothing is compiled."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))
    expected = float(network_lipschitz_bound(net, (1, 4, 4)))
    assert float(network_lipschitz_bound(torch.compile(net), (1, 4, 4))) == expected

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.compile(net)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.body(x)

    assert float(network_lipschitz_bound(Outer(), (1, 4, 4))) == 2 * expected


@pytest.mark.parametrize(("shape", "entry"), [
    ((1.5, 4, 4), "entry 0 is 1.5"), ((1, 4.0, 4), "entry 1 is 4.0"), ((3, True), "entry 1"),
])
def test_non_integer_input_shape_entries_are_refused_not_truncated(shape, entry: str) -> None:
    with pytest.raises(ValueError, match=f"input_shape.*{entry}"):
        network_lipschitz_bound(nn.Flatten(), shape)
    assert float(network_lipschitz_bound(nn.Flatten(), torch.Size([1, 4, 4]))) == 1.0
    assert float(network_lipschitz_bound(nn.Flatten(), (torch.tensor(3),))) == 1.0
