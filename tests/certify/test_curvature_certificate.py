"""The second-order certificate: analytic oracles, attacks on tiny nets, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_spectral.functional import (
    SmoothSoftplus,
    activation_curvature,
    crc_certified_radius,
    curvature_certified_radius,
    linear_head_pairwise_curvature,
)

D64 = torch.float64


class Quadratic(nn.Module):
    """Logits ``(mu + G^T d - (K/2)||d||^2, 0)`` with ``d = x - x0``: margin Hessian ``-K I``."""

    def __init__(self, x0: torch.Tensor, mu: float, grad: torch.Tensor, k: float) -> None:
        super().__init__()
        self.x0, self.grad, self.mu, self.k = x0, grad, mu, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self.x0
        f = self.mu + d @ self.grad - 0.5 * self.k * (d * d).sum(1)
        return torch.stack([f, torch.zeros_like(f)], dim=1)


def test_quadratic_margin_gives_the_exact_root_distance() -> None:
    x0 = torch.tensor([[0.3, -0.2, 1.0]], dtype=D64)
    grad = torch.tensor([1.5, -2.0, 0.5], dtype=D64)
    mu, k = 0.8, 3.0
    model = Quadratic(x0[0], mu, grad, k).eval()
    pairwise = torch.tensor([[0.0, k], [k, 0.0]], dtype=D64)
    r = curvature_certified_radius(model, x0, torch.tensor([0]), pairwise)
    g = float(grad.norm())
    assert float(r[0]) == pytest.approx((math.sqrt(g * g + 2 * k * mu) - g) / k, rel=1e-14)
    # The boundary is reached right there, along -G: the radius is the true distance.
    on_boundary = x0 - r[0] * grad / grad.norm()
    assert abs(float(model(on_boundary)[0, 0])) < 1e-12
    # The scalar form (Jacobian-Lipschitz constant of the logit map = k) pays sqrt(2).
    r_scalar = curvature_certified_radius(model, x0, torch.tensor([0]), k)
    kk = math.sqrt(2) * k
    assert float(r_scalar[0]) == pytest.approx((math.sqrt(g * g + 2 * kk * mu) - g) / kk)
    assert r_scalar[0] < r[0]


@pytest.mark.parametrize("loose", [1.0, 1.5, 2.0, 4.0])
def test_crc_reaches_the_exact_distance_even_with_a_loose_bound(loose: float) -> None:
    x0 = torch.tensor([[0.3, -0.2, 1.0]], dtype=D64)
    grad = torch.tensor([1.5, -2.0, 0.5], dtype=D64)
    mu, k = 0.8, 3.0
    model = Quadratic(x0[0], mu, grad, k).eval()
    g = float(grad.norm())
    exact = (math.sqrt(g * g + 2 * k * mu) - g) / k
    bound = torch.tensor([[0.0, k * loose], [k * loose, 0.0]], dtype=D64)
    crc = float(crc_certified_radius(model, x0, torch.tensor([0]), bound)[0])
    assert crc == pytest.approx(exact, rel=1e-9)
    assert crc <= exact * (1 + 1e-12)
    r_k = float(curvature_certified_radius(model, x0, torch.tensor([0]), bound)[0])
    assert r_k <= crc and (loose == 1.0 or r_k < 0.99 * exact)


@pytest.mark.parametrize(("outer", "inner"), [(1, 1), (3, 1), (30, 1), (30, 2)])
def test_crc_with_an_unconverged_inner_solve_stays_sound(outer: int, inner: int) -> None:
    """The residual correction: F(x) alone at an unconverged x overshoots the distance."""
    x0 = torch.tensor([[0.3, -0.2, 1.0]], dtype=D64)
    grad = torch.tensor([1.5, -2.0, 0.5], dtype=D64)
    mu, k = 5.0, 3.0
    model = Quadratic(x0[0], mu, grad, k).eval()
    g = float(grad.norm())
    exact = (math.sqrt(g * g + 2 * k * mu) - g) / k
    bound = torch.tensor([[0.0, k], [k, 0.0]], dtype=D64)
    crc = crc_certified_radius(model, x0, torch.tensor([0]), bound, outer_steps=outer,
                               inner_steps=inner)
    assert float(crc[0]) <= exact * (1 + 1e-12)


def test_crc_on_affine_models_and_misclassified_points() -> None:
    w = torch.randn(3, 4, dtype=D64)
    model = _affine(w, torch.randn(3, dtype=D64))
    x = torch.randn(20, 4, dtype=D64)
    y = model(x).argmax(1).detach()
    torch.testing.assert_close(crc_certified_radius(model, x, y, 0.0),
                               curvature_certified_radius(model, x, y, 0.0), rtol=0, atol=0)
    wrong = (y + 1) % 3
    assert (crc_certified_radius(model, x, wrong, 0.5) == 0).all()
    with pytest.raises(ValueError, match="inner_steps"):
        crc_certified_radius(model, x, y, 0.5, inner_steps=0)


def _affine(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    lin = nn.Linear(weight.shape[1], weight.shape[0]).to(D64)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return lin.eval()


def test_affine_model_with_zero_curvature_gives_hyperplane_distance() -> None:
    w = torch.randn(4, 5, dtype=D64)
    model = _affine(w, torch.randn(4, dtype=D64))
    x = torch.randn(30, 5, dtype=D64)
    z = model(x).detach()
    y = z.argmax(1)
    # min over t of (z_y - z_t) / ||W_y - W_t||, written out directly.
    expected = torch.tensor([
        min(float((z[n, y[n]] - z[n, t]) / (w[y[n]] - w[t]).norm()) for t in range(4) if t != y[n])
        for n in range(30)
    ], dtype=D64)
    for curvature in (0.0, torch.zeros(4, 4, dtype=D64)):
        r = curvature_certified_radius(model, x, y, curvature)
        torch.testing.assert_close(r, expected, rtol=1e-13, atol=0)
    # Continuity at K -> 0.
    r_small = curvature_certified_radius(model, x, y, 1e-12)
    torch.testing.assert_close(r_small, expected, rtol=1e-9, atol=0)


def test_minimum_over_all_classes_not_just_the_runner_up() -> None:
    """Class 1 is the runner-up (logit 9) but constant; class 2 (logit 5) is steep and binds."""
    w = torch.tensor([[0.0, 0.0], [0.0, 0.0], [100.0, 0.0]], dtype=D64)
    model = _affine(w, torch.tensor([10.0, 9.0, 5.0], dtype=D64))
    x = torch.zeros(1, 2, dtype=D64)
    r = curvature_certified_radius(model, x, torch.tensor([0]), 0.0)
    assert float(r[0]) == pytest.approx(0.05, rel=1e-14)
    # Just beyond the radius class 2 wins, while the runner-up alone would certify infinity.
    beyond = torch.tensor([[0.0501, 0.0]], dtype=D64)
    assert int(model(beyond).argmax()) == 2


def test_misclassified_and_tied_samples_get_zero() -> None:
    model = _affine(torch.eye(3, dtype=D64), torch.zeros(3, dtype=D64))
    x = torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 0.0], [3.0, 1.0, 0.0]], dtype=D64)
    r = curvature_certified_radius(model, x, torch.tensor([0, 0, 0]), 0.5)
    assert r[0] == 0 and r[1] == 0 and r[2] > 0


def test_zero_gradient_and_zero_curvature_gives_infinity() -> None:
    model = _affine(torch.zeros(2, 3, dtype=D64), torch.tensor([1.0, 0.0], dtype=D64))
    r = curvature_certified_radius(model, torch.randn(2, 3, dtype=D64), torch.tensor([0, 0]), 0.0)
    assert torch.isinf(r).all()


# ----------------------------------------------------------------------------------------
# Tiny nets with hand-computed bounds (composition C = C_out L_in^2 + L_out C_in) vs attacks.
# ----------------------------------------------------------------------------------------
def _norm(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach(), ord=2))  # exact (SVD)


def _net(act: nn.Module, widths: list[int], scale: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if i:
            layers.append(act)
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.mul_(scale)
        layers.append(lin)
    return nn.Sequential(*layers).to(D64).eval()


def _hand_bound(net: nn.Sequential, act: nn.Module) -> tuple[float, float]:
    """(L, C) of the features feeding the last layer, and C of the logit map.

    z_1 = W_1 x: (||W_1||, 0); through s then W_{I+1}: L' = g ||W|| L and
    C' = ||W|| (h L^2 + g C).
    """
    g, h = activation_curvature(act)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    lip, curv = _norm(linears[0].weight), 0.0
    for lin in linears[1:-1]:
        w = _norm(lin.weight)
        lip, curv = g * w * lip, w * (h * lip**2 + g * curv)
    feature_curv = h * lip**2 + g * curv  # of s(z_{L-1}), whose Lipschitz bound is g * lip
    return feature_curv, _norm(linears[-1].weight) * feature_curv


def _margin(net: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    z = net(x)
    rows = torch.arange(len(x))
    return z[rows, y] - z[rows, t]


def _attack_distance(net: nn.Module, x0: torch.Tensor, y: torch.Tensor, restarts: int = 8,
                     steps: int = 40) -> torch.Tensor:
    """Smallest ||x - x0|| over verified adversarial points (z_t >= z_y) against every t.

    Per target: iterated projection of x0 onto the margin's linearization at x (damped), from
    several random starts; then the first crossing on the ray x0 -> x (fine scan), which is
    checked on the model itself.
    """
    n, num_classes = len(x0), int(net(x0[:1]).shape[1])
    best = torch.full((n,), math.inf, dtype=D64)
    for t in range(num_classes):
        idx = torch.nonzero(y != t).flatten().repeat_interleave(restarts)
        base, yy, tt = x0[idx], y[idx], torch.full_like(idx, t)
        x = base + 0.3 * torch.randn_like(base) * torch.rand(len(idx), 1, dtype=D64)
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            f = _margin(net, x, yy, tt)
            (grad,) = torch.autograd.grad(f.sum(), x)
            a = -(f.detach() + ((base - x.detach()) * grad).sum(1)) / grad.square().sum(1)
            x = 0.5 * x.detach() + 0.5 * (base + a[:, None] * grad)
        with torch.no_grad():
            for s in torch.linspace(0, 3, 1501, dtype=D64)[1:]:
                cand = base + s * (x - base)
                hit = _margin(net, cand, yy, tt) <= 0
                dist = torch.where(hit, (cand - base).norm(dim=1), torch.full_like(s, math.inf))
                best = best.scatter_reduce(0, idx, dist, "amin")
    return best


@pytest.mark.parametrize(("act", "widths", "scale"), [
    (SmoothSoftplus(), [4, 12, 3], 1.5),
    (nn.Tanh(), [4, 12, 3], 1.0),
    (nn.Tanh(), [3, 8, 8, 3], 1.0),
])
def test_radius_never_exceeds_attack_distance(act: nn.Module, widths: list[int],
                                              scale: float) -> None:
    net = _net(act, widths, scale)
    x = torch.randn(40, widths[0], dtype=D64)
    y = net(x).argmax(1).detach()
    feature_curv, logit_curv = _hand_bound(net, act)
    r_global = curvature_certified_radius(net, x, y, logit_curv)
    pairwise = linear_head_pairwise_curvature(net[-1].weight, feature_curv)
    r_pair = curvature_certified_radius(net, x, y, pairwise)
    attack = _attack_distance(net, x, y)
    assert torch.isfinite(attack).all()  # the attack found an adversarial point everywhere
    assert (r_pair >= r_global).all()  # ||W_y - W_t|| <= sqrt(2) ||W||
    assert (r_pair <= attack).all()
    assert (r_pair > 0).all()
    assert float((r_pair / attack).median()) > 0.2  # the comparison has teeth
    # ... and so does the attack: the first-order guess mu / ||G|| (K = 0) overshoots it.
    assert (curvature_certified_radius(net, x, y, 0.0) > attack).any()
    # The dual certificate sits in between (up to float64 rounding only), and is tighter.
    crc = crc_certified_radius(net, x, y, pairwise)
    assert (crc >= r_pair).all()
    assert (crc <= attack * (1 + 1e-9)).all()
    assert float((crc / r_pair).median()) > 1.1
    rough = crc_certified_radius(net, x, y, pairwise, outer_steps=2, inner_steps=1)
    assert (rough >= r_pair).all() and (rough <= attack * (1 + 1e-9)).all()


def test_hand_bound_dominates_exact_hessians() -> None:
    """The pairwise bound vs sup ||Hess (z_y - z_t)|| at many points (the bound's own oracle)."""
    act = nn.Tanh()
    net = _net(act, [3, 6, 6, 3], 1.0)
    feature_curv, _ = _hand_bound(net, act)
    pairwise = linear_head_pairwise_curvature(net[-1].weight, feature_curv)
    for x in torch.randn(100, 3, dtype=D64) * 2:
        for y, t in [(0, 1), (1, 2), (2, 0)]:
            hess = torch.autograd.functional.hessian(
                lambda u, y=y, t=t: (net(u[None])[0, y] - net(u[None])[0, t]), x
            )
            assert float(torch.linalg.matrix_norm(hess, ord=2)) <= float(pairwise[y, t])


def test_linear_head_pairwise_curvature() -> None:
    w = torch.randn(5, 7, dtype=D64)
    k = linear_head_pairwise_curvature(w, 2.5)
    for i in range(5):
        for j in range(5):
            assert float(k[i, j]) == pytest.approx(2.5 * float((w[i] - w[j]).norm()), rel=1e-14)
    assert (k.diagonal() == 0).all()
    assert (k <= math.sqrt(2) * _norm(w) * 2.5).all()
    with pytest.raises(ValueError, match="feature_curvature"):
        linear_head_pairwise_curvature(w, -1.0)
    with pytest.raises(ValueError, match=r"shape \(C, D\)"):
        linear_head_pairwise_curvature(torch.randn(5), 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        linear_head_pairwise_curvature(torch.full((2, 2), math.nan), 1.0)


# ----------------------------------------------------------------------------------------
# Precision and validation.
# ----------------------------------------------------------------------------------------
def test_float32_module_is_certified_in_float64_and_left_alone() -> None:
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).eval()
    x = torch.randn(6, 3)
    y = net(x).argmax(1)
    r = curvature_certified_radius(net, x, y, 0.7)
    assert r.dtype == D64
    assert all(p.dtype == torch.float32 for p in net.parameters())
    r64 = curvature_certified_radius(net.double(), x.double(), y, 0.7, dtype=None)
    torch.testing.assert_close(r, r64, rtol=1e-15, atol=0)


def test_bad_inputs_are_refused() -> None:
    net = _affine(torch.randn(3, 2, dtype=D64), torch.zeros(3, dtype=D64))
    x, y = torch.randn(4, 2, dtype=D64), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        curvature_certified_radius(net, x, y, -1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        curvature_certified_radius(net, x, y, math.nan)
    with pytest.raises(ValueError, match="off the diagonal"):
        curvature_certified_radius(net, x, y, torch.full((3, 3), math.inf, dtype=D64))
    with pytest.raises(ValueError, match=r"\(3, 3\) matrix"):
        curvature_certified_radius(net, x, y, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        curvature_certified_radius(net, x, y[:3], 1.0)
    with pytest.raises(ValueError, match="integer class"):
        curvature_certified_radius(net, x, y.double(), 1.0)
    with pytest.raises(ValueError, match="must lie in"):
        curvature_certified_radius(net, x, y + 1, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        curvature_certified_radius(lambda u: net(u) / 0.0, x, y, 1.0)
    with pytest.raises(ValueError, match="logits"):
        curvature_certified_radius(lambda u: net(u).flatten(), x, y, 1.0)
    with pytest.raises(ValueError, match="at least 2 logits"):
        curvature_certified_radius(lambda u: net(u)[:, :1], x, y * 0, 1.0)
    with pytest.raises(ValueError, match="training mode"):
        curvature_certified_radius(net.train(), x, y, 1.0)
    mixed = nn.Sequential(net.eval(), nn.Dropout(0.5)).eval()
    mixed[1].train()
    with pytest.raises(ValueError, match="training mode"):
        curvature_certified_radius(mixed, x, y, 1.0)


def test_bad_arguments_are_refused_before_the_model_runs() -> None:
    net = _affine(torch.randn(3, 2, dtype=D64), torch.zeros(3, dtype=D64))
    calls = []

    def model(u: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return net(u)

    x, y = torch.randn(4, 2, dtype=D64), torch.tensor([0, 1, 2, 0])
    bad = [
        (y, -1.0), (y, math.inf), (y, torch.ones(3, 2)), (y, torch.ones(3, 3, 3)),
        (y, torch.full((3, 3), -1.0).fill_diagonal_(0)), (y[:3], 1.0), (y.double(), 1.0),
        (y[:, None], 1.0),
    ]
    for target, curvature in bad:
        for certify in (curvature_certified_radius, crc_certified_radius):
            with pytest.raises(ValueError):
                certify(model, x, target, curvature)
    assert not calls
    empty = x[:0]
    assert curvature_certified_radius(model, empty, y[:0], 1.0).shape == (0,)
    with pytest.raises(ValueError, match="finite and >= 0"):
        crc_certified_radius(model, empty, y[:0], -1.0)
    with pytest.raises(ValueError, match="batch axis"):
        curvature_certified_radius(model, torch.tensor(1.0), y[:0], 1.0)


def test_image_inputs_and_chunking_match_the_flat_computation() -> None:
    conv = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)
    ).to(D64).eval()
    x = torch.randn(7, 1, 4, 4, dtype=D64)
    y = conv(x).argmax(1).detach()

    def flat(u: torch.Tensor) -> torch.Tensor:
        return conv(u.view(-1, 1, 4, 4))

    r_image = curvature_certified_radius(conv, x, y, 2.0)
    r_flat = curvature_certified_radius(flat, x.flatten(1), y, 2.0)
    r_chunked = curvature_certified_radius(conv, x, y, 2.0, chunk_size=3)
    torch.testing.assert_close(r_image, r_flat, rtol=1e-14, atol=0)
    torch.testing.assert_close(r_image, r_chunked, rtol=1e-14, atol=0)
    torch.testing.assert_close(crc_certified_radius(conv, x, y, 2.0, outer_steps=5, inner_steps=5),
                               crc_certified_radius(flat, x.flatten(1), y, 2.0, outer_steps=5,
                                                    inner_steps=5), rtol=1e-12, atol=0)
