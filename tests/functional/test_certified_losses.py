"""The certified-training losses, the pairwise radius and the operator power iteration,
against loops, explicit operator matrices and autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_spectral.functional import operator_matrix
from lightning_spectral.functional.certified_losses import (
    gloro_logits,
    gloro_loss,
    gloro_trades_kl,
    gloro_trades_loss,
    lipschitz_margin_loss,
)
from lightning_spectral.functional.certify import pairwise_certified_radius
from lightning_spectral.functional.operator_power import operator_norm_estimate, operator_vector


def _pairwise(c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.rand(c, c, generator=g, dtype=torch.float64) + 0.1
    return (k + k.T) * (1 - torch.eye(c, dtype=torch.float64))


def test_bottom_logit_matches_a_loop() -> None:
    z, y, k = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 2]), _pairwise(4)
    out = gloro_logits(z, y, 0.3, k)
    for n in range(6):
        t = int(y[n])
        bottom = max(float(z[n, j]) + 0.3 * float(k[t, j]) for j in range(4) if j != t)
        assert float(out[n, -1]) == pytest.approx(bottom, rel=1e-6)
        assert torch.equal(out[n, :4], z[n])


def test_gloro_prediction_is_the_true_class_exactly_when_the_certificate_holds() -> None:
    z, y, k = torch.randn(200, 5, dtype=torch.float64), torch.randint(0, 5, (200,)), _pairwise(5)
    eps = 0.2
    augmented = gloro_logits(z, y, eps, k)
    radius = pairwise_certified_radius(z, y, k)
    wins = augmented[torch.arange(200), y] > augmented[:, -1]
    assert torch.equal(wins, radius > eps)
    assert 0 < int(wins.sum()) < 200  # both cases occur


def test_losses_reach_the_bound_through_its_gradient() -> None:
    z, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    k = _pairwise(3).float().requires_grad_(True)
    for loss in (gloro_loss(z, y, 0.5, k), gloro_trades_kl(z, y, 0.5, k)):
        (grad,) = torch.autograd.grad(loss, k)
        assert float(grad.sum()) > 0  # a smaller bound lowers the loss
    assert float(gloro_trades_kl(z, y, 0.5, k)) >= 0
    total = gloro_trades_loss(z, y, 0.5, k, lam=2.0)
    expected = F.cross_entropy(z, y) + 2.0 * gloro_trades_kl(z, y, 0.5, k)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)


def test_gloro_with_no_radius_and_a_scalar_bound() -> None:
    z, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    out = gloro_logits(z, y, 0.0, torch.tensor(2.0))
    other = z.masked_fill(F.one_hot(y, 3).bool(), -math.inf).amax(1)
    assert torch.equal(out[:, -1], other)


def test_margin_loss_is_cross_entropy_without_margin() -> None:
    z, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    assert float(lipschitz_margin_loss(z, y, 0.0)) == pytest.approx(float(F.cross_entropy(z, y)))


@pytest.mark.parametrize("bad", [
    dict(logits=torch.randn(4), match="logits"),
    dict(target=torch.zeros(4), match="target"),
    dict(eps=-1.0, match="eps"),
    dict(eps=math.nan, match="eps"),
    dict(pairwise=torch.ones(2, 2), match="pairwise"),
])
def test_bad_arguments_are_named(bad: dict) -> None:
    args = dict(logits=torch.randn(4, 3), target=torch.zeros(4, dtype=torch.long), eps=0.1,
                pairwise=torch.ones(3, 3))
    match = bad.pop("match")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        gloro_loss(**args)


def test_pairwise_radius_matches_a_loop_and_refuses_bad_bounds() -> None:
    z, y, k = torch.randn(30, 4), torch.randint(0, 4, (30,)), _pairwise(4, 1)
    r = pairwise_certified_radius(z, y, k)
    for n in range(30):
        t = int(y[n])
        ref = min((float(z[n, t]) - float(z[n, j])) / float(k[t, j]) for j in range(4) if j != t)
        assert float(r[n]) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="shape"):
        pairwise_certified_radius(z, y, torch.ones(3, 3))
    with pytest.raises(ValueError, match="finite"):
        pairwise_certified_radius(z, y, k.clone().fill_(math.nan))


_LAYERS = st.sampled_from(["conv", "conv_transpose", "linear"])


@settings(max_examples=25)
@given(kind=_LAYERS, cin=st.integers(1, 4), cout=st.integers(1, 4), k=st.integers(1, 3),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), size=st.integers(3, 6),
       mode=st.sampled_from(["zeros", "circular", "reflect"]), dims=st.integers(1, 2))
def test_operator_power_iteration_never_exceeds_and_reaches_the_exact_norm(
        kind, cin, cout, k, stride, dilation, size, mode, dims) -> None:
    if kind == "linear":
        layer: nn.Module = nn.Linear(cin * size, cout)
        input_size = None
    elif kind == "conv":
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        pad = min(1, size - 1) if mode != "zeros" else 1
        layer = conv(cin, cout, k, stride=stride, dilation=dilation, padding=pad,
                     padding_mode=mode)
        input_size = (size,) * dims
    else:
        convt = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
        layer = convt(cin, cout, k, stride=stride, dilation=dilation)
        input_size = (size,) * dims
    layer = layer.double()
    exact = float(torch.linalg.matrix_norm(operator_matrix(layer, input_size), 2))
    u = operator_vector(layer, input_size, torch.Generator().manual_seed(0)).double()
    estimates = [float(operator_norm_estimate(layer, u, 1)) for _ in range(300)]
    assert max(estimates) <= exact * (1 + 1e-9)
    assert estimates[-1] == pytest.approx(exact, rel=1e-3)
    # Differentiable in the weight: d sigma / dW = u_1 v_1^T has norm 1 at convergence.
    sigma = operator_norm_estimate(layer, u, 0)
    (grad,) = torch.autograd.grad(sigma, layer.weight)
    assert float(grad.norm()) > 0
