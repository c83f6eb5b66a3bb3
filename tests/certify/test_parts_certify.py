"""The certification tracker and its parts without a Trainer: radii of a linear classifier
against the closed form, certified accuracy from those radii, ``Run`` bookkeeping, the checked
bounds, the eval-mode forward and the option checks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lightning_spectral.certify import CertificationTracker, default_batch_to_input_target
from lightning_spectral.certify.bounds import checked_curvature, checked_lipschitz
from lightning_spectral.certify.forward import eval_logits, warn_if_low_precision
from lightning_spectral.certify.options import check_certify_method, check_input_scale
from lightning_spectral.certify.runs import Run
from lightning_spectral.functional.modules import evaluating

EPSILONS = [0.0, 0.05, 0.2]


def _classifier() -> nn.Sequential:
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(4, 3))


def _batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _closed_form(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The radii a linear classifier ``z = W x + b`` is certified at: the larger of
    ``(z_y - max_{j != y} z_j) / (sqrt(2) ||W||_2)`` and ``min_{j != y} (z_y - z_j) /
    ||W_y - W_j||`` (the exact distance to the decision boundary), float64."""
    w = net[0].weight.detach().double()
    z = net(x).detach().double()
    zy = z.gather(1, y[:, None])
    rows = []
    for n in range(len(y)):
        others = [j for j in range(3) if j != int(y[n])]
        gaps = torch.stack([zy[n, 0] - z[n, j] for j in others])
        pair = torch.stack([(zy[n, 0] - z[n, j]) / (w[int(y[n])] - w[j]).norm()
                            for j in others]).min()
        first = gaps.min() / (math.sqrt(2) * torch.linalg.matrix_norm(w, 2))
        rows.append(torch.maximum(first, pair))
    return torch.stack(rows)


@pytest.mark.parametrize("input_scale", [1.0, [0.5, 0.8]])
def test_tracker_radii_and_accuracy_of_a_linear_classifier(input_scale):
    net = _classifier()
    x, y = _batch()
    scale = min(input_scale) if isinstance(input_scale, list) else input_scale
    tracker = CertificationTracker(EPSILONS, input_scale=input_scale)
    tracker.start("validate")
    tracker.update("validate", net, (x[:40], y[:40]))
    tracker.update("validate", net, {"x": x[40:], "y": y[40:]})
    out = tracker.compute("validate")

    # Radii in raw-input units: the model's radii times the smallest std.
    oracle = _closed_form(net, x, y) * scale
    radii = tracker.runs["validate"].radius.radii()
    # Guaranteed bounds are rounded up: the radii are at most the closed form, barely below.
    assert bool((radii <= oracle.clamp_min(0) + 1e-12).all())
    torch.testing.assert_close(radii, oracle.clamp_min(0), rtol=1e-6, atol=1e-12)
    assert float(out["certified/radius"]) == pytest.approx(float(oracle.clamp_min(0).mean()),
                                                           rel=1e-6)
    correct = net(x).argmax(1) == y
    for e in EPSILONS:
        assert not bool(((oracle - e).abs() < 1e-6).any())  # no radius at an epsilon
        hand = float((correct & (oracle >= e)).double().mean())
        assert float(out[f"certified/acc@{e:g}"]) == pytest.approx(hand, abs=1e-7)
    assert float(out["certified/acc@0"]) == pytest.approx(float(correct.double().mean()))
    lip = float(torch.linalg.matrix_norm(net[0].weight.detach().double(), 2))
    assert float(out["lipschitz/network"]) == pytest.approx(lip / scale, rel=1e-6)
    assert float(out["lipschitz/network"]) >= lip / scale
    assert set(out) == {*(f"certified/acc@{e:g}" for e in EPSILONS), "certified/radius",
                        "lipschitz/network"}


def test_validation_and_test_never_mix_and_start_forgets_the_run():
    net = _classifier()
    x, y = _batch(16)
    tracker = CertificationTracker([0.0])
    tracker.update("test", net, (x, y))
    assert tracker.runs["test"].seen and not tracker.runs["validate"].seen
    out = tracker.compute("test")
    assert set(out) == {"test/certified/acc@0", "test/certified/radius",
                        "test/lipschitz/network"}
    assert tracker.runs["test"].lipschitz and not tracker.runs["validate"].lipschitz
    tracker.start("test")
    run = tracker.runs["test"]
    assert not run.seen and run.lipschitz == {} and run.pairwise == {}
    assert int(run.accuracy.total) == 0 and run.radius.radii().numel() == 0
    with pytest.raises(ValueError, match=r"stage must be one of \['test', 'validate'\]"):
        tracker.start("train")


def test_the_bound_is_computed_once_per_input_shape_and_run():
    calls = []

    def lipschitz_fn(module, shape):
        calls.append(shape)
        return torch.tensor(2.0)

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    tracker = CertificationTracker([0.1], lipschitz_fn=lipschitz_fn)
    for shape in [(4,), (4,), (2, 2), (4,)]:
        tracker.update("validate", net, (torch.randn(3, *shape), torch.tensor([0, 1, 2])))
    assert calls == [(4,), (2, 2)]
    assert tracker.runs["validate"].pairwise == {(4,): None, (2, 2): None}
    tracker.start("validate")
    tracker.update("validate", net, (torch.randn(3, 4), torch.tensor([0, 1, 2])))
    assert calls == [(4,), (2, 2), (4,)]  # weights may have changed between runs


def test_a_given_lipschitz_constant_gives_margin_over_sqrt2_l():
    net = _classifier()
    x, y = _batch(32)
    tracker = CertificationTracker([0.0], lipschitz_fn=lambda m, s: 3.0, input_scale=2.0)
    tracker.update("validate", net, (x, y))
    z = net(x).detach().double()
    top2 = z.topk(2, dim=1).values
    zy = z.gather(1, y[:, None])[:, 0]
    margin = torch.where(zy == top2[:, 0], zy - top2[:, 1], zy - top2[:, 0])
    oracle = (margin / (math.sqrt(2) * 3.0 / 2.0)).clamp_min(0)
    torch.testing.assert_close(tracker.runs["validate"].radius.radii(), oracle)
    assert float(tracker.compute()["lipschitz/network"]) == 1.5


def test_curvature_and_best_families_are_computed_for_a_smooth_network():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = _batch(16)
    tracker = CertificationTracker([0.0, 0.1], method="both")
    tracker.update("validate", net, (x.double(), y))
    out = tracker.compute()
    run = tracker.runs["validate"]
    first, second, best = (r.radii() for r in (run.radius, run.curvature_radius,
                                                  run.best_radius))
    torch.testing.assert_close(best, torch.maximum(first, second))
    assert {"certified_curvature/acc@0.1", "certified_best/radius", "curvature/network"} <= set(
        out)
    assert float(out["certified_best/acc@0.1"]) >= max(float(out["certified/acc@0.1"]),
                                                       float(out["certified_curvature/acc@0.1"]))


def test_run_bookkeeping_keeps_families_apart():
    run = Run([0.0, 0.5], "test/")
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    run.add(logits, y, torch.tensor([1.0, 0.25, -1.0]))
    run.add(logits, y, torch.tensor([0.1, 0.75, -1.0]), second_order=True)
    assert len(run.metrics()) == 6
    first = run.values([0.0, 0.5])
    assert set(first) == {"test/certified/acc@0", "test/certified/acc@0.5",
                          "test/certified/radius"}
    assert float(first["test/certified/acc@0"]) == pytest.approx(2 / 3)
    assert float(first["test/certified/acc@0.5"]) == pytest.approx(1 / 3)
    assert float(first["test/certified/radius"]) == pytest.approx(1.25 / 3)  # misclassified: 0
    second = run.values([0.0, 0.5], second_order=True)
    assert float(second["test/certified_curvature/acc@0.5"]) == pytest.approx(1 / 3)
    assert float(second["test/certified_curvature/radius"]) == pytest.approx(0.85 / 3)
    assert int(run.best_accuracy.total) == 0
    run.lipschitz[(2,)] = torch.tensor(1.0)
    run.seen = True
    run.reset()
    assert run.lipschitz == {} and not run.seen and int(run.accuracy.total) == 0
    assert int(run.curvature_accuracy.total) == 0


def test_checked_bounds_refuse_what_no_certificate_follows_from():
    net = _classifier()
    lip, k = checked_lipschitz(lambda m, s: (torch.tensor(2.0), torch.ones(3, 3)), net, (4,))
    assert lip.dtype == torch.float64 and lip.shape == () and k.dtype == torch.float64
    assert checked_lipschitz(lambda m, s: 1.5, net, (4,))[1] is None
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match=r"at input shape \(4,\) is .*not a finite number"):
            checked_lipschitz(lambda m, s, bad=bad: bad, net, (4,))
    with pytest.raises(ValueError, match="not a finite number"):
        checked_lipschitz(lambda m, s: (1.0, -torch.ones(3, 3)), net, (4,))

    def untraceable(module, shape):
        raise TypeError("no rule")

    with pytest.raises(TypeError, match=r"traces Sequential\.forward and could not bound it: no"):
        checked_lipschitz(untraceable, net, (4,))
    c, k = checked_curvature(lambda m, s: (torch.tensor([3.0]), torch.zeros(3, 3)), net, (4,))
    assert c.shape == () and float(c) == 3.0
    with pytest.raises(ValueError, match="curvature bound of Sequential"):
        checked_curvature(lambda m, s: (torch.tensor(1.0), torch.full((3, 3), math.nan)), net,
                          (4,))


def test_evaluating_restores_every_flag_and_eval_logits_refuses_non_logits():
    net = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 3))
    net.train()
    net[1].eval()  # a submodule with its own flag
    with evaluating(net):
        assert not any(m.training for m in net.modules())
    assert net.training and not net[1].training and net[2].training
    x = torch.randn(8, 4)
    logits = eval_logits(net, x)
    assert not logits.requires_grad and net.training
    with torch.no_grad(), evaluating(net):
        assert torch.equal(logits, net(x))  # dropout off
    with pytest.raises(TypeError, match=r"must return \(N, C\) logits"):
        eval_logits(nn.Flatten(0), x)


def test_low_precision_logits_warn_once_per_dtype_check():
    with pytest.warns(UserWarning, match="certifying torch.bfloat16 logits"):
        assert warn_if_low_precision(torch.bfloat16) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_low_precision(torch.float32) is False
        assert warn_if_low_precision(torch.float64) is False


def test_options_raise_on_bad_values_naming_the_argument():
    assert check_certify_method("method", "both") == "both"
    with pytest.raises(ValueError, match=r"^method must be 'lipschitz', 'curvature' or 'both', "
                                         r"got 'exact'$"):
        check_certify_method("method", "exact")
    assert check_input_scale([0.3, 0.2, 0.25]) == 0.2
    assert check_input_scale(2) == 2.0
    for bad in (0.0, -1.0, float("nan"), [0.5, 0.0], []):
        with pytest.raises(ValueError, match="input_scale"):
            check_input_scale(bad)
    with pytest.raises(ValueError, match="epsilons"):
        CertificationTracker([-0.1])
    with pytest.raises(ValueError, match="method must be"):
        CertificationTracker([0.1], method="exact")
    with pytest.raises(ValueError, match="input_scale"):
        CertificationTracker([0.1], input_scale=-2.0)


def test_default_batch_to_input_target_layouts():
    x, y = torch.zeros(2, 3), torch.ones(2)
    for batch in [(x, y), [x, y, "extra"], {"x": x, "y": y}, {"input": x, "target": y},
                  {"image": x, "label": y}]:
        got = default_batch_to_input_target(batch)
        assert got[0] is x and got[1] is y
    with pytest.raises(TypeError, match="cannot find \\(input, target\\) in a batch of type "
                                        "dict; pass batch_to_input_target"):
        default_batch_to_input_target({"data": x})
