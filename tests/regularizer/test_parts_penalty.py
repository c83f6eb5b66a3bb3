"""The penalty part without a Trainer: ``reduce`` by hand, the estimate's order, the
penalty's value and gradient against an SVD oracle, and the wrapping of ``training_step``."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers.oracles import matricize, svd_norm
from torch import nn

from lightning_spectral.regularizer.penalty import (
    Penalty,
    estimate,
    reduce,
    unwrap_training_step,
    wrap_training_step,
)
from lightning_spectral.regularizer.state import LayerState

VALUES = [0.5, 2.0, 1.25, 3.0]


def _hand_reduce(values: list[float], reduction: str, target: float | None) -> float:
    excess = [v if target is None else max(0.0, v - target) for v in values]
    if reduction == "sum":
        return sum(excess)
    if reduction == "mean":
        return sum(excess) / len(excess)
    return max(excess)


@pytest.mark.parametrize("target", [None, 0.0, 1.0, 1.5, 10.0])
@pytest.mark.parametrize("reduction", ["sum", "max", "mean"])
def test_reduce_is_the_hinged_reduction(reduction, target):
    got = reduce(torch.tensor(VALUES, dtype=torch.float64), reduction, target)
    assert got.ndim == 0
    assert float(got.detach()) == pytest.approx(_hand_reduce(VALUES, reduction, target), abs=1e-15)


def test_reduce_passes_gradient_only_through_layers_above_the_target():
    x = torch.tensor(VALUES, dtype=torch.float64, requires_grad=True)
    reduce(x, "sum", 1.5).backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 1.0]
    x.grad = None
    reduce(x, "max", None).backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0]


def _net() -> nn.Sequential:
    torch.manual_seed(1)
    # Layers 0 and 2 share a grouped shape: one shape group, not adjacent in model order.
    return nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 2), nn.Conv2d(3, 3, 3),
                         nn.Flatten(), nn.Linear(3, 2)).double()


def _state(net: nn.Sequential, warmup: int) -> LayerState:
    s = LayerState()
    s.attach({str(i): m for i, m in enumerate(net) if not isinstance(m, nn.Flatten)}, warmup)
    return s


def _ff_bound(w: torch.Tensor) -> torch.Tensor:
    """``sqrt(prod k) min_A ||M_A||_2`` from SVDs (groups 1), differentiable in ``w``."""
    if w.ndim == 2:
        return svd_norm(w)
    d = w.ndim - 2
    subsets = [[i for i in range(d) if (m >> i) & 1] for m in range(1 << d)]
    norms = torch.stack([svd_norm(matricize(w, a)) for a in subsets])
    return math.sqrt(math.prod(w.shape[2:])) * norms.min()


def test_estimate_is_in_model_order_across_groups():
    s = _state(_net(), warmup=300)
    assert [g.names for g in s.shape_groups] == [["0", "2"], ["1"], ["4"]]
    with torch.no_grad():
        est = estimate(s, 10)
        oracle = torch.stack([_ff_bound(m.weight) for m in s.layers.values()])
    torch.testing.assert_close(est, oracle, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "max", "mean"])
def test_penalty_value_and_its_gradient_match_the_converged_bound(reduction):
    net = _net()
    s = _state(net, warmup=400)
    beta, target = 0.7, 1.0
    penalty = Penalty()
    value = penalty(s, beta, 5, reduction, target)
    assert value.ndim == 0 and value.requires_grad
    value.backward()

    weights = [m.weight.detach().clone().requires_grad_(True) for m in s.layers.values()]
    bounds = torch.stack([_ff_bound(w) for w in weights])
    oracle = beta * torch.as_tensor(_hand_reduce(bounds.tolist(), reduction, target))
    assert float(value.detach()) == pytest.approx(float(oracle), rel=1e-6)
    # The oracle's gradient: beta * d reduce / d bound_i * d bound_i / d W_i, autograd on SVDs.
    excess = (bounds - target).clamp_min(0)
    {"sum": excess.sum, "max": excess.max, "mean": excess.mean}[reduction]().mul(beta).backward()
    for m, w in zip(s.layers.values(), weights, strict=True):
        torch.testing.assert_close(m.weight.grad, w.grad, rtol=1e-4, atol=1e-8)
    assert any(float(m.weight.grad.abs().sum()) > 0 for m in s.layers.values())

    # What is kept: detached, in model order.
    assert not penalty.last_penalty.requires_grad and not penalty.last_estimates.requires_grad
    assert float(penalty.last_penalty) == float(value.detach())
    torch.testing.assert_close(penalty.last_estimates, bounds.detach(), rtol=1e-6, atol=0)
    assert penalty.estimated_this_batch and penalty.last_curvature is None


def test_penalty_adds_the_curvature_term_on_the_same_estimates():
    s = _state(_net(), warmup=50)
    seen = []

    def curvature(estimates: torch.Tensor) -> torch.Tensor:
        seen.append(estimates.detach().clone())
        return (estimates**2).sum().float()  # another dtype: cast back to the estimates'

    penalty = Penalty()
    value = penalty(s, 0.5, 1, "sum", None, curvature=curvature, curvature_beta=0.25)
    est = penalty.last_estimates
    assert torch.equal(seen[0], est)
    expected = 0.5 * est.sum() + 0.25 * (est**2).sum().float().double()
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-12)
    assert value.dtype == torch.float64
    assert float(penalty.last_curvature) == pytest.approx(float((est**2).sum()), rel=1e-6)


def test_penalty_is_computed_outside_autocast():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Linear(3, 2))
    s = _state(net, warmup=20)
    with torch.no_grad():
        plain = Penalty()(s, 1.0, 0, "sum", None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = Penalty()(s, 1.0, 0, "sum", None)
    assert cast.dtype == torch.float32
    assert torch.equal(plain, cast)


class _Step(pl.LightningModule):
    def __init__(self, output):
        super().__init__()
        self.output = output

    def training_step(self, batch, batch_idx):
        return self.output


@pytest.mark.parametrize("kind", ["tensor", "dict"])
def test_wrap_adds_the_term_to_the_returned_loss_and_unwrap_restores_the_method(kind):
    loss = torch.tensor(2.0)
    module = _Step(loss if kind == "tensor" else {"loss": loss, "acc": 0.5})
    calls = []

    def term() -> torch.Tensor:
        calls.append(1)
        return torch.tensor(0.25)

    wrap_training_step(module, term)
    assert module.training_step.__name__ == "training_step"
    out = module.training_step(None, 0)
    if kind == "tensor":
        assert float(out) == 2.25
    else:
        assert float(out["loss"]) == 2.25 and out["acc"] == 0.5
        assert float(module.output["loss"]) == 2.0  # the user's dict is not modified
    assert calls == [1]
    unwrap_training_step(module)
    assert "training_step" not in module.__dict__
    assert float(module.training_step(None, 0) if kind == "tensor"
                 else module.training_step(None, 0)["loss"]) == 2.0
    unwrap_training_step(module)  # idempotent


def test_wrap_leaves_skipped_steps_and_absent_terms_alone():
    calls = []
    skipped = _Step(None)
    wrap_training_step(skipped, lambda: calls.append(1))
    assert skipped.training_step(None, 0) is None and calls == []  # term not even called

    module = _Step(torch.tensor(1.0))
    wrap_training_step(module, lambda: None)
    assert module.training_step(None, 0) is module.output
    odd = _Step("not a loss")
    wrap_training_step(odd, lambda: torch.tensor(1.0))
    assert odd.training_step(None, 0) == "not a loss"  # Lightning's own error follows
