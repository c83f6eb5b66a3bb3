"""LayerState and ShapeGroup without a Trainer: grouping, estimates against an SVD oracle,
checkpoints, lazy layers and input sizes."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from helpers.oracles import matricize, svd_norm
from torch import nn

from lightning_spectral.functional.bounds import layer_bounds
from lightning_spectral.regularizer.penalty import estimate
from lightning_spectral.regularizer.state import LayerState


def _net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    # Two layers of one grouped shape ("1" and "3") around one of another (a grouped conv),
    # so that the shape groups' concatenation is not the model order.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).to(dtype)


def _layers(net: nn.Sequential) -> dict[str, nn.Module]:
    return {str(i): m for i, m in enumerate(net) if isinstance(m, (nn.Conv2d, nn.Linear))}


def _ff_oracle(module: nn.Module) -> float:
    """``sqrt(prod k) * max_g min_A ||M_A(W_g)||_2`` from full SVDs (the bound the estimate
    approaches, per :func:`~lightning_spectral.functional.power.fantastic_four_estimate`)."""
    w = module.weight.detach().double()
    if w.ndim == 2:
        return float(svd_norm(w))
    g = getattr(module, "groups", 1)
    d = w.ndim - 2
    per_group = w.reshape(g, w.shape[0] // g, *w.shape[1:])
    subsets = [[i for i in range(d) if (m >> i) & 1] for m in range(1 << d)]
    norms = torch.stack([svd_norm(matricize(per_group, a, batch_dims=1)) for a in subsets])
    return math.sqrt(math.prod(w.shape[2:])) * float(norms.min(dim=0).values.max())


def _state(net: nn.Sequential, warmup: int = 0) -> LayerState:
    s = LayerState()
    s.attach(_layers(net), warmup)
    return s


def test_layers_of_one_grouped_shape_share_a_group_and_order_restores_model_order():
    s = _state(_net())
    assert s.ready and not s.lazy_pending
    assert [g.names for g in s.shape_groups] == [["0"], ["1", "3"], ["2"], ["5"]]
    assert s.shape_groups[1].shape == (2, 1, 4, 4, 3, 3)
    assert s.shape_groups[2].shape == (1, 2, 2, 2, 3, 3)  # groups=2 splits the outputs
    concatenated = [n for g in s.shape_groups for n in g.names]
    assert [concatenated[i] for i in s.order.tolist()] == list(s.layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_estimates_after_many_iterations_reach_the_fantastic_four_bound(dtype):
    net = _net(dtype)
    s = _state(net, warmup=300)
    with torch.no_grad():
        est = estimate(s, 20)
    assert est.dtype == dtype
    oracle = torch.tensor([_ff_oracle(m) for m in s.layers.values()], dtype=torch.float64)
    # From below (power iteration), and close after convergence, in model order.
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert bool((est.double() <= oracle * (1 + tol)).all()), (est, oracle)
    torch.testing.assert_close(est.double(), oracle, rtol=1e-4, atol=0)
    # Ungrouped layers: also the guaranteed Fantastic-Four value of the bound module
    # (padding factor 1 without an input size).
    for name in ("0", "1", "3"):
        with torch.no_grad():
            ff = float(layer_bounds(s.layers[name], max_cost=0)["fantastic_four"])
        assert float(est[list(s.layers).index(name)]) == pytest.approx(ff, rel=1e-4)


def test_estimates_without_warmup_start_below_the_bound():
    s = _state(_net(torch.float64), warmup=0)
    with torch.no_grad():
        est = estimate(s, 0)
    oracle = torch.tensor([_ff_oracle(m) for m in s.layers.values()], dtype=torch.float64)
    assert bool((est <= oracle * (1 + 1e-12)).all())
    assert bool((est < oracle * 0.999).any())  # random vectors: not converged


def test_vectors_are_unit_norm_per_layer_and_group_and_seeded_by_name():
    a, b = _state(_net()), _state(_net())
    for ga, gb in zip(a.shape_groups, b.shape_groups, strict=True):
        assert torch.equal(ga.u_cat, gb.u_cat) and torch.equal(ga.v_cat, gb.v_cat)
        for t in ga.us + ga.vs:
            per = t.reshape(t.shape[0] * ga.groups, -1).norm(dim=1)
            torch.testing.assert_close(per, torch.ones_like(per))
    # Same shape, different names: different starting vectors.
    g = a.shape_groups[1]
    assert not torch.equal(g.vectors(0)[0], g.vectors(1)[0])


def test_group_vectors_are_views_of_the_buffers():
    g = _state(_net()).shape_groups[1]
    g.vectors(1)[0].fill_(3.0)
    assert bool((g.us[0][1] == 3.0).all())
    assert bool((g.us[0][0] != 3.0).any())
    assert {n for n, _ in g.named_buffers()} == {"u_cat", "v_cat"}


def test_state_dict_round_trip_restores_the_vectors_bit_exactly():
    net = _net()
    src = _state(net, warmup=7)
    with torch.no_grad():
        estimate(src, 3)
    src.input_sizes["1"] = (6, 6)
    saved = src.state_dict()
    assert saved["version"] == 1 and set(saved["layers"]) == set(src.layers)

    dst = _state(copy.deepcopy(net), warmup=0)  # fresh vectors, other values
    assert not torch.equal(dst.shape_groups[0].u_cat, src.shape_groups[0].u_cat)
    dst.load_state_dict(saved)
    for gs, gd in zip(src.shape_groups, dst.shape_groups, strict=True):
        assert torch.equal(gs.u_cat, gd.u_cat) and torch.equal(gs.v_cat, gd.v_cat)
    assert dst.input_sizes == {"1": (6, 6)}
    with torch.no_grad():
        assert torch.equal(estimate(src, 2), estimate(dst, 2))


def test_a_state_loaded_before_the_layers_exist_is_applied_when_they_are_built():
    net = _net()
    src = _state(net, warmup=5)
    saved = src.state_dict()
    dst = LayerState()
    dst.load_state_dict(saved)
    assert not dst.ready and dst.state_dict() is saved  # kept as is until built
    dst.attach(_layers(copy.deepcopy(net)), warmup=0)
    for gs, gd in zip(src.shape_groups, dst.shape_groups, strict=True):
        assert torch.equal(gs.u_cat, gd.u_cat) and torch.equal(gs.v_cat, gd.v_cat)


def test_a_saved_vector_of_the_wrong_shape_is_refused_naming_the_layer():
    s = _state(_net())
    saved = s.state_dict()
    saved["layers"]["3"]["u"][0] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"layer 3: vector of shape \(7,\)"):
        _state(_net()).load_state_dict(saved)
    saved = s.state_dict()
    saved["layers"]["3"]["u"] = saved["layers"]["3"]["u"][:1]  # 2^d = 4 u's and 4 v's
    with pytest.raises(ValueError, match=r"layer 3: 5 vectors, the layer needs 8"):
        _state(_net()).load_state_dict(saved)


def test_missing_and_unknown_saved_layers_warn_and_keep_fresh_vectors():
    s = _state(_net())
    saved = s.state_dict()
    saved["layers"]["ghost"] = saved["layers"].pop("5")
    fresh = _state(_net())
    before = fresh.shape_groups[3].u_cat.clone()
    match = r"no saved vectors for \['5'\].*unknown layers \['ghost'\]"
    with pytest.warns(UserWarning, match=match):
        fresh.load_state_dict(saved)
    assert torch.equal(fresh.shape_groups[3].u_cat, before)


def test_reattaching_the_same_layers_keeps_the_iterated_vectors():
    net = _net()
    s = _state(net, warmup=0)
    with torch.no_grad():
        estimate(s, 5)
    kept = [g.u_cat.clone() for g in s.shape_groups]
    s.attach(_layers(net), warmup=50)  # same modules: no new vectors, no warm-up
    assert all(torch.equal(k, g.u_cat) for k, g in zip(kept, s.shape_groups, strict=True))
    other = _layers(_net())
    s.attach(other, warmup=0)  # other modules: new groups, fresh vectors
    assert all(g.holds(other) and not g.holds(_layers(net)) for g in s.shape_groups)
    assert not torch.equal(kept[0], s.shape_groups[0].u_cat)


def test_lazy_layers_wait_for_materialization():
    net = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 2))
    s = LayerState()
    s.attach({"0": net[0], "2": net[2]}, warmup=0)
    assert s.lazy_pending and not s.ready
    assert s.build_if_materialized(0) is False
    net(torch.randn(2, 3))
    assert s.build_if_materialized(0) is True
    assert s.ready and [g.names for g in s.shape_groups] == [["0"], ["2"]]


def test_a_lazy_layer_never_called_leaves_the_selection_after_a_batch():
    net = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))
    s = LayerState()
    s.attach({"0": net[0], "1": net[1]}, warmup=0)
    assert s.build_if_materialized(0) is False
    with pytest.warns(UserWarning, match="lazy layer.* 1 were not materialized"):
        assert s.build_if_materialized(0, after_batch=True) is True
    assert list(s.layers) == ["0"] and s.ready


def test_input_sizes_are_recorded_once_for_convolutions_only():
    net = _net()
    s = _state(net)
    s.record_input_sizes()
    net(torch.randn(2, 3, 4, 4))
    net(torch.randn(1, 3, 4, 4))
    assert s.input_sizes == {"0": (4, 4), "1": (2, 2), "2": (2, 2), "3": (2, 2)}
    s.remove_size_hooks()
    s.input_sizes.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(torch.randn(1, 3, 4, 4))
    assert s.input_sizes == {}
    assert s.state_dict()["input_sizes"] == {}
