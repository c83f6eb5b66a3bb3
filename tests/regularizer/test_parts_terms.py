"""The curvature and certified-training terms and the configuration, without a Trainer:
hand-written formulas for the replayed programs, the schedule and the certified losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.oracles import operator_norm
from torch import nn

import lightning_spectral as ls
from lightning_spectral.regularizer.certified import CertifiedTerm, certified_loss, scheduled_eps
from lightning_spectral.regularizer.config import RegularizerConfig, inert_options
from lightning_spectral.regularizer.curvature import CurvatureTerm, needs_curvature
from lightning_spectral.regularizer.state import LayerState

# ---------------------------------------------------------------- curvature


def _mlp() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _hand_curvature(n1: float, n2: float) -> float:
    """``Linear -> tanh -> Linear``: ``C = n2 h n1^2`` (``(L, C)`` through ``A``: ``(|A| L,
    |A| C)``; through the activation: ``(g L, h L^2 + g C)``; the input is ``(1, 0)``)."""
    _, h = ls.activation_curvature(nn.Tanh())
    return n2 * h * n1**2


def test_prepare_and_replay_equal_the_curvature_bound_on_the_same_norms():
    net = _mlp()
    layers = {"0": net[0], "2": net[2]}
    term = CurvatureTerm()
    term.prepare(net, layers, (4,))
    # At the recorded bounds: the network bound itself, bit for bit.
    assert torch.equal(term.replay(term.tape.bounds), ls.network_curvature_bound(net, (4,)))
    exact = [float(torch.linalg.matrix_norm(m.weight.detach(), 2)) for m in layers.values()]
    torch.testing.assert_close(term.tape.bounds, torch.tensor(exact, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    # At other norms: the walk with those norms as layer bounds, and the hand formula.
    norms = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    value = term.replay(norms)

    def layer_bound(module, size):
        return norms.detach()[0] if module is net[0] else norms.detach()[1]

    walked = ls.network_curvature_bound(net, (4,), layer_bound=layer_bound)
    assert float(value.detach()) == pytest.approx(float(walked), rel=1e-12)
    assert float(value.detach()) == pytest.approx(_hand_curvature(2.0, 3.0), rel=1e-7)
    value.backward()  # d/dn1 = 2 n2 h n1, d/dn2 = h n1^2
    _, h = ls.activation_curvature(nn.Tanh())
    torch.testing.assert_close(norms.grad, torch.tensor([12 * h, 4 * h], dtype=torch.float64))


def test_replay_for_and_its_refusal_before_recording():
    term = CurvatureTerm()
    assert term.replay_for(0.0) is None
    with pytest.raises(RuntimeError, match="prepare_curvature"):
        term.replay_for(0.5)
    net = _mlp()
    term.prepare(net, {"0": net[0], "2": net[2]}, (4,))
    assert term.replay_for(0.5) == term.replay


def test_a_saved_recording_is_replayed_for_the_same_layers_and_shape_only():
    net = _mlp()
    layers = {"0": net[0], "2": net[2]}
    term = CurvatureTerm()
    assert term.state_dict(layers) is None
    term.prepare(net, layers, (4,))
    saved = term.state_dict(layers)
    assert saved["shape"] == [4] and saved["layers"] == ["0", "2"]
    with torch.no_grad():
        net[2].weight.mul_(10)  # a new recording would see this; the loaded one does not
    norms = torch.tensor([1.5, 0.5], dtype=torch.float64)
    resumed = CurvatureTerm()
    resumed.load_state_dict(saved)
    resumed.prepare(net, layers, (4,))
    assert torch.equal(resumed.replay(norms), term.replay(norms))
    assert torch.equal(resumed.tape.bounds, term.tape.bounds)
    other = CurvatureTerm()
    other.load_state_dict(saved)
    other.prepare(net, {"2": net[2], "0": net[0]}, (4,))  # another order: recorded anew
    assert not torch.equal(other.tape.bounds, term.tape.bounds)


def test_settle_refuses_lazy_layers_and_non_smooth_networks():
    lazy = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 2))
    state = LayerState()
    state.attach({"0": lazy[0]}, 0)
    with pytest.raises(ValueError, match="materialized"):
        CurvatureTerm().settle(lazy, state, (4,), record=True, check=False)
    relu = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    state = LayerState()
    state.attach({"0": relu[0]}, 0)
    term = CurvatureTerm()
    with pytest.raises(ls.NonSmoothOperationError):
        term.settle(relu, state, (4,), record=False, check=True)
    assert not term.settled
    term.settle(relu, state, (4,), record=False, check=False)
    assert term.settled and term.tape is None
    term.reset()
    assert not term.settled


@pytest.mark.parametrize(("beta", "certifying", "method", "expected"), [
    (0.0, False, "lipschitz", False), (0.1, False, "lipschitz", True),
    (0.0, True, "lipschitz", False), (0.0, True, "curvature", True),
    (0.0, False, "both", False), (0.0, True, "both", True),
])
def test_needs_curvature(beta, certifying, method, expected):
    eps = [0.1] if method != "lipschitz" else None
    cfg = RegularizerConfig(curvature_beta=beta, certify_method=method, certify_epsilons=eps)
    assert needs_curvature(cfg, certifying) is expected


# ---------------------------------------------------------------- certified training


@pytest.mark.parametrize(("step", "warmup", "expected"), [
    (0, 0, 0.5), (100, 0, 0.5), (0, 4, 0.125), (1, 4, 0.25), (2, 4, 0.375), (3, 4, 0.5),
    (10, 4, 0.5), (0, 1, 0.5), (0, -1, 0.5),
])
def test_scheduled_eps_rises_linearly_over_the_warmup(step, warmup, expected):
    assert scheduled_eps(0.5, step, warmup) == pytest.approx(expected, abs=1e-15)


LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-0.5, 1.5, 1.4]],
                      dtype=torch.float64)
TARGET = torch.tensor([0, 2, 1])
K = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.5], [2.0, 0.5, 0.0]], dtype=torch.float64)
EPS = 0.3


def _hand_bottom(n: int) -> float:
    y = int(TARGET[n])
    return max(float(LOGITS[n, j]) + EPS * float(K[y, j]) for j in range(3) if j != y)


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _hand(kind: str) -> float:
    total = 0.0
    for n in range(3):
        z, y = LOGITS[n].tolist(), int(TARGET[n])
        if kind == "gloro":  # CE over [z, z_bot]
            total -= _log_softmax([*z, _hand_bottom(n)])[y]
        elif kind == "trades":  # KL(softmax(z) || softmax([z, z_bot])[:C])
            log_p, log_q = _log_softmax(z), _log_softmax([*z, _hand_bottom(n)])[:3]
            total += sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True))
        else:  # CE(z + eps max K (1 - onehot(y)))
            m = EPS * float(K.max())
            total -= _log_softmax([v + (0 if j == y else m) for j, v in enumerate(z)])[y]
    return total / 3


@pytest.mark.parametrize("kind", ["gloro", "trades", "margin"])
def test_certified_loss_kinds_match_the_hand_written_formulas(kind):
    got = certified_loss(kind, LOGITS, TARGET, EPS, K)
    assert got.ndim == 0
    assert float(got.detach()) == pytest.approx(_hand(kind), rel=1e-6)


def test_certified_loss_with_one_bound_for_every_pair():
    k = torch.tensor(1.5, dtype=torch.float64)
    full = torch.full((3, 3), 1.5, dtype=torch.float64)
    for kind in ("gloro", "trades", "margin"):
        assert float(certified_loss(kind, LOGITS, TARGET, EPS, k)) == pytest.approx(
            float(certified_loss(kind, LOGITS, TARGET, EPS, full)), rel=1e-12)


def _prepared(warmup: int = 200) -> tuple[nn.Sequential, CertifiedTerm]:
    net = _mlp()
    term = CertifiedTerm()
    term.prepare(net, {"0": net[0], "2": net[2]}, (4,), warmup)
    return net, term


def test_certified_norms_lipschitz_and_pairwise_against_the_exact_norms():
    net, term = _prepared()
    exact = torch.stack([torch.linalg.matrix_norm(m.weight.detach(), 2) for m in term.modules])
    norms = term.norms(20)
    assert norms.dtype == torch.float64 and norms.requires_grad
    torch.testing.assert_close(norms.detach(), exact, rtol=1e-6, atol=0)
    n1, n2 = exact.tolist()
    lip = term.program.lipschitz(norms.detach())
    assert float(lip) == pytest.approx(n1 * n2, rel=1e-6)  # tanh is 1-Lipschitz
    w = net[2].weight.detach()
    hand = torch.minimum(math.sqrt(2) * lip, torch.cdist(w, w) * n1)
    hand.fill_diagonal_(0)
    torch.testing.assert_close(term.program.pairwise(norms.detach()), hand, rtol=1e-6,
                               atol=1e-12)


def test_certified_term_loss_on_the_captured_logits():
    net, term = _prepared()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    term.capture.install(net)
    logits = net(x)
    term.target = y
    value = term.loss("gloro", 0.2, 3, input_scale=0.5)
    norms = term.norms(0).detach()
    expected = certified_loss("gloro", logits.float(), y, 0.2,
                              (term.program.pairwise(norms) / 0.5).float())
    assert value.dtype == torch.float32
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    value.backward()  # through the logits and the estimates to the weights
    assert all(float(m.weight.grad.abs().sum()) > 0 for m in term.modules)
    assert float(term.last_lipschitz) == pytest.approx(float(term.program.lipschitz(norms)),
                                                       rel=1e-6)
    with pytest.raises(RuntimeError, match="training_step did not call"):
        term.loss("gloro", 0.2, 1, 1.0)  # the capture was taken: nothing captured now


def test_training_term_is_the_weighted_loss_at_the_scheduled_radius():
    net, term = _prepared()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    cfg = RegularizerConfig(certified_eps=0.4, certified_weight=2.0, certified_warmup_steps=4,
                            certified_loss="margin", n_power_iterations=1)
    assert term.training_term(net, RegularizerConfig(), 0) is None  # no certified_eps
    term.prepare_batch(net, _attached(net), (x, y), cfg)
    logits = net(x)
    got = term.training_term(net, cfg, step=1)
    margin = 0.2 * term.program.pairwise(term.norms(0).detach()).max()
    expected = 2.0 * F.cross_entropy(
        logits.float() + float(margin.detach()) * (1 - F.one_hot(y, 3).float()), y)
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def _attached(net: nn.Sequential) -> LayerState:
    state = LayerState()
    state.attach({"0": net[0], "2": net[2]}, 0)
    return state


def test_certified_vectors_round_trip_through_the_checkpoint():
    net, term = _prepared(warmup=7)
    saved = term.state_dict()
    assert set(saved) == {"0", "2"}
    resumed = CertifiedTerm()
    resumed.load_state_dict(saved)
    resumed.prepare(net, {"0": net[0], "2": net[2]}, (4,), warmup=0)
    fresh = CertifiedTerm()
    fresh.prepare(net, {"0": net[0], "2": net[2]}, (4,), warmup=0)
    for a, b, c in zip(term.vectors, resumed.vectors, fresh.vectors, strict=True):
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert CertifiedTerm().state_dict() is None


def test_a_convolution_gets_a_vector_at_the_input_size_the_walk_saw():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(48, 3))
    term = CertifiedTerm()
    term.prepare(net, {"0": net[0], "3": net[3]}, (2, 4, 4), warmup=300)
    assert term.program.input_sizes[0] == (4, 4)
    assert [tuple(v.shape) for v in term.vectors] == [(1, 2, 4, 4), (1, 48)]
    # The conv's operator norm at 4x4, from its explicit matrix.
    exact = float(operator_norm(net[0], (4, 4)))
    assert float(term.norms(20)[0].detach()) == pytest.approx(exact, rel=1e-4)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(beta=-1), r"beta"), (dict(n_power_iterations=0), r"n_power_iterations"),
    (dict(reduction="median"), r"reduction must be 'sum', 'max' or 'mean', got 'median'"),
    (dict(constraint=0), r"constraint"), (dict(target=-0.5), r"target"),
    (dict(certify_epsilons=0.1), r"certify_epsilons must be a list"),
    (dict(certify_method="both"), r"certify_method='both' certifies at certify_epsilons"),
    (dict(certify_method="exact", certify_epsilons=[0.1]), r"certify_method must be"),
    (dict(certified_loss="hinge"), r"certified_loss must be .* got 'hinge'"),
    (dict(certified_eps=0.0), r"certified_eps"), (dict(input_scale=0), r"input_scale"),
    (dict(curvature_input_shape=[3, 0]), r"curvature_input_shape"),
    (dict(curvature_input_shape="3x4"), r"curvature_input_shape must be a non-empty list"),
    (dict(batch_to_input_target=3), r"batch_to_input_target must be callable"),
    (dict(log_per_layer="yes"), r"log_per_layer"),
])
def test_config_refuses_bad_values_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegularizerConfig(**kwargs)


def test_config_normalizes_per_channel_input_scale_to_its_minimum():
    assert RegularizerConfig(input_scale=[0.5, 0.25, 0.3]).input_scale == 0.25
    assert RegularizerConfig(curvature_input_shape=(3, 8, 8)).curvature_input_shape == [3, 8, 8]


def test_inert_options_name_each_option_and_what_it_needs():
    assert inert_options(RegularizerConfig()) == []
    found = inert_options(RegularizerConfig(target=1.0, constraint_tight_every_n_steps=5,
                                            certified_weight=0.5, input_scale=0.5))
    assert found == [
        "target=1.0 has no effect without beta > 0 (target shapes the penalty)",
        "constraint_tight_every_n_steps=5 has no effect without constraint",
        "certified_weight=0.5 has no effect without certified_eps",
        "input_scale=0.5 has no effect without certify_epsilons or certified_eps",
    ]
    assert inert_options(RegularizerConfig(beta=0.1, target=1.0, constraint=1.0,
                                           constraint_tight_every_n_steps=5)) == []
