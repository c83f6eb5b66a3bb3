"""torch's softplus with its finite threshold: the slack against the smooth twin, the walk
that carries it, the Taylor bound with slack and the certificate built on it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_curvature_certificate import _attack_distance
from torch import nn

from lightning_spectral import (
    NonSmoothOperationError,
    network_curvature_bound,
    network_curvature_bounds,
)
from lightning_spectral.functional import (
    SmoothSoftplus,
    activation_curvature,
    activation_curvature_slack,
    curvature_certified_radius,
    softplus_switch_slack,
)
from lightning_spectral.network.curvature import curvature_and_pairwise

D64 = torch.float64


def _twin(net: nn.Module) -> nn.Module:
    """The same network with every nn.Softplus replaced by SmoothSoftplus (no switch)."""
    twin = copy.deepcopy(net)
    for name, module in list(twin.named_modules()):
        if isinstance(module, nn.Softplus):
            parent = twin.get_submodule(name.rpartition(".")[0]) if "." in name else twin
            setattr(parent, name.rpartition(".")[2], SmoothSoftplus(module.beta))
    return twin.eval()


def _mlp(widths: list[int], beta: float = 1.0, threshold: float = 20.0,
         scale: float = 1.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if i:
            layers.append(nn.Softplus(beta, threshold))
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.mul_(scale)
        layers.append(lin)
    return nn.Sequential(*layers).to(D64).eval()


def _margins_and_grads(net: nn.Module, x: torch.Tensor, y: int, t: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    z = net(x)
    mu = z[:, y] - z[:, t]
    (grad,) = torch.autograd.grad(mu.sum(), x)
    return mu.detach(), grad


# ----------------------------------------------------------------------------------------
# One unit: (delta, e) against torch itself.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5, -1.5])
@pytest.mark.parametrize("threshold", [20.0, 5.0, 1.0, -0.5])
def test_switch_slack_bounds_torch_softplus_and_is_tight(beta: float, threshold: float) -> None:
    delta, e = softplus_switch_slack(beta, threshold)
    x0 = threshold / beta
    # Dense around the switch (both sides), and far out on both sides.
    x = torch.cat([x0 + torch.linspace(-1, 1, 20001, dtype=D64) * 1e-3 / abs(beta),
                   torch.linspace(-60, 60, 20001, dtype=D64) / abs(beta)]).requires_grad_(True)
    s = F.softplus(x, beta, threshold)
    smooth = torch.logaddexp(beta * x, torch.zeros_like(x)) / beta  # the exact formula
    (ds,) = torch.autograd.grad(s.sum(), x)
    (dsmooth,) = torch.autograd.grad(smooth.sum(), x)
    value_gap, slope_gap = (s - smooth).abs().max(), (ds - dsmooth).abs().max()
    assert value_gap <= e and slope_gap <= delta
    # Tight (the suprema are approached just past the switch), so the test has teeth.
    assert value_gap >= 0.999 * e and slope_gap >= 0.999 * delta
    # The closed forms at the default threshold.
    if threshold == 20.0:
        assert delta == pytest.approx(1 / (1 + math.exp(20)), rel=1e-5)
        assert e == pytest.approx(math.log1p(math.exp(-20)) / abs(beta), rel=1e-5)


def test_slack_constants_of_the_activations() -> None:
    g, h, delta, e = activation_curvature_slack(nn.Softplus(beta=2.0))
    assert (g, h) == activation_curvature(SmoothSoftplus(2.0)) == (1.0, 0.5)
    assert (delta, e) == softplus_switch_slack(2.0, 20.0) and delta > 0 and e > 0
    assert activation_curvature_slack(F.softplus, beta=3.0, threshold=4.0)[2:] == \
        softplus_switch_slack(3.0, 4.0)
    for smooth in (SmoothSoftplus(2.0), nn.Tanh(), nn.Softplus(threshold=math.inf)):
        assert activation_curvature_slack(smooth) == (*activation_curvature(smooth), 0.0, 0.0)
    with pytest.raises(ValueError, match="ReLU"):  # still refused: no twin exists
        activation_curvature_slack(nn.ReLU())
    with pytest.raises(ValueError, match="SmoothSoftplus"):  # (g, h) alone stays refused
        activation_curvature(nn.Softplus())
    with pytest.raises(ValueError):
        softplus_switch_slack(1.0, -math.inf)


# ----------------------------------------------------------------------------------------
# The walk: (E, D) against an explicit small case and against sampled twins.
# ----------------------------------------------------------------------------------------
def test_one_hidden_layer_slack_is_the_hand_formula() -> None:
    torch.manual_seed(0)
    net = _mlp([3, 7, 4], beta=2.0, threshold=14.0)
    delta, e = softplus_switch_slack(2.0, 14.0)
    w1, w2 = net[0].weight.detach(), net[2].weight.detach()
    # u = W1 x + b: (E, D) = (0, 0); s(u): (sqrt(7) e, delta ||W1||); head: ||W2_y - W2_t||.
    rows = torch.linalg.vector_norm(w2[:, None] - w2[None], dim=2)
    bounds = network_curvature_bounds(net, (3,))
    norm1 = float(torch.linalg.matrix_norm(w1, ord=2))
    torch.testing.assert_close(bounds.value_slack, rows * math.sqrt(7) * e, rtol=1e-12, atol=0)
    torch.testing.assert_close(bounds.jacobian_slack, rows * delta * norm1, rtol=1e-9, atol=0)
    # K and C are those of the twin.
    c, k = curvature_and_pairwise(_twin(net), (3,))
    assert torch.equal(bounds.curvature, c) and torch.equal(bounds.pairwise, k)


class _Residual(nn.Module):
    """F.softplus in a residual block, a concatenation and a non-linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(12, 3)
        self.act = nn.Softplus(beta=1.5, threshold=14.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.act(self.a(x))
        v = u + F.softplus(self.b(u), beta=0.7, threshold=15.0)
        return self.c(torch.cat([v, torch.tanh(u)], dim=1))


class _SmoothResidual(_Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = SmoothSoftplus(1.5)(self.a(x))
        v = u + SmoothSoftplus(0.7)(self.b(u))
        return self.c(torch.cat([v, torch.tanh(u)], dim=1))


@pytest.mark.parametrize("kind", ["mlp", "residual"])
def test_walk_slack_bounds_the_distance_to_the_twin(kind: str) -> None:
    torch.manual_seed(1)
    # Thresholds near the smallest the walk takes (value jump <= 1e-6), so that the gaps are
    # far above float64 rounding; inputs large enough to cross the switches.
    if kind == "mlp":
        net = _mlp([4, 8, 8, 3], beta=2.0, threshold=14.0, scale=2.0)
        twin, shape = _twin(net), (4,)
    else:
        net = _Residual().to(D64).eval()
        twin = _SmoothResidual().to(D64).eval()
        twin.load_state_dict(net.state_dict())
        shape = (4,)
    bounds = network_curvature_bounds(net, shape)
    x = 12.0 * torch.randn(4000, *shape, dtype=D64)
    worst_value, worst_grad = 0.0, 0.0
    for y in range(3):
        for t in range(3):
            if y == t:
                continue
            mu, g = _margins_and_grads(net, x, y, t)
            mu_twin, g_twin = _margins_and_grads(twin, x, y, t)
            value = float((mu - mu_twin).abs().max() / bounds.value_slack[y, t])
            grad = float((g - g_twin).norm(dim=1).max() / bounds.jacobian_slack[y, t])
            worst_value, worst_grad = max(worst_value, value), max(worst_grad, grad)
    assert worst_value <= 1.0 and worst_grad <= 1.0
    assert worst_value > 1e-3 and worst_grad > 1e-3  # the gaps are real, the bounds not vacuous


# ----------------------------------------------------------------------------------------
# The Taylor bound with slack, on random pairs and on pairs straddling the switch.
# ----------------------------------------------------------------------------------------
def _straddling(net: nn.Sequential, beta: float, threshold: float, n: int,
                gen: torch.Generator) -> torch.Tensor:
    """Inputs putting a first-layer unit at beta u = threshold (+- 1e-9): u = W x + b."""
    w, b = net[0].weight.detach(), net[0].bias.detach()
    x = torch.randn(n, w.shape[1], generator=gen, dtype=D64)
    unit = torch.randint(0, w.shape[0], (n,), generator=gen)
    row = w[unit]
    target = threshold / beta + 1e-9 * torch.randn(n, generator=gen, dtype=D64)
    gap = target - (x * row).sum(1) - b[unit]
    return x + (gap / row.square().sum(1))[:, None] * row


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), beta=st.sampled_from([1.0, 2.0, -1.0]),
       threshold=st.sampled_from([20.0, 15.0, 14.0]), step=st.floats(1e-4, 2.0))
def test_taylor_bound_with_slack_holds_on_straddling_pairs(seed: int, beta: float,
                                                          threshold: float, step: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = _mlp([3, 6, 6, 3], beta=beta, threshold=threshold, scale=1.5)
    bounds = network_curvature_bounds(net, (3,))
    x = torch.cat([_straddling(net, beta, threshold, 64, gen),
                   2.0 * torch.randn(64, 3, generator=gen, dtype=D64)])
    d = torch.randn(x.shape, generator=gen, dtype=D64)
    d = step * d / d.norm(dim=1, keepdim=True) * torch.rand(len(x), 1, generator=gen, dtype=D64)
    for y, t in [(0, 1), (1, 2), (2, 0)]:
        mu, g = _margins_and_grads(net, x, y, t)
        mu_d, _ = _margins_and_grads(net, x + d, y, t)
        remainder = (mu_d - mu - (g * d).sum(1)).abs()
        r = d.norm(dim=1)
        k, jac, val = bounds.pairwise[y, t], bounds.jacobian_slack[y, t], bounds.value_slack[y, t]
        allowed = k * r.square() / 2 + jac * r + 2 * val
        assert (remainder <= allowed + 1e-12 * (1 + mu.abs())).all()


def test_without_slack_the_taylor_bound_fails_across_the_switch() -> None:
    """The slack terms are needed: for a tiny step across the switch, K ||d||^2 / 2 alone is
    below the remainder (the jumps in value and slope do not shrink with the step)."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    net = _mlp([3, 6, 3], beta=1.0, threshold=14.0)
    bounds = network_curvature_bounds(net, (3,))
    x = _straddling(net, 1.0, 14.0, 200, gen)
    d = 1e-6 * torch.randn(x.shape, generator=gen, dtype=D64)
    mu, g = _margins_and_grads(net, x, 0, 1)
    mu_d, _ = _margins_and_grads(net, x + d, 0, 1)
    remainder = (mu_d - mu - (g * d).sum(1)).abs()
    r = d.norm(dim=1)
    assert (remainder > bounds.pairwise[0, 1] * r.square() / 2).any()
    full = bounds.pairwise[0, 1] * r.square() / 2 + bounds.jacobian_slack[0, 1] * r
    assert (remainder <= full + 2 * bounds.value_slack[0, 1]).all()


# ----------------------------------------------------------------------------------------
# The certificate.
# ----------------------------------------------------------------------------------------
def test_default_softplus_network_certifies_and_withstands_an_attack() -> None:
    torch.manual_seed(0)
    net = _mlp([4, 12, 3], scale=1.5)  # nn.Softplus() with its default threshold 20
    x = torch.randn(40, 4, dtype=D64)
    y = net(x).argmax(1).detach()
    with pytest.raises(NonSmoothOperationError, match="network_curvature_bounds"):
        network_curvature_bound(net, (4,))  # C alone would be no bound of this network
    bounds = network_curvature_bounds(net, (4,))
    assert 0 < float(bounds.jacobian_slack.max()) < 1e-7
    assert 0 < float(bounds.value_slack.max()) < 1e-7
    r = curvature_certified_radius(net, x, y, bounds.pairwise,
                                   jacobian_slack=bounds.jacobian_slack,
                                   value_slack=bounds.value_slack)
    assert (r > 0).all()
    attack = _attack_distance(net, x, y)
    assert torch.isfinite(attack).all()
    assert (r <= attack).all()
    assert float((r / attack).median()) > 0.2
    # The slack costs almost nothing at the default threshold, but it is charged.
    r_twin = curvature_certified_radius(_twin(net), x, y, bounds.pairwise)
    assert (r <= r_twin).all() and (r < r_twin).any()
    assert float((r_twin - r).max()) < 1e-6


def test_radius_with_slack_is_the_root_of_the_slackened_bound() -> None:
    torch.manual_seed(2)
    net = _mlp([3, 5, 2], threshold=1.0)
    x = torch.randn(16, 3, dtype=D64)
    y = net(x).argmax(1).detach()
    k, dj, ev = 0.7, 0.05, 0.01  # scalars: sqrt(2) times for the margin
    r = curvature_certified_radius(net, x, y, k, jacobian_slack=dj, value_slack=ev)
    mu, g = _margins_and_grads(net, x, 0, 1)
    sign = torch.where(y == 0, 1.0, -1.0).to(D64)
    mu, gn = sign * mu, g.norm(dim=1)
    kk, d2, e2 = math.sqrt(2) * k, math.sqrt(2) * dj, math.sqrt(2) * ev
    left = mu - 2 * e2 - (gn + d2) * r - kk * r.square() / 2
    ok = mu > 2 * e2
    assert torch.allclose(left[ok], torch.zeros_like(left[ok]), atol=1e-12)
    assert (r[~ok] == 0).all()
    assert ok.any() and (~ok).any() or ok.all()


def test_zero_slack_is_bit_identical_and_smooth_networks_are_unchanged() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 8), SmoothSoftplus(2.0), nn.Linear(8, 8), nn.Tanh(),
                        nn.Linear(8, 3)).to(D64).eval()
    bounds = network_curvature_bounds(net, (4,))
    c, k = curvature_and_pairwise(net, (4,))
    assert torch.equal(bounds.curvature, c) and torch.equal(bounds.pairwise, k)
    assert torch.equal(network_curvature_bound(net, (4,)), c)
    assert not bounds.jacobian_slack.any() and not bounds.value_slack.any()
    x = torch.randn(30, 4, dtype=D64)
    y = net(x).argmax(1).detach()
    plain = curvature_certified_radius(net, x, y, k)
    slack = curvature_certified_radius(net, x, y, k, jacobian_slack=bounds.jacobian_slack,
                                       value_slack=bounds.value_slack)
    assert torch.equal(plain, slack)
