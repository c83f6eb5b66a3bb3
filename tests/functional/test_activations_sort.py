"""GroupSort and MaxMin: forward against a naive reference, 1-Lipschitz and gradient-norm
preserving against autograd, argument checks, their rule in the Lipschitz walk (exactly 1,
only for the class' own forward) and their refusal by the curvature walk."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers.oracles import operator_norm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import lightning_spectral
from lightning_spectral import GroupSort, MaxMin
from lightning_spectral.functional import NonSmoothActivationError, activation_curvature
from lightning_spectral.functional.bounds import layer_spectral_bound
from lightning_spectral.network import (
    NonSmoothOperationError,
    UnsupportedOperationError,
    network_curvature_bound,
    network_lipschitz_bound,
    record_curvature,
)
from lightning_spectral.network.api import sequential_bound

_SHAPE = (2, 5, 5)


def _naive_group_sort(x: Tensor, group_size: int, dim: int) -> Tensor:
    """Entry by entry: every fibre along ``dim`` cut into groups, each sorted by ``sorted``."""
    out = torch.empty_like(x)
    dim %= x.ndim
    other = [range(n) for i, n in enumerate(x.shape) if i != dim]
    for rest in itertools.product(*other):
        for start in range(0, x.shape[dim], group_size):
            idx = [(*rest[:dim], j, *rest[dim:]) for j in range(start, start + group_size)]
            for i, value in zip(idx, sorted(float(x[i]) for i in idx), strict=True):
                out[i] = value
    return out


def _naive_max_min(x: Tensor, dim: int) -> Tensor:
    out = torch.empty_like(x)
    dim %= x.ndim
    half = x.shape[dim] // 2
    other = [range(n) for i, n in enumerate(x.shape) if i != dim]
    for rest in itertools.product(*other):
        for j in range(half):
            a, b = (*rest[:dim], j, *rest[dim:]), (*rest[:dim], j + half, *rest[dim:])
            out[a], out[b] = max(float(x[a]), float(x[b])), min(float(x[a]), float(x[b]))
    return out


@st.composite
def cases(draw: st.DrawFn) -> tuple[nn.Module, Tensor]:
    """A GroupSort or MaxMin on a random shape, along a random axis (either sign), with a
    random group size; the input from a seeded generator (float64)."""
    ndim = draw(st.integers(1, 4))
    dim = draw(st.integers(-ndim, ndim - 1))
    if draw(st.booleans()):
        group = draw(st.integers(1, 4))
        module: nn.Module = GroupSort(group, dim=dim)
    else:
        group = 2
        module = MaxMin(dim=dim)
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[dim] = group * draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return module, torch.randn(*shape, generator=gen, dtype=torch.float64)


@settings(max_examples=60)
@given(case=cases())
def test_forward_matches_a_naive_reference(case: tuple[nn.Module, Tensor]) -> None:
    module, x = case
    if isinstance(module, GroupSort):
        expected = _naive_group_sort(x, module.group_size, module.dim)
    else:
        expected = _naive_max_min(x, module.dim)
    out = module(x)
    assert out.shape == x.shape
    assert torch.equal(out, expected)


@settings(max_examples=60)
@given(case=cases())
def test_jacobian_is_a_permutation_matrix(case: tuple[nn.Module, Tensor]) -> None:
    """At a point without ties (random float64 entries) the Jacobian permutes the entries:
    0/1 entries, one 1 per row and per column; so its spectral norm is exactly 1 and every
    gradient keeps its norm."""
    module, x = case
    assert x.flatten().unique().numel() == x.numel()  # no ties
    jac = torch.autograd.functional.jacobian(module, x).reshape(x.numel(), x.numel())
    assert bool(((jac == 0) | (jac == 1)).all())
    assert torch.equal(jac.sum(0), torch.ones(x.numel(), dtype=jac.dtype))
    assert torch.equal(jac.sum(1), torch.ones(x.numel(), dtype=jac.dtype))
    assert abs(float(torch.linalg.matrix_norm(jac, ord=2)) - 1.0) < 1e-12
    v = torch.randn(x.numel(), dtype=torch.float64)
    assert abs(float((jac.T @ v).norm() / v.norm()) - 1.0) < 1e-12


@settings(max_examples=60)
@given(case=cases(), data=st.data())
def test_one_lipschitz_across_ties(case: tuple[nn.Module, Tensor], data: st.DataObject) -> None:
    """``||f(x) - f(y)|| <= ||x - y||`` for pairs full of ties (small integers) and pairs of
    random points, where the segment between them crosses many cones."""
    module, x = case
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    ints = torch.randint(-2, 3, (2, *x.shape), generator=gen).double()
    for a, b in ((ints[0], ints[1]), (x, torch.randn(x.shape, generator=gen).double())):
        assert float((module(a) - module(b)).norm()) <= float((a - b).norm()) * (1 + 1e-12)


@pytest.mark.parametrize("group_size", [0, -1, 2.0, True, None])
def test_group_size_must_be_a_positive_int(group_size) -> None:
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        GroupSort(group_size)


@pytest.mark.parametrize("dim", [1.0, "1", None, True])
def test_dim_must_be_an_int(dim) -> None:
    with pytest.raises(TypeError, match="dim must be an int"):
        GroupSort(2, dim=dim)
    with pytest.raises(TypeError, match="dim must be an int"):
        MaxMin(dim=dim)


def test_sizes_that_do_not_split_into_groups_are_refused() -> None:
    with pytest.raises(ValueError, match=r"GroupSort\(3\): dimension 1 has size 4, not a mult"):
        GroupSort(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="MaxMin: dimension -1 has odd size 5"):
        MaxMin(dim=-1)(torch.randn(2, 4, 5))
    with pytest.raises(IndexError, match="dim=3 is out of range for a 2-d input"):
        MaxMin(dim=3)(torch.randn(2, 4))
    with pytest.raises(IndexError, match="GroupSort: dim=-3 is out of range"):
        GroupSort(2, dim=-3)(torch.randn(2, 4))


def test_empty_channel_axis() -> None:
    x = torch.randn(2, 0, 3)
    assert MaxMin()(x).shape == x.shape
    assert GroupSort(2)(x).shape == x.shape


def test_exported_lazily_from_the_package() -> None:
    from lightning_spectral import activations

    assert lightning_spectral.GroupSort is activations.GroupSort
    assert lightning_spectral.MaxMin is activations.MaxMin
    assert {"GroupSort", "MaxMin"} <= set(lightning_spectral.__all__)
    assert repr(GroupSort(3, dim=-1)) == "GroupSort(group_size=3, dim=-1)"


def _net(act1: nn.Module, act2: nn.Module) -> nn.Sequential:
    """Conv2d -> act1 -> Conv2d -> act2 -> Flatten -> Linear (float64, fixed weights)."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), act1, nn.Conv2d(4, 6, 3, padding=1), act2,
        nn.Flatten(), nn.Linear(6 * 5 * 5, 3),
    ).double()  # fmt: skip


def _jacobian_norm(model: nn.Module, x: Tensor) -> float:
    jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0].flatten(), x)
    return float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2))


@pytest.mark.parametrize("layer_bound", [layer_spectral_bound, operator_norm])
def test_network_bound_counts_the_activations_as_exactly_one(layer_bound) -> None:
    net = _net(MaxMin(), GroupSort(3))
    bound = network_lipschitz_bound(net, _SHAPE, layer_bound=layer_bound)
    plain = network_lipschitz_bound(
        _net(nn.Identity(), nn.Identity()), _SHAPE, layer_bound=layer_bound
    )
    with torch.no_grad():
        product = (
            layer_bound(net[0], (5, 5)) * layer_bound(net[2], (5, 5)) * layer_bound(net[5], None)
        )
    assert float(bound) == float(plain)
    assert abs(float(bound) - float(product)) <= 1e-12 * float(product)
    # The Sequential fallback (child by child) gives the same product.
    walked = sequential_bound(net, _SHAPE, layer_bound)
    assert abs(float(walked) - float(product)) <= 1e-12 * float(product)
    net.eval()
    for seed in range(4):
        x = torch.randn(_SHAPE, generator=torch.Generator().manual_seed(seed)).double()
        assert _jacobian_norm(net, x) <= float(bound) * (1 + 1e-9)


def test_channel_axis_last_and_in_a_module_graph() -> None:
    """MaxMin / GroupSort along the last axis of a (N, L, C) tensor inside a traced module."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin1 = nn.Linear(4, 6)
            self.act1 = MaxMin(dim=-1)
            self.lin2 = nn.Linear(6, 6)
            self.act2 = GroupSort(6, dim=2)

        def forward(self, x: Tensor) -> Tensor:
            return self.act2(self.lin2(self.act1(self.lin1(x)))).flatten(1)

    torch.manual_seed(4)
    net = Net().double()
    bound = network_lipschitz_bound(net, (3, 4), layer_bound=operator_norm)
    expected = operator_norm(net.lin1) * operator_norm(net.lin2)
    assert abs(float(bound) - float(expected)) <= 1e-12 * float(expected)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert _jacobian_norm(net, x) <= float(bound) * (1 + 1e-9)


@pytest.mark.parametrize("module", [GroupSort(1, dim=0), MaxMin(dim=-2)])
def test_sorting_along_the_batch_axis_is_refused(module: nn.Module) -> None:
    net = nn.Sequential(nn.Linear(4, 4), module)
    with pytest.raises(UnsupportedOperationError, match="batch"):
        network_lipschitz_bound(net, (4,))
    if isinstance(module, GroupSort):  # runs on any batch: the rule itself must refuse
        with pytest.raises(UnsupportedOperationError, match="sorts along the batch axis"):
            sequential_bound(net, (4,), layer_spectral_bound)


class DoubledMaxMin(MaxMin):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


class DoubledGroupSort(GroupSort):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


def test_subclass_overriding_forward_is_traced_into() -> None:
    plain = network_lipschitz_bound(_net(MaxMin(), GroupSort(3)), _SHAPE)
    net = _net(DoubledMaxMin(), GroupSort(3))
    bound = network_lipschitz_bound(net, _SHAPE)
    assert float(bound) >= 2 * float(plain)
    net.eval()
    x = torch.randn(_SHAPE, dtype=torch.float64)
    assert _jacobian_norm(net, x) <= float(bound) * (1 + 1e-9)
    # On its own: the Jacobian is twice a permutation, and the traced bound is at least 2.
    alone = network_lipschitz_bound(DoubledMaxMin(), (4, 3))
    assert abs(_jacobian_norm(DoubledMaxMin(), torch.randn(4, 3).double()) - 2.0) < 1e-12
    assert float(alone) >= 2.0
    # GroupSort's inside (a sort, whose indices are integers) has no rule: refused, not 1.
    with pytest.raises(UnsupportedOperationError, match="no Lipschitz rule"):
        network_lipschitz_bound(_net(MaxMin(), DoubledGroupSort(3)), _SHAPE)


def test_maximum_and_minimum_of_two_branches() -> None:
    """``torch.maximum(f(x), g(x))``: ``sqrt(L_f^2 + L_g^2)``, above the Jacobian norm."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f, self.g = nn.Linear(3, 4), nn.Linear(3, 4)

        def forward(self, x: Tensor) -> Tensor:
            return torch.maximum(self.f(x), self.g(x)) - self.f(x).minimum(self.g(x))

    torch.manual_seed(5)
    net = Net().double()
    bound = network_lipschitz_bound(net, (3,), layer_bound=operator_norm)
    branch = (operator_norm(net.f) ** 2 + operator_norm(net.g) ** 2).sqrt()
    assert abs(float(bound) - 2 * float(branch)) <= 1e-12 * float(branch)
    for _ in range(4):
        assert _jacobian_norm(net, torch.randn(3, dtype=torch.float64)) <= float(bound)


@pytest.mark.parametrize(
    ("act", "node", "why"),
    [
        (
            MaxMin(),
            "_1",
            "MaxMin: its Jacobian jumps from one permutation matrix to another "
            "where the two entries of a pair tie",
        ),
        (
            GroupSort(2),
            "_1",
            "GroupSort: its Jacobian jumps from one permutation matrix to "
            "another where two entries of a group tie",
        ),
        (
            DoubledMaxMin(),
            "maximum",
            "maximum: its derivative jumps from one argument to the other where they tie",
        ),
    ],
)
def test_curvature_walk_refuses_sorting(act: nn.Module, node: str, why: str) -> None:
    net = _net(act, nn.Tanh())
    with pytest.raises(NonSmoothOperationError, match=f"at node '{node}': {why}"):
        network_curvature_bound(net, _SHAPE)
    with pytest.raises(NonSmoothOperationError, match=f"at node '{node}'"):
        record_curvature(net, _SHAPE, [net[0], net[2]])
    # The same network with a smooth activation has a curvature bound and a tape.
    smooth = _net(nn.Tanh(), nn.Tanh())
    tape = record_curvature(smooth, _SHAPE, [smooth[0], smooth[2]])
    assert float(tape.replay(tape.bounds)) == float(network_curvature_bound(smooth, _SHAPE))


@pytest.mark.parametrize("act", [MaxMin(), GroupSort(4)])
def test_activation_table_refuses_sorting(act: nn.Module) -> None:
    with pytest.raises(NonSmoothActivationError, match="tie"):
        activation_curvature(act)
    assert activation_curvature(DoubledMaxMin()) is None  # another function: unknown
