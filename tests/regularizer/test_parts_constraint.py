"""The constraint part without a Trainer: ``project``, the anchored ``Projection`` over manual
SGD steps, its checkpoint, ``AfterStep`` and the finiteness checks, each checked against
``layer_spectral_bound`` computed afresh."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_spectral.functional.bounds import layer_spectral_bound
from lightning_spectral.regularizer.constraint import (
    AfterStep,
    Projection,
    check_finite,
    project,
    raise_if_non_finite,
)

C = 1.0


def _net() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def _layers(net: nn.Sequential) -> dict[str, nn.Module]:
    return {str(i): m for i, m in enumerate(net) if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def _bounds(layers: dict[str, nn.Module]) -> dict[str, float]:
    return {n: float(layer_spectral_bound(m, max_cost=0)) for n, m in layers.items()}


def _scaled(net: nn.Sequential, factors: dict[str, float]) -> dict[str, nn.Module]:
    layers = _layers(net)
    with torch.no_grad():
        for name, f in factors.items():
            layers[name].weight.mul_(f)
    return layers


def test_project_puts_every_layer_at_or_below_c_and_leaves_the_others_untouched():
    net = _net()
    layers = _scaled(net, {"0": 3.0, "2": 5.0})
    with torch.no_grad():
        layers["3"].weight.mul_(0.5 / float(layer_spectral_bound(layers["3"], max_cost=0)))
        layers["5"].weight.mul_(0.9 / float(layer_spectral_bound(layers["5"], max_cost=0)))
    before = _bounds(layers)
    assert before["0"] > C and before["2"] > C and before["3"] < C and before["5"] < C
    weights = {n: m.weight.detach().clone() for n, m in layers.items()}
    biases = {n: m.bias.detach().clone() for n, m in layers.items()}

    out = project(layers, C, "in a test")
    after = _bounds(layers)
    for name in layers:
        assert after[name] <= C
        assert torch.equal(layers[name].bias, biases[name])  # only weights are rescaled
        if before[name] <= C:
            assert torch.equal(layers[name].weight, weights[name])
        else:  # a rescaling by c / b (times 1 - 8 eps): just below c
            assert after[name] == pytest.approx(C, rel=1e-5)
            ratio = layers[name].weight / weights[name]
            torch.testing.assert_close(ratio, torch.full_like(ratio, C / before[name]))
    # The default (tighter) bound is below the max_cost=0 one, so below c as well.
    assert all(float(layer_spectral_bound(m).detach()) <= C for m in layers.values())
    assert float(out) == pytest.approx(max(min(b, C) for b in before.values()))


def test_project_skips_lazy_layers_and_returns_none_when_all_are():
    lazy = nn.LazyLinear(3)
    assert project({"lazy": lazy}, C, "in a test") is None
    layers = _scaled(_net(), {"5": 10.0})
    out = project({**layers, "lazy": lazy}, C, "in a test")
    assert float(out) == pytest.approx(C, rel=1e-5)


def _sgd_like_steps(layers, after_step: AfterStep, steps: int, every_n: int | None,
                    lr: float = 0.3) -> list[float]:
    """Random updates in place, as an optimizer would make them, each followed by the hook;
    returns the guaranteed maxima reported."""
    gen = torch.Generator().manual_seed(3)
    reported = []
    for _ in range(steps):
        with torch.no_grad():
            for m in layers.values():
                m.weight.add_(lr * torch.randn(m.weight.shape, generator=gen))
        after_step.run(layers, None, check=True, c=C, where="in a test", every_n=every_n)
        reported.append(after_step.last_guaranteed_max)
        bounds = _bounds(layers)
        assert max(bounds.values()) <= C, bounds
        # The reported value is a guaranteed bound of every layer as rescaled.
        assert max(bounds.values()) <= float(after_step.last_guaranteed_max)
        assert float(after_step.last_guaranteed_max) <= C
    return [float(r) for r in reported]


@pytest.mark.parametrize("every_n", [None, 1, 3])
def test_the_anchored_projection_keeps_the_guarantee_over_random_steps(every_n):
    layers = _scaled(_net(), {"0": 4.0})
    after = AfterStep()
    _sgd_like_steps(layers, after, 6, every_n)
    assert set(after.projection.anchors) == set(layers)


def test_a_layer_below_c_is_not_rescaled_by_the_anchored_projection():
    layers = _layers(_net())
    with torch.no_grad():
        for m in layers.values():
            m.weight.mul_(0.5 / float(layer_spectral_bound(m, max_cost=0)))
    weights = {n: m.weight.detach().clone() for n, m in layers.items()}
    after = AfterStep()
    after.project(layers, C, "in a test")  # first sight: tight bounds, anchors
    after.run(layers, None, check=False, c=C, where="in a test")  # anchored: no refresh
    assert all(torch.equal(m.weight, weights[n]) for n, m in layers.items())
    assert float(after.last_guaranteed_max) == pytest.approx(0.5, rel=1e-4)
    assert float(after.last_guaranteed_max) >= max(_bounds(layers).values())


def test_a_resumed_projection_projects_exactly_as_the_uninterrupted_one():
    net = _net()
    first = _scaled(net, {"2": 3.0})
    a = AfterStep()
    _sgd_like_steps(first, a, 2, every_n=2)
    saved = copy.deepcopy(a.projection.state_dict())
    assert set(saved) == {"schedule", "anchors"} and set(saved["anchors"]) == set(first)

    twin_net = copy.deepcopy(net)
    twin = _layers(twin_net)
    b = AfterStep()
    b.projection.load_state_dict(saved)
    assert b.projection.state_dict() is saved  # pending until the layers are seen
    # The same further updates on both: bit-identical weights and reports.
    ra = _sgd_like_steps(first, a, 3, every_n=2)
    rb = _sgd_like_steps(twin, b, 3, every_n=2)
    assert ra == rb
    assert all(torch.equal(first[n].weight, twin[n].weight) for n in first)


def test_a_saved_anchor_of_another_shape_is_refused():
    layers = _layers(_net())
    p = Projection()
    p(layers, C, "in a test", every_n=None, step=False, verify_finite=True)
    saved = p.state_dict()
    saved["anchors"]["5"]["weight"] = torch.zeros(2, 2)
    q = Projection()
    q.load_state_dict(saved)
    with pytest.raises(ValueError, match=r"anchor has shape \(2, 2\), the weight \(5, 16\)"):
        q(layers, C, "in a test", every_n=None, step=False, verify_finite=True)


def test_a_parametrized_weight_is_refused_by_name():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = nn.Linear(3, 2)
    parametrize.register_parametrization(layer, "weight", Double())
    with pytest.raises(RuntimeError, match="weight of head is not a plain parameter"):
        project({"head": layer}, C, "in a test")


def _with_nan(net: nn.Sequential, name: str) -> dict[str, nn.Module]:
    layers = _layers(net)
    with torch.no_grad():
        layers[name].weight[0, 0] = float("nan")
    return layers


def test_raise_if_non_finite_names_only_the_bad_layer():
    layers = _layers(_net())
    raise_if_non_finite(layers, "here")  # finite: nothing
    layers = _with_nan(_net(), "2")
    with torch.no_grad():
        layers["5"].weight[1, 1] = float("inf")
    with pytest.raises(RuntimeError, match=r"in layer\(s\) 2, 5 \(here\)"):
        raise_if_non_finite(layers, "here")


def test_check_finite_names_the_layer_with_a_nan_weight():
    check_finite(_layers(_net()), torch.ones(4), "step 1")
    with pytest.raises(RuntimeError, match=r"in layer\(s\) 3 \(after the optimizer step, step 1\)"):
        check_finite(_with_nan(_net(), "3"), None, "step 1")


def test_check_finite_tells_weights_too_large_for_float32_from_non_finite_ones():
    layers = _layers(_net())
    estimates = torch.tensor([1.0, float("inf"), 1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"estimate of layer\(s\) 2 is not finite although"):
        check_finite(layers, estimates, "step 1")
    # Finite weights whose sum overflows: no error.
    big = nn.Linear(4, 4)
    with torch.no_grad():
        big.weight.fill_(3e38)
    check_finite({"big": big}, None, "step 1")


def test_the_projection_names_a_non_finite_layer_when_the_check_is_off():
    net = _net()
    after = AfterStep()
    after.run(_layers(net), None, check=False, c=C, where="step 0")  # a first, finite step
    layers = _with_nan(net, "0")
    with pytest.raises(RuntimeError, match=r"in layer\(s\) 0 \(found by the constraint"):
        after.run(layers, None, check=False, c=C, where="step 1")


def test_the_projection_names_a_non_finite_layer_at_its_first_optimizer_step():
    layers = _with_nan(_net(), "0")
    with pytest.raises(RuntimeError, match=r"in layer\(s\) 0 \(found by the constraint"):
        AfterStep().run(layers, None, check=False, c=C, where="step 1")


def test_after_step_runs_from_the_optimizer_step_post_hook_until_removed():
    layers = _scaled(_net(), {"5": 10.0})
    params = [m.weight for m in layers.values()]
    opt = torch.optim.SGD(params, lr=0.0)
    after = AfterStep()
    calls = []

    def hook(optimizer, args, kwargs):
        calls.append(optimizer)
        after.run(layers, None, check=True, c=C, where="hook")

    after.register([opt], hook)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert calls == [opt] and _bounds(layers)["5"] <= C
    after.remove()
    opt.step()
    assert len(calls) == 1
