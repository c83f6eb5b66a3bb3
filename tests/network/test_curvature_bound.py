"""The network curvature bound: exact Hessians and Jacobian differences never exceed it,
tight cases and hand recursions are met exactly, non-smooth graphs are refused by name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.curvature import (
    D64,
    ascend_curvature,
    curvature_seen,
    exact_layer_bound,
    jacobian_ratio,
    randomize_bn,
)
from torch import nn

import lightning_spectral as ls
from lightning_spectral.functional import (
    NonSmoothActivationError,
    SmoothSoftplus,
    activation_curvature,
    crc_certified_radius,
    curvature_certified_radius,
    linear_head_pairwise_curvature,
)
from lightning_spectral.network import (
    NonSmoothOperationError,
    UnsupportedOperationError,
    network_curvature_bound,
    network_lipschitz_bound,
    network_pairwise_curvature,
    register_curvature_rule,
    register_lipschitz_rule,
    unregister_curvature_rule,
    unregister_lipschitz_rule,
)

TANH_G, TANH_H = activation_curvature(nn.Tanh())
SIG_G, SIG_H = activation_curvature(nn.Sigmoid())


class ConvNet(nn.Module):
    """Strided circular conv + folded BatchNorm, grouped reflect conv, residual, avg pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="circular")
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="reflect")
        self.pool = nn.AvgPool2d(2, stride=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn1(self.conv1(x)))
        h = F.gelu(self.conv2(h)) + h
        return self.fc(self.pool(h).flatten(1))


class ResCat(nn.Module):
    """Standalone BatchNorm, residual add, concatenation, tanh / ELU / sigmoid / Mish."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(torch.tanh(self.a(x)))
        h = h + F.elu(self.b(h))
        u = torch.cat([self.c(h).sigmoid(), F.mish(h)], dim=1)
        return self.head(u)


class Conv1dNet(nn.Module):
    """Replicate-padded strided Conv1d, SmoothSoftplus, exact softplus, adaptive average
    pooling, mean, and an ``F.linear`` head with a constant weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, stride=2, padding=2, padding_mode="replicate")
        self.act = SmoothSoftplus(beta=2.0)
        self.pool = nn.AdaptiveAvgPool1d(3)
        self.weight = nn.Parameter(torch.randn(4, 9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.softplus(self.act(self.conv(x)), threshold=math.inf)
        h = h - 0.5 * h.mean(2, True)
        h = F.gelu(self.pool(h), approximate="tanh")
        return F.linear(h.flatten(1), self.weight)


def _mlp(act: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


NETS = {
    "conv": (ConvNet, (2, 5, 5)),
    "rescat": (ResCat, (6,)),
    "conv1d": (Conv1dNet, (2, 8)),
    "mlp_softplus": (lambda: _mlp(SmoothSoftplus()), (5,)),
    "mlp_sigmoid": (lambda: _mlp(nn.Sigmoid()), (5,)),
    "mlp_celu": (lambda: _mlp(nn.CELU(0.5)), (5,)),
}


def _build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    factory, shape = NETS[name]
    torch.manual_seed(1)
    net = factory().double()
    randomize_bn(net, 2)
    return net.eval(), shape


@pytest.mark.parametrize("name", sorted(NETS))
def test_bound_holds_for_exact_hessians_and_jacobian_differences(name: str) -> None:
    net, shape = _build(name)
    c = float(network_curvature_bound(net, shape))
    k = network_pairwise_curvature(net, shape)
    assert math.isfinite(c) and c > 0
    assert torch.allclose(k, k.T) and bool((k <= math.sqrt(2) * c * (1 + 1e-12)).all())
    gen = torch.Generator().manual_seed(3)
    worst = 0.0
    for _ in range(12):
        x = 2.0 * torch.randn(shape, generator=gen, dtype=D64)
        seen = curvature_seen(net, shape, x)
        worst = max(worst, seen["logit"])
        assert seen["logit"] <= c * (1 + 1e-9)
        assert bool((seen["pair"] <= k * (1 + 1e-9) + 1e-12).all())
        x2 = x + 0.3 * torch.randn(shape, generator=gen, dtype=D64)
        assert jacobian_ratio(net, shape, x, x2) <= c * (1 + 1e-9)
    ascended = ascend_curvature(net, shape, k.shape[0])
    assert ascended <= c * (1 + 1e-9)
    assert max(worst, ascended) > 0  # the oracle looked at a curved map


@pytest.mark.parametrize(("act", "peak"), [
    (nn.Tanh(), math.atanh(1 / math.sqrt(3))),
    (SmoothSoftplus(), 0.0),
    (nn.Sigmoid(), math.log(2 + math.sqrt(3))),
])
def test_one_neuron_composition_is_tight(act: nn.Module, peak: float) -> None:
    """``v s(w.x + b)`` has Hessian ``v s''(w.x + b) w w^T``: sup = ``|v| h ||w||^2``."""
    w = torch.tensor([[0.6, -1.2, 0.4]], dtype=D64)
    net = nn.Sequential(nn.Linear(3, 1), act, nn.Linear(1, 1)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(w)
        net[0].bias.fill_(0.3)
        net[2].weight.fill_(-2.5)
    _, h = activation_curvature(act)
    c = float(network_curvature_bound(net, (3,), layer_bound=exact_layer_bound))
    assert c == pytest.approx(2.5 * h * float(w.square().sum()), rel=1e-12)
    # At w.x + b = the peak of |s''| the exact Hessian norm reaches it (h is rounded up).
    x = (peak - 0.3) * w[0] / w.square().sum()
    assert curvature_seen(net, (3,), x)["logit"] == pytest.approx(c, rel=1e-7)


def test_scalar_chain_and_mlp_equal_the_hand_recursion() -> None:
    """``C_{i+1} = ||W_{i+1}|| (h L_i^2 + g C_i)``, ``L_{i+1} = g ||W_{i+1}|| L_i``."""
    for widths in ([1, 1, 1, 1, 1], [4, 6, 5, 3, 2]):
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers += [nn.Linear(n_in, n_out)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
        net = nn.Sequential(*layers).double().eval()
        norms = [float(exact_layer_bound(m, None)) for m in net if isinstance(m, nn.Linear)]
        lip, curv = norms[0], 0.0
        for n in norms[1:]:
            lip, curv = TANH_G * n * lip, n * (TANH_H * lip**2 + TANH_G * curv)
        got = network_curvature_bound(net, (widths[0],), layer_bound=exact_layer_bound)
        assert float(got) == pytest.approx(curv, rel=1e-12)
        assert got.dtype == torch.float64 and got.ndim == 0 and not got.requires_grad


class Skip(nn.Module):
    def __init__(self, inner: nn.Module, skip: bool) -> None:
        super().__init__()
        self.inner, self.skip, self.id = inner, skip, nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id(x) + self.inner(x) if self.skip else self.inner(x)


def test_identity_skip_adds_no_curvature() -> None:
    inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    plain = network_curvature_bound(Skip(inner, False), (4,))
    skipped = network_curvature_bound(Skip(inner, True), (4,))
    assert float(skipped) == float(plain) > 0
    lip_plain = network_lipschitz_bound(Skip(inner, False), (4,))
    assert float(network_lipschitz_bound(Skip(inner, True), (4,))) > float(lip_plain)


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_scaling_one_layer_scales_as_the_formulas_say(layer: int) -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                        nn.Linear(4, 2)).double().eval()
    n1, n2, n3 = (float(exact_layer_bound(net[i], None)) for i in (0, 2, 4))

    def formula(s1: float, s2: float, s3: float) -> float:
        l1, l2 = s1 * n1, TANH_G * s2 * n2 * s1 * n1
        c2 = s2 * n2 * TANH_H * l1**2
        return s3 * n3 * (TANH_H * l2**2 + TANH_G * c2)

    scale = 1.7
    with torch.no_grad():
        net[layer].weight.mul_(scale)
    factors = [scale if i == layer else 1.0 for i in (0, 2, 4)]
    got = float(network_curvature_bound(net, (3,), layer_bound=exact_layer_bound))
    assert got == pytest.approx(formula(*factors), rel=1e-12)
    # First layer: every term ~ c^2; last: ~ c; middle: c^2 and c terms.
    assert got / formula(1, 1, 1) == pytest.approx(
        {0: scale**2, 4: scale}.get(layer, got / formula(1, 1, 1)), rel=1e-12)


class TwoBranch(nn.Module):
    def __init__(self, cat: bool) -> None:
        super().__init__()
        self.a, self.b, self.cat = nn.Linear(3, 4), nn.Linear(3, 2), cat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, w = torch.tanh(self.a(x)), torch.sigmoid(self.b(x))
        return torch.cat([u, w], dim=1) if self.cat else u[:, :2] + w


@pytest.mark.parametrize("cat", [True, False])
def test_concatenation_is_root_sum_of_squares_and_sums_add(cat: bool) -> None:
    net = TwoBranch(cat).double().eval()
    cu = TANH_H * float(exact_layer_bound(net.a, None)) ** 2
    cw = SIG_H * float(exact_layer_bound(net.b, None)) ** 2
    got = float(network_curvature_bound(net, (3,), layer_bound=exact_layer_bound))
    assert got == pytest.approx(math.hypot(cu, cw) if cat else cu + cw, rel=1e-12)
    for seed in range(5):
        x = 3 * torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=D64)
        assert curvature_seen(net, (3,), x)["logit"] <= got


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.lin, self.fn = nn.Linear(4, 4), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.lin(x))


@pytest.mark.parametrize(("net", "shape", "node"), [
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (4,), "node '_1'"),
    (nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(), nn.Linear(4, 2)), (4,), "node '_1'"),
    (nn.Sequential(nn.Linear(4, 4), nn.Hardtanh()), (4,), "node '_1'"),
    (nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2)), (4,), "SmoothSoftplus"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)), (1, 6, 6), "node '_1'"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveMaxPool2d(1)), (1, 6, 6), "node '_1'"),
    (Fn(F.relu), (4,), "node 'relu"),
    (Fn(torch.abs), (4,), "node 'abs"),
    (Fn(lambda h: h.clamp(-1, 1)), (4,), "node 'clamp"),
    (Fn(lambda h: F.max_pool1d(h[:, None], 2)), (4,), "node 'max_pool1d"),
    (Fn(lambda h: F.softplus(h)), (4,), "node 'softplus"),
])
def test_non_smooth_nodes_are_refused_by_name(net: nn.Module, shape, node: str) -> None:
    with pytest.raises(NonSmoothOperationError, match=node) as info:
        network_curvature_bound(net, shape)
    assert isinstance(info.value, UnsupportedOperationError)
    assert isinstance(info.value, NonSmoothActivationError)
    assert "SmoothSoftplus" in str(info.value)  # a smooth replacement is suggested


def test_products_of_two_dependent_tensors_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedOperationError, match="'mul'.*two input-dependent"):
        network_curvature_bound(Fn(lambda h: h * torch.tanh(h)), (4,))
    with pytest.raises(UnsupportedOperationError, match="'truediv'"):
        network_curvature_bound(Fn(lambda h: 1.0 / (2 + torch.tanh(h))), (4,))


def test_lipschitz_soundness_guards_apply_to_the_curvature_bound() -> None:
    with pytest.raises(UnsupportedOperationError, match="step function"):
        network_curvature_bound(Fn(lambda h: h.long().double()), (4,))
    with pytest.raises(UnsupportedOperationError, match="batch axis"):
        network_curvature_bound(Fn(lambda h: torch.tanh(h.reshape(1, -1))), (4,))
    with pytest.raises(UnsupportedOperationError, match="in-place update of 'lin'"):
        network_curvature_bound(Fn(lambda h: h.mul_(2) + torch.tanh(h)), (4,))

    class TanhSub(nn.Tanh):  # an overriding forward is not Tanh: traced into, then refused
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x)

    with pytest.raises(NonSmoothOperationError, match="'relu'"):
        network_curvature_bound(nn.Sequential(nn.Linear(2, 2), TanhSub()), (2,))


def test_smooth_softplus_now_has_a_lipschitz_rule() -> None:
    net = nn.Sequential(nn.Linear(3, 4), SmoothSoftplus(2.0), nn.Linear(4, 2)).double()
    got = network_lipschitz_bound(net, (3,), layer_bound=exact_layer_bound)
    norms = [float(exact_layer_bound(net[i], None)) for i in (0, 2)]
    assert float(got) == pytest.approx(norms[0] * norms[1], rel=1e-12)


class Atan(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.atan(x)


def test_registered_curvature_rule_is_used_and_can_be_removed() -> None:
    net = nn.Sequential(nn.Linear(3, 4), Atan(), nn.Linear(4, 2)).double().eval()
    with pytest.raises(UnsupportedOperationError, match="node 'atan'"):
        network_curvature_bound(net, (3,))
    # atan' = 1 / (1 + x^2) <= 1; |atan''| = 2|x| / (1 + x^2)^2 peaks at 3 sqrt(3) / 8.
    h = 3 * math.sqrt(3) / 8 + 1e-12
    register_curvature_rule(Atan, lambda module, shapes: (1.0, h))
    try:
        c = float(network_curvature_bound(net, (3,), layer_bound=exact_layer_bound))
        n1, n2 = (float(exact_layer_bound(net[i], None)) for i in (0, 2))
        assert c == pytest.approx(n2 * h * n1**2, rel=1e-12)
        assert float(network_lipschitz_bound(net, (3,), layer_bound=exact_layer_bound)
                     ) == pytest.approx(n1 * n2, rel=1e-12)
        assert ascend_curvature(net, (3,), 2) <= c
    finally:
        unregister_curvature_rule(Atan)
    with pytest.raises(UnsupportedOperationError, match="atan"):
        network_lipschitz_bound(net, (3,))


def test_lipschitz_only_rule_is_refused_with_advice() -> None:
    register_lipschitz_rule(Atan, lambda module, shapes: 1.0)
    try:
        net = nn.Sequential(nn.Linear(3, 4), Atan())
        assert float(network_lipschitz_bound(net, (3,))) > 0
        with pytest.raises(NonSmoothOperationError, match="register_curvature_rule"):
            network_curvature_bound(net, (3,))
    finally:
        unregister_lipschitz_rule(Atan)


def test_bad_user_rule_and_bad_arguments_are_refused() -> None:
    register_curvature_rule(Atan, lambda module, shapes: (1.0, -1.0))
    try:
        with pytest.raises(ValueError, match="finite and >= 0"):
            network_curvature_bound(nn.Sequential(nn.Linear(3, 4), Atan()), (3,))
    finally:
        unregister_curvature_rule(Atan)
    with pytest.raises(TypeError, match="subclass of nn.Module"):
        register_curvature_rule(int, lambda module, shapes: (1.0, 0.0))
    with pytest.raises(TypeError, match="callable"):
        register_curvature_rule(Atan, (1.0, 0.0))
    with pytest.raises(ValueError, match="input_shape"):
        network_curvature_bound(nn.Linear(3, 2), (0,))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        network_pairwise_curvature(nn.Sequential(nn.Linear(3, 1), nn.Tanh()), (3,))


def test_pairwise_bound_folds_a_linear_head() -> None:
    net, shape = _build("mlp_softplus")
    phi = net[:-1]
    c_phi = network_curvature_bound(phi, shape)
    k = network_pairwise_curvature(net, shape)
    expected = torch.minimum(linear_head_pairwise_curvature(net[-1].weight, c_phi),
                             math.sqrt(2) * network_curvature_bound(net, shape)
                             * (1 - torch.eye(3, dtype=D64)))
    assert torch.equal(k, expected)
    assert bool((k < math.sqrt(2) * network_curvature_bound(net, shape)).any())
    assert ls.network_pairwise_curvature is network_pairwise_curvature


def _trained_net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=D64)
    y = torch.arange(3).repeat_interleave(40)
    x = centers[y] + 0.6 * torch.randn(120, 2, generator=gen, dtype=D64)
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), SmoothSoftplus(),
                        nn.Linear(8, 3)).double()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval(), x[::12], y[::12]


def _attack_distance(net: nn.Module, x: torch.Tensor, y: int, reach: float = 6.0) -> float:
    """Smallest distance to a misclassified point along 360 rays (an upper bound on the
    true distance to the decision boundary), refined by bisection."""
    angles = torch.arange(360, dtype=D64) * (2 * math.pi / 360)
    rays = torch.stack([angles.cos(), angles.sin()], 1)
    t = torch.linspace(0, reach, 301, dtype=D64)
    with torch.no_grad():
        pts = x + t[None, :, None] * rays[:, None, :]
        wrong = net(pts.reshape(-1, 2)).argmax(1).reshape(360, 301) != y
        hit = wrong.any(1)
        first = wrong[hit].double().argmax(1)  # first misclassified sample of each ray
        rays, lo, hi = rays[hit], t[first - 1], t[first]
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            bad = net(x + mid[:, None] * rays).argmax(1) != y
            lo, hi = torch.where(bad, lo, mid), torch.where(bad, mid, hi)
    return float(hi.min()) if len(hi) else math.inf


def test_certified_radius_never_exceeds_an_attack_on_a_trained_net() -> None:
    net, x, y = _trained_net()
    c = network_curvature_bound(net, (2,))
    k = network_pairwise_curvature(net, (2,))
    r_global = curvature_certified_radius(net, x, y, c)
    r_pair = curvature_certified_radius(net, x, y, k)
    r_crc = crc_certified_radius(net, x, y, k, outer_steps=15, inner_steps=20)
    assert bool((r_global <= r_pair + 1e-12).all()) and bool((r_pair <= r_crc + 1e-12).all())
    assert float(r_crc.max()) > 0  # not vacuous
    for i in range(len(x)):
        if r_crc[i] > 0:
            assert float(r_crc[i]) <= _attack_distance(net, x[i], int(y[i]))


def test_functional_linear_head_is_folded_too() -> None:
    net, shape = _build("conv1d")
    k = network_pairwise_curvature(net, shape)
    assert bool((k < math.sqrt(2) * network_curvature_bound(net, shape) - 1e-12).any())


def test_observing_hooks_are_fine_and_modes_are_restored() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 2)).double()
    expected = float(network_curvature_bound(net, (3,)))
    seen: list[int] = []
    handle = net[2].register_forward_hook(lambda m, i, o: seen.append(1))
    try:
        net.train()
        assert float(network_curvature_bound(net, (3,))) == expected
        assert seen and net.training and net[1].training
    finally:
        handle.remove()
    handle = net[2].register_forward_hook(lambda m, i, o: 2 * o)
    try:
        with pytest.raises(UnsupportedOperationError, match="hook"):
            network_curvature_bound(net, (3,))
    finally:
        handle.remove()


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) if x.sum() > 0 else x  # data-dependent control flow


def test_untraceable_models_are_refused() -> None:
    with pytest.raises(UnsupportedOperationError, match="could not trace Branchy"):
        network_curvature_bound(Branchy(), (3,))


@pytest.mark.parametrize("fn", [
    lambda h: torch.tanh(h) * h.shape[0],
    lambda h: torch.tanh(h) / h.size(0) ** -1,
    lambda h: torch.tanh(h * h.size(0)),
], ids=["shape", "size", "inside"])
def test_a_constant_read_from_the_batch_size_is_refused_by_the_curvature_bound(fn) -> None:
    with pytest.raises(UnsupportedOperationError, match="at node '.*batch size"):
        network_curvature_bound(Fn(fn), (4,))


def test_reshapes_keeping_the_batch_axis_keep_their_curvature_bound() -> None:
    net = Fn(torch.tanh)
    plain = network_curvature_bound(net, (4,))
    net.fn = lambda h: torch.tanh(h.view(h.size(0), -1))
    assert float(network_curvature_bound(net, (4,))) == float(plain)


@pytest.mark.parametrize(("fn", "same_as"), [
    (nn.LogSigmoid(), SmoothSoftplus()),  # both (1, 1/4)
    (F.logsigmoid, SmoothSoftplus()),
    (torch.special.expit, nn.Sigmoid()),
], ids=["LogSigmoid", "logsigmoid", "expit"])
def test_logsigmoid_and_expit_have_curvature_rules(fn, same_as: nn.Module) -> None:
    net = Fn(fn).double()
    n = float(exact_layer_bound(net.lin, None))
    got = network_curvature_bound(net, (4,), layer_bound=exact_layer_bound)
    g, h = activation_curvature(same_as)
    assert float(got) == pytest.approx(h * n**2, rel=1e-12)
    assert float(network_lipschitz_bound(net, (4,), layer_bound=exact_layer_bound)) == (
        pytest.approx(g * n, rel=1e-12))
    for seed in range(3):
        x = 3 * torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=D64)
        assert curvature_seen(net, (4,), x)["logit"] <= float(got)


@pytest.mark.parametrize("pad", [
    nn.ZeroPad1d((1, 2)), nn.ConstantPad1d(2, 0.5), nn.ReflectionPad1d(2),
    nn.ReplicationPad1d((0, 3)), nn.CircularPad1d(1),
], ids=lambda p: type(p).__name__)
def test_padding_modules_are_linear_in_the_curvature_bound(pad: nn.Module) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), pad, nn.Flatten(), nn.Linear(
        2 * (4 + sum(pad.padding)), 2)).double()
    got = float(network_curvature_bound(net, (1, 6)))
    mode = {nn.ReflectionPad1d: "reflect", nn.ReplicationPad1d: "replicate",
            nn.CircularPad1d: "circular"}.get(type(pad), "constant")
    functional = nn.Sequential(net[0], net[1], _Pad(pad.padding, mode), net[3], net[4])
    assert got == float(network_curvature_bound(functional, (1, 6)))
    x = torch.randn(6, dtype=D64)
    assert curvature_seen(net, (1, 6), x)["logit"] <= got


class _Pad(nn.Module):
    def __init__(self, padding, mode: str) -> None:
        super().__init__()
        self.padding, self.mode = padding, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.padding, self.mode)


def test_softplus_with_negative_beta_is_smooth_or_refused_by_name() -> None:
    """``log(1 + exp(beta x)) / beta`` for ``beta < 0``: ``s' = sigmoid(beta x)`` in (0, 1),
    ``|s''| <= |beta| / 4``; with a finite threshold it switches to ``x`` where
    ``beta x > threshold``, as for ``beta > 0``, and is refused."""
    net = Fn(lambda h: F.softplus(h, beta=-2.0, threshold=math.inf)).double()
    n = float(exact_layer_bound(net.lin, None))
    got = float(network_curvature_bound(net, (4,), layer_bound=exact_layer_bound))
    assert got == pytest.approx(0.5 * n**2, rel=1e-12)
    for seed in range(3):
        x = 3 * torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=D64)
        assert curvature_seen(net, (4,), x)["logit"] <= got
    with pytest.raises(NonSmoothOperationError, match="node 'softplus'"):
        network_curvature_bound(Fn(lambda h: F.softplus(h, beta=-1)), (4,))
    with pytest.raises(UnsupportedOperationError, match="node 'softplus'.*beta=0"):
        network_curvature_bound(Fn(lambda h: F.softplus(h, beta=0.0, threshold=math.inf)), (4,))


def test_curvature_walk_unwraps_torch_compile_and_warns_on_half_casts() -> None:
    net = Fn(torch.tanh)
    expected = float(network_curvature_bound(net, (4,)))
    assert float(network_curvature_bound(torch.compile(net), (4,))) == expected
    net.fn = lambda h: torch.tanh(h.to(torch.bfloat16)).float()
    with pytest.warns(UserWarning, match="node 'to' computes in torch.bfloat16"):
        assert float(network_curvature_bound(net, (4,))) == expected
    with pytest.raises(ValueError, match=r"input_shape.*entry 0 is 4.5"):
        network_curvature_bound(net, (4.5,))
