"""The compositional (ECLipsE-Fast) chain bound: sound against autograd Jacobians, exact on a
one-hidden-unit network, at most the product bound, never looser than the plain ECLipsE-Fast
recursion, per-layer matrices exact, and fallback to the graph walk for anything else."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.oracles import eclipse_fast_reference, operator_matrix
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_spectral import compositional_lipschitz_bound, network_lipschitz_bound  # noqa: E402
from lightning_spectral.functional import (  # noqa: E402
    SmoothSoftplus,
    activation_slope,
    certified_psd,
    chain_lipschitz_bound,
)
from lightning_spectral.functional import compositional as comp  # noqa: E402
from lightning_spectral.network import sequential_chain_bound  # noqa: E402
from lightning_spectral.network.compositional import conv2d_matrix  # noqa: E402

_ACTIVATIONS = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky": lambda: nn.LeakyReLU(0.1),
    "softplus": SmoothSoftplus, "elu": lambda: nn.ELU(0.5), "hardtanh": nn.Hardtanh,
    "identity": nn.Identity, "steep_leaky": lambda: nn.LeakyReLU(2.0),
}


class DoubleReLU(nn.ReLU):
    """A ReLU subclass that computes something else: its slope bound is not ReLU's."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * F.relu(x)


class Residual(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n, n)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.relu(self.fc(x))


def _jacobian_max(model: nn.Module, shape: tuple[int, ...], points: int, seed: int = 0
                  ) -> float:
    """Largest spectral norm of the autograd Jacobian at random points (a lower bound on the
    Lipschitz constant), in float64."""
    net = copy.deepcopy(model).double().eval()
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(points):
        x = torch.randn(1, *shape, generator=gen, dtype=torch.float64) * 2
        jac = torch.autograd.functional.jacobian(net, x).reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
    return best


def _mlp(widths: list[int], acts: list[str], seed: int, scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layer = nn.Linear(widths[i], widths[i + 1])
        with torch.no_grad():
            layer.weight.mul_(scale)
        layers.append(layer)
        if i < len(widths) - 2:
            layers.append(_ACTIVATIONS[acts[i % len(acts)]]())
    return nn.Sequential(*layers)


def _weights(model: nn.Sequential) -> list[Tensor]:
    return [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]


@settings(max_examples=30)
@given(widths=st.lists(st.integers(1, 9), min_size=2, max_size=6),
       acts=st.lists(st.sampled_from(sorted(_ACTIVATIONS)), min_size=1, max_size=3),
       seed=st.integers(0, 10_000), scale=st.sampled_from([0.3, 1.0, 3.0]))
def test_bound_dominates_autograd_jacobians(widths: list[int], acts: list[str], seed: int,
                                            scale: float) -> None:
    model = _mlp(widths, acts, seed, scale)
    bound = sequential_chain_bound(model, (widths[0],))
    assert bound is not None
    assert float(bound) >= _jacobian_max(model, (widths[0],), points=40, seed=seed)


@pytest.mark.parametrize("act", ["relu", "tanh", "identity"])
def test_one_hidden_unit_is_exact(act: str) -> None:
    """``f(x) = w_2 s(w_1^T x)`` with slope 1 reached: Lipschitz constant ``|w_2| ||w_1||``,
    and ECLipsE with ``t = 1/2`` gives exactly ``|w_2|^2 ||w_1||^2 / (4 t (1 - t))``."""
    model = _mlp([5, 1, 1], [act], seed=3)
    w1, w2 = _weights(model)
    exact = abs(float(w2)) * float(w1.norm())
    bound = float(sequential_chain_bound(model, (5,)))
    assert exact <= bound <= exact * (1 + 1e-8)


def test_at_most_product_and_below_it_on_an_mlp() -> None:
    model = _mlp([64, 48, 48, 10], ["relu"], seed=0)
    product = network_lipschitz_bound(model, (64,))
    combined = compositional_lipschitz_bound(model, (64,))
    chain = sequential_chain_bound(model, (64,))
    assert float(combined) <= float(product)
    assert float(chain) < 0.8 * float(product)
    assert float(combined) == float(chain)
    assert float(chain) >= _jacobian_max(model, (64,), points=50)


@settings(max_examples=20)
@given(widths=st.lists(st.integers(2, 30), min_size=3, max_size=6),
       seed=st.integers(0, 10_000), alpha=st.sampled_from([0.0, 0.1]))
def test_never_looser_than_reference_eclipse_fast(widths: list[int], seed: int,
                                                  alpha: float) -> None:
    """The reference is the paper's recursion in plain float64 (no certificate); ours tries
    ``t = 1/2`` among others and pays at most the certification shrink (< 1e-6)."""
    torch.manual_seed(seed)
    mats = [torch.randn(widths[i + 1], widths[i], dtype=torch.float64) / math.sqrt(widths[i])
            for i in range(len(widths) - 1)]
    ours = chain_lipschitz_bound(mats, [(alpha, 1.0)] * (len(mats) - 1))
    assert ours is not None
    assert float(ours) <= eclipse_fast_reference(mats, alpha, 1.0) * (1 + 1e-6)


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "size"), [
    (3, 1, 1, 1, (7, 6)), (4, 2, 1, 1, (8, 8)), (3, 2, (2, 0), 2, (9, 7)), (1, 1, 0, 1, (3, 3)),
])
def test_conv_matrix_is_the_operator(kernel: int, stride: int, padding: object, dilation: int,
                                     size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    ours = conv2d_matrix(conv, (3, *size))
    assert ours is not None
    assert torch.equal(ours, operator_matrix(conv, size))


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 4, stride=2, padding=1),
        nn.Tanh(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * 3 * 3, 12), nn.ReLU(),
        nn.Linear(12, 5),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conv_chain_equals_dense_unrolled_chain_and_is_sound(seed: int) -> None:
    model = _cnn(seed)
    shape = (2, 6, 6)
    bound = sequential_chain_bound(model, shape)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    mats = [operator_matrix(convs[0], (6, 6)), operator_matrix(convs[1], (6, 6)),
            *_weights(model)]
    dense = chain_lipschitz_bound(mats, [(0.0, 1.0)] * 3)
    assert float(bound) == float(dense)
    assert float(bound) <= float(network_lipschitz_bound(model, shape))
    assert float(bound) >= _jacobian_max(model, shape, points=60, seed=seed)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)),
    nn.Sequential(nn.Linear(6, 6), DoubleReLU(), nn.Linear(6, 2)),
    nn.Sequential(nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 2)),
    nn.Sequential(nn.Linear(6, 6), nn.Softplus(), nn.Linear(6, 2)),  # threshold: a jump
    nn.Sequential(Residual(6), nn.Linear(6, 2)),
    Residual(6),
], ids=["batchnorm", "relu-subclass", "silu", "softplus-threshold", "residual", "module"])
def test_not_a_chain_falls_back_to_the_graph_walk(model: nn.Module) -> None:
    assert sequential_chain_bound(model, (6,)) is None
    combined = compositional_lipschitz_bound(model, (6,))
    assert float(combined) == float(network_lipschitz_bound(model, (6,)))
    assert float(combined) >= _jacobian_max(model, (6,), points=30)


def test_a_hook_breaks_the_chain() -> None:
    model = _mlp([4, 4, 2], ["relu"], seed=0)
    model[1].register_forward_hook(lambda m, i, o: 3 * o)
    assert sequential_chain_bound(model, (4,)) is None


def test_relu_subclass_with_its_own_forward_is_not_relu() -> None:
    assert activation_slope(DoubleReLU()) is None
    assert activation_slope(nn.ReLU()) == (0.0, 1.0)


@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_slope_bounds_hold_on_difference_quotients(name: str) -> None:
    act = _ACTIVATIONS[name]()
    alpha, beta = activation_slope(act)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(20_000, generator=gen, dtype=torch.float64) * 4
    b = a + torch.randn(20_000, generator=gen, dtype=torch.float64).abs().clamp_min(1e-3)
    quotient = (act(b) - act(a)) / (b - a)
    assert float(quotient.min()) >= alpha - 1e-9
    assert float(quotient.max()) <= beta + 1e-9


@pytest.mark.parametrize("module", [nn.LeakyReLU(-0.1), nn.SiLU(), nn.GELU(), nn.Softplus(),
                                    nn.Hardswish(), nn.Linear(2, 2)])
def test_slopes_refused(module: nn.Module) -> None:
    assert activation_slope(module) is None


def test_certified_psd_accepts_definite_and_refuses_indefinite() -> None:
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    eig = torch.linspace(1e-6, 1.0, 50, dtype=torch.float64)
    good = q @ torch.diag(eig) @ q.T
    good = (good + good.T) / 2
    assert certified_psd(good)
    bad = good - 2e-6 * torch.eye(50, dtype=torch.float64)
    assert not certified_psd(bad)
    assert not certified_psd(good, slack=1e-5)  # a perturbation this large could break it


def test_zero_weight_gives_zero_and_bad_slopes_raise() -> None:
    mats = [torch.zeros(3, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)]
    assert float(chain_lipschitz_bound(mats, [(0.0, 1.0)])) == 0.0
    with pytest.raises(ValueError, match="slope"):
        chain_lipschitz_bound(mats, [(-0.1, 1.0)])
    with pytest.raises(ValueError, match="activations"):
        chain_lipschitz_bound(mats, [])


def test_leading_and_trailing_activations_and_two_linears_in_a_row() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Tanh(), nn.Linear(5, 6), nn.Linear(6, 6), nn.ReLU(), nn.Sigmoid(),
                          nn.Linear(6, 3), nn.Tanh())
    bound = sequential_chain_bound(model, (5,))
    assert bound is not None
    assert float(bound) >= _jacobian_max(model, (5,), points=60)
    assert float(compositional_lipschitz_bound(model, (5,))) <= float(
        network_lipschitz_bound(model, (5,)))



@settings(max_examples=25)
@given(d0=st.integers(1, 6), grow=st.integers(1, 12),
       rest=st.lists(st.integers(1, 9), min_size=2, max_size=4),
       acts=st.lists(st.sampled_from(["relu", "tanh", "sigmoid"]), min_size=2, max_size=2),
       seed=st.integers(0, 10_000))
def test_two_step_start_matches_step_by_step_and_is_sound(
        d0: int, grow: int, rest: list[int], acts: list[str], seed: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A first layer with more outputs than inputs and ``alpha = 0`` after the first two
    layers: the two-step start is the certificate, and it is the step-by-step recursion."""
    model = _mlp([d0, d0 + grow, *rest], acts, seed)
    mats = _weights(model)
    slopes = [activation_slope(m) for m in model if not isinstance(m, nn.Linear)]
    verdicts: list[bool] = []
    original = comp._check_start

    def spy(*args: object) -> bool:
        verdicts.append(original(*args))
        return verdicts[-1]

    with monkeypatch.context() as patch:
        patch.setattr(comp, "_check_start", spy)
        fast = chain_lipschitz_bound(mats, slopes)
    slow = chain_lipschitz_bound(mats, slopes, fast_start=False)
    assert verdicts and verdicts[-1], "the two-step start was not the certificate"
    assert abs(float(fast) - float(slow)) <= 1e-6 * float(slow)
    assert float(fast) >= _jacobian_max(model, (d0,), points=40, seed=seed)


def test_two_step_check_refuses_a_too_large_y2() -> None:
    """The check of ``S`` certifies the ``Y_2`` it is given: the recursion's passes, the same
    matrix raised by 1e-4 (100 times the shrink) fails."""
    w1, w2, _ = _weights(_mlp([4, 20, 12, 3], ["relu"], seed=5))
    start = comp._Start(w1, w2)
    pending: list = []
    y2, _ = comp._fast_start(start, [(0.0, 1.0)] * 2, 0.7, 1e-6, False, pending)
    assert pending[0]()
    y2.diagonal().add_(1e-4)  # the check holds this very tensor
    assert not pending[0]()


def test_products_over_row_groups_are_the_dense_products() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    w = conv2d_matrix(conv, (3, 9, 9))
    groups = comp._row_groups(w)
    assert groups is not None and len(groups) == 25  # one per output position
    x = torch.randn(w.shape[1], 7, dtype=torch.float64)
    torch.testing.assert_close(comp._matmul(w, x, groups), w @ x, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(comp._gram(w, groups), w.mT @ w, rtol=1e-13, atol=1e-13)
    assert comp._row_groups(torch.randn(600, 700, dtype=torch.float64).sign() * (
        torch.rand(600, 700, dtype=torch.float64) > 0.5)) is None  # too many patterns


class _Wrapper(nn.Module):
    def __init__(self, model: nn.Module, functional_relu: bool = False) -> None:
        super().__init__()
        self.model, self.functional_relu = model, functional_relu

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.model(x)) if self.functional_relu else self.model(x)


def test_chain_of_a_forward_and_its_cost_cap() -> None:
    from lightning_spectral.network.compositional import chain_bound_of_forward, check_rows

    model = _mlp([6, 9, 7, 3], ["tanh"], seed=2)
    direct = sequential_chain_bound(model, (6,))
    assert float(chain_bound_of_forward(_Wrapper(model), (6,))) == float(direct)
    assert chain_bound_of_forward(_Wrapper(model, functional_relu=True), (6,)) is None
    assert check_rows(_weights(model), [(0.0, 1.0)] * 2, [0.0] * 3) == 6 + 7  # d_0 + d_2
    assert check_rows(_weights(model), [(0.1, 1.0)] * 2, [0.0] * 3) == 9 + 7  # d_1 + d_2
    assert chain_bound_of_forward(model, (6,), max_rows=12) is None


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_ranking_of_a_wide_chain_still_certifies_the_best(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer wider than ``ROUGH_ABOVE``: the fractions are ranked in float32, the bound is
    the float64 certificate, no looser than the paper's recursion and above the Jacobians."""
    model = _mlp([5, comp.ROUGH_ABOVE + 30, 6, 3], ["relu", "tanh"], seed)
    mats = _weights(model)
    slopes = [(0.0, 1.0), (0.0, 1.0)]
    rough: list[list[float]] = []
    original = comp._rough_order

    def spy(*args: object) -> list[float]:
        rough.append(original(*args))
        return rough[-1]

    with monkeypatch.context() as patch:
        patch.setattr(comp, "_rough_order", spy)
        bound = float(chain_lipschitz_bound(mats, slopes))
    assert rough, "the float32 ranking was not used"
    best = chain_lipschitz_bound(mats, slopes, fractions=rough[0][:1])
    assert bound == float(best)
    assert bound <= eclipse_fast_reference(mats) * (1 + 1e-6)
    assert bound >= _jacobian_max(model, (5,), points=40, seed=seed)
