"""Lipschitz-margin certificates against independent references (explicit affine maps)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_spectral.functional import certified_radius


def _reference_global(logits: torch.Tensor, target: torch.Tensor, lip: float) -> list[float]:
    out = []
    for z, y in zip(logits.double().tolist(), target.tolist(), strict=True):
        best_other = max(v for j, v in enumerate(z) if j != y)
        out.append((z[y] - best_other) / (math.sqrt(2.0) * lip))
    return out


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_global_radius_matches_loop_reference(num_classes: int) -> None:
    logits = torch.randn(64, num_classes)
    target = torch.randint(0, num_classes, (64,))
    radius = certified_radius(logits, target, 2.5)
    assert radius.dtype == torch.float64 and radius.shape == (64,)
    torch.testing.assert_close(radius, torch.tensor(_reference_global(logits, target, 2.5),
                                                    dtype=torch.float64))


def test_sign_follows_correctness_and_ties_give_zero() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    target = torch.tensor([0, 0, 0])
    radius = certified_radius(logits, target, torch.tensor(1.0))
    assert radius[0] > 0 and radius[1] < 0 and radius[2] == 0


def test_per_sample_constants_and_zero_constant() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([0, 0])
    radius = certified_radius(logits, target, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(radius, torch.tensor([2 / math.sqrt(2), -2 / (2 * math.sqrt(2))],
                                                    dtype=torch.float64))
    # A constant map: nothing can change a correct prediction, nothing can fix a wrong one.
    radius = certified_radius(logits, target, 0.0)
    assert radius[0] == math.inf and radius[1] == -math.inf


def _affine(num_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    b = torch.randn(num_classes, generator=g, dtype=torch.float64)
    return a, b


def _exact_boundary_distance(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor,
                             y: torch.Tensor) -> torch.Tensor:
    """For f(x) = A x + b the region where y wins is a polyhedron: the l2 distance to its
    boundary is min_j (f_y - f_j) / ||A_y - A_j||, computed here by a plain loop."""
    f = x @ a.T + b
    out = []
    for i in range(x.shape[0]):
        yi = int(y[i])
        out.append(min(float((f[i, yi] - f[i, j]) / torch.linalg.vector_norm(a[yi] - a[j]))
                       for j in range(a.shape[0]) if j != yi))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_radii_never_exceed_exact_distance_on_affine_maps(seed: int) -> None:
    a, b = _affine(5, 12, seed)
    x = torch.randn(200, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    logits = x @ a.T + b
    y = logits.argmax(1)  # correctly classified: positive distances
    exact = _exact_boundary_distance(a, b, x, y)
    lip = torch.linalg.matrix_norm(a, ord=2)
    glob = certified_radius(logits, y, lip)
    assert (glob > 0).all() and (glob <= exact * (1 + 1e-12)).all()
    # The refined certificate with the identity as features is exactly the distance.
    refined = certified_radius(logits, y, None, last_layer_weight=a, feature_lipschitz=1.0)
    torch.testing.assert_close(refined, exact, rtol=1e-10, atol=0)
    assert (refined >= glob * (1 - 1e-12)).all()
    # Both given: the better of the two.
    both = certified_radius(logits, y, lip, last_layer_weight=a, feature_lipschitz=1.0)
    torch.testing.assert_close(both, torch.maximum(glob, refined))


def test_refined_certificate_on_features() -> None:
    """f = W g(x) with g = 2 * identity: L_g = 2, distances halve."""
    a, b = _affine(4, 6, 7)
    x = torch.randn(50, 6, dtype=torch.float64)
    logits = (2 * x) @ a.T + b
    y = torch.randint(0, 4, (50,))
    exact = _exact_boundary_distance(2 * a, b, x, y)  # the map is x -> (2A) x + b
    refined = certified_radius(logits, y, None, last_layer_weight=a, feature_lipschitz=2.0)
    torch.testing.assert_close(refined, exact, rtol=1e-10, atol=1e-12)
    wrong = refined < 0
    assert torch.equal(wrong, logits.argmax(1) != y)


@pytest.mark.parametrize(
    ("logits", "target", "lip", "kwargs", "match"),
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), 1.0, {}, "shape"),
        (torch.randn(4, 1), torch.zeros(4, dtype=torch.long), 1.0, {}, "2 classes"),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), 1.0, {}, "target"),
        (torch.randn(4, 3), torch.zeros(4), 1.0, {}, "integer"),
        (torch.randn(4, 3), torch.full((4,), 3), 1.0, {}, r"\[0, 3\)"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), -1.0, {}, ">= 0"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), float("nan"), {}, "finite"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(3), {}, "shape"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), None, {}, "required"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 1.0,
         {"last_layer_weight": torch.randn(3, 2)}, "both"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 1.0,
         {"last_layer_weight": torch.randn(2, 5), "feature_lipschitz": 1.0}, r"\(C, D\)"),
    ],
)
def test_invalid_arguments_are_refused(logits, target, lip, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        certified_radius(logits, target, lip, **kwargs)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_logits_are_refused(bad: float) -> None:
    """An infinite logit would give an infinite margin: 'certified' at every radius."""
    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    logits[1, 0] = bad
    with pytest.raises(ValueError, match="logits.*not finite.*row"):
        certified_radius(logits, torch.tensor([0, 0]), 1.0)
    with pytest.raises(ValueError, match="logits.*not finite"):
        certified_radius(logits, torch.tensor([0, 0]), None,
                         last_layer_weight=torch.eye(2), feature_lipschitz=1.0)


def test_float16_overflow_is_refused_and_finite_half_logits_are_exact() -> None:
    big = torch.tensor([[7e4, 0.0]]).half()  # overflows float16 to +inf
    with pytest.raises(ValueError, match="not finite"):
        certified_radius(big, torch.tensor([0]), 1.0)
    logits = torch.randn(30, 4).half()
    target = torch.randint(0, 4, (30,))
    # Computed in float64 from the half values, which float64 holds exactly.
    torch.testing.assert_close(certified_radius(logits, target, 0.7),
                               certified_radius(logits.double(), target, 0.7), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lipschitz_constant": torch.tensor(math.nan)}, "lipschitz_constant.*finite"),
        ({"lipschitz_constant": torch.tensor([1.0, -1.0])}, "lipschitz_constant.*>= 0"),
        ({"lipschitz_constant": math.inf}, "lipschitz_constant.*finite"),
        ({"lipschitz_constant": None, "last_layer_weight": torch.eye(2),
          "feature_lipschitz": math.nan}, "feature_lipschitz.*finite"),
        ({"lipschitz_constant": None, "last_layer_weight": torch.eye(2),
          "feature_lipschitz": -0.5}, "feature_lipschitz.*>= 0"),
        ({"lipschitz_constant": None, "last_layer_weight": torch.eye(2)[None],
          "feature_lipschitz": 1.0}, r"\(C, D\)"),
        ({"lipschitz_constant": None, "last_layer_weight": torch.eye(2),
          "feature_lipschitz": torch.ones(2, 1)}, "feature_lipschitz.*shape"),
    ],
)
def test_bad_constants_are_refused(kwargs, match) -> None:
    logits, target = torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=match):
        certified_radius(logits, target, **kwargs)


def test_one_element_constant_counts_as_a_scalar() -> None:
    logits, target = torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1])
    torch.testing.assert_close(certified_radius(logits, target, torch.tensor([2.0])),
                               certified_radius(logits, target, 2.0))


@pytest.mark.parametrize(
    ("logits", "target", "match"),
    [
        (torch.ones(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), "floating"),
        (torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, dtype=torch.long), "floating"),
        (torch.randn(2, 3), torch.tensor([True, False]), "integer"),
        (torch.randn(2, 3), torch.tensor([0, -1]), r"\[0, 3\)"),
        (torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long), r"\(N,\)"),
    ],
)
def test_bad_logits_and_targets_are_refused(logits, target, match) -> None:
    with pytest.raises(ValueError, match=match):
        certified_radius(logits, target, 1.0)


def test_ties_are_never_certified_above_zero() -> None:
    """With tied top logits the prediction can flip under any perturbation."""
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    radius = certified_radius(logits, torch.tensor([0, 1]), 1.0)
    assert (radius == 0).all()
    refined = certified_radius(logits, torch.tensor([0, 1]), None,
                               last_layer_weight=torch.eye(3), feature_lipschitz=1.0)
    assert (refined <= 0).all()
